"""LoRA on the learners (PEFT): wrapping the model, and the two views of its weights that leave the learners.

``model.lora.rank`` > 0 wraps the loaded model in PEFT's ``LoraModel``: the base weights are frozen and only the
adapters' A and B matrices train (and take optimizer state) under every ZeRO stage. Two views leave the learners:

- the adapter (``adapter_parameters``): names in PEFT's file format (``...q_proj.lora_A.weight``), what
  ``final_model/`` holds and what vLLM loads as a ``LoRARequest``;
- the merged weights (``merged_parameters``): the base model's own names, each adapted weight W + s·B·A (s =
  alpha / rank), for consumers that only take full weights (the HF engine, the reference server, evaluation).

Both gather each parameter across ranks while it is looked at (ZeRO-3), so no rank holds a second full copy.
``check_target_modules`` checks ``model.lora`` against the model's modules before any actor starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rlft.config import LoraConfig
from rlft.errors import ConfigError

# What PEFT puts in front of the base model's parameter names, and the one adapter rlft trains.
_PREFIX = "base_model.model."
_ADAPTER = "default"


def peft_config(lora: LoraConfig):
    """PEFT's ``LoraConfig`` for ``model.lora``."""
    from peft import LoraConfig as PeftLoraConfig

    target = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                          layers_to_transform=list(lora.layers) or None, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """``model`` with adapters on the target modules; only the adapters require gradients."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora))


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The trainable adapter parameters with the names PEFT writes to ``adapter_model.safetensors``."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name.replace(f".{_ADAPTER}.", "."), param


def merged_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, tuple | None]]:
    """``(base model name, base parameter, adapter)`` in order, every base parameter once; ``adapter`` is
    ``(A, B, scaling)`` for an adapted weight, None for the rest. Names and metadata only: ``merged_tensors``
    computes the tensors."""
    layers = _lora_layers(model)
    out = []
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        module_name, _, leaf = name.rpartition(".")
        owner = module_name.removesuffix(".base_layer")
        layer = layers.get(owner)
        adapter = None
        if layer is not None and leaf == "weight" and _ADAPTER in layer.lora_A:
            if getattr(layer, "fan_in_fan_out", False):
                raise NotImplementedError(f"{owner}: LoRA on a transposed (Conv1D) weight")
            adapter = (layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight, layer.scaling[_ADAPTER])
        out.append((f"{owner}.{leaf}".removeprefix(_PREFIX), param, adapter))
    return out


def merged_tensors(model: torch.nn.Module, gathered) -> Iterator[tuple[str, torch.Tensor]]:
    """``(base model name, W + s·B·A)`` for every base parameter, in ``merged_parameters``' order.
    ``gathered(params)`` is the context in which ``params`` are whole (ZeRO-3's gather, or nothing)."""
    for name, param, adapter in merged_parameters(model):
        if adapter is None:
            with gathered([param]):
                yield name, param.data
            continue
        a, b, scaling = adapter
        with gathered([param, a, b]):
            delta = (b.data.float() @ a.data.float()) * scaling
            yield name, (param.data.float() + delta).to(param.dtype)


def disabled_adapter(model: torch.nn.Module):
    """The context in which ``model`` runs as its base model (the adapter off): the reference policy."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def check_target_modules(model_path: str, lora: LoraConfig) -> None:
    """``ConfigError`` naming ``model.lora.target_modules`` (or ``layers``) when the model has no such linear
    module: the model is built on the meta device from its config, so no weight is read."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    names = {name.rpartition(".")[2] for name in linear}
    if list(lora.target_modules) != ["all-linear"]:
        missing = [target for target in lora.target_modules if target not in names]
        if missing:
            raise ConfigError(f"model.lora.target_modules: {model_path} has no linear module named "
                              f"{', '.join(map(repr, missing))}; it has {', '.join(sorted(names))}")
    num_layers = getattr(config, "num_hidden_layers", None)
    if lora.layers and num_layers is not None and max(lora.layers) >= num_layers:
        raise ConfigError(f"model.lora.layers: {model_path} has {num_layers} layers (0 to {num_layers - 1}), "
                          f"got {list(lora.layers)}")
