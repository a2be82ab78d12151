"""Run untrusted Python grader source (OpenAI's ``python`` grader: ``def grade(sample, item) -> float``) in the
sandbox (``rlft.sandbox``: namespaces the operating system enforces, resource limits, an audit hook).

    results = run_sandboxed(source, [(sample, item), ...], PythonGraderLimits())
    results[i]  # a float, or a SandboxError naming what went wrong for pair i

One sandbox process scores a worker's share of a batch. Each score comes back on the result channel tagged with its
sample's index, as soon as it is computed, so the grader's own prints cannot shift scores, and the scores finished
before a later sample hangs are kept when the wall-clock limit kills the process. The grader's stdout and stderr are
read up to a bound; the end of stderr goes into the reason of a grader that failed to load.

A grader that raises, returns something other than a finite number, or is killed costs the samples it had not
scored a ``SandboxError`` with the reason; the caller counts those and gives them the fallback score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlft.sandbox import SandboxLimits, SandboxMode, run_python

MAX_SOURCE_BYTES_DEFAULT = 64 * 1024


@dataclass(frozen=True)
class PythonGraderLimits(SandboxLimits):
    """The sandbox's limits, its mode (``graders.sandbox``) and the longest grader source accepted."""

    mode: SandboxMode = "namespaces"
    max_source_bytes: int = MAX_SOURCE_BYTES_DEFAULT


@dataclass(frozen=True)
class SandboxError:
    """Why one sample got no score: the grader's exception, a bad return value, or the process's end."""

    message: str

    def __str__(self) -> str:
        return self.message


# Runs inside the sandbox. Reads {"source", "pairs"} from stdin; writes one JSON line per scored pair, tagged with
# its index, to the result channel.
_RUNNER = r"""
import json, math, os, sys

def _main(result_fd):
    out = os.fdopen(result_fd, "w", buffering=1)
    emit = lambda record: out.write(json.dumps(record) + "\n")
    request = json.loads(sys.stdin.read())
    namespace = {"__name__": "grader"}
    try:
        exec(compile(request["source"], "<grader>", "exec"), namespace)
        grade = namespace["grade"]
        if not callable(grade):
            raise TypeError("grade is not a function")
    except BaseException as exc:
        emit({"fatal": f"loading the grader failed: {type(exc).__name__}: {exc}"[:500]})
        return
    for i, (sample, item) in enumerate(request["pairs"]):
        try:
            value = grade(sample, item)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                emit({"i": i, "error": f"grade returned {value!r:.80}, not a finite number"})
            else:
                emit({"i": i, "score": float(value)})
        except SystemExit:
            emit({"i": i, "error": "grade called exit()"})
        except BaseException as exc:
            emit({"i": i, "error": f"{type(exc).__name__}: {exc}"[:500]})

_main(RESULT_FD)
"""


def check_source(source: str, limits: PythonGraderLimits) -> None:
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


def run_sandboxed(source: str, pairs: list[tuple[dict, dict]], limits: PythonGraderLimits) -> list[float | SandboxError]:
    """Score each (sample, item) pair with the source's ``grade``, in one sandboxed process."""
    if not pairs:
        return []
    done = run_python(_RUNNER, json.dumps({"source": source, "pairs": pairs}).encode(), limits, limits.mode)
    results: list[float | SandboxError | None] = [None] * len(pairs)
    for line in done.results.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "fatal" in record:
            return [SandboxError(str(record["fatal"]))] * len(pairs)
        i = record.get("i")
        if isinstance(i, int) and 0 <= i < len(pairs) and results[i] is None:
            score = record.get("score")
            results[i] = float(score) if isinstance(score, (int, float)) else SandboxError(str(record.get("error")))
    ended = done.ended or "exited"
    if done.ended and done.ended.startswith("exited") and done.stderr:
        ended += f"; stderr ends: {done.stderr.decode(errors='replace').strip()[-300:]}"
    missing = SandboxError(f"grader process {ended} before scoring this sample")
    return [missing if r is None else r for r in results]
