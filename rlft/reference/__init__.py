"""The reference server: per-token log-probabilities of the frozen initial policy, batched, over replicas."""

from rlft.reference.config import ReferenceConfig
from rlft.reference.server import ReferenceGroup, ReferenceWorker

__all__ = ["ReferenceConfig", "ReferenceGroup", "ReferenceWorker"]
