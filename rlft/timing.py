"""Wall seconds by phase: the controller times each phase of a step with it, and every role actor the work inside
its engine under the phase it belongs to (``rlft bench`` sets the two side by side). Imports nothing heavy, so any
process can use it."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rlft.names import Phase


class PhaseTimer:
    """Seconds of each phase, summed over its runs: ``with timer.phase(Phase.GENERATE): ...``; ``seconds`` is keyed
    by the phase's name (``"generate"``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, phase: Phase):
        name = Phase(phase).value
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
