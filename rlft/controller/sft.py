"""Supervised fine-tuning: one function, phases named and timed.

```
rows (JSONL / Parquet / datasets dir) ──► validate + tokenize (driver, before any actor starts)
                                             │  loss weights on assistant tokens only
                                             ▼
             sampler (epoch permutation, position saved in checkpoints) ──► global batch of rows
                                             ▼
             LearnerGroup.train_step(batch, SFTLoss)  (N DeepSpeed ranks, micro-batches, accumulation)
                                             ▼
             metrics ─► console / metrics.jsonl / wandb;  checkpoints;  held-out eval by generation
```
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from rlft.algorithms.sft import SFTLoss
from rlft.config import Config
from rlft.controller.common import (
    RunResult,
    prepare_output_dir,
    resolve_paths,
    resume_path,
    save_step_checkpoint,
    step_schedule,
)
from rlft.controller.evaluation import evaluate_weights, task_evaluator
from rlft.data import formats
from rlft.data.batch import TokenBatch
from rlft.data.packing import collate, normalize_loss_weights, pack
from rlft.data.tokenize import TokenizedExample, tokenize_sft_examples
from rlft.distributed.cluster import start_cluster
from rlft.distributed.placement import job_demands
from rlft.learner.group import LearnerGroup
from rlft.metrics import MetricsLogger
from rlft.timing import PhaseTimer


def load_sft_rows(cfg: Config, tokenizer) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Read, validate and tokenize the training data; malformed rows stop here (or are skipped and counted)."""
    loaded = formats.load_examples(
        cfg.data.train_path,
        lambda row: formats.parse_sft(row, cfg.data.format),
        on_bad_row=cfg.data.on_bad_row,
    )
    examples, num_dropped, num_truncated = tokenize_sft_examples(
        loaded.examples, tokenizer, cfg.data.max_seq_len, on_long_row=cfg.data.on_long_row
    )
    if cfg.data.packing:
        examples = pack(examples, cfg.data.max_seq_len)
    counts = {
        "data/rows_read": loaded.num_rows,
        "data/rows_skipped_malformed": loaded.num_skipped,
        "data/rows_dropped_long_or_empty": num_dropped,
        "data/rows_truncated": num_truncated,
        "data/train_rows": len(examples),
    }
    for error in loaded.errors[:5]:
        tqdm.write(f"skipped malformed row: {error}")
    return examples, counts


def sft(cfg: Config) -> RunResult:
    started = time.perf_counter()
    cfg = resolve_paths(cfg)
    out_dir = prepare_output_dir(cfg)
    ckpt_root = Path(cfg.checkpoint_dir)

    # ---- data: everything validated before any actor starts
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    rows, data_counts = load_sft_rows(cfg, tokenizer)
    sampler, total_steps = step_schedule(cfg, len(rows))
    resume_from = resume_path(cfg, ckpt_root)
    evaluator = task_evaluator(cfg, tokenizer)

    # ---- actors
    placement = start_cluster(cfg, job_demands(cfg, reference=False, rollout=False, graders=False))
    learners = None
    logger = None
    try:
        learners = LearnerGroup(cfg, total_steps, local=cfg.ray.local_mode, placement=placement)
        start_step = 0
        if resume_from:
            trainer_state = learners.load_checkpoint(resume_from)
            sampler.load_state(trainer_state["data"])
            start_step = trainer_state["step"]
            tqdm.write(f"resumed from {resume_from} at step {start_step}")
        logger = MetricsLogger(cfg, resume_step=start_step if resume_from else None)
        logger.log(start_step, {**data_counts, "model/num_parameters": learners.num_parameters}, console=False)

        def evaluate(step: int, tag: str) -> float:
            t0 = time.perf_counter()
            metrics = evaluate_weights(evaluator, learners.export_weights(), out_dir / f"eval_samples_{tag}.jsonl")
            logger.log(step, {**metrics, "eval/seconds": time.perf_counter() - t0}, console=True)
            return metrics["eval/accuracy"]

        accuracy_start = evaluate(start_step, f"step{start_step}") if evaluator and start_step == 0 else None

        loss = SFTLoss()
        progress = tqdm(
            total=total_steps, initial=start_step, desc="sft", disable=not cfg.logging.progress_bar, dynamic_ncols=True
        )
        for step in range(start_step + 1, total_steps + 1):
            timer = PhaseTimer()
            step_start = time.perf_counter()
            with timer.phase("data"):
                batch = _make_batch(rows, sampler.next_batch(), tokenizer.pad_token_id)
            with timer.phase("update"):
                result = learners.train_step(batch, loss)
            step_seconds = time.perf_counter() - step_start
            num_tokens = result.metrics["num_tokens"]
            metrics = {
                "train/loss": result.metrics["loss"],
                "train/grad_norm": result.metrics["grad_norm"],
                "train/lr": result.metrics["lr"],
                "train/epoch": sampler.epoch + sampler.index / max(sampler.num_rows, 1),
                "train/num_tokens": num_tokens,
                "train/batch_tokens": num_tokens,
                "train/update_tokens": num_tokens,
                **timer.metrics(),
                "time/step_seconds": step_seconds,
                # The slowest rank's time inside DeepSpeed (ranks wait for each other).
                "engine/update_seconds": result.seconds_slowest_rank,
                "perf/tokens_per_second": num_tokens / step_seconds,
            }
            logger.log(step, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['perf/tokens_per_second']:.0f}")
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0 and step < total_steps:
                save_step_checkpoint(learners, cfg, step, sampler)
            if evaluator and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < total_steps:
                evaluate(step, f"step{step}")
        progress.close()

        save_step_checkpoint(learners, cfg, total_steps, sampler)
        final_dir = learners.save_pretrained(out_dir / "final_model")
        accuracy_end = evaluate(total_steps, "final") if evaluator else None
        summary = RunResult(
            output_dir=out_dir,
            final_model_dir=final_dir,
            num_steps=total_steps,
            eval_accuracy_start=accuracy_start,
            eval_accuracy_end=accuracy_end,
            seconds=time.perf_counter() - started,
        )
        summary.write_summary()
        return summary
    finally:
        if logger is not None:
            logger.close()
        if learners is not None:
            learners.shutdown()
        if placement is not None:
            placement.remove()


def _make_batch(rows: list[TokenizedExample], indices: list[int], pad_id: int) -> TokenBatch:
    return normalize_loss_weights(collate([rows[i] for i in indices], pad_id))
