"""Where a job's actors go: what each role asks for, whether the cluster can hold it, and the placement groups.

    demands = job_demands(cfg, reference=True)     # what each role asks for (rlft.controller.run)
    check_fit(demands, free_node_resources())      # ClusterFitError before any actor starts
    placement = Placement(demands, cfg.ray)        # one placement group per role
    resources = placement.resources("rollout", 0)  # Resources that schedule actor 0 of the role on its bundle

Each role gets its own placement group, with ``ray.placement_strategy`` (``pack`` puts a role's actors on as few
nodes as possible, ``spread`` on as many). ``reference.colocate_with_learners`` puts reference replica ``i`` in the
bundle of learner ``i`` (the bundle then holds both), so the reference shares the learners' GPUs instead of taking
its own. Rollout workers added while the job runs (``rlft scale``) get a one-bundle group each.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from rlft.distributed.actors import Resources
from rlft.distributed.config import RayConfig
from rlft.errors import ConfigError
from rlft.names import Role

# Roles that get placement groups. Grader workers and reward models are light CPU actors scheduled as they come;
# the fit check counts them all.
PLACED_ROLES = (Role.LEARNERS, Role.CRITIC, Role.ROLLOUT, Role.REFERENCE)
# Ray's names of the strategies ``ray.placement_strategy`` offers.
_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}


class ClusterFitError(ConfigError):
    """The job asks for more than the cluster has: raised before any actor starts."""


@dataclass(frozen=True)
class RoleDemand:
    """``count`` actors of one role, each needing ``cpus`` CPUs and ``gpus`` GPUs on one node."""

    role: str
    count: int
    cpus: float
    gpus: float
    fields: str  # the config fields that set it, for error messages

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = self.gpus
        return bundle

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.role} {self.count} × ({self.cpus:g} CPU{gpus})  [{self.fields}]"


def total(demands: list[RoleDemand], resource: str) -> float:
    return sum(d.count * d.bundle.get(resource, 0.0) for d in demands)


def check_fit(demands: list[RoleDemand], nodes: list[dict[str, float]], cluster: str = "the cluster",
              remedy: str = "add nodes") -> None:
    """Raise ``ClusterFitError`` unless every actor's bundle can be placed on the nodes' free resources.

    Bundles are placed largest first, each on the node with the most room left that can hold it (a bundle never
    spans nodes). The message's first line names the config fields of the first actor that finds no room, and
    what ``cluster`` (its name in the message) has; the lines after it list every role's demand and end with
    ``remedy`` (besides lowering the fields).
    """
    free = [dict(node) for node in nodes]
    bundles = sorted(
        ((d, d.bundle) for d in demands for _ in range(d.count)),
        key=lambda item: (item[1].get("GPU", 0.0), item[1]["CPU"]),
        reverse=True,
    )
    for demand, bundle in bundles:
        fitting = [n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())]
        if not fitting:
            raise ClusterFitError(_no_fit_message(demands, nodes, demand, cluster, remedy))
        node = max(fitting, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
        for key, value in bundle.items():
            node[key] = node.get(key, 0.0) - value


def _no_fit_message(
    demands: list[RoleDemand], nodes: list[dict[str, float]], first: RoleDemand, cluster: str, remedy: str
) -> str:
    have_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    have_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    lines = [
        f"{first.fields}: the job does not fit {cluster}: it needs {total(demands, 'CPU'):g} CPUs and "
        f"{total(demands, 'GPU'):g} GPUs, {cluster} has {have_cpu:g} CPUs and {have_gpu:g} GPUs free on {len(nodes)} "
        f"node(s) (largest node: {biggest.get('CPU', 0.0):g} CPUs, {biggest.get('GPU', 0.0):g} GPUs); no node has "
        f"room for one {first.role} actor ({first.cpus:g} CPU, {first.gpus:g} GPU).",
        "The job asks for:",
        *(f"  {d.describe()}" for d in demands),
        f"Lower those fields, or {remedy}.",
    ]
    return "\n".join(lines)


def free_node_resources() -> list[dict[str, float]]:
    """Each alive node's free CPUs and GPUs, as Ray sees them now."""
    # Ray's per-node view of free resources is only in its private state module; the public API has the total.
    from ray._private.state import available_resources_per_node

    return [
        {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU")}
        for resources in available_resources_per_node().values()
    ]


def role_resources(placement: Placement | None, role: str, index: int, num_cpus: float, num_gpus: float) -> Resources:
    """Resources for actor ``index`` of ``role``: on its placement bundle when the job has placement groups."""
    if placement is None:
        return Resources(num_cpus=num_cpus, num_gpus=num_gpus)
    return placement.resources(role, index, num_cpus, num_gpus)


class Placement:
    """The job's placement groups: one per role (learners, rollout, reference, ...), made after ``check_fit``."""

    def __init__(self, demands: list[RoleDemand], cfg: RayConfig, colocate_reference: bool = False):
        self.cfg = cfg
        self.colocate_reference = colocate_reference
        self.demands = {d.role: d for d in demands}
        self.groups: dict[str, PlacementGroup] = {}
        self.extra: dict[tuple[str, int], PlacementGroup] = {}
        strategy = _STRATEGIES[cfg.placement_strategy]
        try:
            for d in demands:
                if d.role in PLACED_ROLES and (d.cpus or d.gpus):
                    self.groups[d.role] = placement_group([d.bundle] * d.count, strategy=strategy,
                                                          name=f"rlft-{d.role}")
            self._wait([(role, group) for role, group in self.groups.items()])
        except BaseException:
            self.remove()
            raise

    def resources(self, role: str, index: int, num_cpus: float, num_gpus: float) -> Resources:
        """Resources that schedule actor ``index`` of ``role`` on its bundle; an index beyond the role's group
        (a rollout worker added later) gets a new one-bundle group."""
        group_role, bundle = role, index
        if role == Role.REFERENCE and self.colocate_reference:
            group_role, bundle = Role.LEARNERS, index
        group = self.groups.get(group_role)
        if group is None:
            return Resources(num_cpus=num_cpus, num_gpus=num_gpus)
        if bundle >= self.demands[group_role].count:
            group = self.extra.get((role, index))
            if group is None:
                request = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
                group = placement_group([request], strategy="PACK", name=f"rlft-{role}-{index}")
                self.extra[(role, index)] = group
                self._wait([(f"{role} {index}", group)])
            bundle = 0
        return Resources(num_cpus=num_cpus, num_gpus=num_gpus, placement_group=group, bundle_index=bundle)

    def release(self, role: str, index: int) -> None:
        """Give back the one-bundle group of an added actor that has been removed."""
        group = self.extra.pop((role, index), None)
        if group is not None:
            remove_placement_group(group)

    def remove(self) -> None:
        for group in [*self.groups.values(), *self.extra.values()]:
            remove_placement_group(group)
        self.groups, self.extra = {}, {}

    def _wait(self, groups: list[tuple[str, PlacementGroup]]) -> None:
        for name, group in groups:
            ready, _ = ray.wait([group.ready()], timeout=self.cfg.placement_timeout_s)
            if not ready:
                raise ClusterFitError(
                    f"ray.placement_timeout_s: the placement group of {name} ({group.bundle_specs}) was not placed "
                    f"within {self.cfg.placement_timeout_s:g} s: the cluster's free resources are too fragmented "
                    f"across nodes for ray.placement_strategy = {self.cfg.placement_strategy}, or other jobs hold them"
                )
