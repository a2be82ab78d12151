"""The grader pool: ``GraderPool``, a typed facade over ``num_grader_workers`` actors that score samples.

    pool = GraderPool(cfg.graders)
    result = pool.grade([GradeRequest(prompt.messages, completion, prompt.extra), ...])
    result.rewards                      # per sample: sum over graders of weight × score
    result.scores["math"]               # per sample, one grader
    result.metrics()                    # graders/errors, graders/timeouts, graders/invalid, graders/<name>/mean

    handle = pool.submit(requests)      # streaming: grade while the rollout workers generate the next batch
    result = pool.collect(handle)

A grader that raises, hangs or returns something other than a finite number costs the samples it was scoring
``fallback_score`` for that grader, and is counted; it never crashes or stalls the job. Two lines of defence:

1. Inside a worker (``GraderWorker``), each grader runs in a thread that the worker waits on for ``timeout_s``.
   A thread still running then is abandoned; samples it has not scored are timeouts.
2. The pool gives each worker's share a deadline (every grader's ``timeout_s`` plus a margin). A worker past it
   (e.g. stuck in C code that holds the GIL, where line 1 cannot act) is killed and replaced; its share counts as
   timeouts. A worker that abandoned a thread is replaced too, so stuck threads never pile up. A worker that died
   has its share sent once more to its replacement; a second death counts the share as errors.
"""

from __future__ import annotations

import dataclasses

import enum
import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from rlft import startup
from rlft.distributed.actors import Resources, slowest, spawn, wait
from rlft.errors import GraderFailureRateError, RestartBudgetError
from rlft.graders.config import GraderConfig, sandbox_limits, validate_graders
from rlft.graders.graders import BatchGrader, GradeRequest, Grader, SampleGrader, build_grader, extra_fields_of
from rlft.graders.openai_spec import GraderFailure
from rlft.names import Phase
from rlft.timing import PhaseTimer

logger = logging.getLogger(__name__)

# Added to a worker's deadline for the Ray round trip, so that only a worker that is really stuck gets killed.
STUCK_MARGIN_S = 5.0
# The longest a replacement worker may take to start (a process, imports); a share's deadline is pushed back by
# the time spent waiting for its worker to start.
RESTART_ALLOWANCE_S = 30.0


class Failure(enum.Enum):
    """Why a grader gave a sample no score."""

    ERROR = "error"
    TIMEOUT = "timeout"
    INVALID = "invalid"


# One grader's verdict on one sample: a finite score, or why there is none.
Outcome = float | Failure


@dataclass
class WorkerResult:
    outcomes: dict[str, list[Outcome]]  # grader name -> one outcome per request of the share
    num_stuck_threads: int  # abandoned grader threads still running in the worker
    examples: dict[str, str]  # grader name -> the first failure's reason in this share, if any
    memory_mib: float = 0.0  # the worker's resident memory after the share (its process and its children)


class GraderWorker:
    """Scores shares of a batch with every configured grader, each grader under a deadline of ``timeout_s``."""

    def __init__(self, cfg: GraderConfig, reward_models: dict[str, "RewardModelGroup"] | None = None):
        from rlft.distributed.stacks import install_handler  # stacks on a phase overrun (rlft/timing.py)
        install_handler()
        startup.mark("grader", "actor")
        self.graders: list[Grader] = [
            build_grader(item, sandbox_limits(cfg), cfg.concurrency_per_worker, reward_models) for item in cfg.items
        ]
        self.timeout_s = cfg.timeout_s
        self._stuck: list[threading.Thread] = []
        self.clock = PhaseTimer()
        startup.mark("grader", "ready")

    def engine_seconds(self) -> dict[str, float]:
        """Seconds spent grading since the last call (``grade``)."""
        return self.clock.take()

    def ready(self) -> bool:
        """Answers once the worker is built (user functions imported), so start-up is never charged to a deadline."""
        return True

    def grade(self, requests: list[GradeRequest], extra_fields: list[str]) -> WorkerResult:
        """Every grader's outcome on every request; graders run one after another, each in its own thread.
        ``extra_fields`` are the extra columns user functions get (those of the whole batch, not just this share)."""
        examples: dict[str, str] = {}
        with self.clock.phase(Phase.GRADE):
            outcomes = {grader.name: self._run(grader, requests, extra_fields, examples) for grader in self.graders}
        self._stuck = [thread for thread in self._stuck if thread.is_alive()]
        return WorkerResult(outcomes, len(self._stuck), examples, resident_mib())

    def _run(
        self, grader: Grader, requests: list[GradeRequest], extra_fields: list[str], examples: dict[str, str]
    ) -> list[Outcome]:
        """Run ``grader`` in a daemon thread for at most ``timeout_s``; unscored requests are timeouts. The first
        failure's reason goes into ``examples[grader.name]``."""
        outcomes: list[Outcome] = [Failure.TIMEOUT] * len(requests)
        reasons: list[str] = []
        if isinstance(grader, SampleGrader):
            fill, args = _fill_per_sample, (grader, requests, outcomes, reasons)
        else:
            fill, args = _fill_batch, (grader, requests, extra_fields, outcomes, reasons)
        thread = threading.Thread(target=fill, args=args, daemon=True, name=grader.name)
        thread.start()
        thread.join(self.timeout_s)
        # A copy: an abandoned thread may still write into ``outcomes`` later.
        settled = list(outcomes)
        if thread.is_alive():
            self._stuck.append(thread)
            num_late = sum(o is Failure.TIMEOUT for o in settled)
            logger.warning("grader %r: %d of %d samples unscored after %ss", grader.name, num_late, len(settled),
                           self.timeout_s)
            reasons.append(f"timed out after {self.timeout_s}s")
        if reasons:
            examples[grader.name] = reasons[0]
        return settled


def resident_mib() -> float:
    """Resident memory of this process and its live children (sandboxes, judge clients), in MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _fill_per_sample(
    grader: SampleGrader, requests: list[GradeRequest], outcomes: list[Outcome], reasons: list[str]
) -> None:
    """Score requests one by one into ``outcomes``; an exception costs only its own sample."""
    logged = False
    for i, request in enumerate(requests):
        try:
            outcomes[i] = _checked(grader.score(request))
            if outcomes[i] is Failure.INVALID and not reasons:
                reasons.append("returned something other than a finite number")
        except Exception as exc:
            outcomes[i] = Failure.ERROR
            if not reasons:
                reasons.append(f"{type(exc).__name__}: {exc}"[:500])
            if not logged:
                logger.warning("grader %r raised on a sample (first in this share)", grader.name, exc_info=True)
                logged = True


def _fill_batch(
    grader: BatchGrader,
    requests: list[GradeRequest],
    extra_fields: list[str],
    outcomes: list[Outcome],
    reasons: list[str],
) -> None:
    """Score all requests in one call; an exception or a result of the wrong length costs every sample, a
    ``GraderFailure`` value only its own."""
    try:
        values = list(grader.score(requests, extra_fields))
    except Exception as exc:
        logger.warning("grader %r raised", grader.name, exc_info=True)
        reasons.append(f"{type(exc).__name__}: {exc}"[:500])
        outcomes[:] = [Failure.ERROR] * len(requests)
        return
    if len(values) != len(requests):
        logger.warning("grader %r returned %d values for %d samples", grader.name, len(values), len(requests))
        reasons.append(f"returned {len(values)} values for {len(requests)} samples")
        outcomes[:] = [Failure.INVALID] * len(requests)
        return
    checked = [_checked(value) for value in values]
    failures = [v for v in values if isinstance(v, GraderFailure)]
    if failures:
        reasons.append(failures[0].message)
    if Failure.INVALID in checked:
        bad = values[checked.index(Failure.INVALID)]
        reasons.append(f"returned {bad!r:.80}, not a finite number")
        logger.warning("grader %r returned %.80r, not a finite number (first in this share)", grader.name, bad)
    outcomes[:] = checked


def _checked(value: Any) -> Outcome:
    """``value`` as a float if it is a finite real number (bools count as 1 and 0); a ``GraderFailure`` is an
    error; anything else ``Failure.INVALID``."""
    if isinstance(value, GraderFailure):
        return Failure.ERROR
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return Failure.INVALID


# --------------------------------------------------------------------------------------------------------------
# The pool


@dataclass
class GradeResult:
    """Scores of a batch, in request order. Counters count (sample, grader) pairs that got ``fallback_score``."""

    rewards: list[float]  # per sample: sum over graders of weight × score
    scores: dict[str, list[float]]  # grader name -> per-sample score (fallbacks included)
    num_errors: int  # the grader raised (or its worker died twice)
    num_timeouts: int  # the grader ran past ``timeout_s`` (or its worker was stuck and killed)
    num_invalid: int  # the grader returned something other than a finite number
    failures_by_grader: dict[str, int]  # grader name -> samples it gave no score (errors + timeouts + invalid)
    examples: dict[str, str]  # grader name -> the reason of one of its failures
    # Worker health, not scores: left out of comparisons (an in-process pool and Ray workers grade alike).
    worker_memory_mib: float = field(default=0.0, compare=False)  # the largest a worker reported after its share
    memory_replacements: int = field(default=0, compare=False)  # workers replaced past max_worker_memory_mib

    @classmethod
    def concat(cls, results: list[GradeResult]) -> GradeResult:
        """The results of consecutive batches as one, in order (e.g. the chunks of a streamed step)."""
        examples: dict[str, str] = {}
        for r in results:
            for name, reason in r.examples.items():
                examples.setdefault(name, reason)
        names = list(results[0].scores)
        return cls(
            rewards=[x for r in results for x in r.rewards],
            scores={name: [x for r in results for x in r.scores[name]] for name in names},
            num_errors=sum(r.num_errors for r in results),
            num_timeouts=sum(r.num_timeouts for r in results),
            num_invalid=sum(r.num_invalid for r in results),
            failures_by_grader={name: sum(r.failures_by_grader[name] for r in results) for name in names},
            examples=examples,
            worker_memory_mib=max(r.worker_memory_mib for r in results),
            memory_replacements=sum(r.memory_replacements for r in results),
        )

    def select(self, rows: list[int]) -> GradeResult:
        """The rewards and scores of ``rows``, in that order; the failure counters stay those of every row graded."""
        return dataclasses.replace(self, rewards=[self.rewards[i] for i in rows],
                                   scores={name: [scores[i] for i in rows] for name, scores in self.scores.items()})

    def check_error_rate(self, max_error_rate: float) -> None:
        """Raise ``GraderFailureRateError`` naming the first grader that failed on more than ``max_error_rate`` of
        the samples, with an example reason."""
        num = len(self.rewards)
        for name, failed in self.failures_by_grader.items():
            if num and failed / num > max_error_rate:
                raise GraderFailureRateError(
                    f"grader {name!r} failed on {failed} of {num} samples ({failed / num:.0%}), more than "
                    f"graders.max_error_rate = {max_error_rate:g}; for example: {self.examples.get(name, '?')}"
                )

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "graders/errors": self.num_errors,
            "graders/timeouts": self.num_timeouts,
            "graders/invalid": self.num_invalid,
            "graders/worker_memory_mib": self.worker_memory_mib,
            "graders/memory_replacements": self.memory_replacements,
        }
        for name, scores in self.scores.items():
            if scores:
                out[f"graders/{name}/mean"] = sum(scores) / len(scores)
        return out


@dataclass
class _Share:
    """The requests ``requests[first:first + len(requests)]`` of a batch, sent to one worker."""

    first: int
    requests: list[GradeRequest]
    extra_fields: list[str]  # of the whole batch
    worker: int  # index into the pool's workers
    generation: int  # which incarnation of that worker got it (a replacement has a higher one)
    starting: Any  # the worker's pending ``ready()`` if it was a replacement still starting, else None
    ref: Any  # the pending ``WorkerResult``
    deadline: float  # ``time.monotonic()`` by which the worker must have answered, start-up aside
    resent: bool = False


@dataclass
class GradeHandle:
    """A batch being graded: returned by ``GraderPool.submit``, redeemed with ``GraderPool.collect``."""

    num_requests: int
    shares: list[_Share]


class GraderPool:
    """``num_grader_workers`` grader actors (or in-process objects when ``local``) behind one typed facade."""

    def __init__(self, cfg: GraderConfig, local: bool = False, max_restarts: int | None = None):
        validate_graders(cfg)
        self.cfg = cfg
        self.local = local
        # Workers that died (not stuck ones, which are replaced as part of grading) may be replaced this many times
        # over the pool's life; None: no limit.
        self.max_restarts = max_restarts
        self.restarts = 0
        # Of the batch being collected: the largest worker memory reported, and workers replaced for their memory.
        self._memory_mib, self._memory_replacements = 0.0, 0
        self.weights = {item.name: item.weight for item in cfg.items}
        # torch is imported only by a pool that has a reward model.
        self.reward_models: dict[str, "RewardModelGroup"] = {}
        try:
            for item in cfg.items:
                if item.type == "reward_model":
                    resources = Resources(num_cpus=item.num_cpus_per_replica, num_gpus=item.num_gpus_per_replica)
                    from rlft.graders.reward_model import RewardModelGroup

                    self.reward_models[item.name] = RewardModelGroup(
                        item.model_path, item.num_replicas, item.batch_size, item.max_length, resources, local
                    )
        except Exception:
            self.shutdown()
            raise
        self.workers = [self._start_worker() for _ in range(cfg.num_grader_workers)]
        self._generations = [0] * len(self.workers)
        # Per worker: a replacement's pending ``ready()``, until a share has seen it done.
        self._starting: list[Any] = [None] * len(self.workers)
        # Per worker: when it should be done with everything sent to it so far (``time.monotonic()``).
        self._busy_until = [0.0] * len(self.workers)
        try:
            wait([worker.ready.remote() for worker in self.workers])
        except Exception:
            self.shutdown()
            raise

    @property
    def share_budget_s(self) -> float:
        """The longest a worker may take over one share: every grader's timeout, plus the margin."""
        return len(self.cfg.items) * self.cfg.timeout_s + STUCK_MARGIN_S

    def grade(self, requests: list[GradeRequest]) -> GradeResult:
        """Score ``requests`` on all workers at once; returns within about ``share_budget_s``. Raises
        ``GraderFailureRateError`` when a grader failed on more than ``max_error_rate`` of them."""
        result = self.collect(self.submit(requests))
        result.check_error_rate(self.cfg.max_error_rate)
        return result

    def submit(self, requests: list[GradeRequest]) -> GradeHandle:
        """Start grading ``requests``, split evenly over the workers, and return at once (in local mode the work
        is done here). Shares queue behind earlier submissions on the same worker; their deadlines account for it."""
        num_workers = len(self.workers)
        extra_fields = extra_fields_of(requests)
        shares = []
        for worker in range(num_workers):
            first = len(requests) * worker // num_workers
            end = len(requests) * (worker + 1) // num_workers
            if end > first:
                shares.append(self._send(first, requests[first:end], extra_fields, worker))
        return GradeHandle(len(requests), shares)

    def collect(self, handle: GradeHandle) -> GradeResult:
        """Wait for a submitted batch (no share past its deadline) and combine the graders' scores."""
        self._memory_mib, self._memory_replacements = 0.0, 0
        by_first = {share.first: self._await(share) for share in sorted(handle.shares, key=lambda s: s.deadline)}
        outcomes = {name: [o for first in sorted(by_first) for o in by_first[first][0][name]] for name in self.weights}
        examples: dict[str, str] = {}
        for first in sorted(by_first):
            for name, reason in by_first[first][1].items():
                examples.setdefault(name, reason)
        result = self._result(outcomes, handle.num_requests, examples)
        result.worker_memory_mib, result.memory_replacements = self._memory_mib, self._memory_replacements
        return result

    def engine_seconds(self) -> dict[str, float]:
        """Seconds spent grading since the last call (the slowest worker's)."""
        return slowest(wait([worker.engine_seconds.remote() for worker in self.workers]))

    def shutdown(self) -> None:
        """Kill the worker actors (abandoned threads included) and the reward-model actors."""
        if not self.local:
            for worker in getattr(self, "workers", []):
                ray.kill(worker, no_restart=True)
        for group in self.reward_models.values():
            group.shutdown()

    # ----------------------------------------------------------------------------------------------------------

    def _start_worker(self):
        resources = Resources(num_cpus=self.cfg.num_cpus_per_worker)
        return spawn(GraderWorker, self.cfg, self.reward_models, resources=resources, local=self.local)

    def _send(
        self, first: int, requests: list[GradeRequest], extra_fields: list[str], worker: int, resent: bool = False
    ) -> _Share:
        start = max(time.monotonic(), self._busy_until[worker])
        self._busy_until[worker] = start + self.share_budget_s
        ref = self.workers[worker].grade.remote(requests, extra_fields)
        generation, starting, deadline = self._generations[worker], self._starting[worker], self._busy_until[worker]
        return _Share(first, requests, extra_fields, worker, generation, starting, ref, deadline, resent)

    def _await(self, share: _Share) -> tuple[dict[str, list[Outcome]], dict[str, str]]:
        """The share's outcomes; a stuck worker is replaced (timeouts), a dead one replaced and the share resent
        once (errors if it dies again)."""
        try:
            result: WorkerResult = self._get(share)
        except GetTimeoutError:
            logger.warning("grader worker %d stuck past its deadline; replacing it", share.worker)
            self._replace(share.worker, share.generation)
            return self._all(share, Failure.TIMEOUT), dict.fromkeys(self.weights, "grader worker stuck past its deadline")
        except RayActorError as err:
            if self._generations[share.worker] == share.generation:
                self._count_death(share.worker, type(err).__name__)
            self._replace(share.worker, share.generation)
            if share.resent:
                logger.warning("grader worker %d died twice on the same share; scoring it as errors", share.worker)
                return self._all(share, Failure.ERROR), dict.fromkeys(self.weights, "grader worker died twice")
            return self._await(self._send(share.first, share.requests, share.extra_fields, share.worker, resent=True))
        except RayError:
            logger.warning("grading a share failed on worker %d", share.worker, exc_info=True)
            return self._all(share, Failure.ERROR), dict.fromkeys(self.weights, "grading the share failed in Ray")
        self._memory_mib = max(self._memory_mib, result.memory_mib)
        limit = self.cfg.max_worker_memory_mib
        if result.num_stuck_threads:
            self._replace(share.worker, share.generation)
        elif limit and not self.local and result.memory_mib > limit:
            logger.warning("grader worker %d holds %.0f MiB, more than graders.max_worker_memory_mib = %d; replacing it",
                           share.worker, result.memory_mib, limit)
            self._memory_replacements += 1
            self._replace(share.worker, share.generation)
        return result.outcomes, result.examples

    def _get(self, share: _Share) -> WorkerResult:
        """The share's result, waiting no longer than its deadline plus its worker's remaining start-up."""
        if self.local:
            return wait(share.ref)
        deadline = share.deadline
        if share.starting is not None:
            before = time.monotonic()
            ray.get(share.starting, timeout=RESTART_ALLOWANCE_S)
            deadline += time.monotonic() - before
            if self._generations[share.worker] == share.generation:
                self._starting[share.worker] = None
        return wait(share.ref, timeout_s=max(0.0, deadline - time.monotonic()))

    def _count_death(self, worker: int, reason: str) -> None:
        if self.max_restarts is not None and self.restarts >= self.max_restarts:
            raise RestartBudgetError(
                f"grader worker {worker} died ({reason}) and the restart budget ray.max_actor_restarts = "
                f"{self.max_restarts} is spent"
            )
        self.restarts += 1
        logger.warning("grader worker %d died (%s); starting a replacement", worker, reason)

    def _replace(self, worker: int, generation: int) -> None:
        """Kill worker ``worker`` and start a fresh one, unless the incarnation ``generation`` is already gone.
        Shares still queued on the old one fail with ``RayActorError`` and are resent."""
        if self._generations[worker] != generation:
            return
        if not self.local:
            ray.kill(self.workers[worker], no_restart=True)
        self.workers[worker] = self._start_worker()
        self._generations[worker] += 1
        self._starting[worker] = None if self.local else self.workers[worker].ready.remote()
        self._busy_until[worker] = time.monotonic()

    def _all(self, share: _Share, failure: Failure) -> dict[str, list[Outcome]]:
        return {name: [failure] * len(share.requests) for name in self.weights}

    def _result(self, outcomes: dict[str, list[Outcome]], num_requests: int, examples: dict[str, str]) -> GradeResult:
        """Fallbacks in place of failures, counters of each failure, and the weighted sum."""
        fallback = self.cfg.fallback_score
        counts = {failure: 0 for failure in Failure}
        scores: dict[str, list[float]] = {}
        for name, grader_outcomes in outcomes.items():
            for outcome in grader_outcomes:
                if isinstance(outcome, Failure):
                    counts[outcome] += 1
            scores[name] = [fallback if isinstance(o, Failure) else o for o in grader_outcomes]
        rewards = [sum(self.weights[name] * scores[name][i] for name in scores) for i in range(num_requests)]
        return GradeResult(
            rewards=rewards,
            scores=scores,
            num_errors=counts[Failure.ERROR],
            num_timeouts=counts[Failure.TIMEOUT],
            num_invalid=counts[Failure.INVALID],
            failures_by_grader={name: sum(isinstance(o, Failure) for o in os) for name, os in outcomes.items()},
            examples=examples,
        )
