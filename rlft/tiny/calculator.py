"""The embedded tool-use task: products of two 3-digit numbers, with a ``multiply`` tool the model may call before
it answers.

A transcript that uses the tool (the chat template renders the call in the Hermes format)::

    user       What is 347*589?
    assistant  <tool_call>{"name": "multiply", "arguments": {"a": 347, "b": 589}}</tool_call>
    tool       204383
    assistant  204383

The SFT demonstrations come from a teacher who calls the tool in ``TOOL_USE_FRACTION`` of them and answers from
memory in the rest. The tiny model learns to copy digits, and never learns to multiply 3-digit numbers from a few
thousand examples (it does learn 3-digit sums, so the task is products): after SFT its held-out answers are right
when it calls the tool, and almost never otherwise. Held-out success then rises under RL as the policy learns from
the grader that calling the tool pays (``configs/grpo_tool_tiny.yaml``).
"""

from __future__ import annotations

import json
import random

from rlft.envs.tools import ToolEnvironment
from rlft.tiny.tasks import MAX_DRAWS_PER_EXAMPLE

TASK = "calculator"
PROMPT_TEMPLATE = "What is {a}*{b}?"
OPERAND_RANGE = (100, 999)
# The share of the SFT demonstrations that call the tool; the rest answer directly (and correctly).
TOOL_USE_FRACTION = 0.3
MULTIPLY_TOOL = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "The product of two integers.",
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
        prompt = PROMPT_TEMPLATE.format(a=a, b=b)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}], "answer": str(a * b), "task": TASK,
                     "tools": [MULTIPLY_TOOL]})
    if len(rows) < num:
        raise ValueError(f"task {TASK!r} yielded only {len(rows)} distinct prompts of {num} requested")
    return rows


def operands(example: dict) -> tuple[int, int]:
    a, b = example["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split("*")
    return int(a), int(b)


def sft_row(example: dict, use_tool: bool) -> dict:
    """An SFT chat row in OpenAI format: the tool call, its result and the answer; or the answer alone."""
    answer = {"role": "assistant", "content": example["answer"]}
    if not use_tool:
        return {"messages": [*example["messages"], answer], "tools": example["tools"]}
    a, b = operands(example)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "multiply", "arguments": json.dumps({"a": a, "b": b})}}
    return {
        "messages": [
            *example["messages"],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "name": "multiply", "content": str(a * b)},
            answer,
        ],
        "tools": example["tools"],
    }


def sft_rows(examples: list[dict], rng: random.Random) -> list[dict]:
    return [sft_row(example, rng.random() < TOOL_USE_FRACTION) for example in examples]


def multiply(a: int, b: int) -> int:
    if not (isinstance(a, int) and isinstance(b, int)):
        raise TypeError(f"multiply takes two integers, got {a!r} and {b!r}")
    return a * b


class Calculator(ToolEnvironment):
    """The task's environment (``envs.name: rlft.tiny.calculator:Calculator``): runs ``multiply`` calls; a turn
    without a tool call is the answer, which the graders score."""

    tools = {"multiply": multiply}
