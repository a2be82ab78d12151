"""Errors that name what is wrong, shared by every module (kept free of imports so any module can use them)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted path of the offending field."""


class DataError(ValueError):
    """A problem with one row (or one file) of training data.

    ``str()`` reads ``"{where}: {field}: {problem}"``, e.g. ``"train.jsonl:12: messages[2].role: ..."``; a problem
    with a whole file has no field and reads ``"{where}: {problem}"``.
    """

    def __init__(self, where: str, field: str, problem: str):
        self.where = where
        self.field = field
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.field:
            return f"{self.where}: {self.field}: {self.problem}"
        return f"{self.where}: {self.problem}"


class GraderFailureRateError(RuntimeError):
    """A grader failed on too many of a step's samples (``graders.max_error_rate``); the job stops."""


class RestartBudgetError(RuntimeError):
    """A role's actors died more often than ``ray.max_actor_restarts`` allows; the job stops."""


class LearnerFailedError(RuntimeError):
    """A learner actor died. The ranks share one sharded optimizer state, so the job stops; the last checkpoint
    is intact and ``checkpoint.resume=auto`` continues from it."""


class WeightSyncError(RuntimeError):
    """Weights did not reach a consumer: a peer of the weight transfer failed or did not answer in time. The
    message names the peer (``rollout worker 1``, ``learner rank 0``)."""


class PeerTimeoutError(TimeoutError):
    """A role's actor did not answer a call in time; the message names the role and the actor."""
