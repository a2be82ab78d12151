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
                        (an evaluation worker that takes the learners' weights through the object store)
```

The run around the loop (resume, checkpoints, evaluation, summary, shutdown) is ``rlft/controller/run.py``.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from rlft.algorithms.sft import SFTLoss
from rlft.config import Config
from rlft.controller.common import RunResult, step_schedule
from rlft.controller.run import Run
from rlft.data import formats
from rlft.data.batch import TokenBatch
from rlft.data.packing import collate, normalize_loss_weights, pack
from rlft.data.tokenize import TokenizedExample, load_tokenizer, tokenize_sft_examples
from rlft.evaluator.results import eval_items
from rlft.evaluator.worker import HeldOutEvaluation
from rlft.learner.group import LearnerGroup
from rlft.names import Phase
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
    with Run(cfg) as run:
        cfg = run.cfg
        # ---- data: everything validated before any actor starts
        tokenizer = load_tokenizer(cfg.model.tokenizer_path)
        rows, data_counts = load_sft_rows(cfg, tokenizer)
        sampler, total_steps = step_schedule(cfg, len(rows))
        items = eval_items(cfg)

        # ---- actors
        run.start_cluster()
        # The evaluation worker first: it loads while the learners start (they block until they are up).
        evaluation = run.keep(HeldOutEvaluation(cfg, items)) if items else None
        learners = run.keep(LearnerGroup(cfg, total_steps, local=cfg.ray.local_mode, placement=run.placement))

        def evaluate(step: int, tag: str) -> dict[str, float]:
            return evaluation.evaluate(learners, step, run.samples_path(tag))

        run.begin(learners, sampler, total_steps, evaluate if evaluation else None,
                  first_metrics={**data_counts, "model/num_parameters": learners.num_parameters,
                                 "model/num_trainable_parameters": learners.num_trainable_parameters})
        loss = SFTLoss()
        for step in run.steps():
            with run.recover_learners():  # a dead learner: all ranks restarted, steps since the checkpoint redone
                timer = PhaseTimer()
                step_start = time.perf_counter()
                with timer.phase(Phase.DATA):
                    batch = _make_batch(rows, sampler.next_batch(), tokenizer.pad_token_id)
                with timer.phase(Phase.UPDATE):
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
                run.end_step(step, metrics, loss=f"{metrics['train/loss']:.4f}",
                             tok_s=f"{metrics['perf/tokens_per_second']:.0f}")
        return run.finish()


def _make_batch(rows: list[TokenizedExample], indices: list[int], pad_id: int) -> TokenBatch:
    return normalize_loss_weights(collate([rows[i] for i in indices], pad_id))
