"""Starting role actors: on Ray, or in the driver's own process for debugging.

Roles are plain classes. ``spawn`` turns one into a Ray actor with the resources the config asks for (never
hard-coded in a decorator), or, with ``local=True``, into an in-process object with the same call shape
(``handle.method.remote(...)`` and ``wait(...)``), so every facade works unchanged and ``breakpoint()`` works inside
a role. Facades such as ``LearnerGroup`` are the only callers; the controller never touches handles.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlft.errors import RestartBudgetError

logger = logging.getLogger(__name__)

# Environment every role process gets: quiet Ray, CPU DeepSpeed where there is no GPU, a shared cache of compiled
# extensions (DeepSpeed's CPU communication op takes half a minute to build the first time).
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def cache_dir() -> str:
    return os.environ.get("RLFT_CACHE_DIR", os.path.expanduser("~/.cache/rlft"))


def role_env(num_gpus: float) -> dict[str, str]:
    env = dict(BASE_ENV)
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(cache_dir(), "torch_extensions"))
    env["RLFT_CACHE_DIR"] = cache_dir()
    if num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def slowest(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """Workers of a role run side by side, so a kind of work takes as long as its slowest worker's share."""
    out: dict[str, float] = {}
    for seconds in per_worker:
        for kind, value in seconds.items():
            out[kind] = max(out.get(kind, 0.0), value)
    return out


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    # Set by ``rlft.distributed.placement.Placement``: the actor goes on this bundle of this placement group.
    placement_group: Any = None
    bundle_index: int = -1


class _Done:
    """The result of a local call, standing where a Ray ``ObjectRef`` would."""

    def __init__(self, value: Any):
        self.value = value


class _LocalMethod:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs) -> _Done:
        return _Done(self._fn(*args, **kwargs))


class LocalActor:
    """An object whose methods are called as ``handle.method.remote(...)``, run at once in this process."""

    def __init__(self, instance: Any):
        self._instance = instance

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._instance, name))


def spawn(cls: type, *args, resources: Resources, local: bool = False, name: str = "", **kwargs):
    """Start ``cls(*args, **kwargs)`` as a Ray actor with ``resources``, or in this process when ``local``."""
    env = {**role_env(resources.num_gpus), **resources.env}
    if local:
        os.environ.update(env)
        return LocalActor(cls(*args, **kwargs))
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "runtime_env": {"env_vars": env},
    }
    if name:
        options["name"] = name
    if resources.placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            resources.placement_group, placement_group_bundle_index=resources.bundle_index
        )
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def wait(refs):
    """``ray.get`` that also accepts the results of local calls (one ref or a list)."""
    if isinstance(refs, list):
        if all(isinstance(r, _Done) for r in refs):
            return [r.value for r in refs]
        return ray.get(refs)
    return refs.value if isinstance(refs, _Done) else ray.get(refs)


def wait_each(refs, timeout_s: float | None = None):
    """Like ``wait``, but a call that failed raises as soon as it has, without waiting for the rest (which may be
    blocked on the failed one, e.g. in a collective). ``timeout_s`` bounds the whole wait (``GetTimeoutError``)."""
    if not isinstance(refs, list):
        return wait_each([refs], timeout_s)[0]
    if all(isinstance(r, _Done) for r in refs):
        return [r.value for r in refs]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} calls not done within {timeout_s} s")
        ray.get(ready)  # raises the call's error now
    return ray.get(refs)


def kill(handles: list) -> None:
    """End role actors started by ``spawn`` (in-process ones simply go out of scope)."""
    for handle in handles:
        if not isinstance(handle, LocalActor):
            ray.kill(handle, no_restart=True)


class WorkerSet:
    """A role's actors, one per slot, with a dead one replaced and its calls redone.

    ``start(slot)`` starts (and readies) the actor for a slot: a replacement comes from the same function, so it
    starts in the state the role needs (a rollout worker with the current weights, say). ``as_completed`` runs calls
    on slots and, when a slot's actor dies (``RayActorError``), starts a replacement and sends the dead actor's calls
    to it; each call's result is yielded exactly once. At most ``max_restarts`` replacements over the set's life: one
    death more raises ``RestartBudgetError``.
    """

    def __init__(self, role: str, start: Callable[[int], Any], num: int, max_restarts: int, local: bool = False):
        self.role, self._start, self.max_restarts, self.local = role, start, max_restarts, local
        self.restarts = 0
        self.handles: list = []
        self._generations: list[int] = []
        try:
            for slot in range(num):
                self.add()
        except BaseException:
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.handles)

    def add(self) -> None:
        """Start one more actor, in the next slot."""
        self.handles.append(self._start(len(self.handles)))
        self._generations.append(0)

    def remove_last(self) -> None:
        kill([self.handles.pop()])
        self._generations.pop()

    def replace(self, slot: int, reason: str) -> None:
        """Start a new actor in ``slot`` (after the old one died), within the restart budget."""
        if self.restarts >= self.max_restarts:
            raise RestartBudgetError(
                f"{self.role} actor {slot} died ({reason}) and the restart budget ray.max_actor_restarts = "
                f"{self.max_restarts} is spent"
            )
        self.restarts += 1
        logger.warning("%s actor %d died (%s); starting a replacement (restart %d of %d)",
                       self.role, slot, reason, self.restarts, self.max_restarts)
        kill([self.handles[slot]])
        self.handles[slot] = self._start(slot)
        self._generations[slot] += 1

    def as_completed(self, calls: dict[Any, tuple[int, Callable[[Any], Any]]]) -> Iterator[tuple[Any, Any]]:
        """``calls`` maps a key to ``(slot, fn)``, ``fn(handle)`` making the remote call; yields ``(key, result)``
        as calls finish, redoing on a replacement the calls of an actor that died."""
        pending = {}

        def send(key):
            slot, fn = calls[key]
            pending[fn(self.handles[slot])] = (key, self._generations[slot])

        for key in calls:
            send(key)
        while pending:
            if self.local:
                ref = next(iter(pending))
            else:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
            key, generation = pending.pop(ref)
            try:
                result = wait(ref)
            except RayActorError as err:
                slot = calls[key][0]
                if self._generations[slot] == generation:
                    self.replace(slot, type(err).__name__)
                send(key)
                continue
            yield key, result

    def call(self, calls: list[tuple[int, Callable[[Any], Any]]]) -> list:
        """Like ``as_completed``, the results in the order of ``calls``."""
        results = dict(self.as_completed(dict(enumerate(calls))))
        return [results[i] for i in range(len(calls))]

    def call_all(self, fn: Callable[[Any], Any]) -> list:
        """``fn(handle)`` on every actor; results in slot order."""
        return self.call([(slot, fn) for slot in range(len(self.handles))])

    def shutdown(self) -> None:
        kill(self.handles)
        self.handles, self._generations = [], []


def balanced_chunks(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, stop) of ``num_parts`` contiguous chunks whose sizes differ by at most one: 5 over 2 -> (0,3),(3,5)."""
    bounds, start = [], 0
    for part in range(num_parts):
        stop = start + num_items // num_parts + (part < num_items % num_parts)
        bounds.append((start, stop))
        start = stop
    return bounds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """This process's node address, as other nodes reach it (loopback on a single machine)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
