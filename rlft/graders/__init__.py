"""Graders: score sampled responses (exact match, math-verify, regex, user functions) in a pool of actors.

    validate_graders(cfg.graders)                   # before any actor starts: regexes compile, functions import
    pool = GraderPool(cfg.graders)                  # num_grader_workers actors; local=True runs in this process
    result = pool.grade([GradeRequest(prompt.messages, completion, prompt.extra), ...])
    result.rewards, result.scores["math"], result.metrics()

Importing the package loads only the configuration (``rlft.config`` needs it, and must not pull in Ray or
math-verify); the graders and the pool are imported on first use of their names.
"""

import importlib

from rlft.graders.config import GraderConfig, GraderItemConfig, validate_graders

# name -> the module that defines it, imported when the name is first looked up (PEP 562).
_LAZY = {
    "GradeRequest": "rlft.graders.graders",
    "exact_match": "rlft.graders.exact",
    "math_match": "rlft.graders.graders",
    "regex_match": "rlft.graders.graders",
    "GradeHandle": "rlft.graders.pool",
    "GradeResult": "rlft.graders.pool",
    "GraderPool": "rlft.graders.pool",
    "GraderWorker": "rlft.graders.pool",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "GradeHandle",
    "GradeRequest",
    "GradeResult",
    "GraderConfig",
    "GraderItemConfig",
    "GraderPool",
    "GraderWorker",
    "exact_match",
    "math_match",
    "regex_match",
    "validate_graders",
]
