"""The batches that move between actors, one dataclass of tensors each, every field with a leading batch dimension,
and the policy-gradient batch built from rollout samples.

Shapes are in the names: ``B`` sequences (rows), ``T`` tokens per row. A packed row holds several examples; its
``position_ids_BT`` restart at 0 at each example's first token, which is what keeps attention inside an example.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from rlft.data.samples import Sample


@dataclass
class TokenBatch:
    input_ids_BT: torch.Tensor  # int64
    attention_mask_BT: torch.Tensor  # int64, 1 for real tokens, 0 for padding
    position_ids_BT: torch.Tensor  # int64, restart at 0 for each packed example
    # Weight of the loss on predicting token t (float32), 0 off the assistant's tokens. The producer of the batch
    # normalises the weights of a whole optimizer step so that they sum to 1 over all its rows; a loss is then the
    # weighted sum over tokens, and summing the micro-batches' losses gives the step's mean.
    loss_weights_BT: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask_BT.sum())

    def model_inputs(self) -> dict[str, torch.Tensor | bool | None]:
        """Keyword arguments for a Hugging Face causal LM's forward that keep packed examples apart.

        Without a 2D attention mask and without a KV cache, transformers reads the restarting ``position_ids`` and
        builds a block-diagonal causal mask (padding has position 0, so each padding token is a sequence of its own).
        Both are needed: with an attention mask, or with ``use_cache=True`` (most configs' default, in training mode
        too), transformers skips that detection and attention silently crosses example boundaries.
        """
        return {
            "input_ids": self.input_ids_BT,
            "position_ids": self.position_ids_BT,
            "attention_mask": None,
            "use_cache": False,
        }

    def rows(self, start: int, stop: int) -> TokenBatch:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)}
        )

    def split(self, num_parts: int) -> list[TokenBatch]:
        """Split rows into ``num_parts`` equal parts (the row count must divide evenly)."""
        if self.num_rows % num_parts:
            raise ValueError(f"cannot split {self.num_rows} rows into {num_parts} equal parts")
        size = self.num_rows // num_parts
        return [self.rows(i * size, (i + 1) * size) for i in range(num_parts)]

    def trimmed(self) -> TokenBatch:
        """Drop trailing columns that are padding in every row."""
        used = int(self.attention_mask_BT.sum(dim=0).nonzero().max()) + 1 if self.num_tokens else 1
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[:, :used] for f in dataclasses.fields(self)}
        )

    @classmethod
    def concat(cls, batches: list[TokenBatch]) -> TokenBatch:
        """Stack rows, right-padding narrower batches with zeros; builds ``cls`` from its fields (subclasses too)."""
        width = max(b.input_ids_BT.shape[1] for b in batches)
        out = {}
        for f in dataclasses.fields(cls):
            parts = []
            for b in batches:
                t = getattr(b, f.name)
                parts.append(torch.nn.functional.pad(t, (0, width - t.shape[1])))
            out[f.name] = torch.cat(parts)
        return cls(**out)


@dataclass
class PolicyBatch(TokenBatch):
    """A ``TokenBatch`` with the per-token inputs of a policy-gradient loss, all float32 and aligned with
    ``input_ids_BT`` (0 off the response). ``loss_weights_BT`` holds ``aggregation_weights`` of the whole step."""

    old_logprobs_BT: torch.Tensor  # log π_old of each token: the policy that sampled it, before this update
    advantages_BT: torch.Tensor
    ref_logprobs_BT: torch.Tensor  # log π_ref of each token; zeros when the KL coefficient is 0
    sampler_logprobs_BT: torch.Tensor  # log π_behav of each token, as the sampler (vLLM) computed it; zeros if unknown


@dataclass
class ValueBatch(TokenBatch):
    """A ``TokenBatch`` for the critic: ``old_values_BT`` (values before this update) and ``returns_BT`` (GAE
    targets), float32, aligned with ``input_ids_BT``; ``loss_weights_BT`` holds the step's aggregation weights."""

    old_values_BT: torch.Tensor
    returns_BT: torch.Tensor


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
