"""Connecting to a Ray cluster (or starting a local one bound to loopback), checking the job fits, placing it."""

from __future__ import annotations

import os

import ray

from rlft.config import Config, RayConfig
from rlft.distributed.actors import BASE_ENV
from rlft.distributed.placement import Placement, RoleDemand, check_fit, free_node_resources, total


def init_ray(cfg: RayConfig, num_cpus_needed: float) -> None:
    """Start (or join) Ray once per process. A local cluster gets at least the CPUs the job's actors ask for.

    The job joins an existing cluster when ``ray.address`` names one, or when it runs on one already (a job
    submitted with ``rlft submit`` has RAY_ADDRESS set); otherwise it starts a private local cluster.
    """
    if ray.is_initialized():
        return
    for key, value in BASE_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    _keep_on_loopback()
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    ray.init(
        # "local" starts a fresh cluster even when `ray start` already runs one on this machine.
        address="local",
        num_cpus=max(num_cpus, int(num_cpus_needed + 0.999)),
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )


def start_cluster(cfg: Config, demands: list[RoleDemand]) -> Placement | None:
    """Join or start Ray, check that the job's ``demands`` fit the cluster's free resources (``ClusterFitError``
    naming the fields otherwise, before any actor starts) and make its placement groups. ``None`` in
    ``ray.local_mode``, where every role runs in this process."""
    if cfg.ray.local_mode:
        return None
    init_ray(cfg.ray, total(demands, "CPU"))
    check_fit(demands, free_node_resources())
    return Placement(demands, cfg.ray, colocate_reference=cfg.reference.colocate_with_learners)


def _keep_on_loopback() -> None:
    """Make a local cluster's services listen on 127.0.0.1 only.

    Ray replaces a loopback node address with the machine's external one (and its servers then listen on every
    interface) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads once, when it is imported. rlft imports
    Ray before it knows whether it will start a cluster or join one, so the setting is applied here as well: in the
    environment (for the cluster's processes) and in Ray's constant (for this process).
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
