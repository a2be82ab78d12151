"""Connecting to a Ray cluster (or starting a local one bound to loopback), checking the job fits, placing it."""

from __future__ import annotations

import os

import ray

from rlft import startup
from rlft.distributed.actors import BASE_ENV, forget_role_env, hand_down_role_env
from rlft.distributed.config import RayConfig
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
    address = cluster_address(cfg)
    if address:
        forget_role_env()
        ray.init(address=address, log_to_driver=True)
        return
    keep_on_loopback()
    hand_down_role_env(local_num_gpus())
    startup.mark("driver", "ray_start")
    ray.init(
        # "local" starts a fresh cluster even when `ray start` already runs one on this machine.
        address="local",
        num_cpus=local_num_cpus(cfg, num_cpus_needed),
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
    startup.mark("driver", "ray_ready")


def cluster_address(cfg: RayConfig) -> str:
    """The cluster the job joins: ``ray.address``, else RAY_ADDRESS; empty means a local cluster of its own."""
    return cfg.address or os.environ.get("RAY_ADDRESS", "")


def local_num_cpus(cfg: RayConfig, num_cpus_needed: float) -> int:
    """Logical CPUs of a local cluster: ``ray.num_cpus`` or the machine's cores, raised to what the job needs."""
    return max(cfg.num_cpus or os.cpu_count() or 1, int(num_cpus_needed + 0.999))


def local_num_gpus() -> int:
    """The GPUs a local Ray cluster finds on this machine, as Ray counts them: the devices NVML reports, no more
    than CUDA_VISIBLE_DEVICES lists when it is set."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    num_gpus = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return num_gpus if visible is None else min(num_gpus, len(visible))


def start_cluster(cfg: RayConfig, demands: list[RoleDemand], colocate_reference: bool = False) -> Placement | None:
    """Join or start Ray, check that the job's ``demands`` fit the cluster's free resources (``ClusterFitError``
    naming the fields otherwise, before any actor starts) and make its placement groups (reference replica i in
    learner i's bundle with ``colocate_reference``). ``None`` in ``ray.local_mode``, where every role runs in this
    process. A job that would start a local cluster is checked against this machine first, so that a job asking for
    GPUs the machine lacks stops before Ray starts."""
    if cfg.local_mode:
        return None
    start_ray(cfg, demands)
    check_fit(demands, free_node_resources())
    return Placement(demands, cfg, colocate_reference=colocate_reference)


def start_ray(cfg: RayConfig, demands: list[RoleDemand]) -> None:
    """Join or start Ray for a job that asks for ``demands`` (nothing if this process already has). A local cluster
    is checked against this machine first, so that a job asking for GPUs the machine lacks stops before Ray
    starts."""
    if ray.is_initialized():
        return
    if not cluster_address(cfg):
        machine = {"CPU": float(local_num_cpus(cfg, total(demands, "CPU"))), "GPU": float(local_num_gpus())}
        check_fit(demands, [machine], cluster="this machine",
                  remedy="set ray.address to a cluster that has them (unset, the job starts a local Ray cluster)")
    init_ray(cfg, total(demands, "CPU"))


def keep_on_loopback() -> None:
    """Make a local cluster's services listen on 127.0.0.1 only.

    Ray replaces a loopback node address with the machine's external one (and its servers then listen on every
    interface) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads once, when it is imported. rlft imports
    Ray before it knows whether it will start a cluster or join one, so the setting is applied here as well: in the
    environment (for the cluster's processes) and in Ray's constant (for this process).
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
