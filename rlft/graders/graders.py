"""The graders: each turns a sample (prompt messages, completion text, the item's extra fields) into a score.

- ``exact_match``: 1.0 when the completion is the item's answer, ignoring surrounding whitespace (and case, if
  asked); 0.0 otherwise.
- ``math``: 1.0 when math-verify finds the completion's answer mathematically equal to the item's
  (``"0.5"``, ``"1/2"`` and ``"\\frac{1}{2}"`` agree); 0.0 otherwise.
- ``regex``: 1.0 when a pattern matches the completion (a format check); 0.0 otherwise.
- ``python_function``: a user function, called TRL-style on a whole batch:
  ``fn(prompts, completions, **extra_columns) -> list of numbers``.

``build_grader`` turns one config item into a ``SampleGrader`` (one sample per call, so a sample that breaks it
costs only itself) or a ``BatchGrader`` (one call per batch). Graders do not police their output: the worker runs
them under a deadline and turns exceptions and values that are not finite numbers into counted fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlft.graders.exact import exact_match
from rlft.graders.config import GraderItemConfig, api_key_of, load_function, load_spec
from rlft.graders.openai_spec import parse_spec, sample_of
from rlft.graders.sandbox import PythonGraderLimits

# A reference answer without one of these is wrapped in ``$...$`` so math-verify reads it as LaTeX
# (bare ``x+1`` does not parse; ``$x+1$`` does).
_MATH_DELIMITERS = ("$", "\\(", "\\[")


@dataclass
class GradeRequest:
    """One sample to grade."""

    messages: list[dict]  # the prompt, as chat messages
    completion: str  # the policy's response text
    extra: dict  # the prompt row's other fields (``RFTPrompt.extra``), e.g. ``answer``


@dataclass(frozen=True)
class SampleGrader:
    """A grader called once per sample."""

    name: str
    score: Callable[[GradeRequest], Any]


@dataclass(frozen=True)
class BatchGrader:
    """A grader called once per batch with the batch's extra field names; returns one value per request."""

    name: str
    score: Callable[[list[GradeRequest], list[str]], Any]


Grader = SampleGrader | BatchGrader


def math_match(completion: str, answer: str) -> float:
    """1.0 when math-verify finds the completion's answer equal to ``answer``; else 0.0.

    math-verify's own timeouts use ``signal.alarm``, which fails outside a process's main thread, so they are off
    here: graders run in worker threads under the pool's deadline instead. A reference answer that does not parse
    raises ``ValueError`` (a data problem, counted as an error) rather than silently scoring every sample 0.
    """
    gold_text = answer if any(d in answer for d in _MATH_DELIMITERS) else f"${answer}$"
    from math_verify import parse, verify  # sympy: loaded by the processes that grade math only

    gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"reference answer {answer!r} does not parse as math")
    return float(verify(gold, parse(completion, parsing_timeout=None), timeout_seconds=None))


def regex_match(completion: str, pattern: re.Pattern, fullmatch: bool) -> float:
    """1.0 when ``pattern`` matches all of ``completion`` (``fullmatch``) or somewhere in it; else 0.0."""
    found = pattern.fullmatch(completion) if fullmatch else pattern.search(completion)
    return float(found is not None)


def build_grader(
    item: GraderItemConfig,
    limits: PythonGraderLimits | None = None,
    concurrency: int = 8,
    reward_models: dict | None = None,
) -> Grader:
    """The grader an (already validated) config item describes; ``limits`` bound sandboxed Python graders,
    ``concurrency`` is how many requests a judge grader keeps open, ``reward_models`` holds the
    ``RewardModelGroup`` of each reward_model grader by name."""
    limits = limits or PythonGraderLimits()
    if item.type == "exact_match":
        return SampleGrader(
            item.name, lambda r: float(exact_match(r.completion, answer_of(r, item.answer_field), item.case_sensitive))
        )
    if item.type == "math":
        return SampleGrader(item.name, lambda r: math_match(r.completion, answer_of(r, item.answer_field)))
    if item.type == "regex":
        pattern = re.compile(item.pattern)
        fullmatch = item.regex_mode == "fullmatch"
        return SampleGrader(item.name, lambda r: regex_match(r.completion, pattern, fullmatch))
    if item.type == "python_function":
        return BatchGrader(item.name, trl_style(load_function(item.function)))
    if item.type == "reward_model":
        group = (reward_models or {})[item.name]
        return BatchGrader(
            item.name,
            lambda requests, _: group.score(
                [[*r.messages, {"role": "assistant", "content": r.completion}] for r in requests]
            ),
        )
    if item.type == "openai":
        spec = parse_spec(load_spec(item), limits, "spec", item.endpoint, api_key_of(item), concurrency)
        return BatchGrader(item.name, spec_style(spec))
    raise ValueError(f"unknown grader type {item.type!r}")


def answer_of(request: GradeRequest, answer_field: str) -> str:
    """The item's reference answer as text (JSON numbers such as ``82`` become ``"82"``)."""
    if answer_field not in request.extra:
        raise KeyError(f"the item has no field {answer_field!r} (it has: {', '.join(request.extra) or 'none'})")
    return str(request.extra[answer_field])


def trl_style(fn: Callable) -> Callable[[list[GradeRequest], list[str]], Any]:
    """Wrap a TRL-style reward function: ``fn(prompts, completions, **extra_columns)`` over a batch.

    The columns are the given ``extra_fields`` (those of the whole batch, however it was split over workers), one
    value per request, None where a request lacks the field.
    """

    def score(requests: list[GradeRequest], extra_fields: list[str]) -> Any:
        prompts = [r.messages for r in requests]
        completions = [r.completion for r in requests]
        columns = {name: [r.extra.get(name) for r in requests] for name in extra_fields}
        return fn(prompts, completions, **columns)

    return score


def extra_fields_of(requests: list[GradeRequest]) -> list[str]:
    """Every extra field name that some request has, in order of first appearance."""
    return list(dict.fromkeys(name for r in requests for name in r.extra))


def spec_style(grader) -> Callable[[list[GradeRequest], list[str]], list]:
    """Adapt an OpenAI-spec grader (``rlft.graders.openai_spec``) to a batch of requests: ``sample`` from the
    completion, ``item`` from the row's extra fields. Failures come back as ``GraderFailure`` values."""

    def score(requests: list[GradeRequest], extra_fields: list[str]) -> list:
        return grader.score([sample_of(r.completion) for r in requests], [dict(r.extra) for r in requests])

    return score
