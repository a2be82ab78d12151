"""The stacks of every actor, written to the run directory when a phase overruns its deadline.

```
actor constructor:  install_handler()      SIGUSR1 → faulthandler writes all its threads' Python stacks to a file
driver, spawn:      track(handle, cls)     asks the new actor once for its process id (answered before any other call)
driver, WorkerSet:  label(handle, role, slot)
driver, a phase's call overruns ray.call_timeout_s (rlft/timing.py):
                    dump_all()             every actor on this node writes its stacks;
                                           <output_dir>/stacks/<role>-<rank>-<pid>.txt
```

faulthandler writes from its signal handler without taking the GIL, so an actor stuck in C code (a collective, a
kernel, a lock) still dumps. Two kinds of process cannot run that handler:

- a stopped process (SIGSTOP, a debugger) runs no handler until it is continued. It is read from outside with
  ``py-spy dump --nonblocking`` (py-spy is an optional tool; rlft looks for it next to the Python it runs under and on
  PATH), which leaves it stopped: continuing it would change the state being reported. Without py-spy its file says
  that it is stopped, and the signal stays pending: its stack is appended when it continues.
- processes an actor started (a multi-process vLLM engine, sandboxed graders) have no handler; py-spy reads those
  that run Python, when it is installed, into their actor's file.

Actors on other nodes are named in the error, not dumped: their process ids mean nothing on the driver's node.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft import timing
from rlft.distributed.net import node_ip
from rlft.names import Role

# Set by the driver (``watch``) in the environment of every actor it starts: where actors keep their handler files.
HANDLER_DIR_ENV = "RLFT_STACK_HANDLER_DIR"
# How long the driver waits for the actors' handlers to finish writing.
_WRITE_WAIT_S = 5.0
_PY_SPY_TIMEOUT_S = 10.0
_MAX_CHILDREN = 8

_ROLE_OF_CLASS = {
    "LearnerWorker": Role.LEARNERS,
    "RolloutWorker": Role.ROLLOUT,
    "ReferenceWorker": Role.REFERENCE,
    "GraderWorker": Role.GRADERS,
}

# ------------------------------------------------------------------------------------------------ in every actor

_handler_file = None


def install_handler() -> None:
    """Make SIGUSR1 write this process's stacks (every thread) to its handler file. Called first thing in each
    role's constructor; does nothing outside a watched run."""
    global _handler_file
    directory = os.environ.get(HANDLER_DIR_ENV)
    if not directory or _handler_file is not None or not os.path.isdir(directory):
        return
    _handler_file = open(os.path.join(directory, f"{os.getpid()}.txt"), "a")  # noqa: SIM115 (lives with the process)
    faulthandler.register(signal.SIGUSR1, file=_handler_file, all_threads=True)


def _identity(instance: Any) -> tuple[int, str, int | None]:
    """(pid, node address, rank if the role knows its own) of the actor running this."""
    return os.getpid(), node_ip(), getattr(instance, "rank", None)


# ------------------------------------------------------------------------------------------------ in the driver


@dataclass
class _Actor:
    role: str
    rank: int | None
    identity_ref: Any  # answers _identity
    pid: int | None = None
    node: str = ""
    started: float = 0.0  # the process's start time, so a pid taken over by another process is never signalled

    def resolve(self, timeout_s: float) -> None:
        if self.pid is not None:
            return
        import ray

        try:
            self.pid, self.node, own_rank = ray.get(self.identity_ref, timeout=timeout_s)
        except Exception:  # noqa: BLE001 (still starting, or dead: no pid to read)
            return
        if self.rank is None:
            self.rank = own_rank
        process = _process(self.pid)
        self.started = process.create_time() if process is not None else 0.0

    def process(self):
        """This actor's process on this node, or None (ended, elsewhere, or not known)."""
        if self.pid is None or self.node != node_ip():
            return None
        process = _process(self.pid)
        return process if process is not None and process.create_time() == self.started else None

    @property
    def name(self) -> str:
        return f"{self.role} actor" if self.rank is None else f"{self.role} actor {self.rank}"

    def file_name(self) -> str:
        return f"{self.role}-{self.pid}.txt" if self.rank is None else f"{self.role}-{self.rank}-{self.pid}.txt"


@dataclass
class _Watch:
    out_dir: Path  # where the dumps go
    handler_dir: Path  # the actors' handler files
    actors: dict[str, _Actor]  # by Ray actor id (hex)


_watch: _Watch | None = None


def watch(out_dir: str | Path, call_timeout_s: float | None) -> None:
    """Watch this run (the driver): every remote call inside a step's phase gets ``call_timeout_s`` as its deadline
    (``rlft.timing``), and actors started from now on can have their stacks written to ``out_dir`` on overrun."""
    global _watch
    timing.set_call_timeout(call_timeout_s, on_overrun=dump_all)
    if _watch is not None:
        _watch.out_dir = Path(out_dir)
        return
    handler_dir = Path(tempfile.mkdtemp(prefix="rlft-stacks-"))
    os.environ[HANDLER_DIR_ENV] = str(handler_dir)
    _watch = _Watch(Path(out_dir), handler_dir, {})
    atexit.register(shutil.rmtree, handler_dir, True)


def track(handle: Any, cls: type) -> None:
    """Remember an actor just started (``actors.spawn``); its process id is asked for now, read when needed."""
    if _watch is None:
        return
    ref = handle.__ray_call__.remote(_identity)
    _watch.actors[handle._actor_id.hex()] = _Actor(str(_ROLE_OF_CLASS.get(cls.__name__, cls.__name__)), None, ref)


def label(handle: Any, role: str, rank: int) -> None:
    """Name a tracked actor by its role and slot (a ``WorkerSet``'s)."""
    actor = _watch.actors.get(handle._actor_id.hex()) if _watch is not None else None
    if actor is not None:
        actor.role, actor.rank = str(role), rank


def forget(handle: Any) -> None:
    """An actor that was ended (``actors.kill``): nothing to dump any more."""
    if _watch is not None:
        _watch.actors.pop(handle._actor_id.hex(), None)


def describe(refs: list, fallback: list[str] | None = None) -> list[str]:
    """The actors that the calls ``refs`` went to: ``"learners actor 1 (pid 4242, stopped)"``; an actor not tracked
    is named by ``fallback[i]`` (its caller's name for it), else by its Ray id."""
    names = []
    for i, ref in enumerate(refs):
        try:
            actor_id = ref.task_id().actor_id().hex()
        except Exception:  # noqa: BLE001 (not an actor call)
            actor_id = ""
        actor = _watch.actors.get(actor_id) if _watch is not None else None
        if actor is None:
            names.append(fallback[i] if fallback else f"actor {actor_id[:12]}" if actor_id else "a task")
            continue
        actor.resolve(1.0)
        names.append(f"{actor.name} ({_process_note(actor)})")
    return list(dict.fromkeys(names))


def dump_all(reason: str) -> Path | None:
    """Write the stacks of every tracked actor on this node to ``<out_dir>/<role>-<rank>-<pid>.txt``; returns the
    directory, or None when there is nothing to dump (no watched run, or no actors)."""
    if _watch is None or not _watch.actors:
        return None
    out = _watch.out_dir
    out.mkdir(parents=True, exist_ok=True)
    waiting: list[tuple[_Actor, Path, int]] = []  # signalled actors: their handler file and its size before
    extra: dict[int, list[str]] = {}  # by pid: stopped actors' and children's stacks read with py-spy
    for actor in list(_watch.actors.values()):
        actor.resolve(2.0)
        process = actor.process()
        if process is None:
            continue  # on another node, ended, or never answered
        sections = extra.setdefault(actor.pid, [])
        handler = _watch.handler_dir / f"{actor.pid}.txt"
        if _status(process) == "stopped":
            sections.append(_py_spy(actor.pid) or (
                "the process is stopped (SIGSTOP or a debugger) and py-spy is not installed to read it from outside; "
                "its stack is written to the handler file when it continues\n"))
            if handler.exists():
                os.kill(actor.pid, signal.SIGUSR1)  # pending until it continues
        elif handler.exists():
            waiting.append((actor, handler, handler.stat().st_size))
            os.kill(actor.pid, signal.SIGUSR1)
        else:
            sections.append(_py_spy(actor.pid) or "no stack handler in this process and no py-spy to read it\n")
        for child in _children(process):
            text = _py_spy(child.pid)
            if text:
                sections.append(f"--- child process {child.pid}: {' '.join(_cmdline(child))[:200]}\n{text}")
    written = {actor.pid: _read_new(handler, size) for actor, handler, size in waiting}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for actor in _watch.actors.values():
        if actor.pid not in extra:
            continue
        text = "".join([written.get(actor.pid, "")] + extra[actor.pid])
        header = f"# {actor.name} ({_process_note(actor)}), {stamp}: {reason}\n"
        (out / actor.file_name()).write_text(header + text)
    return out


def _read_new(path: Path, offset: int) -> str:
    """What the handler wrote to ``path`` past ``offset``, once it has stopped growing (or the wait is over)."""
    deadline = time.monotonic() + _WRITE_WAIT_S
    last = offset
    while time.monotonic() < deadline:
        time.sleep(0.1)
        size = path.stat().st_size
        if size > offset and size == last:
            break
        last = size
    with path.open() as f:
        f.seek(offset)
        return f.read()


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _status(process) -> str:
    import psutil

    try:
        return process.status()
    except psutil.Error:
        return "gone"


def _process_note(actor: _Actor) -> str:
    if actor.pid is None:
        return "process not known"
    if actor.node != node_ip():
        return f"pid {actor.pid} on {actor.node}"
    process = actor.process()
    return f"pid {actor.pid}, {_status(process) if process is not None else 'gone'}"


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)[:_MAX_CHILDREN]
    except psutil.Error:
        return []


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _py_spy(pid: int) -> str:
    """The Python stacks of ``pid`` read from outside (without pausing it, so a stopped process stays stopped), in
    faulthandler's layout; empty when py-spy is missing or cannot read it."""
    exe = py_spy_path()
    if exe is None:
        return ""
    try:
        proc = subprocess.run([exe, "dump", "--nonblocking", "--json", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=_PY_SPY_TIMEOUT_S)
        threads = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return ""
    if not threads:
        return ""
    lines = ["(read with py-spy)\n"]
    for thread in threads:
        name = f" {thread['thread_name']}" if thread.get("thread_name") else ""
        lines.append(f"Thread {thread.get('thread_id', 0):#x}{name} (most recent call first):\n")
        for frame in thread.get("frames", []):
            lines.append(f'  File "{frame.get("filename")}", line {frame.get("line")} in {frame.get("name")}\n')
        lines.append("\n")
    return "".join(lines)
