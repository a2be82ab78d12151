"""The batch that moves between actors: one dataclass of tensors, every field with a leading batch dimension.

Shapes are in the names: ``B`` sequences (rows), ``T`` tokens per row. A packed row holds several examples; its
``position_ids_BT`` restart at 0 at each example's first token, which is what keeps attention inside an example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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
