"""The suite's time budget, checked at the end of every whole-suite run (``make test``, ``make test-fast``).

The budget is the sum of the tests' own durations (setup, call and teardown, as ``--durations`` reports them),
not the wall clock, and it is written in one place: ``[tool.rlft.test_budget]`` in pyproject.toml. A run of the
whole suite whose sum passes it fails, even when every test passed. A run of a few files, or with ``-k``, is not
checked. Tests that take longer than ``slow_test_seconds`` without a docstring saying why are listed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The marker expression of each checked run: the budget key it is held to.
BUDGET_OF_MARKEXPR = {"": "suite_seconds", "not slow": "fast_seconds"}


def budget() -> dict[str, float]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["rlft"]["test_budget"]


class TimeBudget:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.seconds = 0.0
        self.by_test: dict[str, float] = {}
        self.docstrings: dict[str, str] = {}

    def checked_key(self) -> str | None:
        """The budget this run is held to: a run of the whole suite (the test paths of pyproject.toml, no ``-k``)
        with a marker expression of ``BUDGET_OF_MARKEXPR``; None for any other selection."""
        opt = self.config.option
        whole = [Path(a).resolve() for a in self.config.args] == [ROOT / "tests"]
        if not whole or opt.keyword or opt.lf or getattr(opt, "deselect", None):
            return None
        return BUDGET_OF_MARKEXPR.get((opt.markexpr or "").strip())

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, items):
        for item in items:
            doc = getattr(getattr(item, "function", None), "__doc__", None)
            self.docstrings[item.nodeid] = (doc or "").strip()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport):
        self.seconds += report.duration
        self.by_test[report.nodeid] = self.by_test.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        limits = budget()
        write = terminalreporter.write_line
        undocumented = [(s, t) for t, s in self.by_test.items()
                        if s > limits["slow_test_seconds"] and not self.docstrings.get(t)]
        for seconds, test in sorted(undocumented, reverse=True):
            write(f"time budget: {test} took {seconds:.0f} s (over {limits['slow_test_seconds']:g} s) and has no "
                  "docstring saying why")
        key = self.checked_key()
        if key is None:
            write(f"time budget: tests took {self.seconds:.0f} s in all (a partial run: not checked)")
            return
        verdict = "within" if self.seconds <= limits[key] else "OVER"
        write(f"time budget: tests took {self.seconds:.0f} s in all, {verdict} the budget of {limits[key]:g} s "
              f"({key} in pyproject.toml's [tool.rlft.test_budget])", bold=True, red=verdict == "OVER")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus):
        key = self.checked_key()
        if key is not None and self.seconds > budget()[key] and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(TimeBudget(config), "rlft_time_budget")
