"""What GRPO and PPO share: prompts in, typed batches out, set-up, evaluation, checkpoints, the end of a run.

Kept as plain functions so each controller stays one readable loop.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from rlft.algorithms.aggregation import aggregation_weights
from rlft.algorithms.policy_loss import PolicyBatch, PolicyLoss
from rlft.config import Config, ConfigError
from rlft.controller.common import (
    EpochSampler,
    RunResult,
    prepare_output_dir,
    prune_checkpoints,
    resolve_paths,
    resume_path,
)
from rlft.controller.evaluation import extracted_accuracy
from rlft.data import formats
from rlft.data.formats import RFTPrompt
from rlft.data.sources import DataError
from rlft.data.tokenize import tokenize_prompt
from rlft.distributed.cluster import start_cluster
from rlft.distributed.actors import DRIVER_INBOX
from rlft.distributed.control import job_id, start_control
from rlft.distributed.placement import (
    ClusterFitError,
    Placement,
    RoleDemand,
    check_fit,
    free_node_resources,
    job_demands,
)
from rlft.graders import GradeRequest, GraderPool
from rlft.graders.pool import GradeResult
from rlft.learner.group import LearnerGroup
from rlft.metrics import MetricsLogger
from rlft.reference import ReferenceGroup
from rlft.rollout import Sample, SamplingConfig
from rlft.rollout.group import RolloutGroup
from rlft.timing import PhaseTimer


@dataclass
class PromptSet:
    items: list[RFTPrompt]
    token_ids: list[list[int]]


def load_prompts(path: str, tokenizer, cfg: Config, limit: int | None = None) -> PromptSet:
    """Read RFT prompt rows and tokenize them with the chat template; a prompt too long for the rollout engine's
    ``max_model_len`` (with ``max_new_tokens`` room) is an error naming its row, before any actor starts."""
    loaded = formats.load_examples(path, formats.parse_rft, on_bad_row=cfg.data.on_bad_row, limit=limit)
    room = cfg.rollout.max_model_len - cfg.rollout.sampling.max_new_tokens
    token_ids = []
    for item in loaded.examples:
        ids = tokenize_prompt(item.messages, tokenizer)
        if len(ids) > room:
            raise DataError(
                item.where,
                "messages",
                f"prompt of {len(ids)} tokens leaves no room for rollout.sampling.max_new_tokens = "
                f"{cfg.rollout.sampling.max_new_tokens} within rollout.max_model_len = {cfg.rollout.max_model_len}",
            )
        token_ids.append(ids)
    return PromptSet(loaded.examples, token_ids)


def grade_requests(samples: list[Sample], prompts: PromptSet) -> list[GradeRequest]:
    return [
        GradeRequest(prompts.items[s.prompt_index].messages, s.response_text, prompts.items[s.prompt_index].extra)
        for s in samples
    ]


def generate_and_grade(run: RLRun, indices: list[int], timer: PhaseTimer) -> tuple[list[Sample], GradeResult]:
    """The step's samples (``rl.num_samples_per_prompt`` per prompt, in prompt order) and their grades. Each chunk
    of samples goes to the grader pool as soon as it is generated (``rollout.chunks_per_worker``), so two phases
    are timed: ``generate``, until the last sample exists, and ``grade``, what grading adds after that (the part
    not hidden behind generation)."""
    cfg = run.cfg
    chunks, handles = {}, {}
    with timer.phase("generate"):
        for first, samples in run.rollout.generate_streamed(
            [run.prompts.token_ids[i] for i in indices],
            # trainer.seed shifts the sampling seed too, so one seed changes every random choice of a run.
            dataclasses.replace(cfg.rollout.sampling, seed=cfg.rollout.sampling.seed + cfg.trainer.seed),
            cfg.rl.num_samples_per_prompt,
            indices,
            cfg.rollout.chunks_per_worker,
        ):
            chunks[first] = samples
            handles[first] = run.graders.submit(grade_requests(samples, run.prompts))
    with timer.phase("grade"):
        order = sorted(chunks)
        _check_complete([s for first in order for s in chunks[first]], indices, cfg.rl.num_samples_per_prompt)
        graded = GradeResult.concat([run.graders.collect(handles[first]) for first in order])
        graded.check_error_rate(cfg.graders.max_error_rate)
    return [sample for first in order for sample in chunks[first]], graded


def _check_complete(samples: list[Sample], indices: list[int], per_prompt: int) -> None:
    """Every prompt's samples exactly once, in prompt order (a redone chunk must not add or drop any)."""
    got = [s.prompt_index for s in samples]
    want = [i for i in indices for _ in range(per_prompt)]
    if got != want:
        raise RuntimeError(f"rollout returned {len(got)} samples for {len(want)} expected, or out of order")


def policy_batch(
    samples: list[Sample], advantages_S: torch.Tensor, pad_id: int, width: int
) -> tuple[PolicyBatch, torch.Tensor]:
    """Prompt + response rows, right-padded to ``width``, each response token carrying its sample's advantage.

    Returns the batch (``old_logprobs_BT`` and ``ref_logprobs_BT`` still zero, ``loss_weights_BT`` the response
    mask) and the sampler's log-probabilities of the response tokens, aligned the same way.
    """
    num = len(samples)
    input_ids_BT = torch.full((num, width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((num, width), dtype=torch.long)
    response_BT = torch.zeros((num, width), dtype=torch.float32)
    sampler_logprobs_BT = torch.zeros((num, width), dtype=torch.float32)
    for row, s in enumerate(samples):
        start, stop = len(s.prompt_token_ids), len(s.prompt_token_ids) + len(s.response_token_ids)
        input_ids_BT[row, :stop] = torch.tensor(s.prompt_token_ids + s.response_token_ids)
        attention_BT[row, :stop] = 1
        response_BT[row, start:stop] = 1.0
        sampler_logprobs_BT[row, start:stop] = torch.tensor(s.response_logprobs, dtype=torch.float32)
    zeros_BT = torch.zeros((num, width), dtype=torch.float32)
    batch = PolicyBatch(
        input_ids_BT=input_ids_BT,
        attention_mask_BT=attention_BT,
        position_ids_BT=torch.arange(width).expand(num, width).clone(),
        loss_weights_BT=response_BT,
        old_logprobs_BT=zeros_BT,
        advantages_BT=advantages_S[:, None] * response_BT,
        ref_logprobs_BT=zeros_BT.clone(),
    )
    return batch, sampler_logprobs_BT


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


def held_out_accuracy(
    rollout, prompts: PromptSet, sampling: SamplingConfig, num_samples: int = 1
) -> tuple[float, float, float, list[dict]]:
    """Exact match of ``num_samples`` completions per prompt with each item's ``answer``: (mean accuracy over all
    completions, pass@k (share of prompts with a correct one), mean completion tokens, one record per completion)."""
    samples = rollout.generate(prompts.token_ids, sampling, num_samples)
    records = []
    for s in samples:
        answer = prompts.items[s.prompt_index].extra.get("answer")
        records.append(
            {
                "prompt": prompts.items[s.prompt_index].messages[-1]["content"],
                "completion": s.response_text,
                "answer": answer,
                "correct": isinstance(answer, str) and s.response_text.strip() == answer.strip(),
            }
        )
    num = max(len(samples), 1)
    solved = {s.prompt_index for s, r in zip(samples, records) if r["correct"]}
    mean_tokens = sum(len(s.response_token_ids) for s in samples) / num
    pass_at_k = len(solved) / max(len(prompts.items), 1)
    return sum(r["correct"] for r in records) / num, pass_at_k, mean_tokens, records


# ---------------------------------------------------------------------------------------------------------------
# The parts of a run around the step loop: set-up (data checked before actors start), evaluation, checkpoints,
# the end. GRPO and PPO call these; the step itself stays in each controller.


@dataclass
class RLRun:
    cfg: Config
    tokenizer: object
    prompts: PromptSet
    eval_prompts: PromptSet | None
    sampler: EpochSampler
    total_steps: int
    out_dir: Path
    ckpt_root: Path
    placement: Placement | None = None
    learners: LearnerGroup | None = None
    rollout: RolloutGroup | None = None
    graders: GraderPool | None = None
    reference: ReferenceGroup | None = None
    critic: LearnerGroup | None = None
    control: object = None  # the job's JobControl actor (``rlft scale``), None without Ray
    logger: MetricsLogger | None = None
    start_step: int = 0
    started: float = 0.0
    eval_accuracy_start: float | None = None
    progress: tqdm | None = None

    def shutdown(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
        for role in (self.learners, self.rollout, self.graders, self.reference, self.critic):
            if role is not None:
                role.shutdown()
        if self.control is not None:
            ray.kill(self.control)
        if self.placement is not None:
            self.placement.remove()


def start_rl_run(cfg: Config, with_critic: bool) -> RLRun:
    """Validate data, start every role, resume if asked, evaluate the starting policy."""
    started = time.perf_counter()
    cfg = resolve_paths(cfg)
    rl = cfg.rl
    out_dir = prepare_output_dir(cfg)
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
    ckpt_root = Path(cfg.checkpoint_dir)
    resume_from = resume_path(cfg, ckpt_root)

    use_reference = rl.kl_coef > 0
    # Online DPO starts its own reference server (the learner's policy loss has no KL term there).
    extra_reference = cfg.algorithm == "online_dpo"
    local = cfg.ray.local_mode
    placement = start_cluster(cfg, job_demands(cfg, reference=use_reference or extra_reference, critic=with_critic))
    restarts = cfg.ray.max_actor_restarts
    optimizer_steps = total_steps * rl.num_mini_batches * rl.num_epochs_per_step
    run = RLRun(cfg, tokenizer, prompts, eval_prompts, sampler, total_steps, out_dir, ckpt_root, placement=placement)
    try:
        run.learners = LearnerGroup(cfg, optimizer_steps, local=local, placement=placement)
        run.rollout = RolloutGroup(cfg.model.path, cfg.rollout, local=local, placement=placement,
                                   max_restarts=restarts)
        run.graders = GraderPool(cfg.graders, local=local, max_restarts=restarts)
        if use_reference:
            run.reference = ReferenceGroup(cfg.reference, cfg.model.path, local=local, placement=placement,
                                           max_restarts=restarts)
        if with_critic:
            run.critic = LearnerGroup(cfg, optimizer_steps, local=local, head="value", lr=rl.critic_lr,
                                      placement=placement)
        if not local:
            run.control = start_control(cfg)
            tqdm.write(f"job {job_id(cfg)}: `rlft scale {job_id(cfg)} --rollout-workers N` resizes the rollout")
        run.started = started
        if resume_from:
            state = run.learners.load_checkpoint(resume_from)
            if run.critic is not None:
                run.critic.load_checkpoint(resume_from / "critic")
            sampler.load_state(state["data"])
            run.start_step = state["step"]
            run.rollout.sync_from(run.learners, run.start_step)
            tqdm.write(f"resumed from {resume_from} at step {run.start_step}")
        run.logger = MetricsLogger(cfg, resume_step=run.start_step if resume_from else None)
        if eval_prompts and run.start_step == 0:
            run.eval_accuracy_start = evaluate(run, 0, "step0")
        if cfg.logging.engine_times:
            engine_metrics(run)  # start-up and the first evaluation are not the first step's work
        DRIVER_INBOX.take()
        run.progress = tqdm(
            total=total_steps, initial=run.start_step, desc=cfg.algorithm, disable=not cfg.logging.progress_bar
        )
    except BaseException:
        run.shutdown()
        raise
    return run


def evaluate(run: RLRun, step: int, tag: str) -> float:
    """Held-out accuracy with the rollout workers' current weights: greedy, and sampled when
    ``eval.num_samples`` > 0; the greedy completions are saved beside the metrics. Returns the greedy accuracy."""
    t0 = time.perf_counter()
    ev = run.cfg.eval
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=ev.max_new_tokens)
    accuracy, _, mean_tokens, records = held_out_accuracy(run.rollout, run.eval_prompts, greedy)
    with (run.out_dir / f"eval_samples_{tag}.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    metrics = {"eval/accuracy": accuracy, "eval/num_examples": len(records), "eval/mean_completion_tokens": mean_tokens}
    if ev.extract_pattern:
        metrics["eval/extracted_accuracy"] = extracted_accuracy(records, ev.extract_pattern)
    if ev.num_samples:
        sampling = SamplingConfig(
            temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=run.cfg.trainer.seed + 1
        )
        sampled, pass_at_k, _, _ = held_out_accuracy(run.rollout, run.eval_prompts, sampling, ev.num_samples)
        metrics.update({"eval/sampled_accuracy": sampled, "eval/pass_at_k": pass_at_k})
    run.logger.log(step, {**metrics, "eval/seconds": time.perf_counter() - t0}, console=True)
    return accuracy


def save_checkpoint(run: RLRun, step: int) -> None:
    path = run.ckpt_root / f"step_{step:06d}"
    run.learners.save_checkpoint(path, {"step": step, "data": run.sampler.state()})
    if run.critic is not None:
        run.critic.save_checkpoint(path / "critic", {"step": step})
    prune_checkpoints(run.ckpt_root, run.cfg.checkpoint.keep_last)


def end_step(run: RLRun, step: int, metrics: dict[str, float]) -> None:
    """Log the step, then checkpoint and evaluate when due, then apply requests (``rlft scale``) and report."""
    cfg = run.cfg
    # Everything role calls handed back to the driver this step (samples, grades, handles, metrics).
    metrics = {**metrics, "driver/received_bytes": DRIVER_INBOX.take()}
    if cfg.logging.engine_times:
        metrics = {**metrics, **engine_metrics(run)}
    run.logger.log(step, {**metrics, **fault_metrics(run)})
    run.progress.update(1)
    run.progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
    if step < run.total_steps:
        if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
            save_checkpoint(run, step)
        if run.eval_prompts and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0:
            evaluate(run, step, f"step{step}")
        apply_requests(run)
    if cfg.logging.engine_times:
        engine_metrics(run)  # evaluation and checkpoints are not the next step's work
    DRIVER_INBOX.take()
    if run.control is not None:
        run.control.report.remote({"step": step, "total_steps": run.total_steps,
                                   "rollout_workers": run.rollout.num_workers})


def engine_metrics(run: RLRun) -> dict[str, float]:
    """``engine/<phase>_seconds``: how long the engines worked in each phase since the last call (for each role
    the slowest worker's share, as workers run side by side). Against ``time/<phase>_seconds`` this shows what
    dispatch, transfers and the controller add (``rlft bench``)."""
    rollout, learner, graders = run.rollout.engine_seconds(), run.learners.engine_seconds(), run.graders.engine_seconds()
    critic = run.critic.engine_seconds() if run.critic is not None else {}
    reference = run.reference.engine_seconds() if run.reference is not None else {}
    by_phase = {
        "generate": [rollout.get("generate")],
        "grade": [graders.get("grade")],
        "old_logprobs": [learner.get("forward")],
        "values": [critic.get("forward")],
        "reference": [reference.get("forward")],
        "update": [learner.get("train"), critic.get("train")],
        "sync": [learner.get("export"), rollout.get("load_weights"), reference.get("load_weights")],
    }
    return {
        f"engine/{phase}_seconds": sum(s for s in parts if s is not None)
        for phase, parts in by_phase.items()
        if any(s is not None for s in parts)
    }


def fault_metrics(run: RLRun) -> dict[str, float]:
    """The role size and the actors replaced so far (cumulative over the run, resumes start again at 0)."""
    metrics = {
        "rollout/num_workers": run.rollout.num_workers,
        "faults/rollout_restarts": run.rollout.restarts,
        "faults/grader_restarts": run.graders.restarts,
    }
    if run.reference is not None:
        metrics["faults/reference_restarts"] = run.reference.restarts
    return metrics


def apply_requests(run: RLRun) -> None:
    """Between steps: resize the rollout workers as ``rlft scale`` asked. Added workers that do not fit the cluster's
    free resources are refused with a warning; the job goes on with the workers it has."""
    if run.control is None:
        return
    wanted = ray.get(run.control.take_requests.remote()).get("rollout_workers")
    current = run.rollout.num_workers
    if not wanted or wanted == current:
        return
    if wanted > current:
        rc = run.cfg.rollout
        added = RoleDemand("rollout", wanted - current, rc.num_cpus_per_worker, rc.num_gpus_per_worker,
                           "rlft scale --rollout-workers")
        try:
            check_fit([added], free_node_resources())
        except ClusterFitError as err:
            tqdm.write(f"rollout workers stay at {current}: {err}")
            return
    started = time.perf_counter()
    run.rollout.resize(wanted)
    tqdm.write(f"rollout workers: {current} -> {wanted} ({time.perf_counter() - started:.1f} s)")


def finish(run: RLRun) -> RunResult:
    """Final checkpoint, the Hugging Face model directory, the final evaluation and ``summary.json``."""
    run.progress.close()
    save_checkpoint(run, run.total_steps)
    final_dir = run.learners.save_pretrained(run.out_dir / "final_model")
    accuracy_end = evaluate(run, run.total_steps, "final") if run.eval_prompts else None
    result = RunResult(
        output_dir=run.out_dir,
        final_model_dir=final_dir,
        num_steps=run.total_steps,
        eval_accuracy_start=run.eval_accuracy_start,
        eval_accuracy_end=accuracy_end,
        seconds=time.perf_counter() - run.started,
    )
    result.write_summary()
    return result


def rollout_metrics(samples: list[Sample], prompts: PromptSet, rewards_S: torch.Tensor, step: int) -> dict[str, float]:
    correct = [
        s.response_text.strip() == str(prompts.items[s.prompt_index].extra.get("answer", "")).strip() for s in samples
    ]
    return {
        "reward/mean": rewards_S.mean().item(),
        "reward/std": rewards_S.std().item(),
        "rollout/num_samples": len(samples),
        "rollout/response_tokens": sum(len(s.response_token_ids) for s in samples),
        "rollout/accuracy": sum(correct) / max(len(correct), 1),
        "rollout/response_tokens_mean": statistics.mean(len(s.response_token_ids) for s in samples),
        "rollout/truncated_fraction": statistics.mean(s.finish_reason == "length" for s in samples),
        # Samples come from the weights synced after the previous step: a lag above 0 means stale weights.
        "rollout/policy_version_lag": step - 1 - min(s.policy_version for s in samples),
    }


def sync_metrics(sync, logprob_gap: float | None = None) -> dict[str, float]:
    """Seconds, bytes and GB/s of a weight sync (and what the driver received meanwhile). ``logprob_gap``, the
    largest gap between the learner's recomputed log-probabilities of the sampled tokens and the sampler's own:
    after a correct sync they agree up to numerics, so this is the check that rollout workers run the learner's
    weights."""
    metrics = {"sync/seconds": sync.seconds, "sync/bytes": sync.num_bytes, "sync/gb_per_s": sync.gb_per_s,
               "sync/driver_bytes": sync.driver_bytes, "sync/load_seconds": sync.load_seconds,
               "sync/transfer_gb_per_s": sync.transfer_gb_per_s}
    if logprob_gap is not None:
        metrics["sync/logprob_max_abs_diff"] = logprob_gap
    return metrics


def mean_metrics(results: list[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = [k for k in results[0] if k != "seconds"]
    return {prefix + k: sum(r[k] for r in results) / len(results) for k in keys}
