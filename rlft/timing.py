"""Wall seconds by name: the controller times each phase of a step with it, and every role actor the work inside
its engine (``rlft bench`` sets the two side by side). Imports nothing heavy, so any process can use it."""

from __future__ import annotations

import time
from contextlib import contextmanager


class PhaseTimer:
    """Seconds of each named phase, summed over its runs: ``with timer.phase("generate"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_seconds": value for name, value in self.seconds.items()}

    def take(self) -> dict[str, float]:
        """The seconds so far, and start again from none."""
        taken, self.seconds = self.seconds, {}
        return taken
