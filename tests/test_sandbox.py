"""The sandbox against escapes, class by class. Every attack's harmful effect is checked where it would land: on disk
(files outside, a file it could see), on the network (a loopback listener this test starts), and in the process
table (a victim process, processes left running), not by the error message.

Each attack runs twice: through the OS boundary alone (``run_python(..., audit_hook=False)``) and as a ``python``
grader, with both layers (``run_sandboxed``; the grader pool and ``rlft grade`` further down).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from rlft.graders.config import GraderConfig, GraderItemConfig
from rlft.graders.graders import GradeRequest
from rlft.graders.pool import GraderPool
from rlft.graders.sandbox import PythonGraderLimits, run_sandboxed
from rlft.sandbox import SandboxLimits, namespaces_unavailable, run_python

pytestmark = pytest.mark.skipif(namespaces_unavailable() is not None, reason=f"{namespaces_unavailable()}")

LIMITS = PythonGraderLimits(wall_timeout_s=15, cpu_seconds=10, memory_mib=512)
PROJECT_FILE = Path(__file__).resolve().parents[1] / "rlft" / "__init__.py"


class Listener:
    """A loopback TCP listener that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def world(tmp_path):
    """What an attack aims at: paths outside (one the sandbox cannot see, one it sees read-only), a file it can see
    (in the Python installation's tree, mounted read-only), a victim process, a listener, a marker for the process
    table, a secret in a host file and in the environment."""
    keep = Path(sys.prefix) / f"rlft-sandbox-keep-{uuid.uuid4().hex[:8]}"
    keep.write_text("keep")
    keep.chmod(0o644)
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-7d1f")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    listener = Listener()
    os.environ["RLFT_SANDBOX_SECRET"] = "env-secret-3a9c"
    w = {
        "TARGET": str(tmp_path / "escaped.txt"),
        "TARGET2": str(Path(sys.prefix) / f"rlft-sandbox-escaped-{uuid.uuid4().hex[:8]}"),
        "KEEP": str(keep),
        "SECRET": str(secret),
        "PROJECT": str(PROJECT_FILE),
        "PORT": listener.port,
        "VICTIM": victim.pid,
        "MARKER": f"rlft-escape-{uuid.uuid4().hex[:8]}",
        "PYTHON": sys.executable,
    }
    before = os.stat(keep)
    yield w
    # Effects that must not be there, whatever the attack.
    try:
        assert not os.path.exists(w["TARGET"]) and not os.path.exists(w["TARGET2"]), "a file was written outside"
        after = os.stat(keep)
        assert keep.read_text() == "keep", "a file outside was changed"
        assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
        assert os.listxattr(keep) == [], "extended attributes were set on a file outside"
        time.sleep(0.3)
        assert listener.accepted == 0, "the sandbox reached a loopback listener"
        assert victim.poll() is None, "the sandbox killed a process outside"
        left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if w["MARKER"] in " ".join(p.info["cmdline"] or [])]
        assert left == [], f"processes started in the sandbox outlived it: {left}"
    finally:
        os.environ.pop("RLFT_SANDBOX_SECRET", None)
        victim.kill()
        listener.close()
        for path in (keep, Path(w["TARGET2"])):
            path.unlink(missing_ok=True)


# Every attack: lines run one by one, each failure ignored, so that what counts is what happened, not what raised.
# ``took`` collects what an attack got hold of; it comes back as the result.
ATTACKS = {
    # --- the audit hook switched off from inside, then the harm
    "hook: clear __main__": ["import __main__; vars(__main__).clear()"],
    "hook: replace builtins": ["import builtins; builtins.isinstance = lambda *a: True; builtins.any = lambda *a: False"],
    "hook: patch path helpers": ["import posixpath; posixpath.normpath = lambda p: '/sandbox/x'",
                                 "import posixpath; posixpath.join = lambda *a: '/sandbox/x'"],
    "hook: reach it through gc": [
        "import gc; hooks = [f for f in gc.get_objects() if getattr(f, '__name__', '') == 'hook']",
        "for f in hooks: f.__code__ = (lambda event, args: None).__code__",
    ],
    "hook: through a traceback": [
        "try:\n    open(TARGET2, 'w')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
        "    while tb.tb_next:\n        tb = tb.tb_next\n    tb.tb_frame.f_locals.update(blocked=(), paths={})\n"
        "    tb.tb_frame.f_globals.clear()",
    ],
    # --- processes the hook does not see
    "process: fork_exec": [
        "import _posixsubprocess",
        "import subprocess; subprocess.Popen([PYTHON, '-c', 'import time; time.sleep(300)', MARKER], start_new_session=True)",
        "import subprocess; subprocess.Popen(['/bin/sh', '-c', f'echo x > {TARGET}; echo x > {TARGET2}; exec 3<>/dev/tcp/127.0.0.1/{PORT}'])",
    ],
    "process: multiprocessing spawn": [
        "import multiprocessing as mp; ctx = mp.get_context('spawn'); p = ctx.Process(target=print, args=(MARKER,)); p.start()",
        "import multiprocessing as mp; p = mp.get_context('fork').Process(target=__import__('time').sleep, args=(300,)); p.start()",
    ],
    "process: fork and outlive": [
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    os.execv(PYTHON, [PYTHON, '-c', 'import time; time.sleep(300)', MARKER])",
        "import os; os.posix_spawn(PYTHON, [PYTHON, '-c', 'import time; time.sleep(300)', MARKER], {})",
    ],
    "process: fork bomb": ["import os\nfor _ in range(100000):\n    os.fork()"],
    # --- signals to processes outside
    "signal: kill": ["import os; os.kill(VICTIM, 9)", "import os; os.kill(os.getppid(), 9)", "import os; os.kill(-1, 9)"],
    "signal: pidfd_send_signal": ["import os, signal; signal.pidfd_send_signal(os.pidfd_open(VICTIM), 9)",
                                  "import os, signal; signal.pidfd_send_signal(os.pidfd_open(1), 9)"],
    "signal: killpg": ["import os; os.killpg(os.getpgid(VICTIM), 9)", "import os; os.killpg(0, 9)"],
    # --- writes outside the working directory
    "write: chdir then relative": ["import os; os.chdir('/')", "open(TARGET2.lstrip('/'), 'w').write('x')",
                                   "open('../' * 8 + TARGET.lstrip('/'), 'w').write('x')"],
    "write: dir_fd": ["import os; d = os.open(os.path.dirname(TARGET2), os.O_RDONLY); os.open(os.path.basename(TARGET2), os.O_CREAT | os.O_WRONLY, dir_fd=d)",
                      "import os; d = os.open(os.path.dirname(KEEP), os.O_RDONLY); os.unlink(os.path.basename(KEEP), dir_fd=d)"],
    "write: sqlite3": ["import sqlite3; sqlite3.connect(TARGET2).execute('create table t (x)')"],
    "write: mkfifo and mknod": ["import os; os.mkfifo(TARGET2)", "import os, stat; os.mknod(TARGET2, stat.S_IFREG | 0o644)"],
    "write: through an open fd": ["import os; fd = os.open(KEEP, os.O_RDONLY); os.fchmod(fd, 0o777)",
                                  "import os; fd = os.open(KEEP, os.O_RDONLY); os.fchown(fd, 1000, 1000)",
                                  "import os; fd = os.open(KEEP, os.O_RDWR); os.write(fd, b'pwned')"],
    "write: xattr and the file itself": ["import os; os.setxattr(KEEP, 'user.rlft', b'1')",
                                         "open(KEEP, 'w').write('pwned')", "import os; os.truncate(KEEP, 0)",
                                         "import os; os.rename(KEEP, KEEP + '.moved')", "import os; os.remove(KEEP)",
                                         "import os; os.chmod(KEEP, 0o777)"],
    # --- reads
    "read: host files": ["took.append(open('/etc/shadow').read())", "took.append(open(SECRET).read())",
                         "took.append(open(PROJECT).read())", "took.append(open('/etc/hostname').read())",
                         "import os; took.append(str(os.listdir(os.path.expanduser('~'))))",
                         "import glob; took.append(str(glob.glob('/tmp/ray/*')))"],
    "read: the parent's environment": ["import os; took.append(open(f'/proc/{os.getppid()}/environ').read())",
                                       "took.append(open('/proc/1/environ').read())",
                                       "import os; took.append(os.environ.get('RLFT_SANDBOX_SECRET', ''))",
                                       "took.append(open('/proc/self/environ').read())"],
    # --- network
    "network: connect": ["import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2)",
                         "import urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=2)"],
}


def attack_program(lines: list[str], world: dict) -> str:
    """The attack as a program: the world's names as globals, each line in its own try, what it took on the result
    channel."""
    setup = "".join(f"{name} = {value!r}\n" for name, value in world.items())
    body = "".join(f"try:\n{textwrap.indent(line, '    ')}\nexcept BaseException:\n    pass\n" for line in lines)
    report = "import os\nos.write(RESULT_FD, repr([t for t in took if t not in ('', '[]')]).encode())\n"
    return setup + "took = []\n" + body + report


def attack_grader(lines: list[str], world: dict) -> str:
    setup = "".join(f"{name} = {value!r}\n" for name, value in world.items())
    body = "".join(f"    try:\n{textwrap.indent(line, '        ')}\n    except BaseException:\n        pass\n"
                   for line in lines)
    return setup + "def grade(sample, item):\n    took = []\n" + body + "    return float(len(''.join(t for t in took if t not in ('', '[]'))))\n"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_os_boundary_alone_holds(name, world):
    done = run_python(attack_program(ATTACKS[name], world), b"", SandboxLimits(wall_timeout_s=8, cpu_seconds=8),
                      audit_hook=False)
    if name.startswith("read"):
        assert done.results == b"[]", f"{name}: the sandbox read {done.results[:200]!r}"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_python_grader_holds(name, world):
    (result,) = run_sandboxed(attack_grader(ATTACKS[name], world), [({"output_text": "x"}, {})], LIMITS)
    if name.startswith("read"):
        assert result == 0.0, f"{name}: the grader read {result} characters it should not see"


def test_sandbox_sees_only_the_interpreter_and_its_own_directory():
    program = ("import os, json\nos.write(RESULT_FD, json.dumps({'root': sorted(os.listdir('/')), 'cwd': os.getcwd(), "
               "'uid': os.getuid(), 'ppid': os.getppid(), 'w': open('f', 'w').write('ok')}).encode())")
    seen = json.loads(run_python(program, b"", SandboxLimits()).results)
    interpreter = {os.path.realpath(p).split("/")[1] for p in (sys.base_prefix, sys.prefix, sys.executable)}
    interpreter |= {p.split("/")[1] for p in (sys.base_prefix, sys.prefix)}
    expected = {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "dev", "sandbox"} | interpreter
    assert set(seen["root"]) <= expected, f"the sandbox sees {set(seen['root']) - expected}"
    assert not {"etc", "proc", "tmp", "home"} & (set(seen["root"]) - interpreter)
    assert seen["cwd"] == "/sandbox" and seen["uid"] == 1000 and seen["ppid"] == 1 and seen["w"] == 2


def test_printing_a_gigabyte_costs_the_parent_nothing():
    me = psutil.Process()
    before = me.memory_info().rss
    program = "import os, sys\nchunk = b'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)\nos.write(RESULT_FD, b'done')"
    done = run_python(program, b"", SandboxLimits(wall_timeout_s=60, cpu_seconds=60))
    assert done.results == b"done" and done.ended is None
    assert len(done.stdout) == SandboxLimits().max_output_bytes
    assert done.stdout_dropped == 2**30 - len(done.stdout)
    assert me.memory_info().rss - before < 64 * 2**20


def test_prints_never_shift_scores():
    source = textwrap.dedent("""
        import os, sys
        def grade(sample, item):
            print('{"score": 0.0}')
            print('{"i": 0, "score": 99.0}', file=sys.stderr)
            os.write(1, b'{"i": 1, "score": 42.0}\\n')
            return float(item["n"])
    """)
    pairs = [({"output_text": "x"}, {"n": n}) for n in (1, 2, 3)]
    assert run_sandboxed(source, pairs, LIMITS) == [1.0, 2.0, 3.0]


def test_scores_finished_before_a_timeout_are_kept():
    """Through the pool: the sandbox's wall limit ends before the pool's wait, so samples 0 and 1 keep their scores
    and only sample 2, which hangs, is a timeout."""
    spec = {"type": "python", "source": "import time\ndef grade(sample, item):\n    if item['n'] == 2:\n"
                                         "        time.sleep(60)\n    return 1.0"}
    cfg = GraderConfig(items=[GraderItemConfig(name="slow", type="openai", spec=spec)], timeout_s=3.0,
                       fallback_score=-1.0)
    pool = GraderPool(cfg, local=True)
    result = pool.grade([GradeRequest([], "x", {"n": n}) for n in range(3)])
    assert result.scores["slow"] == [1.0, 1.0, -1.0]
    assert result.num_errors + result.num_timeouts == 1


def write_grade_inputs(tmp_path: Path, sandbox: str | None) -> tuple[Path, Path]:
    section = {"items": [{"name": "py", "type": "openai",
                          "spec": {"type": "python", "source": "def grade(sample, item):\n    return 1.0"}}]}
    if sandbox:
        section["sandbox"] = sandbox
    config = tmp_path / f"graders-{sandbox}.yaml"
    config.write_text(yaml.safe_dump({"graders": section}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"completion": "x", "item": {}}) + "\n")
    return config, samples


def test_rlft_grade_runs_python_graders_in_the_sandbox(tmp_path):
    config, samples = write_grade_inputs(tmp_path, None)
    done = subprocess.run([sys.executable, "-m", "rlft.cli", "grade", str(config), "--samples", str(samples),
                           "--show", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1.0" in done.stdout


@pytest.mark.slow  # two `rlft grade` processes
def test_without_user_namespaces_python_graders_are_refused_not_downgraded(tmp_path):
    """A host without user namespaces (here: a namespace whose limit is 0): the namespace sandbox is refused with the
    setting that allows the weaker mode; with that setting the grader runs."""
    no_userns = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\""
    for sandbox, rc in ((None, 2), ("audit_hook_only", 0)):
        config, samples = write_grade_inputs(tmp_path, sandbox)
        done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", no_userns, "sh", sys.executable,
                               "-m", "rlft.cli", "grade", str(config), "--samples", str(samples)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == rc, done.stderr
        if rc:
            assert "graders.sandbox" in done.stderr and "audit_hook_only" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
