"""The reference server: per-token log-probabilities of the frozen initial policy, batched, over replicas.

Importing the package loads only ``ReferenceConfig`` (``rlft.config`` needs it, and must not pull in Ray or
torch); ``ReferenceGroup`` and ``ReferenceWorker`` are imported from ``rlft.reference.server`` on first use.
"""

import importlib

from rlft.reference.config import ReferenceConfig

_LAZY = {"ReferenceGroup": "rlft.reference.server", "ReferenceWorker": "rlft.reference.server"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["ReferenceConfig", "ReferenceGroup", "ReferenceWorker"]
