"""A small Llama causal LM created locally from a config (random init, no hub), saved in float32 safetensors.

The architecture is plain Llama so every engine rlft uses (HF transformers, vLLM, DeepSpeed) loads it without
custom code. Head size is 32 or 64 because vLLM's CPU attention supports no smaller head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a Llama model; ``hidden_size == num_attention_heads * head_dim``."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int


PRESETS: dict[str, ModelPreset] = {
    # About 0.8M parameters: trains on a laptop CPU in minutes.
    "tiny": ModelPreset(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=4,
        intermediate_size=384,
        max_position_embeddings=256,
    ),
    # About 25M parameters: for throughput benchmarks and GPU smoke runs.
    "small": ModelPreset(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=8,
        intermediate_size=1536,
        max_position_embeddings=512,
    ),
    # About 0.50B parameters (495,889,920 with the embedded 293-token vocabulary, tied embeddings): a model big
    # enough that one GPU's generation, training and weight sync are real work (benchmarks/gpu_bench.py). Its
    # float32 checkpoint is 2 GB; build it on the machine that uses it.
    "half_b": ModelPreset(
        hidden_size=1280,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=24,
        intermediate_size=4352,
        max_position_embeddings=1024,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; a ``KeyError`` lists the known presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def make_config(tokenizer: PreTrainedTokenizerBase, preset: str = "tiny") -> LlamaConfig:
    """A ``LlamaConfig`` for ``preset`` whose vocabulary and special ids match ``tokenizer`` (no BOS)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **asdict(get_preset(preset)),
    )


def build_model(
    tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, seed: int = 0, preset: str = "tiny"
) -> LlamaForCausalLM:
    """Create a randomly initialised model and save it with ``tokenizer`` and a generation config to ``out_dir``.

    The same ``seed`` and ``preset`` give the same weights. Generation stops at ``<|im_end|>``.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(tokenizer, preset)).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())
