"""Offline preference fine-tuning (DPO and kin): one function, phases named and timed.

```
preference rows (OpenAI or {prompt, chosen, rejected}) ──► validate + tokenize (driver, before any actor starts)
                                             ▼
   reference log-probabilities of every pair: from the on-disk cache (keyed by model, data, max_seq_len), or
   computed once by the reference server and cached  ─ or, with dpo.reference=server, per step
                                             ▼
   sampler ──► batch of pairs (chosen, rejected rows) ──► LearnerGroup.train_step(batch, DPOLoss)
                                             ▼
   metrics: loss, margin, preference accuracy, chosen / rejected log-probabilities; held-out preference accuracy
   and task accuracy (greedy exact match, by an evaluation worker that takes the learners' weights through the
   object store) at each evaluation
```

The run around the loop (resume, checkpoints, evaluation, summary, shutdown) is ``rlft/controller/run.py``; the
reference server is built there too, so its replicas are replaced up to ``ray.max_actor_restarts``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlft.algorithms.dpo import DPOLoss, PreferenceBatch, dpo_loss
from rlft.config import Config
from rlft.controller.common import RunResult, step_schedule
from rlft.controller.run import Run
from rlft.controller.step_metrics import engine_metrics
from rlft.data import formats
from rlft.data.packing import collate
from rlft.data.sources import DataError
from rlft.data.tokenize import TokenizedExample, load_tokenizer, tokenize_prompt_completion
from rlft.evaluator.results import eval_items
from rlft.evaluator.worker import HeldOutEvaluation
from rlft.learner.group import LearnerGroup
from rlft.names import Phase
from rlft.timing import PhaseTimer
from rlft.tiny import resolve

# Pairs per reference (or policy) scoring call when scoring a whole data set.
SCORING_CHUNK_PAIRS = 128


@dataclass
class Pairs:
    """Tokenized preference pairs; ``source`` names the file they came from (for the cache key)."""

    chosen: list[TokenizedExample]
    rejected: list[TokenizedExample]
    source: str

    def __len__(self) -> int:
        return len(self.chosen)


def load_pairs(path: str, tokenizer, cfg: Config, limit: int | None = None) -> Pairs:
    """Read, validate and tokenize preference rows; a pair whose response does not fit ``data.max_seq_len`` is an
    error naming its row."""
    loaded = formats.load_examples(path, formats.parse_preference, on_bad_row=cfg.data.on_bad_row, limit=limit)
    chosen, rejected = [], []
    for example in loaded.examples:
        for name, response, out in (
            ("chosen", example.chosen_messages, chosen),
            ("rejected", example.rejected_messages, rejected),
        ):
            tokenized = tokenize_prompt_completion(example.prompt_messages, response, tokenizer, cfg.data.max_seq_len)
            if not any(tokenized.loss_weights):
                raise DataError(example.where, name, f"no response token fits in data.max_seq_len = {cfg.data.max_seq_len}")
            out.append(tokenized)
    return Pairs(chosen, rejected, path)


def pair_batch(
    pairs: Pairs, indices: list[int], pad_id: int, ref_sums_P2: torch.Tensor | None, num_weighted: int | None = None
) -> PreferenceBatch:
    """The pairs ``indices`` as rows (chosen, rejected, chosen, ...); the first ``num_weighted`` pairs (default:
    all) share the step's weight equally, the rest weigh 0 (fillers). With ``ref_sums_P2`` (the reference's summed
    log-probabilities, chosen and rejected, of every pair) set on each row's last response token."""
    rows = [row for i in indices for row in (pairs.chosen[i], pairs.rejected[i])]
    base = collate(rows, pad_id)
    mask_BT = (base.loss_weights_BT != 0).to(torch.float32)
    ref_BT = torch.zeros_like(mask_BT)
    if ref_sums_P2 is not None:
        last_B = mask_BT.shape[1] - 1 - mask_BT.flip(1).argmax(dim=1)
        ref_BT[torch.arange(len(rows)), last_B] = ref_sums_P2[indices].reshape(-1)
    num_weighted = len(indices) if num_weighted is None else num_weighted
    weights_BT = torch.zeros_like(mask_BT)
    weights_BT[0 : 2 * num_weighted : 2] = 1.0 / num_weighted
    return PreferenceBatch(
        base.input_ids_BT, base.attention_mask_BT, base.position_ids_BT, mask_BT, ref_BT, weights_BT
    )


def rows_config(cfg: Config) -> Config:
    """``cfg`` with the batch sizes in rows, as the learner group counts them: two rows (chosen, rejected) a pair."""
    return dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, global_batch_size=2 * cfg.trainer.global_batch_size),
        learner=dataclasses.replace(
            cfg.learner, micro_batch_size_per_learner=2 * cfg.learner.micro_batch_size_per_learner
        ),
    )


def loss_of(cfg: Config) -> DPOLoss:
    d = cfg.dpo
    return DPOLoss(d.beta, d.loss_type, d.label_smoothing, d.simpo_gamma, d.rpo_alpha)


def summed_logprobs(score, pairs: Pairs, pad_id: int) -> torch.Tensor:
    """(pairs, 2) summed response log-probabilities under ``score`` (a ``logprobs(batch) -> logprobs_BT``)."""
    out = []
    for start in range(0, len(pairs), SCORING_CHUNK_PAIRS):
        batch = pair_batch(pairs, list(range(start, min(start + SCORING_CHUNK_PAIRS, len(pairs)))), pad_id, None)
        out.append((score(batch) * batch.loss_weights_BT).sum(dim=1).view(-1, 2))
    return torch.cat(out)


def reference_cache_path(cfg: Config, pairs: Pairs) -> Path:
    """Where the reference sums of ``pairs`` are kept: keyed by the reference model's files (names, sizes,
    modification times), the data file's bytes, ``data.max_seq_len`` and the number of pairs."""
    model_dir = Path(cfg.model.path)
    model_files = sorted(
        (str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.rglob("*") if p.is_file()
    )
    data = Path(pairs.source)
    data_digest = hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else str(data.resolve())
    key = json.dumps([model_files, data_digest, cfg.data.max_seq_len, len(pairs), cfg.model.dtype])
    return Path(cfg.dpo.cache_dir).expanduser() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def cached_reference_sums(run: Run, pairs: Pairs, pad_id: int, reference) -> torch.Tensor:
    """The reference sums of ``pairs``, read from the cache, or computed by ``reference`` (a ``ReferenceGroup``, or
    the learners' ``LearnerReference``) and written there."""
    path = reference_cache_path(run.cfg, pairs)
    if path.exists():
        return torch.load(path)
    sums = summed_logprobs(reference.logprobs, pairs, pad_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(sums, partial)
    partial.rename(path)
    return sums


def preference_metrics(cfg: Config, policy_P2: torch.Tensor, ref_P2: torch.Tensor, pairs: Pairs) -> dict[str, float]:
    """Held-out preference accuracy (chosen reward above rejected), reward margin and loss."""
    lengths = torch.tensor([[sum(1 for w in r.loss_weights if w) for r in (c, j)] for c, j in zip(pairs.chosen, pairs.rejected)],
                           dtype=torch.float32)
    d = cfg.dpo
    losses, chosen, rejected = dpo_loss(
        policy_P2[:, 0], policy_P2[:, 1], ref_P2[:, 0], ref_P2[:, 1],
        beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
        chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], simpo_gamma=d.simpo_gamma,
    )
    return {
        "eval/preference_accuracy": (chosen > rejected).float().mean().item(),
        "eval/reward_margin": (chosen - rejected).mean().item(),
        "eval/loss": losses.mean().item(),
    }


def dpo(cfg: Config) -> RunResult:
    with Run(cfg) as run:
        cfg, d = run.cfg, cfg.dpo
        # ---- data: everything validated before any actor starts
        tokenizer = load_tokenizer(cfg.model.tokenizer_path)
        pad_id = tokenizer.pad_token_id
        pairs = load_pairs(cfg.data.train_path, tokenizer, cfg)
        eval_pairs = load_pairs(resolve(d.eval_path), tokenizer, cfg, limit=d.eval_num_pairs) if d.eval_path else None
        sampler, total_steps = step_schedule(cfg, len(pairs), "pairs")
        items = eval_items(cfg)

        # ---- actors: the learners see rows, two per pair; every role starts at once
        # The reference: with LoRA the learners' base model (the adapter disabled), no server; otherwise the
        # reference server, kept for the run with dpo.reference=server, else started for the cache pass alone
        # (when a pass has no cached sums) and shut down after it.
        lora = cfg.model.lora.rank > 0
        uncached = [p for p in (pairs, eval_pairs) if p is not None and not reference_cache_path(cfg, p).exists()]
        run.start_cluster()
        evaluation = run.keep(HeldOutEvaluation(cfg, items)) if items else None  # loads while the rest starts
        starts = {"learners": lambda: LearnerGroup(rows_config(cfg), total_steps, local=cfg.ray.local_mode,
                                                   placement=run.placement)}
        if not lora and (d.reference == "server" or uncached):
            starts["reference"] = run.reference_group
        roles = run.start_roles(starts)
        learners = roles["learners"]
        scorer = learners.reference() if lora else roles.get("reference")
        reference = scorer if d.reference == "server" else None
        timer = PhaseTimer()
        with timer.phase(Phase.REFERENCE_CACHE):
            ref_sums = None if reference else cached_reference_sums(run, pairs, pad_id, scorer)
            eval_ref = cached_reference_sums(run, eval_pairs, pad_id, scorer) if eval_pairs else None
        if scorer is not None and not lora and reference is None:
            run.release(scorer)  # the cache pass's server

        def evaluate(step: int, tag: str) -> dict[str, float]:
            metrics: dict[str, float] = {}
            if eval_pairs is not None:
                policy = summed_logprobs(learners.compute_logprobs, eval_pairs, pad_id)
                metrics.update(preference_metrics(cfg, policy, eval_ref, eval_pairs))
            if evaluation is not None:
                metrics.update(evaluation.evaluate(learners, step, run.samples_path(tag)))
            return metrics

        run.begin(learners, sampler, total_steps, evaluate,
                  first_metrics={"data/train_pairs": len(pairs), **timer.metrics()})
        loss = loss_of(cfg)
        if cfg.logging.engine_times:
            engine_metrics(reference)  # start-up is not the first step's work
        for step in run.steps():
            with run.recover_learners():  # a dead learner: all ranks restarted, steps since the checkpoint redone
                timer = PhaseTimer()
                step_start = time.perf_counter()
                with timer.phase(Phase.DATA):
                    batch = pair_batch(pairs, sampler.next_batch(), pad_id, ref_sums)
                if reference is not None:
                    with timer.phase(Phase.REFERENCE):
                        batch = dataclasses.replace(batch, ref_logprobs_BT=reference.keep_logprobs(batch))
                with timer.phase(Phase.UPDATE):
                    result = learners.train_step(batch, loss)
                m = result.metrics
                metrics = {
                    **{f"train/{k}": m[k] for k in ("loss", "accuracy", "margin", "chosen_rewards", "rejected_rewards",
                                                    "chosen_logps", "rejected_logps", "grad_norm", "lr")},
                    "train/epoch": sampler.epoch + sampler.index / max(sampler.num_rows, 1),
                    **timer.metrics(),
                    "time/step_seconds": time.perf_counter() - step_start,
                    "perf/tokens_per_second": m["num_tokens"] / timer.seconds["update"],
                    "train/batch_tokens": m["num_tokens"],
                    "train/update_tokens": m["num_tokens"],
                    # The slowest rank's time inside DeepSpeed (ranks wait for each other).
                    "engine/update_seconds": result.seconds_slowest_rank,
                    **(engine_metrics(reference) if cfg.logging.engine_times else {}),
                }
                if reference is not None:
                    metrics["faults/reference_restarts"] = reference.restarts
                run.end_step(step, metrics, loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}")
        return run.finish()
