"""Environments for tests/test_envs.py, importable by path (``tests.env_fixtures:Name``) in Ray actors too."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time

from rlft.envs import Environment, StepResult, ToolEnvironment


class Countdown(Environment):
    """Replies to each of the policy's turns until its ``turns``-th, then ends with reward 1; 0.25 per reply."""

    def __init__(self, turns: int = 3):
        self.turns, self.turn = turns, 0

    def step(self, action):
        self.turn += 1
        if self.turn >= self.turns:
            return StepResult(reward=1.0, done=True)
        return StepResult([{"role": "user", "content": f"again {self.turn}"}], reward=0.25)


class Faulty(Environment):
    """Does what the row's ``behaviour`` says on the first step: ok, raise, hang, garbage, nan, exit, or hog (a
    regex that holds the GIL, so no thread can time it out: only the pool's deadline on the worker can)."""

    def reset(self, item):
        self.behaviour = item["behaviour"]
        if self.behaviour == "raise_on_reset":
            raise ValueError("no such level")
        return item["messages"]

    def step(self, action):
        if self.behaviour == "raise":
            raise RuntimeError("boom")
        if self.behaviour == "hang":
            time.sleep(3600)
        if self.behaviour == "garbage":
            return "not a StepResult"
        if self.behaviour == "nan":
            return StepResult(reward=math.nan, done=True)
        if self.behaviour == "exit":
            os._exit(3)
        if self.behaviour == "hog":
            re.fullmatch(r"(a|a)*b", "a" * 64)
        return StepResult(reward=1.0, done=True)


class Adder(ToolEnvironment):
    tools = {"add": lambda a, b: a + b}


_openai_client = None


def two_call_agent(item, base_url, api_key):
    """A black-box agent: asks the policy, answers its reply with a tool result, asks again; rewards 0.5. Its
    sessions share one OpenAI client (a new client costs ~30 ms of CPU; ``with_options`` ~0.1 ms)."""
    global _openai_client
    if _openai_client is None:
        from openai import OpenAI

        _openai_client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    client = _openai_client.with_options(base_url=base_url, api_key=api_key)
    messages = list(item["messages"])
    reply = client.chat.completions.create(model="policy", messages=messages).choices[0].message
    messages += [{"role": "assistant", "content": reply.content}, {"role": "tool", "content": "ok"}]
    client.chat.completions.create(model="policy", messages=messages)
    return 0.5


class AsyncEcho(Environment):
    """An asyncio environment: ``step`` awaits I/O (a sleep), records how many steps wait at once, and echoes the
    action for ``turns`` turns; the row's ``behaviour`` ``hang`` awaits forever."""

    waiting = 0
    most_waiting = 0

    async def reset(self, item):
        self.item, self.turn = item, 0
        return item["messages"]

    async def step(self, action):
        cls = type(self)
        cls.waiting += 1
        cls.most_waiting = max(cls.most_waiting, cls.waiting)
        try:
            await asyncio.sleep(3600 if self.item.get("behaviour") == "hang" else 0.2)
        finally:
            cls.waiting -= 1
        self.turn += 1
        return StepResult([{"role": "user", "content": f"echo {action['content']}"}], reward=1.0,
                          done=self.turn >= 2)
