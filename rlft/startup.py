"""Start-up marks: when each process of a run reached each point of its start-up.

Every process of a run (the driver and each role actor) calls ``mark(role, event)`` at the points that divide its
start-up: ``process`` (when the operating system started it), ``imports`` (its modules loaded), ``engine`` (its
engine built: vLLM, DeepSpeed, a grader pool), ``ready``. The driver adds ``ray`` (Ray's start) and the first
evaluation and step. Marks are JSON lines appended to the file ``RLFT_STARTUP_LOG`` names (the run's
``startup.jsonl``, opened by the driver with ``open_log``; role actors inherit the variable). Marks made before the
log is open are kept in memory and written when it opens.
``benchmarks/startup.py`` reads the file to break each role's start-up down and draw its timeline.

Standard library and psutil only, so that any process can mark before its heavy imports.
"""

from __future__ import annotations

import json
import os
import time

LOG_ENV = "RLFT_STARTUP_LOG"
FILE_NAME = "startup.jsonl"

_process_marked: set[str] = set()
_pending: list[str] = []  # marks made before the log was opened


def mark(role: str, event: str, at: float | None = None) -> None:
    """Append ``(role, event, wall time)`` to the run's start-up log. The first mark of a role in a process is
    preceded by a ``process`` mark: when the operating system started the process (a Ray worker may have been
    started before its actor was given to it)."""
    now = time.time() if at is None else at
    lines = []
    if role not in _process_marked:
        _process_marked.add(role)
        lines.append(_line(role, "process", process_start_time()))
    lines.append(_line(role, event, now))
    path = os.environ.get(LOG_ENV)
    if not path:
        _pending.extend(lines)
        return
    _append(path, lines)


def open_log(path: str) -> None:
    """Start the run's log at ``path`` (emptied), with the marks made so far in this process; role actors started
    from now on mark into it too. Opening the log that is open already keeps it."""
    if os.environ.get(LOG_ENV) != str(path):
        os.environ[LOG_ENV] = str(path)
        open(path, "w").close()
    _append(str(path), _pending)
    _pending.clear()


def _append(path: str, lines: list[str]) -> None:
    try:
        # One write per call with O_APPEND: lines from several processes never interleave.
        with open(path, "a") as f:
            f.write("".join(lines))
    except OSError:
        pass  # a diagnostic only: never a reason to fail a role


def _line(role: str, event: str, at: float) -> str:
    return json.dumps({"role": role, "event": event, "t": at, "pid": os.getpid()}) + "\n"


def process_start_time() -> float:
    """Wall time at which this process started."""
    import psutil

    return psutil.Process().create_time()


def read(path: str) -> list[dict]:
    """The marks of a start-up log, in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
