"""Multi-turn rollouts, token-in/token-out.

A trajectory's tokens are never re-tokenised: each policy turn appends the exact ids the sampler produced (with
their sampler log-probabilities), and each observation appends the ids of its messages rendered once by the chat
template (``observation_ids``). The learner trains on exactly these ids; ``mask`` is 1 on the policy's tokens
only, so the loss and the log-probabilities line up token by token with what was sampled.

The turns of all a call's trajectories are generated together: turn 1 of every trajectory in one engine call, then
each trajectory's environment step, then turn 2 of the trajectories still going, and so on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from rlft.envs.config import EnvConfig
from rlft.envs.runner import EnvPool
from rlft.envs.tools import parse_tool_calls
from rlft.data.samples import Completion, Sample

# Why a trajectory ended: its environment said done (``done``); no room for another turn in
# ``envs.max_total_tokens``; ``envs.max_turns`` turns; or its environment failed (``env_failure``).
EndReason = str
_SEED_LIMIT = 2**62


@dataclass
class Trajectory:
    key: int
    item: dict
    seed: int
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0 on observation tokens
    mask: list[int] = field(default_factory=list)  # 1 on the policy's tokens
    messages: list[dict] = field(default_factory=list)  # the transcript
    final_text: str = ""  # the policy's last turn: what graders score
    finish_reason: str = "stop"  # of the policy's last turn
    env_reward: float = 0.0
    num_turns: int = 0
    num_tool_calls: int = 0
    policy_version: int = -1  # the oldest weights any of its turns was sampled with (-1: none yet)
    failure: str = ""  # "", "error", "timeout" or "invalid" (rlft/envs/runner.py)
    failure_reason: str = ""
    end: EndReason = ""

    @property
    def done(self) -> bool:
        return bool(self.end)

    def add_turn(self, completion: Completion) -> dict:
        """Append the policy's turn as sampled; returns it as an assistant message, its tool calls parsed."""
        self.ids += completion.token_ids
        self.logprobs += completion.logprobs
        self.mask += [1] * len(completion.token_ids)
        self.num_turns += 1
        self.final_text, self.finish_reason = completion.text, completion.finish_reason
        content, calls = parse_tool_calls(completion.text)
        message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        self.messages.append(message)
        self.num_tool_calls += len(calls)
        return message

    def add_observation(self, messages: list[dict], tokenizer, tools: list[dict] | None) -> None:
        """Append ``messages`` answering the last turn, rendered once (``observation_ids``); not trained on. A turn
        cut at ``max_new_tokens`` is first closed with the eos token, as context."""
        obs = observation_ids(tokenizer, messages, tools)
        if not self.ids or self.ids[-1] != tokenizer.eos_token_id:
            obs = [tokenizer.eos_token_id] + obs
        self.ids += obs
        self.logprobs += [0.0] * len(obs)
        self.mask += [0] * len(obs)
        self.messages += messages

    def to_sample(self, prompt_index: int, policy_version: int) -> Sample:
        return Sample(
            prompt_index=prompt_index,
            prompt_token_ids=self.prompt_ids,
            response_token_ids=self.ids,
            response_logprobs=self.logprobs,
            response_text=self.final_text,
            finish_reason="length" if self.finish_reason == "length" else "stop",
            policy_version=policy_version,
            response_mask=self.mask,
            num_turns=self.num_turns,
            num_tool_calls=self.num_tool_calls,
            env_reward=self.env_reward,
            env_failure=self.failure,
            messages=self.messages,
        )


# A finished exchange, whose rendering an observation's rendering is cut from; and the renderings already made, by
# (chat template, eos token, tools, messages): trajectories of one prompt start alike and often see the same replies.
_PROBE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
_RENDERED: dict[tuple[str, str, str, str], list[int]] = {}
_MAX_RENDERED = 65_536


def observation_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The ids that follow the policy's end-of-turn token when ``messages`` answer it: the chat template's text
    between an assistant turn's eos and the next assistant header, tokenised once. For ChatML that is
    ``"\\n<|im_start|>tool\\n...<|im_end|>\\n<|im_start|>assistant\\n"``."""
    eos = tokenizer.eos_token
    key = (str(tokenizer.chat_template), eos, json.dumps(tools, sort_keys=True), json.dumps(messages))
    if key in _RENDERED:
        return list(_RENDERED[key])
    before = tokenizer.apply_chat_template(_PROBE, tools=tools, tokenize=False)
    after = tokenizer.apply_chat_template(_PROBE + messages, tools=tools, tokenize=False, add_generation_prompt=True)
    end_of_turn = before.rfind(eos)
    if end_of_turn < 0 or not after.startswith(before[: end_of_turn + len(eos)]):
        raise ValueError("the chat template does not end an assistant turn with the eos token, or renders earlier "
                         "turns differently once later ones follow; token-in/token-out needs both")
    ids = list(tokenizer(after[end_of_turn + len(eos):], add_special_tokens=False)["input_ids"])
    if len(_RENDERED) >= _MAX_RENDERED:
        _RENDERED.clear()
    _RENDERED[key] = ids
    return list(ids)


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt's ids (``rlft.data.tokenize.tokenize_prompt``), rendered once per distinct prompt."""
    from rlft.data.tokenize import tokenize_prompt

    key = (str(tokenizer.chat_template), "prompt", json.dumps(tools, sort_keys=True), json.dumps(messages))
    if key not in _RENDERED:
        if len(_RENDERED) >= _MAX_RENDERED:
            _RENDERED.clear()
        _RENDERED[key] = tokenize_prompt(messages, tokenizer, tools)
    return list(_RENDERED[key])


def turn_seed(seed: int, turn: int) -> int:
    return (seed * 1_000_003 + turn) % _SEED_LIMIT


def run_trajectories(
    generate: Callable[[list[list[int]], list[int]], list[Completion]],
    tokenizer,
    envs: EnvPool,
    cfg: EnvConfig,
    items: list[dict],
    keys: list[int],
    seeds: list[int],
    max_new_tokens: int,
    max_total_tokens: int,
) -> list[Trajectory]:
    """One trajectory per item. ``generate(prompts, seeds)`` samples one completion of each prompt; ``keys`` name
    the trajectories' environments in ``envs``; ``seeds`` seed their turns."""
    trajs = [Trajectory(key, item, seed) for key, item, seed in zip(keys, items, seeds)]
    for t, outcome in zip(trajs, envs.reset(keys, items)):
        messages = outcome.result.messages if outcome.result else list(t.item.get("messages", []))
        t.messages = list(messages)
        t.prompt_ids = prompt_ids(tokenizer, t.messages, t.item.get("tools"))
        if outcome.failure:
            t.failure, t.failure_reason, t.end = outcome.failure, outcome.reason, "env_failure"
    for turn in range(cfg.max_turns):
        for t in trajs:
            if not t.done and len(t.prompt_ids) + len(t.ids) + max_new_tokens > max_total_tokens:
                t.end = "max_total_tokens"
        active = [t for t in trajs if not t.done]
        if not active:
            break
        completions = generate([t.prompt_ids + t.ids for t in active], [turn_seed(t.seed, turn) for t in active])
        actions = [t.add_turn(c) for t, c in zip(active, completions)]
        outcomes = envs.step([t.key for t in active], actions)
        for t, outcome in zip(active, outcomes):
            if outcome.failure:
                t.failure, t.failure_reason, t.end = outcome.failure, outcome.reason, "env_failure"
                continue
            result = outcome.result
            t.env_reward += result.reward
            if result.done:
                t.end = "done"
            elif turn + 1 < cfg.max_turns and result.messages:
                t.add_observation(result.messages, tokenizer, t.item.get("tools"))
    for t in trajs:
        t.end = t.end or "max_turns"
        while t.mask and not t.mask[-1]:  # an observation the policy never answered trains nothing
            t.ids.pop(), t.logprobs.pop(), t.mask.pop()
    envs.close(keys)
    return trajs
