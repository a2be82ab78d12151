"""Names every process shares: the phases of a step and the roles of a job, one enum each, and the weight
transports.

The controller times its phases with them, every role actor times its engine work under the phase that work belongs
to, and ``rlft bench`` reads both back (``time/<phase>_seconds`` and ``engine/<phase>_seconds``). Placement,
restarts and fault metrics name roles with ``Role``. The rollout config names a ``WeightTransport`` that
``rlft/distributed/weight_sync.py`` implements. Imports nothing, so any process (and the config) can use it.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal


class _Name(str, Enum):
    """A name that prints as itself (``f"{Role.ROLLOUT}"`` is ``rollout``) and equals its string."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Phase(_Name):
    """Phases of a step, in the order a step runs them (``rlft bench`` keeps this order)."""

    DATA = "data"
    GENERATE = "generate"
    # Multi-turn rollouts: the environments' time inside the rollout workers (resets, steps, observations).
    ENV = "env"
    GRADE = "grade"
    PAIRS = "pairs"
    ADVANTAGES = "advantages"
    OLD_LOGPROBS = "old_logprobs"
    VALUES = "values"
    REFERENCE = "reference"
    UPDATE = "update"
    SYNC = "sync"
    # Outside a step: the reference pass of a whole preference data set, and scoring sequences for evaluation.
    REFERENCE_CACHE = "reference_cache"
    SCORE = "score"


class Role(_Name):
    """Roles of a job: each a group of actors with its own resources (``rlft/distributed/placement.py``)."""

    LEARNERS = "learners"
    CRITIC = "critic"
    ROLLOUT = "rollout"
    ENVS = "envs"  # multi-turn environments: each rollout worker's own pool (not in a placement group)
    GRADERS = "graders"
    REFERENCE = "reference"


# How new weights reach the rollout workers (``rollout.weight_transport``): the transports of
# ``rlft/distributed/weight_sync.py``.
WeightTransport = Literal["object_store", "collective", "cuda_ipc"]
