"""Learners: N DeepSpeed ZeRO ranks training one model, behind the ``LearnerGroup`` facade."""

from rlft.learner.group import LearnerGroup, StepResult
from rlft.learner.worker import LearnerSpec, LearnerWorker, Loss

__all__ = ["LearnerGroup", "LearnerSpec", "LearnerWorker", "Loss", "StepResult"]
