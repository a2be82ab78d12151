"""Rollout samples into the typed batch a policy-gradient update takes."""

from __future__ import annotations

import math

import torch

from rlft.algorithms.policy_loss import PolicyBatch
from rlft.rollout.types import Sample


def trainable(samples: list[Sample], mask_truncated: bool) -> tuple[list[bool], dict[str, float]]:
    """Which samples the loss covers, and the counts of those it leaves out: a sample whose sampler
    log-probabilities are not all finite (its importance weights and logged gaps would be NaN), and with
    ``mask_truncated`` one cut at the length limit (DAPO's overlong filtering: its reward judges an unfinished
    answer). Masked samples stay in the batch, so their rewards still count in their group's advantages."""
    finite = [all(math.isfinite(x) for x in s.response_logprobs) for s in samples]
    complete = [not (mask_truncated and s.finish_reason == "length") for s in samples]
    metrics = {"filter/nonfinite_masked": finite.count(False),
               "filter/truncated_masked": sum(f and not c for f, c in zip(finite, complete))}
    return [f and c for f, c in zip(finite, complete)], metrics


def policy_batch(samples: list[Sample], advantages_S: torch.Tensor, pad_id: int, width: int,
                 keep: list[bool] | None = None) -> PolicyBatch:
    """Prompt + response rows, right-padded to ``width``, each response token carrying its sample's advantage and
    the sampler's log-probability (``sampler_logprobs_BT``). ``old_logprobs_BT`` and ``ref_logprobs_BT`` are still
    zero, ``loss_weights_BT`` is the response mask: the policy's tokens (a multi-turn sample's observations are context,
    not trained on), and none of a row that ``keep`` (``trainable``) leaves out, whose sampler log-probabilities are
    zeros."""
    num = len(samples)
    input_ids_BT = torch.full((num, width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((num, width), dtype=torch.long)
    response_BT = torch.zeros((num, width), dtype=torch.float32)
    sampler_logprobs_BT = torch.zeros((num, width), dtype=torch.float32)
    for row, s in enumerate(samples):
        start, stop = len(s.prompt_token_ids), len(s.prompt_token_ids) + len(s.response_token_ids)
        input_ids_BT[row, :stop] = torch.tensor(s.prompt_token_ids + s.response_token_ids)
        attention_BT[row, :stop] = 1
        if keep is not None and not keep[row]:
            continue
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
