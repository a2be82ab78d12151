"""Which sample each token belongs to, when a row may hold several (packed micro-batches).

Public API:

- ``sequence_ids(position_ids_BT) -> sequence_ids_BT``
- ``sequence_sum(x_BT, sequence_ids_BT=None) -> sums_BT``

A packed row (``learner.max_tokens_per_micro_batch``) concatenates samples, each one's position ids restarting at 0,
so a quantity of one sample (GSPO's sequence ratio, a sequence-level importance weight) is a sum over the tokens of
its *sequence*, not of its row. With one sample per row (padded micro-batches) the two are the same.
"""

from __future__ import annotations

import torch


def sequence_ids(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """An id per token (int64), the same for the tokens of one sequence and different across sequences and rows: a
    sequence starts at each position id 0. A right-padded row whose padding has position 0 makes each padding token
    a sequence of its own, which a mask then leaves out."""
    num_rows, width = position_ids_BT.shape
    starts_BT = (position_ids_BT == 0).long()
    starts_BT[:, 0] = 1  # a row always starts a sequence
    row_offsets_B1 = torch.arange(num_rows, device=position_ids_BT.device)[:, None] * width
    return row_offsets_B1 + starts_BT.cumsum(dim=-1) - 1


def sequence_sum(x_BT: torch.Tensor, sequence_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Σ of ``x_BT`` over each token's sequence, given back at every token of it (differentiable in ``x_BT``).
    ``sequence_ids_BT`` from ``sequence_ids``; None: one sequence per row."""
    if sequence_ids_BT is None:
        return x_BT.sum(dim=-1, keepdim=True).expand_as(x_BT)
    flat_ids = sequence_ids_BT.flatten()
    sums = x_BT.new_zeros(x_BT.numel()).index_add(0, flat_ids, x_BT.flatten())
    return sums[flat_ids].view_as(x_BT)
