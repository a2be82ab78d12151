"""Settings of the reference server (every default here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReferenceConfig:
    # Replicas share the rows of each request; each holds a whole copy of the model.
    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    # Rows per forward pass inside a replica.
    micro_batch_size: int = 32
    dtype: str = "float32"
    # Put replica i in learner i's placement bundle, sharing its node (and GPUs, with fractional
    # ``num_gpus_per_replica``) instead of taking its own; needs num_replicas <= learner.num_learners.
    colocate_with_learners: bool = False
