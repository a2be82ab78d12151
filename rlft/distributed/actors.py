"""Starting role actors: on Ray, or in the driver's own process for debugging.

Roles are plain classes. ``spawn`` turns one into a Ray actor with the resources the config asks for (never
hard-coded in a decorator), or, with ``local=True``, into an in-process object with the same call shape
(``handle.method.remote(...)`` and ``wait(...)``), so every facade works unchanged and ``breakpoint()`` works inside
a role. Facades such as ``LearnerGroup`` are the only callers; the controller never touches handles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlft import startup
from rlft.distributed import stacks
from rlft.errors import PeerTimeoutError, RestartBudgetError
from rlft.timing import call_timeout_s

logger = logging.getLogger(__name__)

# Environment every role process gets: quiet Ray, CPU DeepSpeed where there is no GPU, rlft's cache (the learners
# keep DeepSpeed's compiled ops there, one directory per Python environment, unless TORCH_EXTENSIONS_DIR is set).
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
    env["RLFT_CACHE_DIR"] = cache_dir()
    for name in ("TORCH_EXTENSIONS_DIR", stacks.HANDLER_DIR_ENV, startup.LOG_ENV):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


# The role environment that the worker processes of the local cluster this process started inherit from it.
_inherited_env: dict[str, str] = {}


def hand_down_role_env(num_gpus_on_machine: int) -> None:
    """Called just before this process starts a local Ray cluster: put the role environment into this process's
    own, which the cluster's worker processes inherit. An actor whose environment is that one then needs no
    ``runtime_env`` of its own, and Ray can give it one of the worker processes it started ahead (an actor with
    a ``runtime_env`` waits for a fresh process)."""
    env = role_env(num_gpus_on_machine)
    os.environ.update(env)
    _inherited_env.clear()
    _inherited_env.update(env)


def forget_role_env() -> None:
    """This process joins a cluster it did not start: its workers inherit nothing from here."""
    _inherited_env.clear()


def runtime_env_for(env: dict[str, str]) -> dict | None:
    """The ``runtime_env`` an actor with environment ``env`` needs: none when the cluster's workers inherited it
    all (``hand_down_role_env``), else the whole of it."""
    if all(_inherited_env.get(key) == value for key, value in env.items()):
        return None
    return {"env_vars": env}


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
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    runtime_env = runtime_env_for(env)
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    if name:
        options["name"] = name
    if resources.placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            resources.placement_group, placement_group_bundle_index=resources.bundle_index
        )
    handle = ray.remote(cls).options(**options).remote(*args, **kwargs)
    stacks.track(handle, cls)
    return handle


class DriverInbox:
    """Bytes of the results that role calls hand back to this process (the driver), by the size of what they
    hold: tensors and arrays by their buffers, strings by length, references and numbers as a few bytes. The
    driver should see rewards, lengths, token ids and metrics; a weight or a log-probability tensor here is a
    payload that went the wrong way. ``take()`` returns the count since the last call."""

    def __init__(self):
        self.num_bytes = 0

    def add(self, value: Any) -> Any:
        self.num_bytes += payload_bytes(value)
        return value

    def take(self) -> int:
        num_bytes, self.num_bytes = self.num_bytes, 0
        return num_bytes


DRIVER_INBOX = DriverInbox()


def payload_bytes(value: Any, _depth: int = 0) -> int:
    """The size of ``value``'s contents (see ``DriverInbox``)."""
    if _depth > 64:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if hasattr(value, "nbytes") and hasattr(value, "shape"):  # numpy arrays
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch tensors
        return int(value.element_size() * value.numel())
    if isinstance(value, dict):
        return sum(payload_bytes(k, _depth + 1) + payload_bytes(v, _depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(payload_bytes(v, _depth + 1) for v in value) + 8
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value))
    return 8  # numbers, None, object references, handles


class CallTimeoutError(PeerTimeoutError, GetTimeoutError):
    """Calls on actors did not answer within their deadline; the message names the actors (role, rank, process).
    Also a ``GetTimeoutError``, so code that expects Ray's own keeps working."""


def wait(refs, timeout_s: float | None = None):
    """``ray.get`` that also accepts the results of local calls (one ref or a list). Without ``timeout_s``, the
    deadline of a call inside a phase (``rlft.timing.call_timeout_s``); past it, ``CallTimeoutError``."""
    if isinstance(refs, list):
        if all(isinstance(r, _Done) for r in refs):
            return [r.value for r in refs]
        return _get_within(refs, timeout_s)
    return refs.value if isinstance(refs, _Done) else _get_within(refs, timeout_s)


def _get_within(refs, timeout_s: float | None):
    timeout_s = call_timeout_s() if timeout_s is None else timeout_s
    try:
        return DRIVER_INBOX.add(ray.get(refs, timeout=timeout_s))
    except GetTimeoutError:
        listed = refs if isinstance(refs, list) else [refs]
        _, pending = ray.wait(listed, num_returns=len(listed), timeout=0)
        raise _not_answered(pending, timeout_s) from None


def _not_answered(pending: list, timeout_s: float, names: list[str] | None = None) -> CallTimeoutError:
    """The error for calls ``pending`` past ``timeout_s``; ``names``: the caller's names for their actors."""
    actors = ", ".join(stacks.describe(pending, names)) or "a call"
    return CallTimeoutError(f"{actors} did not answer within {timeout_s:g} s")


def wait_peers(calls: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
    """Wait for calls on named peers (``"rollout worker 1"``: ref) that take part in one exchange, e.g. a
    collective. All are waited for until ``timeout_s``, not only until the first failure: a peer that failed
    makes the others fail too, and the message has to name the peer that did not answer. Raises
    ``WeightSyncError`` naming the peers that did not finish in time and the errors of those that failed."""
    from rlft.errors import WeightSyncError

    if all(isinstance(r, _Done) for r in calls.values()):
        return {name: r.value for name, r in calls.items()}
    names = {ref: name for name, ref in calls.items()}
    ready, pending = ray.wait(list(names), num_returns=len(names), timeout=timeout_s)
    results, failed = {}, {}
    for ref in ready:
        try:
            results[names[ref]] = DRIVER_INBOX.add(ray.get(ref))
        except Exception as err:  # noqa: BLE001 (reported below, by peer)
            failed[names[ref]] = err
    if pending or failed:
        parts = []
        if pending:
            parts.append(f"{', '.join(names[r] for r in pending)} did not finish within {timeout_s:g} s")
        for name, err in failed.items():
            parts.append(f"{name} failed: {_first_line(err)}")
        error = WeightSyncError(f"{what}: " + "; ".join(parts))
        error.failed = failed
        error.pending = [names[r] for r in pending]
        raise error
    return {name: results[name] for name in calls}


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def wait_each(refs, timeout_s: float | None = None):
    """Like ``wait``, but a call that failed raises as soon as it has, without waiting for the rest (which may be
    blocked on the failed one, e.g. in a collective). ``timeout_s`` (by default the deadline of a call inside a
    phase) bounds the whole wait: ``CallTimeoutError`` naming the actors that did not answer."""
    if not isinstance(refs, list):
        return wait_each([refs], timeout_s)[0]
    if all(isinstance(r, _Done) for r in refs):
        return [r.value for r in refs]
    timeout_s = call_timeout_s() if timeout_s is None else timeout_s
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise _not_answered(pending, timeout_s)
        ray.get(ready)  # raises the call's error now
    return _get_within(refs, None)


def kill(handles: list) -> None:
    """End role actors started by ``spawn`` (in-process ones simply go out of scope)."""
    for handle in handles:
        if not isinstance(handle, LocalActor):
            stacks.forget(handle)
            ray.kill(handle, no_restart=True)


@dataclass
class Submitted:
    """Calls a ``WorkerSet`` has sent and not yet returned: each reference with its key, slot and actor."""

    calls: dict[Any, tuple[int, Callable[[Any], Any]]]
    pending: dict[Any, tuple[Any, int, Any]] = field(default_factory=dict)


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
        self.handles.append(self._started(len(self.handles)))

    def _started(self, slot: int):
        handle = self._start(slot)
        if not self.local:
            stacks.label(handle, self.role, slot)
        return handle

    def remove_last(self) -> None:
        kill([self.handles.pop()])

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
        self.handles[slot] = self._started(slot)

    def submit(self, calls: dict[Any, tuple[int, Callable[[Any], Any]]]) -> Submitted:
        """Send ``calls`` (a key to ``(slot, fn)``, ``fn(handle)`` making the remote call) now; ``results`` waits
        for them later. Between the two the set may lose actors (deaths, ``remove_last``): their calls are redone."""
        submitted = Submitted(calls)
        for key in calls:
            self._send(submitted, key)
        return submitted

    def _send(self, submitted: Submitted, key: Any) -> None:
        slot = calls_slot = submitted.calls[key][0]
        if slot >= len(self.handles):  # the set shrank since the call was planned: another actor takes it
            slot = calls_slot % len(self.handles)
        handle = self.handles[slot]
        submitted.pending[submitted.calls[key][1](handle)] = (key, slot, handle)

    def as_completed(
        self, calls: dict[Any, tuple[int, Callable[[Any], Any]]], timeout_s: float | None = None
    ) -> Iterator[tuple[Any, Any]]:
        """``calls`` maps a key to ``(slot, fn)``, ``fn(handle)`` making the remote call; yields ``(key, result)``
        as calls finish, redoing on a replacement the calls of an actor that died. With ``timeout_s`` (by default the
        deadline of a call inside a phase), a wait of that long with no call finishing raises ``CallTimeoutError``
        naming the actors still busy."""
        yield from self.results(self.submit(calls), timeout_s)

    def results(self, submitted: Submitted, timeout_s: float | None = None) -> Iterator[tuple[Any, Any]]:
        """``(key, result)`` of the ``submit``-ted calls as they finish (see ``as_completed``)."""
        timeout_s = call_timeout_s() if timeout_s is None else timeout_s
        pending = submitted.pending
        while pending:
            if self.local:
                ref = next(iter(pending))
            else:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
                if not done:
                    busy = list(pending)
                    raise _not_answered(busy, timeout_s, [f"{self.role} actor {pending[ref][1]}" for ref in busy])
                (ref,) = done
            key, slot, handle = pending.pop(ref)
            try:
                result = wait(ref)
            except RayActorError as err:
                if slot < len(self.handles) and self.handles[slot] is handle:  # died, not removed or replaced
                    self.replace(slot, type(err).__name__)
                self._send(submitted, key)
                continue
            yield key, result

    def call(self, calls: list[tuple[int, Callable[[Any], Any]]], timeout_s: float | None = None) -> list:
        """Like ``as_completed``, the results in the order of ``calls``."""
        results = dict(self.as_completed(dict(enumerate(calls)), timeout_s))
        return [results[i] for i in range(len(calls))]

    def call_all(self, fn: Callable[[Any], Any], timeout_s: float | None = None) -> list:
        """``fn(handle)`` on every actor; results in slot order."""
        return self.call([(slot, fn) for slot in range(len(self.handles))], timeout_s)

    def shutdown(self) -> None:
        kill(self.handles)
        self.handles = []


def balanced_chunks(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, stop) of ``num_parts`` contiguous chunks whose sizes differ by at most one: 5 over 2 -> (0,3),(3,5)."""
    bounds, start = [], 0
    for part in range(num_parts):
        stop = start + num_items // num_parts + (part < num_items % num_parts)
        bounds.append((start, stop))
        start = stop
    return bounds


