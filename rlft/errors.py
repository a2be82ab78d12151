"""Errors that name what is wrong, shared by every module (kept free of imports so any module can use them)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted path of the offending field."""


class RestartBudgetError(RuntimeError):
    """A role's actors died more often than ``ray.max_actor_restarts`` allows; the job stops."""


class LearnerFailedError(RuntimeError):
    """A learner actor died. The ranks share one sharded optimizer state, so the job stops; the last checkpoint
    is intact and ``checkpoint.resume=auto`` continues from it."""
