"""Talking to a running job: ``rlft scale JOB --rollout-workers N``.

An RL job on Ray starts one small named actor, ``JobControl`` (``rlft-job:<job id>`` in the ``rlft`` namespace).
``rlft scale`` leaves a request with it; the controller takes requests between steps (never inside one), applies
them and reports its status back, which ``rlft scale`` prints.

The job id is ``RLFT_JOB_ID`` (``rlft submit`` sets it to the Ray job's submission id), else ``logging.run_name``,
else the name of ``logging.output_dir``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
from tqdm import tqdm

from rlft.config import Config, ConfigError
from rlft.distributed.placement import ClusterFitError, RoleDemand, check_fit, free_node_resources
from rlft.names import Role

logger = logging.getLogger(__name__)

NAMESPACE = "rlft"


class JobControl:
    """Requests for a running job, and its last reported status."""

    def __init__(self):
        self._requests: dict = {}
        self._status: dict = {}

    def request(self, rollout_workers: int) -> dict:
        self._requests["rollout_workers"] = rollout_workers
        return self._status

    def take_requests(self) -> dict:
        requests, self._requests = self._requests, {}
        return requests

    def report(self, status: dict) -> None:
        self._status = status

    def status(self) -> dict:
        return self._status


def job_id(cfg: Config) -> str:
    return os.environ.get("RLFT_JOB_ID") or cfg.logging.run_name or Path(cfg.logging.output_dir).name


def actor_name(job: str) -> str:
    return f"rlft-job:{job}"


def start_control(cfg: Config):
    """The job's ``JobControl`` actor, or None (with a warning) when another running job already has its name."""
    job = job_id(cfg)
    try:
        handle = ray.remote(JobControl).options(name=actor_name(job), namespace=NAMESPACE, num_cpus=0).remote()
        ray.get(handle.status.remote())
    except ValueError:
        logger.warning("another running job is named %r; `rlft scale` cannot reach this one (set logging.run_name)", job)
        return None
    return handle


class LiveControl:
    """The controller's side of ``rlft scale``: between steps it takes the job's requests and applies them to the
    rollout group, then reports the job's status. Without Ray (or when another job holds the name) it does
    nothing."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.handle = None if cfg.ray.local_mode else start_control(cfg)
        if self.handle is not None:
            # The job's own cluster: what `rlft scale --address` takes to reach it from another shell.
            address = ray.get_runtime_context().gcs_address
            tqdm.write(f"job {job_id(cfg)}: `rlft scale {job_id(cfg)} --rollout-workers N --address {address}` "
                       "resizes the rollout")

    def apply_requests(self, rollout) -> None:
        """Resize ``rollout`` as ``rlft scale`` asked. Added workers that do not fit the cluster's free resources
        are refused with a warning; the job goes on with the workers it has."""
        if self.handle is None:
            return
        wanted = ray.get(self.handle.take_requests.remote(), timeout=60).get("rollout_workers")
        current = rollout.num_workers
        if not wanted or wanted == current:
            return
        if wanted > current:
            rc = self.cfg.rollout
            added = [RoleDemand(Role.ROLLOUT.value, wanted - current, rc.num_cpus_per_worker, rc.num_gpus_per_worker,
                                "rlft scale --rollout-workers")]
            envs = self.cfg.envs
            if envs.name and envs.num_workers:  # each rollout worker brings its own environment actors
                added.append(RoleDemand(Role.ENVS.value, (wanted - current) * envs.num_workers,
                                        envs.num_cpus_per_worker, 0.0, "rlft scale --rollout-workers, envs.num_workers"))
            try:
                check_fit(added, free_node_resources())
            except ClusterFitError as err:
                tqdm.write(f"rollout workers stay at {current}: {err}")
                return
        started = time.perf_counter()
        rollout.resize(wanted)
        tqdm.write(f"rollout workers: {current} -> {wanted} ({time.perf_counter() - started:.1f} s)")

    def report(self, status: dict) -> None:
        if self.handle is not None:
            self.handle.report.remote(status)

    def shutdown(self) -> None:
        if self.handle is not None:
            ray.kill(self.handle)
            self.handle = None


def running_jobs() -> list[str]:
    from ray.util import list_named_actors

    prefix = actor_name("")
    return sorted(
        a["name"][len(prefix):]
        for a in list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
    )


def request_scale(job: str, rollout_workers: int) -> dict:
    """Leave a rollout-worker count for ``job`` on the connected cluster; returns the job's last status."""
    if rollout_workers < 1:
        raise ConfigError(f"--rollout-workers: need at least 1, got {rollout_workers}")
    try:
        handle = ray.get_actor(actor_name(job), namespace=NAMESPACE)
    except ValueError:
        running = ", ".join(running_jobs()) or "none"
        raise ConfigError(f"no running rlft job {job!r} on this cluster (running RL jobs: {running})") from None
    return ray.get(handle.request.remote(rollout_workers))
