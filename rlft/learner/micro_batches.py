"""How a rank's share of a step becomes micro-batches: padded rows, or samples packed by a token budget.

Padded (``learner.max_tokens_per_micro_batch: 0``): ``gradient_accumulation_steps`` micro-batches of
``micro_batch_size_per_learner`` rows each, one sample a row, right-padded to the micro-batch's longest.

Packed: each micro-batch is one row of at most ``max_tokens`` tokens, the samples in it concatenated without
padding, each one's position ids restarting at 0 (``TokenBatch.model_inputs`` keeps attention inside each sample;
the losses find each sample from its position ids). Samples go in by best fit, longest first. A sample without loss
weight is left out: it adds nothing to the loss, its gradient or its metrics.

The same count on every rank: ZeRO-2 reduces gradients at every micro-batch and ZeRO-3 gathers parameters at every
forward pass, so all ranks must run as many micro-batches. ``packed_plans`` plans every rank's share at once, on the
driver: a rank whose samples fill fewer rows than the busiest rank's gets empty micro-batches (one padding token, no
loss weight) to make up the count. The count is the budget's, so it changes from step to step; the learner marks
DeepSpeed's accumulation boundary at the last micro-batch itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlft.data.batch import TokenBatch
from rlft.data.packing import best_fit


@dataclass(frozen=True)
class MicroBatchPlan:
    """The rows of a rank's share that go into each micro-batch, in order. ``packed``: each micro-batch's rows are
    concatenated into one row (an empty tuple is an empty micro-batch); otherwise they are stacked, padded."""

    rows: tuple[tuple[int, ...], ...]
    packed: bool

    def __len__(self) -> int:
        return len(self.rows)


def padded_plan(num_rows: int, num_micro_batches: int) -> MicroBatchPlan:
    """``num_micro_batches`` micro-batches of consecutive rows, as many in each (the count must divide evenly)."""
    if num_rows % num_micro_batches:
        raise ValueError(f"cannot split {num_rows} rows into {num_micro_batches} equal micro-batches")
    size = num_rows // num_micro_batches
    return MicroBatchPlan(tuple(tuple(range(i, i + size)) for i in range(0, num_rows, size)), packed=False)


def packed_plans(shares: list[TokenBatch], max_tokens: int) -> list[MicroBatchPlan]:
    """One plan per rank's share, every one of the same length: each share's samples with loss weight packed into
    rows of at most ``max_tokens`` tokens (best fit, longest first), then empty micro-batches up to the largest
    count over the shares (at least one, so every rank steps the optimizer)."""
    groups = [_pack_share(share, max_tokens) for share in shares]
    count = max([1] + [len(g) for g in groups])
    return [MicroBatchPlan(tuple(g) + ((),) * (count - len(g)), packed=True) for g in groups]


def _pack_share(share: TokenBatch, max_tokens: int) -> list[tuple[int, ...]]:
    lengths_B = share.attention_mask_BT.sum(dim=-1).tolist()
    weighted_B = (share.loss_weights_BT != 0).any(dim=-1).tolist()
    rows = sorted((row for row in range(share.num_rows) if weighted_B[row]), key=lambda row: -lengths_B[row])
    longest = max((lengths_B[row] for row in rows), default=0)
    if longest > max_tokens:
        raise ValueError(f"learner.max_tokens_per_micro_batch: a sample of {longest} tokens does not fit in "
                         f"{max_tokens} tokens")
    bins = best_fit([lengths_B[row] for row in rows], max_tokens)
    return [tuple(sorted(rows[i] for i in indices)) for indices in bins]


def micro_batches(batch: TokenBatch, plan: MicroBatchPlan) -> list[TokenBatch]:
    """The micro-batches of ``batch`` (a rank's share) that ``plan`` describes, padding trimmed."""
    if not plan.packed:
        return [batch.rows(rows[0], rows[-1] + 1).trimmed() for rows in plan.rows]
    return [pack_rows(batch, rows) for rows in plan.rows]


def pack_rows(batch: TokenBatch, rows: tuple[int, ...]) -> TokenBatch:
    """One row holding the real tokens of ``rows`` one after the other (every field of ``batch``'s class, so a
    ``PolicyBatch`` keeps its per-token inputs aligned). Each right-padded row's position ids start at 0, so they
    restart at each sample. No rows: one padding token without loss weight (an empty micro-batch)."""
    if not rows:
        return dataclasses.replace(batch, **{f.name: torch.zeros_like(getattr(batch, f.name)[:1, :1])
                                             for f in dataclasses.fields(batch)})
    lengths = batch.attention_mask_BT.sum(dim=-1).tolist()
    return dataclasses.replace(batch, **{
        f.name: torch.cat([getattr(batch, f.name)[row, : lengths[row]] for row in rows])[None]
        for f in dataclasses.fields(batch)
    })


def padding_tokens(micro: TokenBatch) -> int:
    """Positions of a micro-batch that hold no token: computed, and wasted."""
    return micro.input_ids_BT.numel() - micro.num_tokens
