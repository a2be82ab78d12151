"""Where environments run: ``LocalEnvRunner`` (in this process, each call in a thread under a deadline, the
coroutines of asyncio environments on one event loop) and ``EnvPool`` (``envs.num_workers`` Ray actors, each a
``LocalEnvRunner``, sized on their own like the grader pool).

Every ``reset`` and ``step`` comes back as an ``Outcome``: a result, or why there is none (``error``: it raised;
``timeout``: past ``envs.step_timeout_s``; ``invalid``: it returned something that is not messages, a finite
reward and a done flag). A failed call ends its trajectory, which is counted; it never stops the job.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from rlft.envs.base import Environment, StepResult, load_environment_class
from rlft.envs.config import EnvConfig

logger = logging.getLogger(__name__)

FAILURES = ("error", "timeout", "invalid")
# Added to an environment worker's deadline for the Ray round trip.
POOL_MARGIN_S = 5.0
# The longest environment workers may take to start (a process, the environment's imports).
START_TIMEOUT_S = 120.0
_LOOP_LOCK = threading.Lock()


@dataclass
class Outcome:
    result: StepResult | None = None
    failure: str = ""  # "", or one of FAILURES
    reason: str = ""


def _checked_messages(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise TypeError(f"{what} must be a list of {{'role': str, 'content': str}} messages, got {messages!r:.200}")
    return messages


def _checked(value: Any, kind: str) -> StepResult:
    if kind == "reset":
        return StepResult(_checked_messages(value, "reset()"))
    if not isinstance(value, StepResult):
        raise TypeError(f"step() must return a StepResult, got {type(value).__name__}")
    if isinstance(value.reward, bool) or not isinstance(value.reward, (int, float)) or not math.isfinite(value.reward):
        raise TypeError(f"step() reward must be a finite number, got {value.reward!r}")
    if not isinstance(value.done, bool):
        raise TypeError(f"step() done must be true or false, got {value.done!r}")
    return StepResult(_checked_messages(value.messages, "step() messages"), float(value.reward), value.done)


class LocalEnvRunner:
    """One environment object per trajectory key, in this process. The calls of one batch run at once, each on a
    daemon thread of its own (reused across calls); a call still running at its deadline is abandoned (its thread
    finishes or not, unseen) and its environment dropped."""

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self.cls = load_environment_class(cfg.name)
        self.envs: dict[Any, Environment] = {}
        self._threads = _DaemonThreads()
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of this runner's asyncio environments, running in a daemon thread of its own."""
        with _LOOP_LOCK:
            if self._event_loop is None:
                self._event_loop = asyncio.new_event_loop()
                threading.Thread(target=self._event_loop.run_forever, daemon=True, name="rlft-env-loop").start()
        return self._event_loop

    def ready(self) -> bool:
        return True

    def reset(self, keys: list, items: list[dict]) -> list[Outcome]:
        def call(key, item):
            env = self.cls(**self.cfg.kwargs)
            self.envs[key] = env
            return env.reset(item)

        return self._run("reset", keys, [(call, key, item) for key, item in zip(keys, items)])

    def step(self, keys: list, actions: list[dict]) -> list[Outcome]:
        def call(key, action):
            env = self.envs.get(key)
            if env is None:
                raise KeyError(f"no environment for trajectory {key!r} (its reset failed or it was closed)")
            return env.step(action)

        return self._run("step", keys, [(call, key, action) for key, action in zip(keys, actions)])

    def close(self, keys: list) -> None:
        for key in keys:
            self.envs.pop(key, None)

    def _run(self, kind: str, keys: list, calls: list) -> list[Outcome]:
        results: list[Any] = [None] * len(calls)
        errors: list[BaseException | None] = [None] * len(calls)
        finished = [threading.Event() for _ in calls]
        coroutines: list[Any] = [None] * len(calls)

        def job(i, fn, *args):
            try:
                result = fn(*args)
                if inspect.isawaitable(result):  # an asyncio environment: its coroutines share one event loop
                    coroutines[i] = asyncio.run_coroutine_threadsafe(result, self._loop())
                    result = coroutines[i].result()
                results[i] = result
            except BaseException as err:  # noqa: BLE001 - the environment's failure, reported as an outcome
                errors[i] = err
            finished[i].set()

        for i, call in enumerate(calls):
            self._threads.run(job, i, *call)
        deadline = time.monotonic() + self.cfg.step_timeout_s
        outcomes = []
        for i, key in enumerate(keys):
            if not finished[i].wait(max(0.0, deadline - time.monotonic())):
                if coroutines[i] is not None:
                    coroutines[i].cancel()
                self.envs.pop(key, None)
                outcomes.append(Outcome(failure="timeout", reason=f"{kind} ran past envs.step_timeout_s = "
                                                                  f"{self.cfg.step_timeout_s:g} s"))
            elif errors[i] is not None:
                self.envs.pop(key, None)
                outcomes.append(Outcome(failure="error", reason=f"{kind} raised {type(errors[i]).__name__}: "
                                                                f"{errors[i]}"))
            else:
                try:
                    outcomes.append(Outcome(_checked(results[i], kind)))
                except TypeError as err:
                    self.envs.pop(key, None)
                    outcomes.append(Outcome(failure="invalid", reason=str(err)))
        return outcomes


class _DaemonThreads:
    """Threads that run one call at a time and are reused: starting a thread per call was most of a trivial
    environment's cost. A call that never returns keeps its thread (another is started for the next call), and
    daemon threads never hold up the process's exit."""

    def __init__(self):
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, fn, *args) -> None:
        try:
            inbox = self._idle.get_nowait()
        except queue.Empty:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), daemon=True, name="rlft-env").start()
        inbox.put((fn, args))

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            fn, args = inbox.get()
            fn(*args)
            self._idle.put(inbox)


class EnvPool:
    """``envs.num_workers`` environment actors (or one ``LocalEnvRunner`` in this process when ``num_workers`` is
    0). A trajectory's environment lives on worker ``key % num_workers``. A worker that dies or stays stuck past
    its deadline costs the trajectories it held (``error`` / ``timeout``) and is replaced."""

    def __init__(self, cfg: EnvConfig, local: bool = False):
        self.cfg = cfg
        self.local = local or cfg.num_workers == 0
        self.restarts = 0
        if self.local:
            self.runners = [LocalEnvRunner(cfg)]
        else:
            self.runners = [self._start() for _ in range(cfg.num_workers)]
            from rlft.distributed.actors import CallTimeoutError, wait

            try:
                wait([r.ready.remote() for r in self.runners], timeout_s=START_TIMEOUT_S)
            except CallTimeoutError:
                self.shutdown()
                raise CallTimeoutError(
                    f"{cfg.num_workers} environment workers of {cfg.num_cpus_per_worker:g} CPUs each "
                    f"(envs.num_workers, envs.num_cpus_per_worker) did not start within {START_TIMEOUT_S:g} s: "
                    "does the cluster have the CPUs free?") from None

    def _start(self):
        from rlft.distributed.actors import Resources, spawn

        return spawn(LocalEnvRunner, self.cfg, resources=Resources(num_cpus=self.cfg.num_cpus_per_worker))

    def reset(self, keys: list[int], items: list[dict]) -> list[Outcome]:
        return self._call("reset", keys, items)

    def step(self, keys: list[int], actions: list[dict]) -> list[Outcome]:
        return self._call("step", keys, actions)

    def close(self, keys: list[int]) -> None:
        if self.local:
            self.runners[0].close(keys)
            return
        for w, runner in enumerate(self.runners):
            mine = [k for k in keys if k % len(self.runners) == w]
            if mine:
                runner.close.remote(mine)

    def _call(self, kind: str, keys: list[int], args: list) -> list[Outcome]:
        if self.local:
            return getattr(self.runners[0], kind)(keys, args)
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        n = len(self.runners)
        shares = {w: [i for i, k in enumerate(keys) if k % n == w] for w in range(n)}
        refs = {w: getattr(self.runners[w], kind).remote([keys[i] for i in idx], [args[i] for i in idx])
                for w, idx in shares.items() if idx}
        outcomes: list[Outcome | None] = [None] * len(keys)
        deadline = time.monotonic() + self.cfg.step_timeout_s + POOL_MARGIN_S
        for w, ref in refs.items():
            try:
                got = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (GetTimeoutError, RayActorError) as err:
                stuck = isinstance(err, GetTimeoutError)
                logger.warning("environment worker %d %s during %s; replacing it", w,
                               "stuck past its deadline" if stuck else "died", kind)
                self._replace(w)
                failure = Outcome(failure="timeout" if stuck else "error",
                                  reason=f"environment worker {w} {'stuck' if stuck else 'died'} during {kind}")
                got = [failure] * len(shares[w])
            for i, outcome in zip(shares[w], got):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _replace(self, worker: int) -> None:
        import ray

        ray.kill(self.runners[worker], no_restart=True)
        self.runners[worker] = self._start()
        self.restarts += 1

    def shutdown(self) -> None:
        if not self.local:
            import ray

            for runner in self.runners:
                ray.kill(runner, no_restart=True)
        self.runners = []
