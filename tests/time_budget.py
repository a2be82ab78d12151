"""The suite's time budget, checked at the end of every whole-suite run (``make test``, ``make test-fast``).

The budget is the sum of the tests' own durations (setup, call and teardown, as ``--durations`` reports them),
not the wall clock, and it is written in one place: ``[tool.rlft.test_budget]`` in pyproject.toml. Under
``pytest -n`` (``make test``) each worker runs its tests one after another, and the busiest worker's sum is held to
the budget (about the run's wall time); the sum over all workers is printed beside it. A run of the whole suite
whose sum passes the budget fails, even when every test passed. A run of a few files, or with ``-k``, is not
checked. Tests that take longer than ``slow_test_seconds`` without a docstring saying why are listed.

Durations are seconds on whatever machine runs the suite, and 2-core machines differ by half or more (the same
suite took 20 minutes on one and 35 on another). So the budgets are written for the machine they were measured on,
and a checked run first times a fixed piece of the suite's own work (``CALIBRATION``: the imports every role pays,
then forward and backward passes of the tiny model on one thread) in a fresh interpreter, before the workers start.
The budget is scaled by that CPU time over ``reference_calibration_seconds``, the same piece's on the budgets'
machine, when that is more than 1: a machine twice as slow gets twice the seconds. A faster machine keeps the
budgets as written: the calibration follows the suite only roughly (a run's start-up took 2.3 times the CPU on one
machine as on another, whose whole suite was 1.4-1.7 times as fast), so scaling down would fail sound runs there.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The marker expression of each checked run: the budget key it is held to.
BUDGET_OF_MARKEXPR = {"": "suite_seconds", "not slow": "fast_seconds"}


# What most of the suite's time is made of: the imports of every rlft process (torch, transformers and, through the
# model's masking code, torch._dynamo) and small forward and backward passes on one thread.
CALIBRATION = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=293, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2))
ids = torch.randint(0, 293, (32, 32))
for _ in range(10):
    model(input_ids=ids, labels=ids).loss.backward()
"""


def budget() -> dict[str, float]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["rlft"]["test_budget"]


def calibration_seconds() -> float:
    """CPU seconds (user and system) of ``CALIBRATION`` in a fresh interpreter on one thread."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", CALIBRATION], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class TimeBudget:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.by_worker: dict[str, float] = {}
        self.by_test: dict[str, float] = {}
        self.documented: set[str] = set()
        self.scale = 1.0  # this machine's calibration over the reference machine's, at least 1
        self.calibration = ""

    @pytest.hookimpl(tryfirst=True)  # before pytest -n starts its workers: the machine is otherwise idle
    def pytest_sessionstart(self, session: pytest.Session):
        if self.checked_key() is None:
            return
        reference = budget()["reference_calibration_seconds"]
        here = calibration_seconds()
        self.scale = max(1.0, here / reference)
        self.calibration = (f"the calibration took {here:.1f} CPU-s here against {reference:g} on the budgets' "
                            f"machine, so the budgets scale by {self.scale:.2f} (never below 1)")

    def limit(self, key: str) -> float:
        return budget()[key] * self.scale

    def checked_key(self) -> str | None:
        """The budget this run is held to: a run of the whole suite (the test paths of pyproject.toml, no ``-k``)
        with a marker expression of ``BUDGET_OF_MARKEXPR``; None for any other selection."""
        opt = self.config.option
        whole = [Path(a).resolve() for a in self.config.args] == [ROOT / "tests"]
        partial = opt.keyword or opt.collectonly or getattr(opt, "lf", False) or getattr(opt, "deselect", None)
        if not whole or partial:
            return None
        return BUDGET_OF_MARKEXPR.get((opt.markexpr or "").strip())

    def seconds(self) -> float:
        """What the budget holds: the busiest worker's sum (the only one's, without ``pytest -n``)."""
        return max(self.by_worker.values(), default=0.0)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport):
        node = getattr(report, "node", None)  # the worker that ran it, under pytest -n
        worker = node.gateway.id if node is not None else "main"
        self.by_worker[worker] = self.by_worker.get(worker, 0.0) + report.duration
        self.by_test[report.nodeid] = self.by_test.get(report.nodeid, 0.0) + report.duration
        if dict(report.user_properties).get("has_docstring"):
            self.documented.add(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        limits = budget()
        write = terminalreporter.write_line
        slow = self.limit("slow_test_seconds")
        undocumented = [(s, t) for t, s in self.by_test.items() if s > slow and t not in self.documented]
        for seconds, test in sorted(undocumented, reverse=True):
            write(f"time budget: {test} took {seconds:.0f} s (over {slow:.0f} s) and has no docstring saying why")
        key = self.checked_key()
        spent = self.seconds()
        workers = ", ".join(f"{w} {s:.0f} s" for w, s in sorted(self.by_worker.items()))
        summed = f"{sum(self.by_worker.values()):.0f} s in all ({workers})"
        if key is None:
            write(f"time budget: tests took {summed} (a partial run: not checked)")
            return
        limit = self.limit(key)
        verdict = "within" if spent <= limit else "OVER"
        write(f"time budget: {self.calibration}")
        write(f"time budget: tests took {summed}; the busiest worker's {spent:.0f} s is {verdict} the budget of "
              f"{limit:.0f} s ({key} = {limits[key]:g} in pyproject.toml's [tool.rlft.test_budget], scaled by "
              f"{self.scale:.2f})", bold=True, red=verdict == "OVER")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus):
        key = self.checked_key()
        if key is not None and self.seconds() > self.limit(key) and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Whether the test says why it is slow travels with its reports (to the controller, under pytest -n)."""
    doc = getattr(getattr(item, "function", None), "__doc__", None)
    item.user_properties.append(("has_docstring", bool((doc or "").strip())))


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest -n worker: the controller, which sees every report, keeps count
        return
    config.pluginmanager.register(TimeBudget(config), "rlft_time_budget")
