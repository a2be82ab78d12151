"""Run untrusted Python in a sandbox that the operating system enforces; one mechanism for graders, environments
and tools.

    done = run_python(program, stdin=request_bytes, limits=SandboxLimits(), mode="namespaces")
    done.results       # bytes the program wrote to its result channel (``RESULT_FD`` in its globals)
    done.stdout        # its prints, at most ``limits.max_output_bytes`` (``done.stdout_dropped`` counts the rest)
    done.ended         # None when it exited by itself with status 0, else why it stopped

The boundary, from the outside in (``mode="namespaces"``, the default):

- fresh user, mount, network, PID, IPC and UTS namespaces (``unshare`` from util-linux). Inside, the program runs
  as uid/gid ``SANDBOX_UID`` (an unprivileged uid that owns nothing outside), with every capability dropped and
  ``no_new_privs`` set (``setpriv``);
- a root file system of its own: a read-only view of ``/usr`` (and the ``/bin``, ``/lib`` links), the Python
  installation and its site-packages, ``/dev/{null,zero,random,urandom}``, and one writable tmpfs, ``/sandbox``
  (also ``HOME`` and ``TMPDIR``), of ``limits.max_file_mib``. No host ``/proc``, ``/etc``, ``/tmp``, ``/root``,
  project directory or Ray session directory; the host root is detached (``pivot_root``), not hidden;
- no network at all: the namespace has only a loopback interface, and it is down;
- only the sandbox's own processes are visible or signalable (its PID namespace);
- resource limits (address space, CPU seconds, file size, open files, processes) set before it starts;
- a wall-clock limit that kills the namespace's first process, and with it every process in the namespace;
- an audit hook (PEP 578) as a second layer: no sockets, no new processes, no signals, no ctypes, no writes outside
  the working directory, no reaching the hook through ``gc`` or frames. Its settings live in a closure the
  program cannot name;
- results on a channel of their own (a pipe, ``RESULT_FD``), never on stdout; stdout and stderr are read up to a
  bound and the rest dropped, so a program that prints gigabytes costs the parent nothing.

``mode="audit_hook_only"`` keeps the resource limits, the audit hook, the result channel, a throw-away working
directory and the wall-clock limit, without the namespaces: for hosts where user namespaces are off. It is weaker
(PEP 578 hooks are not a security boundary) and only runs where the configuration asks for it by name.
"""

from __future__ import annotations

import functools
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

SandboxMode = Literal["namespaces", "audit_hook_only"]
SANDBOX_MODES: tuple[str, ...] = ("namespaces", "audit_hook_only")

# Inside the namespace the program runs as this uid and gid; outside they map to ``HOST_UID``, which owns no file.
SANDBOX_UID = 1000
HOST_UID = 1_100_000
MIB = 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    wall_timeout_s: float = 10.0
    cpu_seconds: int = 10
    memory_mib: int = 1024
    max_file_mib: int = 16  # the writable /sandbox, and any one file
    max_processes: int = 32
    max_output_bytes: int = 64 * 1024  # kept of each of stdout and stderr
    max_result_bytes: int = 4 * MIB  # kept of the result channel


@dataclass(frozen=True)
class Completed:
    results: bytes
    stdout: bytes
    stderr: bytes
    stdout_dropped: int  # bytes printed beyond ``max_output_bytes``
    stderr_dropped: int
    ended: str | None  # None: exited with status 0; otherwise why it stopped ("timed out after 10s", ...)


class SandboxUnavailableError(RuntimeError):
    """The namespace sandbox cannot start on this host; the message says why and which setting allows the weaker
    mode."""


def run_python(
    program: str, stdin: bytes, limits: SandboxLimits, mode: SandboxMode = "namespaces", audit_hook: bool = True
) -> Completed:
    """Run ``program`` (Python source; it finds its result channel's fd in the global ``RESULT_FD``) with
    ``stdin``, inside the sandbox ``mode``; returns what it wrote, never raises for what the program did.
    ``audit_hook=False`` leaves out the second layer (for testing what the OS boundary alone holds)."""
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode must be one of {SANDBOX_MODES}, got {mode!r}")
    if mode == "namespaces":
        require_namespaces()
    return _run(program, stdin, limits, mode, audit_hook)


def _run(program: str, stdin: bytes, limits: SandboxLimits, mode: SandboxMode, audit_hook: bool = True) -> Completed:
    result_r, result_w = os.pipe()
    go_r, go_w = os.pipe()
    scratch = tempfile.mkdtemp(prefix="rlft-sandbox-")
    try:
        if mode == "namespaces":
            boot = _bootstrap(program, "/sandbox", result_w, audit_hook)
            argv, cwd, env = _namespace_argv(boot, scratch, go_r, limits), "/", _LAUNCH_ENV
        else:
            argv, cwd = [sys.executable, "-I", "-c", _bootstrap(program, scratch, result_w, audit_hook)], scratch
            env = {**_PROGRAM_ENV, "HOME": scratch, "TMPDIR": scratch}
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            pass_fds=(result_w, go_r),
            start_new_session=True,
            preexec_fn=functools.partial(_set_limits, limits),
        )
        os.close(result_w)
        os.close(go_r)
        result_w = go_r = -1
        if mode == "namespaces":
            _map_ids(proc.pid)
        os.write(go_w, b"go\n")
        return _collect(proc, os.fdopen(result_r, "rb", buffering=0), stdin, limits)
    finally:
        for fd in (result_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why the namespace sandbox cannot start here, or None when it can (tried once per process)."""
    missing = [tool for tool in ("unshare", "setpriv", "mount", "pivot_root") if shutil.which(tool, path=_TOOL_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not found (util-linux)"
    try:
        done = _run("import os; os.write(RESULT_FD, b'ok')", b"", SandboxLimits(wall_timeout_s=30.0), "namespaces")
    except OSError as exc:
        hint = "" if os.geteuid() == 0 else " (mapping the sandbox's unprivileged uid needs rlft to run as root)"
        return f"starting it failed: {exc}{hint}"
    if done.results != b"ok":
        return f"a trial run failed ({done.ended}): {done.stderr.decode(errors='replace').strip()[-300:]}"
    return None


def require_namespaces(setting: str = "graders.sandbox") -> None:
    """Raise ``SandboxUnavailableError`` naming ``setting`` when the namespace sandbox cannot run here."""
    reason = namespaces_unavailable()
    if reason:
        raise SandboxUnavailableError(
            f"the namespace sandbox cannot start on this host: {reason}. rlft does not run user code without it "
            f"unless asked: set {setting}: audit_hook_only for the weaker, audit-hook-only sandbox"
        )


# ------------------------------------------------------------------------------------------------------------------
# Launching

_TOOL_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
_LAUNCH_ENV = {"PATH": _TOOL_PATH, "LANG": "C.UTF-8"}
_PROGRAM_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": "/sandbox", "TMPDIR": "/sandbox"}

# Runs (bash) as root of the new user namespace, in its own mount namespace: waits for the uid maps, builds the new root
# in $1 (a host scratch directory, seen only from inside), pivots into it and runs the program as the sandbox uid. bash itself may
# have started before the maps were written, and so without capabilities: every privileged step is a command. Arguments:
# scratch dir, go fd, /sandbox size (MiB), python, bootstrap, then the read-only paths.
_SETUP = r"""
set -eu
root=$1 go=$2 work_mib=$3 python=$4 boot=$5
shift 5
read -r _ <&"$go" || true
exec {go}<&-
mount -t tmpfs -o size=4m,mode=0755 rlft-root "$root"
for path in "$@"; do
    if [ -L "$path" ]; then
        mkdir -p "$root$(dirname "$path")"
        ln -s "$(readlink "$path")" "$root$path"
    elif [ -e "$path" ]; then
        mkdir -p "$root$path"
        mount --bind "$path" "$root$path"
        mount -o remount,bind,ro,nosuid,nodev "$root$path"
    fi
done
mkdir -p "$root/dev" "$root/sandbox" "$root/old" "$root/proc"
for device in null zero random urandom; do
    touch "$root/dev/$device"
    mount --bind "/dev/$device" "$root/dev/$device"
done
mount -t tmpfs -o "size=${work_mib}m,mode=0700,uid=__UID__,gid=__UID__,nosuid,nodev" rlft-work "$root/sandbox"
cd "$root"
pivot_root . old
mount -t proc rlft-proc /proc  # umount reads /proc/self/mountinfo; this /proc shows only the sandbox's processes
umount -l /old
umount -l /proc
rmdir /old /proc
mount -o remount,bind,ro /
status=0
/usr/bin/setpriv --reuid=__UID__ --regid=__UID__ --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- /usr/bin/env -i -C /sandbox PATH=/usr/bin:/bin LANG=C.UTF-8 PYTHONHASHSEED=0 HOME=/sandbox TMPDIR=/sandbox \
    "$python" -I -c "$boot" || status=$?
exit "$status"  # 128 + N when a signal killed it (unshare itself cannot always pass a signal on)
""".replace("__UID__", str(SANDBOX_UID))


def _namespace_argv(boot: str, scratch: str, go_fd: int, limits: SandboxLimits) -> list[str]:
    python = sys.executable
    return [
        "unshare", "--user", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
        "--", "/bin/bash", "-c", _SETUP, "rlft-sandbox",
        scratch, str(go_fd), str(limits.max_file_mib), python, boot,
        *_read_only_paths(),
    ]  # fmt: skip


@functools.cache
def _read_only_paths() -> tuple[str, ...]:
    """What the interpreter needs, and nothing else: /usr, the merged-/usr links, the Python installation (and the
    virtual environment's, with its site-packages)."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]
    for prefix in {sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        real = os.path.realpath(prefix)
        if not any(real == p or real.startswith(p + "/") for p in paths):
            paths.append(real)
    if sys.prefix != os.path.realpath(sys.prefix):
        paths.append(sys.prefix)
    return tuple(paths)


def _map_ids(pid: int) -> None:
    """From outside (root here): map root of ``pid``'s new user namespace to root, for building its file system,
    and ``SANDBOX_UID`` to ``HOST_UID``, for running the program. Waits until ``unshare`` has made the namespace."""
    own = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            if os.readlink(f"/proc/{pid}/ns/user") != own:
                break
        except FileNotFoundError:
            return  # it already died; its stderr says why
        if time.monotonic() > deadline:
            raise OSError(f"unshare (pid {pid}) did not create its user namespace within 10 s")
        time.sleep(0.0005)
    mapping = f"0 0 1\n{SANDBOX_UID} {HOST_UID} 1\n"
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(mapping)


def _set_limits(limits: SandboxLimits) -> None:
    """In the child before exec: soft = hard, so the program cannot raise them back."""
    for limit, value in (
        (resource.RLIMIT_AS, limits.memory_mib * MIB),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.max_file_mib * MIB),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_NPROC, limits.max_processes),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


# ------------------------------------------------------------------------------------------------------------------
# Inside: the audit hook, then the program

# Installs the hook from a function's closure (nothing at module level names its settings), then runs the program
# in a fresh namespace that has only RESULT_FD. Formatted with the working directory, the result fd and the program.
_BOOTSTRAP = r'''
def _install(root, startswith=str.startswith, isinstance=isinstance, str=str, bytes=bytes, int=int, any=any,
             PermissionError=PermissionError):
    import os, posixpath, sys
    fsdecode, normpath, join, getcwd = os.fsdecode, posixpath.normpath, posixpath.join, os.getcwd
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
               "subprocess.", "os.kill", "os.killpg", "signal.", "pty.", "ctypes.", "resource.setrlimit",
               "resource.prlimit", "os.setuid", "os.chroot", "os.chdir", "os.mkfifo", "os.mknod", "os.setxattr",
               "os.removexattr", "sys.settrace", "sys.setprofile", "sys._current_frames",
               "gc.get_", "cpython.", "sqlite3.", "os.chflags", "os.lchflags", "code.__new__", "function.__new__",
               "sys.addaudithook")
    blocked_modules = ("_posixsubprocess", "_ctypes", "_sqlite3", "_xxsubinterpreters")
    paths = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
             "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
             "shutil.copyfile": 2, "shutil.move": 2}

    def inside(path):
        if path is None or isinstance(path, int):
            return False  # an fd (or dir_fd) cannot be checked by name: refused
        if isinstance(path, bytes):
            path = fsdecode(path)
        full = normpath(join(root, str(path)))
        return full == root or startswith(full, root + "/")

    def hook(event, args):
        if startswith(event, blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and startswith(args[0], blocked_modules):
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "object.__setattr__" and isinstance(args[0], type(hook)):
            raise PermissionError("sandbox: changing a function's attributes is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode and any(c in mode for c in "wax+")) or (flags & write_flags)
            if writes and not isinstance(path, int) and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in paths:
            for path in args[: paths[event]]:
                if not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")
            if event in ("os.chmod", "os.chown", "os.utime", "os.truncate") and isinstance(args[0], int):
                raise PermissionError(f"sandbox: {event} on a file descriptor is not allowed")
            dir_fds = [a for a in args[paths[event]:] if isinstance(a, int) and a != -1]
            if dir_fds and event not in ("os.chmod", "os.chown", "os.utime"):
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")

    sys.addaudithook(hook)
    if getcwd() != root:
        raise SystemExit("sandbox: not started in its working directory")


if %(audit_hook)r:
    _install(%(root)r)
del _install
exec(compile(%(program)r, "<sandbox>", "exec"), {"__name__": "__sandbox__", "RESULT_FD": %(result_fd)d})
'''


def _bootstrap(program: str, root: str, result_fd: int, audit_hook: bool = True) -> str:
    return _BOOTSTRAP % {"root": root, "program": program, "result_fd": result_fd, "audit_hook": audit_hook}


# ------------------------------------------------------------------------------------------------------------------
# Outside: feed stdin, read the three channels with bounds, enforce the wall-clock limit


def _collect(proc: subprocess.Popen, results_pipe, stdin: bytes, limits: SandboxLimits) -> Completed:
    deadline = time.monotonic() + limits.wall_timeout_s
    bounds = {"results": limits.max_result_bytes, "stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes}
    kept: dict[str, bytearray] = {name: bytearray() for name in bounds}
    dropped = dict.fromkeys(bounds, 0)
    selector = selectors.DefaultSelector()
    for name, pipe in (("results", results_pipe), ("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(pipe.fileno(), False)
        selector.register(pipe, selectors.EVENT_READ, name)
    os.set_blocking(proc.stdin.fileno(), False)
    pending = memoryview(stdin)
    if pending:
        selector.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    else:
        proc.stdin.close()
    ended: str | None = None
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                ended = f"timed out after {limits.wall_timeout_s:g}s (wall clock)"
                break
            for key, _ in selector.select(timeout=left):
                if key.data == "stdin":
                    try:
                        pending = pending[os.write(key.fd, pending[: 1 << 16]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buf, room = kept[key.data], bounds[key.data] - len(kept[key.data])
                buf += chunk[: max(room, 0)]
                dropped[key.data] += max(len(chunk) - max(room, 0), 0)
    finally:
        selector.close()
        if ended is not None or proc.poll() is None:
            _kill(proc)
        returncode = proc.wait()
        for pipe in (results_pipe, proc.stdout, proc.stderr, proc.stdin):
            if not pipe.closed:
                pipe.close()
    if ended is None:
        ended = _exit_reason(returncode, limits)
    return Completed(bytes(kept["results"]), bytes(kept["stdout"]), bytes(kept["stderr"]), dropped["stdout"],
                     dropped["stderr"], ended)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; ``unshare --kill-child`` takes the namespace's first process with it,
    and the kernel every other process in the namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_reason(returncode: int, limits: SandboxLimits) -> str | None:
    if returncode == 0:
        return None
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return f"killed at its CPU-time limit ({limits.cpu_seconds}s) or out of memory"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        return f"killed by signal {signal.Signals(returncode - 128).name}"
    return f"exited with status {returncode}"
