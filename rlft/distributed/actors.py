"""Starting role actors: on Ray, or in the driver's own process for debugging.

Roles are plain classes. ``spawn`` turns one into a Ray actor with the resources the config asks for (never
hard-coded in a decorator), or, with ``local=True``, into an in-process object with the same call shape
(``handle.method.remote(...)`` and ``wait(...)``), so every facade works unchanged and ``breakpoint()`` works inside
a role. Facades such as ``LearnerGroup`` are the only callers; the controller never touches handles.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import ray

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


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


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
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def wait(refs):
    """``ray.get`` that also accepts the results of local calls (one ref or a list)."""
    if isinstance(refs, list):
        if all(isinstance(r, _Done) for r in refs):
            return [r.value for r in refs]
        return ray.get(refs)
    return refs.value if isinstance(refs, _Done) else ray.get(refs)


def kill(handles: list) -> None:
    """End role actors started by ``spawn`` (in-process ones simply go out of scope)."""
    for handle in handles:
        if not isinstance(handle, LocalActor):
            ray.kill(handle)


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
