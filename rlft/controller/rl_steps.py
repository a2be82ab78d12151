"""What GRPO, PPO and online DPO share around their loops: the roles of an RL job, generation with grading, the
policy loss, held-out evaluation, and the end of a step.

Kept as plain functions so each controller stays one readable loop; the run lifecycle itself (resume, checkpoints,
summary, shutdown) is ``rlft/controller/run.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import AutoTokenizer

from rlft.algorithms.aggregation import aggregation_weights
from rlft.algorithms.policy_loss import PolicyLoss
from rlft.config import Config, ConfigError
from rlft.controller.common import EpochSampler
from rlft.controller.evaluation import (
    EvalResult,
    extracted_accuracy,
    held_out_accuracy,
    result_metrics,
    write_samples,
)
from rlft.controller.run import Run
from rlft.controller.step_metrics import engine_metrics
from rlft.data.prompts import PromptSet, load_prompts
from rlft.distributed.actors import DRIVER_INBOX
from rlft.distributed.control import LiveControl
from rlft.graders import GradeRequest, GraderPool
from rlft.graders.pool import GradeResult
from rlft.learner.group import LearnerGroup
from rlft.names import Phase
from rlft.rollout import Sample, SamplingConfig
from rlft.rollout.group import RolloutGroup
from rlft.timing import PhaseTimer


@dataclass
class RLJob:
    """The roles of an RL job and its prompts; the run's lifecycle is ``run``."""

    run: Run
    tokenizer: object
    prompts: PromptSet
    eval_prompts: PromptSet | None
    learners: LearnerGroup
    rollout: RolloutGroup
    graders: GraderPool
    control: LiveControl
    reference: object = None  # ReferenceGroup, when the KL term or online DPO needs one
    critic: LearnerGroup | None = None

    @property
    def cfg(self) -> Config:
        return self.run.cfg


def start_rl_job(run: Run, with_critic: bool = False, with_reference: bool | None = None) -> RLJob:
    """Validate the prompts, start every role, resume if asked, evaluate the starting policy. A reference server
    starts when ``with_reference`` says so (default: when ``rl.kl_coef`` > 0). After a resume or a learner restart
    the rollout workers take the restored weights."""
    cfg = run.cfg
    rl = cfg.rl
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    prompts = load_prompts(cfg.data.train_path, tokenizer, cfg)
    eval_prompts = None
    if cfg.eval.path and cfg.eval.num_examples:
        eval_prompts = load_prompts(cfg.eval.path, tokenizer, cfg, limit=cfg.eval.num_examples)
    sampler = EpochSampler(len(prompts.items), rl.num_prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(
            f"rl.num_prompts_per_step: {rl.num_prompts_per_step} prompts per step but {cfg.data.train_path} "
            f"holds only {len(prompts.items)}"
        )
    total_steps = cfg.trainer.max_steps or sampler.steps_per_epoch * cfg.trainer.num_epochs
    with_reference = rl.kl_coef > 0 if with_reference is None else with_reference

    run.start_cluster(reference=with_reference, critic=with_critic)
    local, restarts, placement = cfg.ray.local_mode, cfg.ray.max_actor_restarts, run.placement
    optimizer_steps = total_steps * rl.num_mini_batches * rl.num_epochs_per_step
    learners = run.keep(LearnerGroup(cfg, optimizer_steps, local=local, placement=placement))
    rollout = run.keep(RolloutGroup(cfg.model.path, cfg.rollout, local=local, placement=placement,
                                    max_restarts=restarts))
    graders = run.keep(GraderPool(cfg.graders, local=local, max_restarts=restarts))
    reference = run.reference_group() if with_reference else None
    critic = None
    if with_critic:
        critic = run.keep(LearnerGroup(cfg, optimizer_steps, local=local, head="value", lr=rl.critic_lr,
                                       placement=placement))
    control = run.keep(LiveControl(cfg))
    job = RLJob(run, tokenizer, prompts, eval_prompts, learners, rollout, graders, control, reference, critic)
    evaluate_fn = (lambda step, tag: evaluate(job, step, tag)) if eval_prompts else None

    def after_restore(step: int) -> None:
        """After a resume or a learner restart: the workers generate with the restored weights, as version ``step``."""
        rollout.sync_from(learners, step)
        if cfg.logging.engine_times:
            _job_engine_metrics(job)  # restoring is not the next step's work
        DRIVER_INBOX.take()

    run.begin(learners, sampler, total_steps, evaluate_fn, critic=critic, after_restore=after_restore)
    if cfg.logging.engine_times:
        _job_engine_metrics(job)  # start-up and the first evaluation are not the first step's work
    DRIVER_INBOX.take()
    return job


def grade_requests(samples: list[Sample], prompts: PromptSet) -> list[GradeRequest]:
    return [
        GradeRequest(prompts.items[s.prompt_index].messages, s.response_text, prompts.items[s.prompt_index].extra)
        for s in samples
    ]


def generate_and_grade(job: RLJob, indices: list[int], timer: PhaseTimer) -> tuple[list[Sample], GradeResult]:
    """The step's samples (``rl.num_samples_per_prompt`` per prompt, in prompt order) and their grades. Each chunk
    of samples goes to the grader pool as soon as it is generated (``rollout.chunks_per_worker``), so two phases
    are timed: ``generate``, until the last sample exists, and ``grade``, what grading adds after that (the part
    not hidden behind generation)."""
    cfg = job.cfg
    chunks, handles = {}, {}
    with timer.phase(Phase.GENERATE):
        for first, samples in job.rollout.generate_streamed(
            [job.prompts.token_ids[i] for i in indices],
            # trainer.seed shifts the sampling seed too, so one seed changes every random choice of a run.
            dataclasses.replace(cfg.rollout.sampling, seed=cfg.rollout.sampling.seed + cfg.trainer.seed),
            cfg.rl.num_samples_per_prompt,
            indices,
            cfg.rollout.chunks_per_worker,
        ):
            chunks[first] = samples
            handles[first] = job.graders.submit(grade_requests(samples, job.prompts))
    with timer.phase(Phase.GRADE):
        order = sorted(chunks)
        _check_complete([s for first in order for s in chunks[first]], indices, cfg.rl.num_samples_per_prompt)
        graded = GradeResult.concat([job.graders.collect(handles[first]) for first in order])
        graded.check_error_rate(cfg.graders.max_error_rate)
    return [sample for first in order for sample in chunks[first]], graded


def _check_complete(samples: list[Sample], indices: list[int], per_prompt: int) -> None:
    """Every prompt's samples exactly once, in prompt order (a redone chunk must not add or drop any)."""
    got = [s.prompt_index for s in samples]
    want = [i for i in indices for _ in range(per_prompt)]
    if got != want:
        raise RuntimeError(f"rollout returned {len(got)} samples for {len(want)} expected, or out of order")


def make_policy_loss(cfg: Config, kl_in_loss: bool) -> PolicyLoss:
    """The policy loss the ``rl`` section describes; the KL term only when it belongs in the loss."""
    rl = cfg.rl
    return PolicyLoss(
        clip_low=rl.clip_low,
        clip_high=rl.clip_high,
        dual_clip=rl.dual_clip,
        kl_coef=rl.kl_coef if kl_in_loss else 0.0,
        kl_kind=rl.kl_kind,
        entropy_coef=rl.entropy_coef,
    )


def with_aggregation_weights(batch, cfg: Config):
    """Turn the response mask in ``loss_weights_BT`` into the step's aggregation weights (``rl.loss_aggregation``)."""
    mode = cfg.rl.loss_aggregation
    constant = None
    if mode == "seq_mean_token_sum_norm":
        constant = cfg.rl.loss_aggregation_constant or float(cfg.rollout.sampling.max_new_tokens)
    weights_BT = aggregation_weights(batch.loss_weights_BT != 0, mode, constant)
    return dataclasses.replace(batch, loss_weights_BT=weights_BT)


def evaluate(job: RLJob, step: int, tag: str) -> dict[str, float]:
    """Held-out accuracy with the rollout workers' current weights: greedy, and sampled when ``eval.num_samples``
    > 0; the greedy completions are saved beside the metrics."""
    ev = job.cfg.eval
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=ev.max_new_tokens)
    accuracy, _, mean_tokens, records = held_out_accuracy(job.rollout, job.eval_prompts, greedy)
    result = EvalResult(accuracy, len(records), mean_tokens, records,
                        extracted_accuracy(records, ev.extract_pattern) if ev.extract_pattern else None)
    write_samples(job.run.samples_path(tag), result)
    metrics = result_metrics(result)
    if ev.num_samples:
        sampling = SamplingConfig(
            temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=job.cfg.trainer.seed + 1
        )
        sampled, pass_at_k, _, _ = held_out_accuracy(job.rollout, job.eval_prompts, sampling, ev.num_samples)
        metrics.update({"eval/sampled_accuracy": sampled, "eval/pass_at_k": pass_at_k})
    return metrics


def end_rl_step(job: RLJob, step: int, metrics: dict[str, float]) -> None:
    """Log the step with engine times, faults and the driver's received bytes; checkpoint and evaluate when due;
    then apply ``rlft scale`` requests and report."""
    cfg, run = job.cfg, job.run
    # Everything role calls handed back to the driver this step (samples, grades, handles, metrics).
    metrics = {**metrics, "driver/received_bytes": DRIVER_INBOX.take(), **fault_metrics(job)}
    if cfg.logging.engine_times:
        metrics.update(_job_engine_metrics(job))
    run.end_step(step, metrics, reward=f"{metrics['reward/mean']:.3f}")
    if step < run.total_steps:
        job.control.apply_requests(job.rollout)
    if cfg.logging.engine_times:
        _job_engine_metrics(job)  # evaluation and checkpoints are not the next step's work
    DRIVER_INBOX.take()
    job.control.report({"step": step, "total_steps": run.total_steps, "rollout_workers": job.rollout.num_workers})


def _job_engine_metrics(job: RLJob) -> dict[str, float]:
    return engine_metrics(job.rollout, job.graders, job.learners, job.critic, job.reference)


def fault_metrics(job: RLJob) -> dict[str, float]:
    """The role size and the actors replaced so far (cumulative over the run, resumes start again at 0)."""
    metrics = {
        "rollout/num_workers": job.rollout.num_workers,
        "faults/rollout_restarts": job.rollout.restarts,
        "faults/grader_restarts": job.graders.restarts,
    }
    if job.reference is not None:
        metrics["faults/reference_restarts"] = job.reference.restarts
    return metrics
