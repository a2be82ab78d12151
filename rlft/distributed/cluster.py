"""Connecting to a Ray cluster, or starting a local one bound to loopback."""

from __future__ import annotations

import os

import ray

from rlft.config import RayConfig
from rlft.distributed.actors import BASE_ENV


def init_ray(cfg: RayConfig, num_cpus_needed: float) -> None:
    """Start (or join) Ray once per process. A local cluster gets at least the CPUs the job's actors ask for."""
    if ray.is_initialized():
        return
    for key, value in BASE_ENV.items():
        os.environ.setdefault(key, value)
    # Without this Ray binds its services to the machine's external address even when asked for loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
        return
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
