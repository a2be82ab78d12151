"""Run untrusted Python grader source (OpenAI's ``python`` grader: ``def grade(sample, item) -> float``) in a
throw-away subprocess.

    results = run_sandboxed(source, [(sample, item), ...], SandboxLimits())
    results[i]  # a float, or a SandboxError naming what went wrong for pair i

Containment, from the outside in:

- a fresh interpreter (``python -I``: no user site, no environment paths) in its own session, killed with its whole
  process group at ``wall_timeout_s``;
- resource limits set before it starts: address space (``memory_mib``), CPU seconds (``cpu_seconds``), size of any
  file it writes (``max_file_mib``), open files;
- a throw-away working directory, removed afterwards;
- an audit hook (PEP 578), installed before the grader's source is read, that the source cannot remove. It refuses
  sockets (no network), new processes (fork, exec, spawn, subprocess, os.system: no fork bombs), signals to other
  processes, ctypes (no calls into libc behind the hook's back), changing resource limits, and writing, creating,
  deleting, renaming or changing the mode of any path outside the working directory.

A grader that raises, returns something other than a finite number, or is killed costs the samples it had not
scored a ``SandboxError`` with the reason; the caller counts those and gives them the fallback score.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MAX_SOURCE_BYTES_DEFAULT = 64 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    wall_timeout_s: float = 10.0
    cpu_seconds: int = 10
    memory_mib: int = 1024
    max_file_mib: int = 16
    max_source_bytes: int = MAX_SOURCE_BYTES_DEFAULT


@dataclass(frozen=True)
class SandboxError:
    """Why one sample got no score: the grader's exception, a bad return value, or the process's end."""

    message: str

    def __str__(self) -> str:
        return self.message


# Runs inside the sandbox. Reads {"source", "pairs"} from stdin, writes one JSON line per pair to stdout.
_RUNNER = r"""
import json, math, os, sys, traceback
_out = sys.stdout
_request = json.loads(sys.stdin.read())
_root = os.path.realpath(os.getcwd())

def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(_root, path))
    return full == _root or full.startswith(_root + os.sep)

_BLOCKED = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
            "subprocess.", "os.kill", "os.killpg", "signal.pthread_kill", "pty.", "ctypes.", "resource.setrlimit",
            "resource.prlimit", "os.setuid", "os.chroot", "sys.settrace", "sys.setprofile")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
                "shutil.copyfile": 2, "shutil.move": 2}

def _hook(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writes and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
    elif event in _PATH_EVENTS:
        for path in args[: _PATH_EVENTS[event]]:
            if path is not None and not isinstance(path, int) and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory is not allowed")

sys.addaudithook(_hook)
del _hook

def _emit(record):
    _out.write(json.dumps(record) + "\n")
    _out.flush()

_namespace = {"__name__": "grader"}
try:
    exec(compile(_request["source"], "<grader>", "exec"), _namespace)
    _grade = _namespace["grade"]
    if not callable(_grade):
        raise TypeError("grade is not a function")
except BaseException as exc:
    _emit({"fatal": f"loading the grader failed: {type(exc).__name__}: {exc}"})
    sys.exit(0)

for _sample, _item in _request["pairs"]:
    try:
        _value = _grade(_sample, _item)
        if isinstance(_value, bool) or not isinstance(_value, (int, float)) or not math.isfinite(_value):
            _emit({"error": f"grade returned {_value!r:.80}, not a finite number"})
        else:
            _emit({"score": float(_value)})
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            _emit({"error": "grade called exit()"})
            continue
        _emit({"error": f"{type(exc).__name__}: {exc}"[:500]})
"""


def check_source(source: str, limits: SandboxLimits) -> None:
    """Raise ``ValueError`` for source the sandbox will not run (too long, not Python, no ``grade``)."""
    size = len(source.encode())
    if size > limits.max_source_bytes:
        raise ValueError(f"python grader source is {size} bytes; the limit is {limits.max_source_bytes}")
    try:
        tree = compile(source, "<grader>", "exec", flags=0x400, dont_inherit=True)  # ast.PyCF_ONLY_AST
    except SyntaxError as exc:
        raise ValueError(f"python grader source line {exc.lineno}: {exc.msg}") from None
    if not any(getattr(node, "name", None) == "grade" for node in tree.body):
        raise ValueError("python grader source must define grade(sample, item)")


def run_sandboxed(source: str, pairs: list[tuple[dict, dict]], limits: SandboxLimits) -> list[float | SandboxError]:
    """Score each (sample, item) pair with the source's ``grade``, in one sandboxed process."""
    if not pairs:
        return []
    with tempfile.TemporaryDirectory(prefix="rlft-grader-") as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"},
            start_new_session=True,
            preexec_fn=lambda: _limit(limits),
        )
        request = json.dumps({"source": source, "pairs": pairs})
        try:
            out, _ = proc.communicate(request.encode(), timeout=limits.wall_timeout_s)
            ended = _exit_reason(proc.returncode, limits)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            ended = f"timed out after {limits.wall_timeout_s}s (wall clock)"
    return _results(out.decode(errors="replace"), len(pairs), ended)


def _limit(limits: SandboxLimits) -> None:
    """In the child before exec: resource limits (soft = hard, so the grader cannot raise them back)."""
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mib * mib, limits.memory_mib * mib))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mib * mib, limits.max_file_mib * mib))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_reason(returncode: int, limits: SandboxLimits) -> str:
    if returncode == -signal.SIGXCPU or returncode == -signal.SIGKILL:
        return f"killed at its CPU-time limit ({limits.cpu_seconds}s)"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _results(out: str, num_pairs: int, ended: str) -> list[float | SandboxError]:
    results: list[float | SandboxError] = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "fatal" in record:
            return [SandboxError(record["fatal"])] * num_pairs
        results.append(record["score"] if "score" in record else SandboxError(record["error"]))
    missing = num_pairs - len(results)
    return results[:num_pairs] + [SandboxError(f"grader process {ended} before scoring this sample")] * missing
