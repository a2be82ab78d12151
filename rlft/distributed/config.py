"""Configuration of the Ray side of a job (``ray.*``): the cluster it starts or joins, placement, deadlines and
restarts. Every default of it lives here; no Ray import, so the config loader can read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlft.errors import ConfigError


@dataclass
class RayConfig:
    # Empty starts a local Ray cluster, unless the job runs on one already (``rlft submit``, or RAY_ADDRESS set);
    # otherwise an address such as ``auto``, ``HEAD:6379`` or ``ray://head:10001``.
    address: str = ""
    # Logical CPUs of the local cluster; 0 means the machine's core count (raised to what the job needs).
    num_cpus: int = 0
    # The local cluster's dashboard: off, and on loopback when turned on (anyone who reaches it can run code).
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    # How each role's actors are placed on nodes: ``pack`` (few nodes), ``spread`` (many), or their strict
    # forms (all on one node / each on its own node, or the job does not start).
    placement_strategy: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    # How long to wait for the cluster to place the job's actors before giving up with a clear error.
    placement_timeout_s: float = 120.0
    # Deadline of every remote call inside a step's phases (generate, reference, old_logprobs, update, ...; weight
    # syncs and graders keep their own): past it the job writes every actor's stacks to <output_dir>/stacks/ and
    # fails with an error naming the phase and the actors that did not answer.
    call_timeout_s: float = 1800.0
    # Per role (rollout workers, reference replicas, grader workers): how many dead actors may be replaced during
    # the run, their work redone; one death more stops the job.
    max_actor_restarts: int = 3
    # How many times a learner (or critic) actor may die during the run: every rank of the group is started again
    # (ZeRO state is sharded), the latest checkpoint of the run is loaded (or the starting weights, before the first
    # checkpoint) and the steps since are redone in the same job; one death more stops the job.
    max_learner_restarts: int = 1
    # Debugging: run every role in the driver's own process, without Ray, so ``breakpoint()`` works anywhere
    # (one learner only).
    local_mode: bool = False


def validate_ray_config(cfg: RayConfig, path: str = "ray") -> None:
    """Checks that name the field (``ray.call_timeout_s: ...``); run before anything starts."""
    must_be_positive = ("placement_timeout_s", "call_timeout_s")
    for name in ("num_cpus", "placement_timeout_s", "call_timeout_s", "max_actor_restarts", "max_learner_restarts"):
        value = getattr(cfg, name)
        if name in must_be_positive and value <= 0:
            raise ConfigError(f"{path}.{name}: must be positive, got {value}")
        if value < 0:
            raise ConfigError(f"{path}.{name}: must not be negative, got {value}")
