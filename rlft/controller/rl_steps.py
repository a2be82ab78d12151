"""What GRPO, PPO and online DPO share around their loops: the roles of an RL job, generation with grading, the
policy loss, held-out evaluation, and the end of a step.

Kept as plain functions so each controller stays one readable loop; the run lifecycle itself (resume, checkpoints,
summary, shutdown) is ``rlft/controller/run.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlft.algorithms.aggregation import aggregation_weights
from rlft.algorithms.policy_loss import PolicyLoss
from rlft.config import Config, ConfigError, lora_syncs_adapter, off_policy_correction, recomputes_old_logprobs
from rlft.controller.common import EpochSampler
from rlft.controller.control import LiveControl
from rlft.controller.evaluation import held_out_accuracy, trajectory_metrics
from rlft.controller.rollouts import Rollouts
from rlft.controller.run import Run
from rlft.controller.step_metrics import engine_metrics
from rlft.data.batch import PolicyBatch
from rlft.data.prompts import PromptSet, load_prompts
from rlft.data.tokenize import load_tokenizer
from rlft.distributed.actors import DRIVER_INBOX
from rlft.envs.config import multi_turn
from rlft.evaluator.results import EvalResult, extracted_accuracy, result_metrics, write_samples
from rlft.graders import GraderPool
from rlft.learner.group import LearnerGroup
from rlft.names import Phase
from rlft.rollout import SamplingConfig
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
    rollouts: Rollouts | None = None  # each step's samples and the weights after it (in step, or ahead)

    @property
    def cfg(self) -> Config:
        return self.run.cfg


def start_rl_job(run: Run, with_critic: bool = False, with_reference: bool | None = None) -> RLJob:
    """Validate the prompts, start every role (at once), resume if asked, evaluate the starting policy, and in
    asynchronous mode send the first batches. A reference server starts when ``with_reference`` says so (default:
    when ``rl.kl_coef`` > 0). After a resume or a learner restart the rollout workers take the restored weights."""
    cfg = run.cfg
    rl = cfg.rl
    tokenizer = load_tokenizer(cfg.model.tokenizer_path)
    prompts = load_prompts(cfg.data.train_path, tokenizer, **prompt_limits(cfg))
    eval_prompts = None
    if cfg.eval.path and cfg.eval.num_examples:
        eval_prompts = load_prompts(cfg.eval.path, tokenizer, **prompt_limits(cfg), limit=cfg.eval.num_examples)
    sampler = EpochSampler(len(prompts.items), rl.num_prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(
            f"rl.num_prompts_per_step: {rl.num_prompts_per_step} prompts per step but {cfg.data.train_path} "
            f"holds only {len(prompts.items)}"
        )
    total_steps = cfg.trainer.max_steps or sampler.steps_per_epoch * cfg.trainer.num_epochs
    with_reference = rl.kl_coef > 0 if with_reference is None else with_reference
    # With LoRA the reference is the learners' base model, the adapter disabled: no reference server.
    lora = cfg.model.lora.rank > 0
    reference_server = with_reference and not lora

    run.start_cluster()
    local, restarts, placement = cfg.ray.local_mode, cfg.ray.max_actor_restarts, run.placement
    optimizer_steps = total_steps * rl.num_mini_batches * rl.num_epochs_per_step
    starts = {
        "learners": lambda: LearnerGroup(cfg, optimizer_steps, local=local, placement=placement),
        "rollout": lambda: RolloutGroup(cfg.model.path, cfg.rollout, local=local, placement=placement,
                                        max_restarts=restarts, envs=cfg.envs if multi_turn(cfg.envs) else None,
                                        lora_rank=cfg.model.lora.rank if lora_syncs_adapter(cfg) else 0),
        "graders": lambda: GraderPool(cfg.graders, local=local, max_restarts=restarts),
        "control": lambda: LiveControl(cfg),  # what `rlft scale` reaches
    }
    if reference_server:
        starts["reference"] = run.reference_group
    if with_critic:
        starts["critic"] = lambda: LearnerGroup(cfg, optimizer_steps, local=local, head="value", lr=rl.critic_lr,
                                                placement=placement)
    roles = run.start_roles(starts)
    learners, rollout = roles["learners"], roles["rollout"]
    control = roles["control"]
    reference = learners.reference() if with_reference and lora else roles.get("reference")
    job = RLJob(run, tokenizer, prompts, eval_prompts, learners, rollout, roles["graders"], control, reference,
                roles.get("critic"))
    job.rollouts = Rollouts(cfg, run, prompts, rollout, roles["graders"], learners)
    evaluate_fn = (lambda step, tag: evaluate(job, step, tag)) if eval_prompts else None

    def after_restore(step: int) -> None:
        """After a resume or a learner restart: the workers generate with the restored weights, as version ``step``
        (an older version than theirs after a learner restart), and the batches sent ahead are sent again."""
        rollout.sync_from(learners, step, rewind=True)
        job.rollouts.restart(step)
        if cfg.logging.engine_times:
            _job_engine_metrics(job, reset=True)  # restoring is not the next step's work
        DRIVER_INBOX.take()

    run.begin(learners, sampler, total_steps, evaluate_fn, critic=job.critic, after_restore=after_restore)
    job.rollouts.send_ahead(run.start_step)  # asynchronous mode: the first batches, with the starting weights
    if cfg.logging.engine_times:
        _job_engine_metrics(job, reset=True)  # start-up and the first evaluation are not the first step's work
    DRIVER_INBOX.take()
    return job


def prompt_limits(cfg: Config) -> dict:
    """What ``load_prompts`` checks a job's prompts against: its bad-row policy and the rollout engine's room."""
    return {"on_bad_row": cfg.data.on_bad_row, "max_model_len": cfg.rollout.max_model_len,
            "max_new_tokens": cfg.rollout.sampling.max_new_tokens}


def make_policy_loss(cfg: Config, kl_in_loss: bool) -> PolicyLoss:
    """The policy loss the ``rl`` section describes; the KL term only when it belongs in the loss. Without a
    forward pass before the update (``rl.old_logprobs``), the ratio's denominator is the update's own forward pass
    (``rl.old_logprobs: auto``) or the batch's ``old_logprobs_BT`` (set to the sampler's: ``sampler``)."""
    rl = cfg.rl
    return PolicyLoss(
        kind=rl.policy_loss,
        clip_low=rl.clip_low,
        clip_high=rl.clip_high,
        dual_clip=rl.dual_clip,
        kl_coef=rl.kl_coef if kl_in_loss else 0.0,
        kl_kind=rl.kl_kind,
        entropy_coef=rl.entropy_coef,
        old_logprobs_from_update=rl.old_logprobs == "auto" and not recomputes_old_logprobs(cfg),
        off_policy_correction=off_policy_correction(cfg),
        is_level=rl.is_level,
        is_cap=rl.is_cap,
        cispo_max_weight=rl.cispo_max_weight,
        sapo_temperature_pos=rl.sapo_temperature_pos,
        sapo_temperature_neg=rl.sapo_temperature_neg,
    )


def proximal_logprobs(job: RLJob, batch: PolicyBatch, timer: PhaseTimer) -> tuple[PolicyBatch, dict[str, float]]:
    """The batch with the ratio's denominator (the proximal policy's log-probabilities) where ``rl.old_logprobs``
    puts it: a learner forward pass kept on the learners (``recompute``, or ``auto`` when a step makes several
    optimizer steps), the sampler's (``sampler``), or nothing, the update's own pass (``auto`` otherwise: that
    pass runs the same weights, so the ``old_logprobs`` phase takes no time). With the forward pass, the largest
    gap between its log-probabilities and the sampler's (``sync/logprob_max_abs_diff``); otherwise the update
    reports it (``train/logprob_diff_max``)."""
    cfg = job.cfg
    if recomputes_old_logprobs(cfg):
        with timer.phase(Phase.OLD_LOGPROBS):
            old_logprobs, gap = job.learners.keep_logprobs(batch, batch.sampler_logprobs_BT)
        return dataclasses.replace(batch, old_logprobs_BT=old_logprobs), {"sync/logprob_max_abs_diff": gap}
    if cfg.rl.old_logprobs == "sampler":
        return dataclasses.replace(batch, old_logprobs_BT=batch.sampler_logprobs_BT), {}
    return batch, {}


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
    trajectories = multi_turn(job.cfg.envs)
    accuracy, _, mean_tokens, records = held_out_accuracy(job.rollout, job.eval_prompts, greedy, 1, trajectories)
    result = EvalResult(accuracy, len(records), mean_tokens, records,
                        extracted_accuracy(records, ev.extract_pattern) if ev.extract_pattern else None)
    write_samples(job.run.samples_path(tag), result)
    metrics = result_metrics(result)
    if trajectories:
        metrics.update(trajectory_metrics(records, "eval/"))
    if ev.num_samples:
        sampling = SamplingConfig(
            temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=job.cfg.trainer.seed + 1
        )
        sampled, pass_at_k, _, sampled_records = held_out_accuracy(job.rollout, job.eval_prompts, sampling,
                                                                   ev.num_samples, trajectories)
        metrics.update({"eval/sampled_accuracy": sampled, "eval/pass_at_k": pass_at_k})
        if trajectories:
            metrics.update(trajectory_metrics(sampled_records, "eval/sampled_"))
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
        _job_engine_metrics(job, reset=True)  # evaluation and checkpoints are not the next step's work
    DRIVER_INBOX.take()
    job.control.report({"step": step, "total_steps": run.total_steps, "rollout_workers": job.rollout.num_workers})


def _job_engine_metrics(job: RLJob, reset: bool = False) -> dict[str, float]:
    """The roles' engine seconds since the last call. A ``reset`` (start-up, evaluation and checkpoints are no
    step's work) leaves out rollout workers with batches queued ahead: their answers come late, and a reset would
    drop them."""
    rollout = None if reset and job.rollout.queued_ahead else job.rollout
    return engine_metrics(rollout, job.graders, job.learners, job.critic, job.reference)


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
