"""Token log-probabilities and the supervised (cross-entropy) loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlft.data.batch import TokenBatch


def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for every t, aligned with ``input_ids`` (column 0 is 0).

    ``logits_BTV[:, t]`` predicts token t+1, so the result is shifted right by one; that keeps every per-token
    tensor of a batch (loss weights, old log-probabilities, advantages) aligned with ``input_ids_BT``.
    """
    logprobs_BTm1 = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    picked_BTm1 = logprobs_BTm1.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked_BTm1, (1, 0))


@dataclass(frozen=True)
class SFTLoss:
    """Weighted negative log-likelihood: L = -Σ_t w_t · log p(x_t | x_<t).

    The batch producer normalises ``loss_weights_BT`` over the whole optimizer step (they sum to 1), so this is
    the token-mean cross-entropy of the step over assistant tokens, exact across micro-batches and learners.
    """

    def __call__(self, logits_BTV: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs_BT = token_logprobs(logits_BTV, batch.input_ids_BT)
        loss = -(logprobs_BT * batch.loss_weights_BT).sum()
        return loss, {"loss": loss.item()}
