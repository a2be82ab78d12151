"""Rollout samples into the typed batch a policy-gradient update takes."""

from __future__ import annotations

import torch

from rlft.algorithms.policy_loss import PolicyBatch
from rlft.rollout.types import Sample


def policy_batch(samples: list[Sample], advantages_S: torch.Tensor, pad_id: int, width: int) -> PolicyBatch:
    """Prompt + response rows, right-padded to ``width``, each response token carrying its sample's advantage and
    the sampler's log-probability (``sampler_logprobs_BT``). ``old_logprobs_BT`` and ``ref_logprobs_BT`` are still
    zero, ``loss_weights_BT`` is the response mask: the policy's tokens (a multi-turn sample's observations are context,
    not trained on)."""
    num = len(samples)
    input_ids_BT = torch.full((num, width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((num, width), dtype=torch.long)
    response_BT = torch.zeros((num, width), dtype=torch.float32)
    sampler_logprobs_BT = torch.zeros((num, width), dtype=torch.float32)
    for row, s in enumerate(samples):
        start, stop = len(s.prompt_token_ids), len(s.prompt_token_ids) + len(s.response_token_ids)
        input_ids_BT[row, :stop] = torch.tensor(s.prompt_token_ids + s.response_token_ids)
        attention_BT[row, :stop] = 1
        mask = s.response_mask if s.response_mask is not None else [1] * (stop - start)
        response_BT[row, start:stop] = torch.tensor(mask, dtype=torch.float32)
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
        sampler_logprobs_BT=sampler_logprobs_BT,
    )
    return batch
