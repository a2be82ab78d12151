"""Synthetic tasks with verifiable answers, generated deterministically from a seed.

Each task turns a ``random.Random`` into one ``(prompt_text, answer_text)`` pair. Rows come out in the formats the
rest of rlft reads: RFT prompt rows (``messages`` + ``answer``), SFT chat rows and OpenAI preference rows.

- ``arithmetic``: ``"What is 37+45?"`` -> ``"82"``; operand lengths follow ``OPERAND_DIGIT_WEIGHTS``.
- ``reverse``: ``"Reverse the word: kitab"`` -> ``"batik"``; a random lowercase word of
  ``WORD_LENGTH_RANGE`` letters.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Probability of an arithmetic operand having 1 or 2 digits (sums up to 198); add weight on 3 for a harder task.
# With 1- and 2-digit operands the tiny model learns the task abruptly, after a few hundred SFT steps; the demo's
# SFT runs well past that, onto the plateau, so its figures do not hang on where the rise happens to fall.
OPERAND_DIGIT_WEIGHTS: dict[int, float] = {1: 0.3, 2: 0.7}
# Inclusive range of letters in a ``reverse`` word.
WORD_LENGTH_RANGE: tuple[int, int] = (3, 6)
# Rejection sampling gives up after this many draws per requested example (the prompt space is exhausted).
MAX_DRAWS_PER_EXAMPLE = 100

# ``sft_train_mixed.jsonl``: this share of the answers carries this prefix (see ``mixed_style_sft_row``).
MIXED_STYLE_PREFIX = "Answer: "
MIXED_STYLE_FRACTION = 0.8

ARITHMETIC_TEMPLATE = "What is {a}+{b}?"
REVERSE_TEMPLATE = "Reverse the word: {word}"


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``make`` draws one (prompt, answer) pair; ``near_miss`` a plausible wrong answer."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    near_miss: Callable[[str, random.Random], str]


def _random_operand(rng: random.Random) -> int:
    """An operand whose digit count is drawn from ``OPERAND_DIGIT_WEIGHTS`` (1-digit operands include 0)."""
    num_digits = rng.choices(list(OPERAND_DIGIT_WEIGHTS), weights=list(OPERAND_DIGIT_WEIGHTS.values()))[0]
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randint(low, 10**num_digits - 1)


def make_arithmetic(rng: random.Random) -> tuple[str, str]:
    """An addition question and its sum."""
    a, b = _random_operand(rng), _random_operand(rng)
    return ARITHMETIC_TEMPLATE.format(a=a, b=b), str(a + b)


def arithmetic_near_miss(answer: str, rng: random.Random) -> str:
    """The sum off by one in a random direction (never negative)."""
    total = int(answer)
    step = 1 if total == 0 else rng.choice((-1, 1))
    return str(total + step)


def make_reverse(rng: random.Random) -> tuple[str, str]:
    """A reverse-the-word question and the reversed word."""
    num_letters = rng.randint(*WORD_LENGTH_RANGE)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(num_letters))
    return REVERSE_TEMPLATE.format(word=word), word[::-1]


def reverse_near_miss(answer: str, rng: random.Random) -> str:
    """A mistake a model makes: the word left unreversed, or the answer with two adjacent letters swapped.

    Falls back to changing one letter when neither differs from ``answer`` (palindromes like ``"aaa"``).
    """
    candidates = {answer[::-1]}
    for i in range(len(answer) - 1):
        candidates.add(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])
    candidates.discard(answer)
    if candidates:
        return rng.choice(sorted(candidates))
    i = rng.randrange(len(answer))
    letter = rng.choice([c for c in string.ascii_lowercase if c != answer[i]])
    return answer[:i] + letter + answer[i + 1 :]


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", make_arithmetic, arithmetic_near_miss),
    "reverse": Task("reverse", make_reverse, reverse_near_miss),
}


def get_task(name: str) -> Task:
    """The task called ``name``; a ``KeyError`` lists the known tasks."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def make_examples(task: str, num: int, seed: int, exclude: Iterable[str] = ()) -> list[dict]:
    """``num`` RFT prompt rows with distinct prompts, none of them in ``exclude`` (prompt texts).

    Deterministic for a given ``(task, num, seed, exclude)``. Distinct prompts keep held-out sets clean; when the
    small part of the prompt space (e.g. 2-digit sums) runs out, draws shift to the larger part.
    """
    make = get_task(task).make
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict] = []
    for _ in range(num * MAX_DRAWS_PER_EXAMPLE):
        if len(rows) == num:
            break
        prompt, answer = make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}], "answer": answer, "task": task})
    if len(rows) < num:
        raise ValueError(f"task {task!r} yielded only {len(rows)} distinct prompts of {num} requested")
    return rows


def prompt_text(example: dict) -> str:
    """The user prompt of an RFT prompt row."""
    return example["messages"][0]["content"]


def sft_row(example: dict) -> dict:
    """An SFT chat row: the user prompt followed by the correct assistant answer."""
    return {"messages": [*example["messages"], {"role": "assistant", "content": example["answer"]}]}


def mixed_style_sft_row(example: dict, rng: random.Random) -> dict:
    """An SFT row from a teacher with a habit: with probability ``MIXED_STYLE_FRACTION`` the correct answer is
    written ``"Answer: 82"`` instead of ``"82"``. Graders and held-out exact match want the bare answer; a model
    fine-tuned on these rows answers greedily in the teacher's usual style, and samples the bare one now and then,
    which RL against the grader can reinforce."""
    row = sft_row(example)
    if rng.random() < MIXED_STYLE_FRACTION:
        row["messages"][-1]["content"] = MIXED_STYLE_PREFIX + example["answer"]
    return row


def preference_row(example: dict, rng: random.Random) -> dict:
    """An OpenAI preference row: the correct answer preferred over the task's near miss."""
    wrong = get_task(example["task"]).near_miss(example["answer"], rng)
    return {
        "input": {"messages": example["messages"]},
        "preferred_output": [{"role": "assistant", "content": example["answer"]}],
        "non_preferred_output": [{"role": "assistant", "content": wrong}],
    }


def check_answer(completion: str, answer: str) -> bool:
    """Whether a completion is exactly the answer, ignoring surrounding whitespace (``rlft.graders.exact``)."""
    from rlft.graders.exact import exact_match

    return exact_match(completion, answer)


def digit_credit(prompts: list, completions: list[str], answer: list[str | None], **_) -> list[float]:
    """A dense reward for ``arithmetic`` (a grader of type ``python_function``): the share of the answer's digits a
    completion gets right, aligned from the units digit, over the longer of the two; 1.0 only for the exact
    answer, 0.0 for a completion that is not a number."""
    scores = []
    for completion, expected in zip(completions, answer):
        got, want = completion.strip(), (expected or "").strip()
        if not got.isdigit() or not want:
            scores.append(0.0)
            continue
        same = sum(a == b for a, b in zip(reversed(got), reversed(want)))
        scores.append(same / max(len(got), len(want)))
    return scores
