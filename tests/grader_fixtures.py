"""User grader functions for tests/test_graders.py, called TRL-style: ``fn(prompts, completions, **extra_columns)``.

Imported by path (``"tests.grader_fixtures:answer_in_completion"``) in the test process and in grader actors.
"""

from __future__ import annotations

import math
import os
import re
import time

# Longer than any timeout the tests use, short enough that an abandoned in-process thread ends soon after.
SLEEP_S = 5.0


def answer_in_completion(prompts: list[list[dict]], completions: list[str], answer: list, **extra) -> list[float]:
    """1.0 where the ``answer`` column's value appears in the completion."""
    return [float(str(a) in c) for c, a in zip(completions, answer)]


def bonus_column(prompts: list[list[dict]], completions: list[str], bonus: list, **extra) -> list[float]:
    """The ``bonus`` column, 0 where a row lacks it (None); checks that prompts arrive as message lists."""
    assert all(p[-1]["role"] == "user" for p in prompts)
    return [0.0 if b is None else b for b in bonus]


def raises(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    raise RuntimeError("a bug in a user grader")


def sleeps(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    time.sleep(SLEEP_S)
    return [1.0] * len(completions)


def returns_nan(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    return [math.nan] * len(completions)


def returns_strings(prompts: list[list[dict]], completions: list[str], **extra) -> list[str]:
    return ["1.0"] * len(completions)


def returns_too_few(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    return [1.0]


def misbehaves_on_request(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    """1.0 per sample, unless a completion asks otherwise: ``"sleep"`` sleeps past the timeout, ``"hog"`` hangs
    in a regex that holds the GIL (no thread can time it out), ``"exit"`` ends the worker's process."""
    if "sleep" in completions:
        time.sleep(SLEEP_S)
    if "hog" in completions:
        re.fullmatch(r"(a|a)*b", "a" * 64)
    if "exit" in completions:
        os._exit(1)
    return [1.0] * len(completions)


_held: list[bytes] = []


def leaks(prompts: list[list[dict]], completions: list[str], **extra) -> list[float]:
    """Keeps 256 MiB more on every call (touched, so resident)."""
    _held.append(b"x" * (256 * 2**20))
    return [1.0] * len(completions)
