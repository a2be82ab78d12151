"""Graders: score sampled responses (exact match, math-verify, regex, user functions) in a pool of actors.

    validate_graders(cfg.graders)                   # before any actor starts: regexes compile, functions import
    pool = GraderPool(cfg.graders)                  # num_grader_workers actors; local=True runs in this process
    result = pool.grade([GradeRequest(prompt.messages, completion, prompt.extra), ...])
    result.rewards, result.scores["math"], result.metrics()
"""

from rlft.graders.config import GraderConfig, GraderItemConfig, validate_graders
from rlft.graders.graders import GradeRequest, exact_match, math_match, regex_match
from rlft.graders.pool import GradeHandle, GraderPool, GradeResult, GraderWorker

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
