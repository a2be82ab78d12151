"""Typed configuration: nested dataclasses, YAML files, dotted command-line overrides.

Every default lives here and nowhere else. A YAML file names only what it changes; ``key.sub=value`` overrides
are applied on top. Unknown keys and wrongly typed values are rejected with the dotted path of the field, and the
batch arithmetic is checked before any actor starts::

    cfg = load_config("configs/sft_tiny.yaml", ["trainer.lr=1e-4", "learner.zero_stage=3"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlft.algorithms.config import (
    DPO_LOSS_TYPES,
    AdvantageEstimator,
    AdvantageScale,
    AggregationMode,
    ISLevel,
    KLKind,
    OffPolicyCorrection,
    PolicyLossKind,
)
from rlft.distributed.config import RayConfig, validate_ray_config
from rlft.envs.config import EnvConfig, multi_turn, validate_env_config
from rlft.errors import ConfigError
from rlft.graders.config import GraderConfig, validate_graders
from rlft.reference.config import ReferenceConfig
from rlft.rollout.config import RolloutConfig, validate_rollout_config

__all__ = ["Config", "ConfigError", "check_local_paths", "load_config", "to_yaml"]


@dataclass
class LoraConfig:
    # Low-rank adapters (PEFT's LoRA, Hu et al. 2021, arXiv:2106.09685) on a frozen model; 0 trains every weight.
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Names (last parts) of the linear modules to adapt; ``all-linear``: every linear layer but the output head.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    # Indices of the transformer layers to adapt; empty: every layer.
    layers: list[int] = field(default_factory=list)
    # What the rollout workers receive: ``adapter`` (only the adapter's weights travel; vLLM applies it with its
    # LoRA kernels), ``merged`` (the learners merge it into full weights first), ``auto``: ``adapter`` where it
    # runs (the vLLM engine, object-store transport, one process per engine), ``merged`` elsewhere.
    sync: Literal["auto", "adapter", "merged"] = "auto"
    # Besides the adapter (PEFT format) in ``final_model/``, write the merged model to ``final_model/merged/``.
    save_merged: bool = False


@dataclass
class ModelConfig:
    # A Hugging Face model directory, or ``tiny://model`` for the embedded default (built on first use).
    path: str = "tiny://model"
    # Tokenizer directory; empty means the model directory.
    tokenizer_path: str = ""
    # Training dtype of the learner's parameters.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # JSONL file, Parquet file, or a directory written by ``datasets.Dataset.save_to_disk``.
    train_path: str = "tiny://arithmetic/sft_train.jsonl"
    # ``auto`` picks the format from each row's keys (``messages`` or ``prompt``/``completion``).
    format: Literal["auto", "chat", "prompt_completion"] = "auto"
    max_seq_len: int = 64
    # Concatenate several examples into one row of ``max_seq_len`` tokens (attention stays within each example).
    packing: bool = False
    # ``error`` stops before training at the first malformed row (``file:line: field: problem``);
    # ``skip`` drops malformed rows and counts them.
    on_bad_row: Literal["error", "skip"] = "error"
    # Rows longer than ``max_seq_len`` tokens: ``truncate`` keeps the head, ``drop`` removes them (counted).
    on_long_row: Literal["truncate", "drop"] = "truncate"
    shuffle: bool = True


@dataclass
class LearnerConfig:
    num_learners: int = 2
    num_cpus_per_learner: float = 1.0
    num_gpus_per_learner: float = 0.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    micro_batch_size_per_learner: int = 8
    # RL (grpo, ppo): pack each learner's samples into micro-batches of at most this many tokens, several samples
    # to a row (positions restart, attention stays within each sample), instead of micro-batches of
    # ``micro_batch_size_per_learner`` padded rows. 0: padded rows. Must hold the longest possible sample
    # (``rollout.max_model_len``, or ``envs.max_total_tokens`` for multi-turn rollouts when set). The micro-batch
    # count then follows the budget; ``micro_batch_size_per_learner`` still sizes the no-gradient forward passes
    # (old log-probabilities, values) and the accumulation steps DeepSpeed divides by (the learner undoes it).
    max_tokens_per_micro_batch: int = 0
    # Communication backend: ``auto`` is NCCL when learners have GPUs, gloo otherwise.
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class TrainerConfig:
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    # Adam's denominator floor; well above the gradients' size it turns Adam into momentum SGD with lr / eps.
    adam_eps: float = 1e-8
    # Decay after the warm-up; every schedule (``constant`` too) warms up linearly over ``warmup_steps``.
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    # Sequences per optimizer step, summed over all learners.
    global_batch_size: int = 64
    num_epochs: int = 1
    # Stop after this many optimizer steps; 0 means ``num_epochs`` full passes over the data.
    max_steps: int = 0


@dataclass
class EvalConfig:
    # Held-out prompts with an ``answer`` field (RFT prompt format); empty disables evaluation.
    path: str = "tiny://arithmetic/test.jsonl"
    num_examples: int = 200
    max_new_tokens: int = 8
    batch_size: int = 64
    # Also evaluate every N steps during training; 0 means only at the start and the end.
    every_n_steps: int = 0
    # RL runs: besides the greedy accuracy, sample this many completions per prompt at ``temperature`` and report
    # their mean accuracy (``eval/sampled_accuracy``, the pass@1 of the sampling policy) and ``eval/pass_at_k``.
    num_samples: int = 0
    temperature: float = 1.0
    # Also score the answer this regular expression finds (its last match in a completion; the first group if it
    # has one) as ``eval/extracted_accuracy``: lenient scoring beside the exact match, as lm-evaluation-harness's
    # "flexible-extract" scores GSM8K. Empty scores exact match only.
    extract_pattern: str = ""


@dataclass
class CheckpointConfig:
    # Empty means ``<logging.output_dir>/checkpoints``.
    dir: str = ""
    # Save every N optimizer steps; 0 saves only the final step.
    every_n_steps: int = 0
    # ``none`` starts fresh, ``auto`` continues from the latest checkpoint in ``dir`` if there is one,
    # anything else is the path of a checkpoint directory to continue from.
    resume: str = "none"
    # Keep at most this many checkpoints (oldest removed first); 0 keeps all.
    keep_last: int = 2


@dataclass
class LoggingConfig:
    output_dir: str = "runs/sft_tiny"
    # Print a metrics line every N steps (the progress bar updates every step).
    console_every_n_steps: int = 10
    wandb: bool = True
    # ``offline`` writes under ``output_dir`` and opens no connection.
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rlft"
    run_name: str = ""
    progress_bar: bool = True
    # Log ``engine/<phase>_seconds`` each step: the time spent inside the engines (vLLM, DeepSpeed, graders), next
    # to the phases' wall times (``rlft bench`` turns it on; it costs one call per actor per step).
    engine_times: bool = False


@dataclass
class RLConfig:
    """The reinforcement-learning step (GRPO and PPO): how many samples, how they become advantages and losses."""

    # A step samples ``num_samples_per_prompt`` responses for each of ``num_prompts_per_step`` prompts.
    num_prompts_per_step: int = 16
    num_samples_per_prompt: int = 8
    # Optimizer steps per RL step: the step's samples are cut into this many mini-batches of
    # ``trainer.global_batch_size`` rows each (so prompts × samples = global batch × mini-batches).
    num_mini_batches: int = 1
    # Passes over the step's samples (PPO epochs); > 1 makes later passes off-policy, which the clip handles.
    num_epochs_per_step: int = 1
    # Critic-free advantages (``algorithm: grpo``): ``grpo`` group-normalised rewards, ``rloo`` leave-one-out
    # baseline, ``reinforce_pp`` REINFORCE++ (batch-whitened returns, no group baseline), ``reinforce_pp_baseline``
    # (group mean subtracted first). PPO always uses GAE with its critic.
    advantage_estimator: AdvantageEstimator = "grpo"
    # GRPO: divide group-centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO).
    advantage_scale: AdvantageScale = "group"
    # PPO: GAE discount and lambda.
    gamma: float = 1.0
    gae_lambda: float = 0.95
    # The policy's loss (rlft.algorithms.policy_loss): ``ppo``, PPO's clipped token ratio; ``gspo``, one
    # length-normalised ratio per sequence, clipped (set clip_low / clip_high small, e.g. 3e-4 / 4e-4); ``cispo``,
    # a REINFORCE token loss weighted by the ratio capped at ``cispo_max_weight`` (no token's gradient is cut);
    # ``sapo``, a smooth gate on the token ratio with a temperature per advantage sign.
    policy_loss: PolicyLossKind = "ppo"
    cispo_max_weight: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    clip_low: float = 0.2
    # DAPO's clip-higher: a larger upper clip keeps exploring tokens alive.
    clip_high: float = 0.2
    # Dual-clip bound (> 1) for negative advantages; null disables it.
    dual_clip: float | None = None
    # KL to the reference policy; 0 starts no reference server.
    kl_coef: float = 0.0
    kl_kind: KLKind = "k3"
    # ``loss``: a KL term in the policy loss (GRPO); ``reward``: a per-token penalty on the reward (PPO).
    kl_mode: Literal["loss", "reward"] = "loss"
    entropy_coef: float = 0.0
    loss_aggregation: AggregationMode = "token_mean"
    # ``seq_mean_token_sum_norm`` divides each sequence's summed loss by this (0 means rollout max_new_tokens).
    loss_aggregation_constant: float = 0.0
    # PPO critic: value-loss clip and its learning rate (the critic shares the learner settings otherwise).
    value_clip: float = 0.2
    critic_lr: float = 1e-3
    # Asynchronous RL: the rollout workers generate the coming steps' samples while the learners update, up to this
    # many policy versions behind them (a sample of version v enters step s's batch only if s − 1 − v <= this).
    # 0 is synchronous: each step's samples come from the weights its previous step published.
    max_staleness_steps: int = 0
    # Where the ratio's denominator (the proximal policy) comes from: ``recompute``, a learner forward pass before
    # the update; ``sampler``, the sampler's own log-probabilities (no correction then); ``auto``, the update's own
    # forward pass when each batch is used for one optimizer step (the weights are the same), else ``recompute``.
    old_logprobs: Literal["auto", "recompute", "sampler"] = "auto"
    # Off-policy correction of the sampler (behaviour) ↔ learner (proximal) gap: truncated (``tis``) or masked
    # (``mis``) importance weights, per token or per sequence, capped at ``is_cap``. ``auto``: ``tis`` when
    # max_staleness_steps > 0, ``none`` in synchronous mode (on CPU the sampler and the learner agree to 1e-5).
    off_policy_correction: Literal["auto"] | OffPolicyCorrection = "auto"
    is_level: ISLevel = "token"
    is_cap: float = 2.0
    # DAPO's dynamic sampling: a prompt whose samples' rewards are all equal (every advantage 0) is dropped, and
    # more prompts are generated, rl.num_prompts_per_step at a time, until the step has that many informative
    # groups or ``dynamic_sampling_max_rounds`` extra rounds ran; dropped groups then fill the batch (counted).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    # DAPO's overlong reward shaping: a penalty growing from 0 to ``overlong_penalty`` over the last
    # ``overlong_buffer`` policy tokens before ``overlong_max_tokens`` (0: rollout.sampling.max_new_tokens), and
    # ``overlong_penalty`` at the limit. 0 (the default) disables it.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    overlong_max_tokens: int = 0
    # Samples the loss leaves out (counted, filter/*): those cut at the length limit, with ``mask_truncated``
    # (DAPO's overlong filtering); those whose sampler log-probabilities are not finite, always.
    mask_truncated: bool = False


@dataclass
class DPOConfig:
    """Preference fine-tuning (``algorithm: dpo``). ``trainer.global_batch_size`` and
    ``learner.micro_batch_size_per_learner`` count pairs here (each pair is a chosen and a rejected row)."""

    beta: float = 0.1
    # sigmoid, robust, ipo, hinge, simpo, nca_pair, bco_pair, sppo_hard, apo_zero (rlft.algorithms.dpo_loss).
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    # > 0 adds rpo_alpha × the chosen response's per-token NLL (RPO).
    rpo_alpha: float = 0.0
    # ``cache``: the reference's log-probabilities of every pair are computed once, before training, and kept on
    # disk (``cache_dir``, keyed by model, data and sequence length) for later runs; ``server``: the reference
    # server scores each step's batch.
    reference: Literal["cache", "server"] = "cache"
    cache_dir: str = "~/.cache/rlft/reference_logps"
    # Held-out preference pairs: preference accuracy and reward margin at each evaluation; empty disables.
    eval_path: str = ""
    eval_num_pairs: int = 300
    # online_dpo: copy the policy into the reference every N steps (0 keeps the reference frozen).
    ref_update_every_n_steps: int = 0


@dataclass
class Config:
    algorithm: Literal["sft", "grpo", "ppo", "dpo", "online_dpo"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Multi-turn rollouts: the environment of every trajectory (``rlft/envs/``); empty ``envs.name``: single-turn.
    envs: EnvConfig = field(default_factory=EnvConfig)
    graders: GraderConfig = field(default_factory=GraderConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    @property
    def gradient_accumulation_steps(self) -> int:
        per_pass = self.learner.micro_batch_size_per_learner * self.learner.num_learners
        return self.trainer.global_batch_size // per_pass

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.logging.output_dir) / "checkpoints")


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the dotted path.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints widen to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if float in typing.get_args(tp) and isinstance(value, float) and not math.isfinite(value):
            return _coerce(value, float, path)  # name the problem, not "matches none of"
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} matches none of {typing.get_args(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``"trainer.lr=1e-5"`` -> ``{"trainer": {"lr": 1e-5}}``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        reason = str(getattr(err, "problem", None) or err).strip()
        raise ConfigError(f"override {text!r}: the value is not YAML ({reason}); quote it for the shell") from None
    if isinstance(value, str) or value is None:
        # YAML reads "1e-5" as a string; numbers in that form are meant as floats.
        try:
            value = float(raw) if value is not None and any(c in raw.lower() for c in "e.") else value
        except ValueError:
            pass
    node: dict = {}
    out = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    for text in overrides:
        data = _merge(data, parse_override(text))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; a top-level ``defaults: [other.yaml]`` list (or one name) is merged underneath, relative
    to the file. ``chain`` holds the files whose ``defaults`` led here, so a file that refers back to one of them is
    an error instead of endless recursion."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a YAML config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parents = data.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and all(isinstance(p, str) and p for p in parents)):
        raise ConfigError(f"{path}: defaults: expected a list of config files (relative to this one), got {parents!r}")
    chain = (*chain, path.resolve())
    merged: dict = {}
    for parent in parents:
        parent_path = path.parent / parent
        if parent_path.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(parent_path.resolve()):], parent_path.resolve()))
            raise ConfigError(f"{path}: defaults: {parent} refers back to a file that includes it ({cycle})")
        merged = _merge(merged, _read_yaml(parent_path, chain))
    return _merge(merged, data)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each ``key.sub=value`` override; validated."""
    data = _read_yaml(Path(path)) if path else {}
    return config_from_dict(data, list(overrides))


def check_local_paths(cfg: Config) -> None:
    """Check the paths a job run on this machine reads and writes, before anything starts: a model or tokenizer
    path that is written as a local path must be a directory, and the output and checkpoint directories must not be
    (or lie under) files. ``rlft train`` calls it; ``load_config`` does not, since a config submitted to a cluster
    names paths on the cluster.
    """
    for where, value in (("model.path", cfg.model.path), ("model.tokenizer_path", cfg.model.tokenizer_path)):
        if value and looks_like_local_path(value) and not Path(value).expanduser().is_dir():
            problem = "is a file, not a model directory" if Path(value).expanduser().exists() else "no such directory"
            raise ConfigError(f"{where}: {value}: {problem} (a path that is not a Hugging Face hub id such as "
                              f"'org/name' must be a local model directory)")
    model_dir = Path(cfg.model.path).expanduser()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        merged = " (its merged model is in merged/)" if (model_dir / "merged/config.json").is_file() else ""
        raise ConfigError(f"model.path: {cfg.model.path} holds a LoRA adapter, not a model{merged}; start from a "
                          f"merged model (model.lora.save_merged) or from the adapter's base model")
    for where, value in (("logging.output_dir", cfg.logging.output_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if not value:
            continue
        directory = Path(value).expanduser()
        for existing in (directory, *directory.parents):
            if existing.exists():
                break
        if existing.exists() and not existing.is_dir():
            where_file = "is a file" if existing == directory else f"cannot be made: {existing} is a file"
            raise ConfigError(f"{where}: {value} {where_file}; expected a directory")


def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` can only mean a local path: absolute, ``~``, ``./`` or ``../``, or with more separators
    than a Hugging Face hub id (``name`` or ``org/name``) has. ``tiny://`` paths are not local paths."""
    if "://" in path:
        return False
    parts = re.split(f"[{re.escape('/' + os.sep + (os.altsep or ''))}]", path)
    return (
        os.path.isabs(path)
        or path.startswith("~")
        or path in (".", "..")
        or parts[0] in (".", "..")
        or len(parts) > 2
    )


def to_dict(cfg: Config) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> None:
    """Cross-field checks, done before any actor starts."""

    def positive(path: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{path}: must be positive, got {value}")

    def non_negative(path: str, value: float) -> None:
        if value < 0:
            raise ConfigError(f"{path}: must not be negative, got {value}")

    positive("learner.num_learners", cfg.learner.num_learners)
    positive("learner.micro_batch_size_per_learner", cfg.learner.micro_batch_size_per_learner)
    non_negative("learner.num_cpus_per_learner", cfg.learner.num_cpus_per_learner)
    non_negative("learner.num_gpus_per_learner", cfg.learner.num_gpus_per_learner)
    positive("trainer.global_batch_size", cfg.trainer.global_batch_size)
    positive("trainer.lr", cfg.trainer.lr)
    positive("trainer.adam_eps", cfg.trainer.adam_eps)
    non_negative("trainer.max_steps", cfg.trainer.max_steps)
    non_negative("trainer.warmup_steps", cfg.trainer.warmup_steps)
    positive("trainer.num_epochs", cfg.trainer.num_epochs)
    non_negative("trainer.max_grad_norm", cfg.trainer.max_grad_norm)
    positive("data.max_seq_len", cfg.data.max_seq_len)
    non_negative("eval.num_examples", cfg.eval.num_examples)
    positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    positive("eval.batch_size", cfg.eval.batch_size)
    non_negative("eval.every_n_steps", cfg.eval.every_n_steps)
    non_negative("eval.num_samples", cfg.eval.num_samples)
    non_negative("eval.temperature", cfg.eval.temperature)
    if cfg.eval.extract_pattern:
        try:
            re.compile(cfg.eval.extract_pattern)
        except re.error as e:
            raise ConfigError(f"eval.extract_pattern: not a regular expression ({e}): {cfg.eval.extract_pattern!r}")
    non_negative("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)
    non_negative("checkpoint.keep_last", cfg.checkpoint.keep_last)
    positive("logging.console_every_n_steps", cfg.logging.console_every_n_steps)
    validate_ray_config(cfg.ray)
    if cfg.reference.colocate_with_learners and cfg.reference.num_replicas > cfg.learner.num_learners:
        raise ConfigError(
            f"reference.colocate_with_learners: replica i shares learner i's bundle, so reference.num_replicas "
            f"({cfg.reference.num_replicas}) must not exceed learner.num_learners ({cfg.learner.num_learners})"
        )

    micro = cfg.learner.micro_batch_size_per_learner
    learners = cfg.learner.num_learners
    per_pass = micro * learners
    if cfg.trainer.global_batch_size % per_pass:
        raise ConfigError(
            f"trainer.global_batch_size: {cfg.trainer.global_batch_size} is not a multiple of "
            f"learner.micro_batch_size_per_learner × learner.num_learners = {micro} × {learners} = {per_pass}; "
            f"gradient accumulation needs global = micro × learners × accumulation steps"
        )
    _validate_packing(cfg)
    if cfg.learner.backend == "nccl" and cfg.learner.num_gpus_per_learner == 0:
        raise ConfigError("learner.backend: nccl needs learner.num_gpus_per_learner > 0")
    if cfg.model.dtype == "float16" and cfg.learner.num_gpus_per_learner == 0:
        raise ConfigError("model.dtype: float16 training is not supported on CPU learners; use float32 or bfloat16")
    if cfg.ray.local_mode and cfg.learner.num_learners != 1:
        raise ConfigError(
            f"ray.local_mode: runs every role in one process, so learner.num_learners must be 1, "
            f"got {cfg.learner.num_learners}"
        )
    if cfg.ray.local_mode and cfg.algorithm == "ppo":
        raise ConfigError("ray.local_mode: PPO's critic is a second learner group, and one process holds one "
                          "(torch.distributed has one default group per process); run PPO with Ray")
    transport = cfg.rollout.weight_transport
    if transport == "collective" and cfg.ray.local_mode:
        raise ConfigError("rollout.weight_transport: collective broadcasts between processes, which ray.local_mode "
                          "does not have; use object_store")
    if transport == "cuda_ipc" and (cfg.learner.num_gpus_per_learner == 0 or cfg.rollout.num_gpus_per_worker == 0):
        raise ConfigError("rollout.weight_transport: cuda_ipc shares GPU memory, so it needs GPU learners and rollout "
                          "workers on the same GPU (learner.num_gpus_per_learner and rollout.num_gpus_per_worker > 0)")
    if multi_turn(cfg.envs) and cfg.algorithm not in ("grpo", "ppo", "online_dpo"):
        raise ConfigError(f"envs.{'name' if cfg.envs.name else 'agent'}: environments drive rollouts, which algorithm {cfg.algorithm!r} has none of")
    validate_env_config(cfg.envs, cfg.rollout.max_model_len)
    if cfg.envs.name and cfg.ray.local_mode and cfg.envs.num_workers:
        raise ConfigError("envs.num_workers: ray.local_mode runs every role in one process; set it to 0 (the "
                          "environments then run in the rollout worker)")
    if cfg.model.lora.rank:
        _validate_lora(cfg)
    if cfg.algorithm in ("grpo", "ppo"):
        _validate_rl(cfg)
    if cfg.algorithm in ("dpo", "online_dpo"):
        _validate_dpo(cfg.dpo)
    if cfg.algorithm == "online_dpo":
        rl = cfg.rl
        _validate_off_policy(cfg)
        if rl.num_samples_per_prompt < 2:
            raise ConfigError("rl.num_samples_per_prompt: online DPO pairs the best and worst of a prompt's samples, "
                              f"so it needs at least 2, got {rl.num_samples_per_prompt}")
        if cfg.trainer.global_batch_size != rl.num_prompts_per_step:
            raise ConfigError(
                f"trainer.global_batch_size: online DPO makes at most one pair per prompt, so it counts pairs and "
                f"must equal rl.num_prompts_per_step = {rl.num_prompts_per_step}, got {cfg.trainer.global_batch_size}"
            )
        validate_rollout_config(cfg.rollout)
        validate_graders(cfg.graders)


def _validate_lora(cfg: Config) -> None:
    lora = cfg.model.lora
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank: must not be negative, got {lora.rank}")
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha: must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules: names no module to adapt")
    if any(layer < 0 for layer in lora.layers):
        raise ConfigError(f"model.lora.layers: layer indices are not negative, got {lora.layers}")
    if lora.sync == "adapter" and not adapter_sync_runs(cfg):
        raise ConfigError(
            "model.lora.sync: adapter sync needs rollout.engine=vllm, rollout.weight_transport=object_store and "
            f"rollout.tensor_parallel_size=1 (got {cfg.rollout.engine}, {cfg.rollout.weight_transport}, "
            f"{cfg.rollout.tensor_parallel_size}); use merged or auto"
        )
    if cfg.algorithm == "online_dpo" and cfg.dpo.ref_update_every_n_steps:
        raise ConfigError("dpo.ref_update_every_n_steps: with model.lora the reference is the base model (the "
                          "adapter disabled), which the policy's updates never change; set it to 0")


def adapter_sync_runs(cfg: Config) -> bool:
    """Whether the rollout workers can take a LoRA adapter as it is (``model.lora.sync``): vLLM loads it from a file
    its worker writes, so the engine's one process must be the worker's."""
    rollout = cfg.rollout
    return rollout.engine == "vllm" and rollout.weight_transport == "object_store" and rollout.tensor_parallel_size == 1


def lora_syncs_adapter(cfg: Config) -> bool:
    """Whether the rollout workers receive the adapter only (else full weights, the adapter merged in)."""
    lora = cfg.model.lora
    return lora.rank > 0 and (lora.sync == "adapter" or (lora.sync == "auto" and adapter_sync_runs(cfg)))


def _validate_packing(cfg: Config) -> None:
    """``learner.max_tokens_per_micro_batch``: off (0), or an RL token budget that holds the longest sample."""
    budget = cfg.learner.max_tokens_per_micro_batch
    if budget == 0:
        return
    if budget < 0:
        raise ConfigError(f"learner.max_tokens_per_micro_batch: must be positive (or 0 for padded micro-batches), "
                          f"got {budget}")
    if cfg.algorithm not in ("grpo", "ppo"):
        raise ConfigError(f"learner.max_tokens_per_micro_batch: packs RL samples (algorithm grpo or ppo); "
                          f"algorithm {cfg.algorithm!r} has {'data.packing' if cfg.algorithm == 'sft' else 'none'}")
    longest, where = longest_sample_tokens(cfg)
    if budget < longest:
        raise ConfigError(f"learner.max_tokens_per_micro_batch: {budget} tokens cannot hold the longest possible "
                          f"sample, {longest} tokens ({where})")


def longest_sample_tokens(cfg: Config) -> tuple[int, str]:
    """The most tokens one RL sample (prompt + response, or a whole trajectory) can have, and the field that says
    so: prompts are checked to leave ``rollout.sampling.max_new_tokens`` within ``rollout.max_model_len``, and a
    trajectory is cut at ``envs.max_total_tokens`` (0: ``rollout.max_model_len``)."""
    if multi_turn(cfg.envs) and cfg.envs.max_total_tokens:
        return cfg.envs.max_total_tokens, "envs.max_total_tokens"
    return cfg.rollout.max_model_len, "rollout.max_model_len: the longest prompt + rollout.sampling.max_new_tokens"


def _validate_dpo(dpo: DPOConfig) -> None:
    if dpo.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type: {dpo.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if dpo.beta <= 0:
        raise ConfigError(f"dpo.beta: must be positive, got {dpo.beta}")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha: must not be negative, got {dpo.rpo_alpha}")
    if dpo.ref_update_every_n_steps < 0:
        raise ConfigError(f"dpo.ref_update_every_n_steps: must not be negative, got {dpo.ref_update_every_n_steps}")
    if dpo.eval_num_pairs < 0:
        raise ConfigError(f"dpo.eval_num_pairs: must not be negative, got {dpo.eval_num_pairs}")


def _validate_rl(cfg: Config) -> None:
    rl = cfg.rl
    for name in ("num_prompts_per_step", "num_samples_per_prompt", "num_mini_batches", "num_epochs_per_step"):
        if getattr(rl, name) <= 0:
            raise ConfigError(f"rl.{name}: must be positive, got {getattr(rl, name)}")
    if cfg.algorithm == "grpo" and rl.num_samples_per_prompt < 2:
        raise ConfigError("rl.num_samples_per_prompt: GRPO compares samples of a prompt, so it needs at least 2")
    rows = rl.num_prompts_per_step * rl.num_samples_per_prompt
    if rows != cfg.trainer.global_batch_size * rl.num_mini_batches:
        raise ConfigError(
            f"trainer.global_batch_size: rl.num_prompts_per_step × rl.num_samples_per_prompt = "
            f"{rl.num_prompts_per_step} × {rl.num_samples_per_prompt} = {rows} samples per step must equal "
            f"trainer.global_batch_size × rl.num_mini_batches = {cfg.trainer.global_batch_size} × {rl.num_mini_batches}"
        )
    if rl.clip_low <= 0 or rl.clip_high <= 0:
        raise ConfigError("rl.clip_low / rl.clip_high: must be positive")
    if rl.dual_clip is not None and rl.dual_clip <= 1:
        raise ConfigError(f"rl.dual_clip: must be greater than 1 (or null), got {rl.dual_clip}")
    if rl.dual_clip is not None and rl.policy_loss != "ppo":
        raise ConfigError(f"rl.dual_clip: bounds PPO's clipped ratio, which rl.policy_loss: {rl.policy_loss} has "
                          "none of; set it to null")
    for name in ("cispo_max_weight", "sapo_temperature_pos", "sapo_temperature_neg"):
        if not getattr(rl, name) > 0:
            raise ConfigError(f"rl.{name}: must be positive, got {getattr(rl, name)}")
    if rl.kl_coef < 0:
        raise ConfigError(f"rl.kl_coef: must not be negative, got {rl.kl_coef}")
    _validate_off_policy(cfg)
    validate_rollout_config(cfg.rollout)
    validate_graders(cfg.graders)


def _validate_off_policy(cfg: Config) -> None:
    """Asynchronous RL and its corrections, and the sampling and shaping of samples (GRPO, PPO and online DPO)."""
    rl = cfg.rl
    if rl.dynamic_sampling and rl.num_samples_per_prompt < 2:
        raise ConfigError("rl.dynamic_sampling: drops prompts whose samples' rewards are all equal, which one sample "
                          f"always is; it needs rl.num_samples_per_prompt >= 2, got {rl.num_samples_per_prompt}")
    if rl.dynamic_sampling and rl.dynamic_sampling_max_rounds < 1:
        raise ConfigError(f"rl.dynamic_sampling_max_rounds: must be at least 1, got {rl.dynamic_sampling_max_rounds}")
    if rl.overlong_buffer:
        limit = overlong_max_tokens(cfg)
        if not 0 < rl.overlong_buffer <= limit:
            raise ConfigError(f"rl.overlong_buffer: must be in (0, {limit}] (rl.overlong_max_tokens, or "
                              f"rollout.sampling.max_new_tokens when 0), got {rl.overlong_buffer}")
        if rl.overlong_penalty < 0:
            raise ConfigError(f"rl.overlong_penalty: must not be negative, got {rl.overlong_penalty}")
    if rl.max_staleness_steps < 0:
        raise ConfigError(f"rl.max_staleness_steps: must be 0 (synchronous) or more, got {rl.max_staleness_steps}")
    if rl.is_cap <= 1:
        raise ConfigError(f"rl.is_cap: importance weights are capped above 1, got {rl.is_cap}")
    if rl.old_logprobs == "sampler":
        if cfg.rollout.engine == "simulated":
            raise ConfigError("rl.old_logprobs: sampler needs the sampler's log-probabilities of the policy, which "
                              "rollout.engine: simulated does not produce; use auto or recompute")
        if off_policy_correction(cfg) != "none":
            raise ConfigError(f"rl.off_policy_correction: {rl.off_policy_correction} weighs the learner's "
                              "log-probabilities against the sampler's, but rl.old_logprobs: sampler takes the "
                              "sampler's as the learner's; set rl.off_policy_correction: none or rl.old_logprobs: auto")
    if rl.max_staleness_steps and cfg.rollout.weight_transport == "collective":
        raise ConfigError("rollout.weight_transport: collective broadcasts to every worker at once, so the learners "
                          "would wait for the workers' queued generation; asynchronous RL (rl.max_staleness_steps > "
                          "0) needs object_store or cuda_ipc")


def overlong_max_tokens(cfg: Config) -> int:
    """The length at which ``rl.overlong_buffer``'s penalty is full: ``rl.overlong_max_tokens`` or the sampling's
    ``max_new_tokens``."""
    return cfg.rl.overlong_max_tokens or cfg.rollout.sampling.max_new_tokens


def off_policy_correction(cfg: Config) -> str:
    """``rl.off_policy_correction`` with ``auto`` resolved: ``tis`` in asynchronous mode, ``none`` otherwise."""
    rl = cfg.rl
    if rl.off_policy_correction != "auto":
        return rl.off_policy_correction
    return "tis" if rl.max_staleness_steps > 0 and rl.old_logprobs != "sampler" else "none"


def recomputes_old_logprobs(cfg: Config) -> bool:
    """Whether a learner forward pass computes the proximal log-probabilities before the update: asked for, or
    needed because a step's samples serve several optimizer steps (mini-batches, epochs) or PPO's KL penalty on the
    reward reads them."""
    rl = cfg.rl
    if rl.old_logprobs != "auto":
        return rl.old_logprobs == "recompute"
    reward_kl = cfg.algorithm == "ppo" and rl.kl_mode == "reward" and rl.kl_coef > 0
    return rl.num_mini_batches * rl.num_epochs_per_step > 1 or reward_kl
