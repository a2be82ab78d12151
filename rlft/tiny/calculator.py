"""The embedded tool-use task: 3-digit sums, with an ``add`` tool the model may call before it answers.

A transcript that uses the tool (the chat template renders the call in the Hermes format)::

    user       What is 347+589?
    assistant  <tool_call>{"name": "add", "arguments": {"a": 347, "b": 589}}</tool_call>
    tool       936
    assistant  936

The SFT demonstrations come from a teacher who calls the tool in ``TOOL_USE_FRACTION`` of them and answers from
memory in the rest. The tiny model copies digits well and adds 3-digit numbers badly, so after SFT its answers are
right mostly when it happens to call the tool; held-out success then rises under RL as the policy learns from the
grader that calling the tool pays (``configs/grpo_tool_tiny.yaml``).
"""

from __future__ import annotations

import json
import random

from rlft.envs.tools import ToolEnvironment
from rlft.tiny.tasks import ARITHMETIC_TEMPLATE, MAX_DRAWS_PER_EXAMPLE

TASK = "calculator"
OPERAND_RANGE = (100, 999)
# The share of the SFT demonstrations that call the tool; the rest answer directly (and correctly).
TOOL_USE_FRACTION = 0.3
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "The sum of two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def make_examples(num: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``num`` RFT prompt rows (``messages``, ``answer``, ``tools``) with distinct prompts, none in ``exclude``."""
    rng = random.Random(seed)
    seen, rows = set(exclude), []
    for _ in range(num * MAX_DRAWS_PER_EXAMPLE):
        if len(rows) == num:
            break
        a, b = rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE)
        prompt = ARITHMETIC_TEMPLATE.format(a=a, b=b)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}], "answer": str(a + b), "task": TASK,
                     "tools": [ADD_TOOL]})
    if len(rows) < num:
        raise ValueError(f"task {TASK!r} yielded only {len(rows)} distinct prompts of {num} requested")
    return rows


def operands(example: dict) -> tuple[int, int]:
    a, b = example["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split("+")
    return int(a), int(b)


def sft_row(example: dict, use_tool: bool) -> dict:
    """An SFT chat row in OpenAI format: the tool call, its result and the answer; or the answer alone."""
    answer = {"role": "assistant", "content": example["answer"]}
    if not use_tool:
        return {"messages": [*example["messages"], answer], "tools": example["tools"]}
    a, b = operands(example)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
    return {
        "messages": [
            *example["messages"],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": str(a + b)},
            answer,
        ],
        "tools": example["tools"],
    }


def sft_rows(examples: list[dict], rng: random.Random) -> list[dict]:
    return [sft_row(example, rng.random() < TOOL_USE_FRACTION) for example in examples]


def add(a: int, b: int) -> int:
    if not (isinstance(a, int) and isinstance(b, int)):
        raise TypeError(f"add takes two integers, got {a!r} and {b!r}")
    return a + b


class Calculator(ToolEnvironment):
    """The task's environment (``envs.name: rlft.tiny.calculator:Calculator``): runs ``add`` calls; a turn without
    a tool call is the answer, which the graders score."""

    tools = {"add": add}
