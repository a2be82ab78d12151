"""Wall seconds by phase, and the deadline of every remote call made inside a phase.

The controller times each phase of a step with ``PhaseTimer``, and every role actor the work inside its engine
under the phase it belongs to (``rlft bench`` sets the two side by side). In the driver of a run
(``rlft.distributed.stacks.watch``), a remote call made inside a phase waits at most ``ray.call_timeout_s``
(``call_timeout_s()``; calls that pass their own timeout keep it). A phase whose call overruns that deadline has
the stacks of every actor written (the ``on_overrun`` that the driver's watcher hands ``set_call_timeout``) and
fails with ``PhaseTimeoutError``, which names the phase, the actors that did not answer and where the stacks are.
Imports nothing heavy and nothing of rlft's above it, so any process can use it.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable

from rlft.errors import PeerTimeoutError
from rlft.names import Phase

logger = logging.getLogger(__name__)

# ``ray.call_timeout_s`` in the driver of a run; None elsewhere (role actors, tools), where phases only time.
_call_timeout_s: float | None = None
# Writes every actor's stacks for a reason and says where (None when it could not); set with the deadline.
_on_overrun: Callable[[str], Path | None] | None = None
_current_phase: ContextVar[str | None] = ContextVar("rlft_phase", default=None)


def set_call_timeout(seconds: float | None, on_overrun: Callable[[str], Path | None] | None = None) -> None:
    """Give calls inside phases ``seconds`` as their deadline (None: no deadline). ``on_overrun(reason)`` writes
    every actor's stacks when a phase overruns it and returns where, or None."""
    global _call_timeout_s, _on_overrun
    _call_timeout_s, _on_overrun = seconds, on_overrun


def call_timeout_s() -> float | None:
    """The deadline of a remote call made now: ``ray.call_timeout_s`` inside a phase of the driver, else None."""
    return _call_timeout_s if _current_phase.get() is not None else None


class PhaseTimeoutError(PeerTimeoutError):
    """A call of a phase overran its deadline. ``phase``: the phase's name; ``stacks_dir``: where every actor's stacks
    were written (None when none could be)."""

    def __init__(self, message: str, phase: str, stacks_dir=None):
        super().__init__(message)
        self.phase, self.stacks_dir = phase, stacks_dir


class PhaseTimer:
    """Seconds of each phase, summed over its runs: ``with timer.phase(Phase.GENERATE): ...``; ``seconds`` is keyed
    by the phase's name (``"generate"``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, phase: Phase):
        name = Phase(phase).value
        token = _current_phase.set(name)
        start = time.perf_counter()
        try:
            yield
        except Exception as err:
            if _call_timeout_s is None or isinstance(err, PhaseTimeoutError) or not _overran(err):
                raise
            raise _phase_timeout(name, err) from err
        finally:
            _current_phase.reset(token)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_seconds": value for name, value in self.seconds.items()}

    def take(self) -> dict[str, float]:
        """The seconds so far, and start again from none."""
        taken, self.seconds = self.seconds, {}
        return taken


def _overran(err: Exception) -> bool:
    """A call that did not answer in time: a timeout, or a weight sync with peers still pending."""
    return isinstance(err, TimeoutError) or bool(getattr(err, "pending", None))


def _phase_timeout(phase: str, err: Exception) -> PhaseTimeoutError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    stacks_dir = _on_overrun(f"phase {phase}: {first}") if _on_overrun is not None else None
    where = f"stacks of every actor in {stacks_dir}" if stacks_dir is not None else "no actor stacks written"
    message = f"phase {phase} overran its deadline: {first}; {where}"
    logger.error(message)
    return PhaseTimeoutError(message, phase, stacks_dir)
