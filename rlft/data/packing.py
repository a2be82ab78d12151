"""Tokenized examples to ``TokenBatch``es: padding, packing several examples into one row, loss normalisation.

A packed row's ``position_ids`` restart at 0 at each example. Run the model with ``TokenBatch.model_inputs()``
(position ids, no 2D attention mask, no KV cache): transformers then finds the examples from the restarting
position ids and builds a block-diagonal causal mask, so every example sees only its own tokens, and its logits
equal those of the example run alone (checked for the sdpa and eager attention of a Llama in tests/test_data.py).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlft.data.batch import TokenBatch
from rlft.data.tokenize import TokenizedExample


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    loss_weights: list[float] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)  # restart at 0 at each example's first token

    def append(self, example: TokenizedExample) -> None:
        self.input_ids += example.input_ids
        self.loss_weights += example.loss_weights
        self.position_ids += example.position_ids


def pack(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """Greedy best-fit packing, in the given order: each example goes into the fullest row that still has room for
    it, or opens a new row. Rows hold at most ``max_seq_len`` tokens; examples are never split (truncate first).
    """
    lengths = [len(example.input_ids) for example in examples]
    for length in lengths:
        if length > max_seq_len:
            raise ValueError(f"an example of {length} tokens does not fit in rows of max_seq_len={max_seq_len}")
    rows = []
    for indices in best_fit(lengths, max_seq_len):
        row = PackedRow()
        for index in indices:
            row.append(examples[index])
        rows.append(row)
    return rows


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy best-fit bin packing, in the given order: each item goes into the fullest bin that still has room for
    it, or opens a new bin. Returns the items' indices in each bin, bins in the order they were opened."""
    bins: list[list[int]] = []
    free_slots: list[tuple[int, int]] = []  # (free capacity, bin index) of bins with room left, sorted
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"an item of size {length} does not fit in bins of capacity {capacity}")
        slot = bisect.bisect_left(free_slots, (length, -1))
        if slot < len(free_slots):
            free, bin_index = free_slots.pop(slot)
        else:
            free, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if free > length:
            bisect.insort(free_slots, (free - length, bin_index))
    return bins


def collate(rows: Sequence[TokenizedExample | PackedRow], pad_id: int) -> TokenBatch:
    """Right-pad rows to the longest one. Padding has attention mask 0, loss weight 0 and position id 0."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    num_rows, width = len(rows), max(len(row.input_ids) for row in rows)
    input_ids_BT = torch.full((num_rows, width), pad_id, dtype=torch.int64)
    attention_mask_BT = torch.zeros((num_rows, width), dtype=torch.int64)
    position_ids_BT = torch.zeros((num_rows, width), dtype=torch.int64)
    loss_weights_BT = torch.zeros((num_rows, width), dtype=torch.float32)
    for b, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids_BT[b, :length] = torch.tensor(row.input_ids, dtype=torch.int64)
        attention_mask_BT[b, :length] = 1
        position_ids_BT[b, :length] = torch.tensor(row.position_ids, dtype=torch.int64)
        loss_weights_BT[b, :length] = torch.tensor(row.loss_weights, dtype=torch.float32)
    return TokenBatch(input_ids_BT, attention_mask_BT, position_ids_BT, loss_weights_BT)


def normalize_loss_weights(batch: TokenBatch, total_weight: float | None = None) -> TokenBatch:
    """Divide the loss weights by their total so that the step's weights sum to 1 (see ``TokenBatch``).

    ``total_weight`` is the sum over the whole optimizer step when the step spans several batches (micro-batches,
    learners); it defaults to this batch's own sum. A batch with no weight is returned unchanged.
    """
    total = float(batch.loss_weights_BT.sum()) if total_weight is None else total_weight
    if total <= 0:
        return batch
    return dataclasses.replace(batch, loss_weights_BT=batch.loss_weights_BT / total)
