"""How a per-token loss becomes one number: the loss aggregation modes, and the same thing as per-token weights.

Public API:

- ``AggregationMode``: ``"token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum" | "seq_mean_token_sum_norm"``
  (defined in ``rlft.config``, which loads without torch)
- ``aggregate(loss_BT, mask_BT, mode, constant=None) -> loss``
- ``aggregation_weights(mask_BT, mode, constant=None) -> weights_BT``

One row is one sample: the step's batch as the controller builds it, before the learner packs several samples into
a row (``learner.max_tokens_per_micro_batch``), which moves each token's weight with it. A row whose mask is all
zero (padding added to fill a micro-batch) is not a sequence: it counts in neither the token count nor the sequence
count.

The learner splits a step over micro-batches and ranks and sums the loss shares, so a mode that divides by a count
of the whole step (tokens, sequences) cannot be applied per micro-batch. The batch producer calls
``aggregation_weights`` once on the whole step's mask and stores the result as ``TokenBatch.loss_weights_BT``; then
``sum(loss_BT * weights_BT)`` summed over any split of the rows equals ``aggregate`` over the whole step.
"""

from __future__ import annotations

from typing import get_args

import torch

from rlft.algorithms.config import AggregationMode


def aggregate(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: AggregationMode, constant: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss over the tokens where ``mask_BT`` is non-zero; values elsewhere are ignored.

    With m_it the mask, |o_i| = Σ_t m_it the length of sequence i and N the number of non-empty sequences:

    - ``token_mean``: Σ_it m_it l_it / Σ_it m_it. Every token counts the same, so long responses are not
      under-weighted. DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
      arXiv:2503.14476), "token-level policy gradient loss".
    - ``seq_mean_token_mean``: (1/N) Σ_i (1/|o_i|) Σ_t m_it l_it. The original GRPO objective (Shao et al. 2024,
      "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", arXiv:2402.03300).
    - ``seq_mean_token_sum``: (1/N) Σ_i Σ_t m_it l_it. Dr. GRPO's objective as written (Liu et al. 2025,
      "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783): GRPO without the 1/|o_i|
      that biases the update by response length.
    - ``seq_mean_token_sum_norm``: (1/N) Σ_i Σ_t m_it l_it / C with a constant C such as ``max_new_tokens``.
      The same objective scaled by a constant, as Dr. GRPO is run in practice, so that the loss keeps the
      magnitude of a per-token mean without depending on the lengths of the responses.

    ``constant`` is C: required by ``seq_mean_token_sum_norm`` and rejected by the other modes. An all-zero mask
    gives 0.
    """
    _check_constant(mode, constant)
    mask_BT = mask_BT.to(loss_BT.dtype)
    masked_BT = torch.where(mask_BT != 0, loss_BT * mask_BT, 0.0)
    if mode == "token_mean":
        return masked_BT.sum() / mask_BT.sum().clamp(min=1)
    lengths_B = mask_BT.sum(dim=-1)
    num_seqs = (lengths_B > 0).sum().clamp(min=1)
    sums_B = masked_BT.sum(dim=-1)
    if mode == "seq_mean_token_mean":
        return (sums_B / lengths_B.clamp(min=1)).sum() / num_seqs
    if mode == "seq_mean_token_sum":
        return sums_B.sum() / num_seqs
    return sums_B.sum() / (constant * num_seqs)


def aggregation_weights(
    mask_BT: torch.Tensor, mode: AggregationMode, constant: float | None = None
) -> torch.Tensor:
    """Per-token weights w_BT (float32) with Σ_it w_it l_it = ``aggregate(l_BT, mask_BT, mode, constant)``.

    - ``token_mean``: w_it = m_it / Σ_jt m_jt
    - ``seq_mean_token_mean``: w_it = m_it / (|o_i| · N)
    - ``seq_mean_token_sum``: w_it = m_it / N
    - ``seq_mean_token_sum_norm``: w_it = m_it / (C · N)

    Call it on the mask of a whole optimizer step (every micro-batch of every learner) so that the counts in the
    denominators are the step's. The weights of ``token_mean`` and ``seq_mean_token_mean`` sum to 1; those of the
    two token-sum modes sum to the mean response length (divided by C), which is what makes them sums.
    """
    _check_constant(mode, constant)
    mask_BT = (mask_BT != 0).float()
    if mode == "token_mean":
        return mask_BT / mask_BT.sum().clamp(min=1)
    lengths_B1 = mask_BT.sum(dim=-1, keepdim=True)
    num_seqs = (lengths_B1 > 0).sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return mask_BT / (lengths_B1.clamp(min=1) * num_seqs)
    if mode == "seq_mean_token_sum":
        return mask_BT / num_seqs
    return mask_BT / (constant * num_seqs)


def _check_constant(mode: str, constant: float | None) -> None:
    if mode not in get_args(AggregationMode):
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {get_args(AggregationMode)}")
    if mode == "seq_mean_token_sum_norm" and (constant is None or constant <= 0):
        raise ValueError(f"aggregation mode {mode!r} needs a positive constant (e.g. max_new_tokens), got {constant}")
    if mode != "seq_mean_token_sum_norm" and constant is not None:
        raise ValueError(f"aggregation mode {mode!r} takes no constant, got {constant}")
