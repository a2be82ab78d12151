"""Exact match, the one definition every part of rlft scores answers with: the ``exact_match`` grader, held-out
evaluation, the rollout accuracy of a step, and the embedded tasks. Imports nothing."""

from __future__ import annotations


def exact_match(completion: str, answer: str, case_sensitive: bool = True) -> bool:
    """``completion`` equals ``answer`` once both are stripped of surrounding whitespace (and case-folded unless
    ``case_sensitive``)."""
    completion, answer = completion.strip(), answer.strip()
    if not case_sensitive:
        completion, answer = completion.casefold(), answer.casefold()
    return completion == answer
