"""One run lifecycle for every algorithm: each controller adds only its step loop.

```
Run(cfg)                      paths resolved, output dir made, config written, the checkpoint to resume from found
  run.start_cluster(...)      Ray (or nothing, in-process) and the job's placement group, before any actor
  run.keep(role)              every role started is kept here and shut down with the run, in reverse order
  run.reference_group()       the reference server: built only here, replicas replaced up to ray.max_actor_restarts
  run.begin(learners, ...)    resume (learners, critic, data position), metrics log, start evaluation, progress bar
  ── the controller's loop:   for step in run.steps(): with run.recover_learners(): ... run.end_step(step, metrics)
                              end_step logs, checkpoints and evaluates when due; a learner that dies in the block is
                              restarted with its group, from the run's latest checkpoint, and the loop goes on from it
  run.finish()                final checkpoint, final_model/, final evaluation, summary.json
  run.shutdown()              (also on error: ``with Run(cfg) as run``)
```

Evaluation is the algorithm's ``evaluate(step, tag) -> metrics`` given to ``begin`` (RL: the rollout workers on
held-out prompts; SFT and DPO: the evaluation worker, and DPO's held-out preference pairs); the run times it, logs
it and returns ``eval/accuracy``.

Learner restarts (``ray.max_learner_restarts``): a learner or critic rank that dies inside ``recover_learners``
takes its whole group with it (ZeRO shards the state over the ranks). The run starts every learner and critic rank
again, loads the checkpoint it saved last (or resumed from; none: the starting weights at step 0, as at ``begin``),
rewinds the data position, the metrics log and the progress bar to that step, has the roles that copy the weights
take them (``begin``'s ``after_restore``: the rollout workers) and lets ``steps()`` continue after that step. The
redone steps are the resumed run's, so they log what an uninterrupted run logs. ``faults/learner_restarts`` counts
the restarts; one death beyond the budget stops the job (``RestartBudgetError``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlft import startup
from rlft.config import Config
from rlft.controller.common import (
    EpochSampler,
    RunResult,
    prepare_output_dir,
    prune_checkpoints,
    resolve_paths,
    resume_path,
)
from rlft.distributed.cluster import start_cluster, start_ray
from rlft.distributed.placement import RoleDemand
from rlft.distributed.stacks import watch
from rlft.errors import LearnerFailedError, RestartBudgetError
from rlft.metrics import MetricsLogger
from rlft.names import Role

Evaluate = Callable[[int, str], dict[str, float]]
# Called with a step after the learners were restored to it (resume, learner restart).
AfterRestore = Callable[[int], None]

logger = logging.getLogger(__name__)


def job_roles(cfg: Config) -> dict[str, bool]:
    """The roles of each algorithm beside its learners, as ``job_demands`` takes them: SFT and DPO have no rollout
    workers or graders; DPO, online DPO and a KL term have a reference server (with LoRA the learners' base model
    is the reference); PPO has a critic."""
    lora = cfg.model.lora.rank > 0
    if cfg.algorithm in ("sft", "dpo"):
        return {"reference": cfg.algorithm == "dpo" and not lora, "rollout": False, "graders": False}
    with_reference = cfg.algorithm == "online_dpo" or cfg.rl.kl_coef > 0
    return {"reference": with_reference and not lora, "critic": cfg.algorithm == "ppo"}


def job_demands(cfg: Config, reference: bool, critic: bool = False, rollout: bool = True, graders: bool = True
                ) -> list[RoleDemand]:
    """What every role of the job asks for, from the config. A colocated reference adds to the learners' bundles."""
    lc, rc, ref = cfg.learner, cfg.rollout, cfg.reference
    colocated = reference and ref.colocate_with_learners
    learner_cpus, learner_gpus = lc.num_cpus_per_learner, lc.num_gpus_per_learner
    if colocated:
        # Replica i shares learner i's bundle; validate() keeps num_replicas <= num_learners.
        learner_cpus += ref.num_cpus_per_replica
        learner_gpus += ref.num_gpus_per_replica
    learner_fields = "learner.num_learners, learner.num_cpus_per_learner, learner.num_gpus_per_learner"
    if colocated:
        learner_fields += " + the colocated reference's reference.num_cpus/gpus_per_replica"
    demands = [RoleDemand(Role.LEARNERS, lc.num_learners, learner_cpus, learner_gpus, learner_fields)]
    if critic:
        demands.append(RoleDemand(Role.CRITIC, lc.num_learners, lc.num_cpus_per_learner, lc.num_gpus_per_learner,
                                  "learner.* (the critic has as many learners as the policy)"))
    if rollout:
        demands.append(RoleDemand(
            Role.ROLLOUT, rc.num_rollout_workers, rc.num_cpus_per_worker, rc.num_gpus_per_worker,
            "rollout.num_rollout_workers, rollout.num_cpus_per_worker, rollout.num_gpus_per_worker",
        ))
    if rollout and cfg.envs.name and cfg.envs.num_workers:
        demands.append(RoleDemand(
            Role.ENVS, rc.num_rollout_workers * cfg.envs.num_workers, cfg.envs.num_cpus_per_worker, 0.0,
            "envs.num_workers (per rollout worker) × rollout.num_rollout_workers, envs.num_cpus_per_worker",
        ))
    if reference and not colocated:
        demands.append(RoleDemand(
            Role.REFERENCE, ref.num_replicas, ref.num_cpus_per_replica, ref.num_gpus_per_replica,
            "reference.num_replicas, reference.num_cpus_per_replica, reference.num_gpus_per_replica",
        ))
    if graders:
        gc = cfg.graders
        demands.append(RoleDemand(Role.GRADERS, gc.num_grader_workers, gc.num_cpus_per_worker, 0.0,
                                  "graders.num_grader_workers, graders.num_cpus_per_worker"))
        for i, item in enumerate(gc.items):
            if item.type == "reward_model":
                demands.append(RoleDemand(
                    f"reward model {item.name!r}", item.num_replicas, item.num_cpus_per_replica,
                    item.num_gpus_per_replica, f"graders.items[{i}].num_replicas, num_cpus/gpus_per_replica",
                ))
    return [d for d in demands if d.count > 0]


def check_model(cfg: Config) -> None:
    """What is checked against the model's structure before Ray or any actor starts: LoRA's target modules."""
    if cfg.model.lora.rank:
        from rlft.learner.lora import check_target_modules

        check_target_modules(cfg.model.path, cfg.model.lora)


def open_run(cfg: Config) -> None:
    """What a run can start while its controller's modules load (they take seconds): its start-up log and Ray, with
    the deadline watch whose stack directory role actors inherit. A local cluster started here is sized for the
    job's roles (``job_roles``); ``Run.start_cluster`` finds it running. ``cfg``'s paths are resolved already
    (``resolve_paths``). Imports nothing heavy: a module that two threads import at once can reach one of them
    half-initialised (transformers' lazy attributes among them)."""
    out_dir = Path(cfg.logging.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    startup.open_log(out_dir / startup.FILE_NAME)
    if not cfg.ray.local_mode:
        watch(out_dir / "stacks", cfg.ray.call_timeout_s)
        start_ray(cfg.ray, job_demands(cfg, **job_roles(cfg)))


class Run:
    def __init__(self, cfg: Config):
        self.started = time.perf_counter()
        self.cfg = resolve_paths(cfg)
        check_model(self.cfg)
        self.out_dir = prepare_output_dir(self.cfg)
        startup.open_log(self.out_dir / startup.FILE_NAME)
        self.ckpt_root = Path(self.cfg.checkpoint_dir)
        self.resume_from = resume_path(self.cfg, self.ckpt_root)
        self.placement = None
        self.roles: list = []
        self.learners = self.critic = None
        self.sampler: EpochSampler | None = None
        self.total_steps = 0
        self.start_step = 0
        # Seconds from the process's start to its first step (imports, Ray, the roles, resume, first evaluation).
        self._startup_s: float | None = None
        self._startup_logged = False
        self.logger: MetricsLogger | None = None
        self.progress: tqdm | None = None
        self.eval_accuracy_start: float | None = None
        self._evaluate: Evaluate | None = None
        self._after_restore: AfterRestore | None = None
        # Where a learner restart goes back to: the checkpoint saved last (or resumed from), else the data position
        # at ``begin`` (step 0, the learners' starting weights).
        self.last_checkpoint: Path | None = self.resume_from
        self._start_data: dict | None = None
        self._next_step = 0
        self.learner_restarts = 0

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------------------------ roles

    def start_cluster(self) -> None:
        """Ray and the placement group for the roles the job runs (``job_roles``); checked against the cluster
        before any actor starts."""
        self.placement = start_cluster(self.cfg.ray, job_demands(self.cfg, **job_roles(self.cfg)),
                                       colocate_reference=self.cfg.reference.colocate_with_learners)
        # Deadlines for the phases' calls; the stacks of every actor started from here on are written on overrun.
        watch(self.out_dir / "stacks", self.cfg.ray.call_timeout_s)

    def keep(self, role):
        """Shut ``role`` down with the run; returns it."""
        self.roles.append(role)
        return role

    def start_roles(self, starts: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Start the roles at once, each in a thread of its own (a Ray job spends its start-up waiting for the
        engines to load, side by side on different actors); the in-process backend starts them one by one. Every
        role that started is kept, to shut down with the run, even when another failed: the first failure is
        raised once all have finished starting."""
        startup.mark("driver", "roles_start")
        if self.cfg.ray.local_mode:
            roles = {name: self._kept(start()) for name, start in starts.items()}
            startup.mark("driver", "roles_ready")
            return roles
        with ThreadPoolExecutor(max_workers=len(starts), thread_name_prefix="rlft-start") as pool:
            futures = {name: pool.submit(start) for name, start in starts.items()}
        startup.mark("driver", "roles_ready")
        roles, failures = {}, []
        for name, future in futures.items():  # in the given order, so shutdown runs in the reverse
            if future.exception() is None:
                roles[name] = self._kept(future.result())
            else:
                failures.append(future.exception())
        if failures:
            raise failures[0]
        return roles

    def _kept(self, role):
        return role if any(role is kept for kept in self.roles) else self.keep(role)

    def release(self, role) -> None:
        """Shut ``role`` down now (a role needed only at start, e.g. a reference pass over a data set)."""
        self.roles.remove(role)
        role.shutdown()

    def reference_group(self):
        """The reference server, the one place it is built: the job's placement, and replicas that die replaced
        (their rows scored again) up to ``ray.max_actor_restarts``."""
        from rlft.reference import ReferenceGroup

        cfg = self.cfg
        return self.keep(ReferenceGroup(cfg.reference, cfg.model.path, local=cfg.ray.local_mode,
                                        placement=self.placement, max_restarts=cfg.ray.max_actor_restarts))

    # ------------------------------------------------------------------------------------------------ lifecycle

    def begin(
        self,
        learners,
        sampler: EpochSampler,
        total_steps: int,
        evaluate: Evaluate | None,
        critic=None,
        first_metrics: dict[str, float] | None = None,
        after_restore: AfterRestore | None = None,
    ) -> int:
        """Resume if asked (weights, optimizer, RNG, data position), open the metrics log, evaluate the starting
        policy (a fresh run only), start the progress bar; returns the first step's number minus one.
        ``after_restore(step)`` brings the roles that copy the learners' weights up to date after a resume and after
        a learner restart (RL: the rollout workers)."""
        self.learners, self.critic, self.sampler, self.total_steps = learners, critic, sampler, total_steps
        self._evaluate, self._after_restore = evaluate, after_restore
        self._start_data = sampler.state()
        if self.resume_from:
            self.start_step = self._restore(self.resume_from)
            tqdm.write(f"resumed from {self.resume_from} at step {self.start_step}")
        self.logger = MetricsLogger(self.cfg, resume_step=self.start_step if self.resume_from else None)
        if first_metrics:
            self.logger.log(self.start_step, first_metrics, console=False)
        if self.start_step == 0:
            self.eval_accuracy_start = self.evaluate(0, "step0")
            startup.mark("driver", "first_eval")
        self.progress = tqdm(total=total_steps, initial=self.start_step, desc=self.cfg.algorithm,
                             disable=not self.cfg.logging.progress_bar, dynamic_ncols=True)
        return self.start_step

    def _restore(self, checkpoint: Path | None) -> int:
        """Learners, critic and data position as at ``checkpoint`` (None: as at ``begin``, on fresh learners); the
        roles that copy the weights follow. Returns the checkpoint's step."""
        step = 0
        if checkpoint is None:
            self.sampler.load_state(self._start_data)
        else:
            state = self.learners.load_checkpoint(checkpoint)
            if self.critic is not None:
                self.critic.load_checkpoint(checkpoint / "critic")
            self.sampler.load_state(state["data"])
            step = state["step"]
        if self._after_restore is not None and (checkpoint is not None or self.learner_restarts):
            self._after_restore(step)
        return step

    def steps(self) -> Iterator[int]:
        """The step numbers still to run; after a learner restart (``recover_learners``), from the step after the
        checkpoint it went back to."""
        self._next_step = self.start_step + 1
        while self._next_step <= self.total_steps:
            step = self._next_step
            self._next_step += 1
            if self._startup_s is None:  # the time to the first step: the process's start-up, then the roles'
                self._startup_s = time.time() - startup.process_start_time()
                startup.mark("driver", "first_step")
            yield step

    @contextmanager
    def recover_learners(self):
        """Around the body of a step: a learner or critic actor that dies in it (``LearnerFailedError``) restarts
        both groups from the latest checkpoint and rewinds ``steps()`` to it, within ``ray.max_learner_restarts``."""
        try:
            yield
        except LearnerFailedError as err:
            self._restart_learners(err)

    def _restart_learners(self, err: LearnerFailedError) -> None:
        budget = self.cfg.ray.max_learner_restarts
        if self.learner_restarts >= budget:
            raise RestartBudgetError(f"{err}; the restart budget ray.max_learner_restarts = {budget} is spent") from err
        self.learner_restarts += 1
        checkpoint = self.last_checkpoint
        origin = f"checkpoint {checkpoint}" if checkpoint else "the starting weights at step 0 (no checkpoint yet)"
        logger.warning("learner restart %d of %d (ray.max_learner_restarts): %s; every rank starts again, from %s",
                       self.learner_restarts, budget, err, origin)
        for group in (self.learners, self.critic):
            if group is not None:
                group.restart()
        step = self._restore(checkpoint)
        self.logger.rewind(step)
        self.progress.n = step
        self.progress.refresh()
        self._next_step = step + 1

    def evaluate(self, step: int, tag: str) -> float | None:
        """Run the algorithm's evaluation, log it with its time; ``eval/accuracy`` (None without evaluation)."""
        if self._evaluate is None:
            return None
        t0 = time.perf_counter()
        metrics = self._evaluate(step, tag)
        if not metrics:
            return None
        self.logger.log(step, {**metrics, "eval/seconds": time.perf_counter() - t0}, console=True)
        return metrics.get("eval/accuracy")

    def samples_path(self, tag: str) -> Path:
        """Where an evaluation writes its completions."""
        return self.out_dir / f"eval_samples_{tag}.jsonl"

    def save_checkpoint(self, step: int) -> None:
        """Learners (and critic) with the data position at ``step``; older checkpoints pruned to
        ``checkpoint.keep_last``."""
        path = self.ckpt_root / f"step_{step:06d}"
        self.learners.save_checkpoint(path, {"step": step, "data": self.sampler.state()})
        if self.critic is not None:
            self.critic.save_checkpoint(path / "critic", {"step": step})
        self.last_checkpoint = path
        prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep_last)

    def end_step(self, step: int, metrics: dict[str, float], **postfix: str) -> None:
        """Log the step, then evaluate and checkpoint when due (the last step's are ``finish``'s). The evaluation
        comes first, so a checkpoint is only written once its step is complete: a learner restart from it redoes no
        evaluation and loses none."""
        cfg = self.cfg
        if not self._startup_logged:
            self._startup_logged = True
            metrics = {**metrics, "run/startup_seconds": self._startup_s}
        self.logger.log(step, {**metrics, "faults/learner_restarts": self.learner_restarts})
        self.progress.update(1)
        if postfix:
            self.progress.set_postfix(**postfix)
        if step < self.total_steps:
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0:
                self.evaluate(step, f"step{step}")
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
                self.save_checkpoint(step)

    def finish(self) -> RunResult:
        """Final checkpoint, the Hugging Face model directory, the final evaluation and ``summary.json``."""
        self.progress.close()
        self.save_checkpoint(self.total_steps)
        final_dir = self.learners.save_pretrained(self.out_dir / "final_model")
        accuracy_end = self.evaluate(self.total_steps, "final")
        result = RunResult(
            output_dir=self.out_dir,
            final_model_dir=final_dir,
            num_steps=self.total_steps,
            eval_accuracy_start=self.eval_accuracy_start,
            eval_accuracy_end=accuracy_end,
            seconds=time.perf_counter() - self.started,
        )
        result.write_summary()
        return result

    def shutdown(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
        try:
            for role in reversed(self.roles):
                role.shutdown()
        finally:
            self.roles = []
            if self.placement is not None:
                self.placement.remove()
                self.placement = None
