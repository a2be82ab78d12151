"""Packed RL micro-batches (``learner.max_tokens_per_micro_batch``): the plans of every rank, the packed rows, and a
real causal LM giving the same loss and gradients packed as padded, for every aggregation mode and policy loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlft.algorithms import PolicyLoss, aggregation_weights, token_logprobs
from rlft.algorithms.sequences import sequence_ids, sequence_sum
from rlft.data.batch import policy_batch
from rlft.learner.micro_batches import micro_batches, pack_rows, packed_plans, padded_plan, padding_tokens
from rlft.rollout import Sample

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
VOCAB = 32


def _samples(lengths: list[tuple[int, int]], seed: int = 0) -> list[Sample]:
    """Samples of (prompt, response) lengths with random tokens and sampler log-probabilities."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for prompt, response in lengths:
        ids = torch.randint(1, VOCAB, (prompt + response,), generator=gen).tolist()
        logprobs = (-torch.rand(response, generator=gen) * 3).tolist()
        samples.append(Sample(prompt_index=0, prompt_token_ids=ids[:prompt], response_token_ids=ids[prompt:],
                              response_logprobs=logprobs, response_text="", finish_reason="stop", policy_version=0))
    return samples


def _batch(lengths: list[tuple[int, int]], mode: str = "token_mean", keep: list[bool] | None = None, seed: int = 0):
    """A step's policy batch as the controller builds it (one sample a row), weighted by ``mode``."""
    gen = torch.Generator().manual_seed(seed + 1)
    width = max(p + r for p, r in lengths) + 2
    batch = policy_batch(_samples(lengths, seed), torch.randn(len(lengths), generator=gen), 0, width, keep)
    response_BT = batch.loss_weights_BT != 0
    weights_BT = aggregation_weights(response_BT, mode, 4.0 if mode == "seq_mean_token_sum_norm" else None)
    noise_BT = 0.3 * torch.randn(response_BT.shape, generator=gen) * response_BT
    return dataclasses.replace(batch, loss_weights_BT=weights_BT,
                               old_logprobs_BT=batch.sampler_logprobs_BT + noise_BT,
                               ref_logprobs_BT=batch.sampler_logprobs_BT - noise_BT)


# A long-tailed step: mostly short responses, a few long ones.
LENGTHS = [(3, 2), (4, 12), (3, 1), (2, 3), (5, 20), (3, 4), (4, 2), (2, 9)]


def test_plans_have_the_same_length_on_every_rank():
    batch = _batch(LENGTHS)
    shares = batch.split(2)  # rank 0: 5+16+4+5 tokens, rank 1: 25+7+6+11
    plans = packed_plans(shares, max_tokens=26)
    assert [len(plan) for plan in plans] == [2, 2]
    for share, plan in zip(shares, plans):
        lengths = share.attention_mask_BT.sum(dim=-1).tolist()
        assert sorted(row for rows in plan.rows for row in rows) == list(range(share.num_rows))  # each once
        assert all(sum(lengths[row] for row in rows) <= 26 for rows in plan.rows)
    # A rank whose samples fill fewer rows makes up the count with empty micro-batches.
    plans = packed_plans(shares, max_tokens=30)  # rank 0's 30 tokens fill one row, rank 1's 49 two
    assert len(plans[0]) == len(plans[1]) == 2 and plans[0].rows[-1] == ()
    empty = micro_batches(batch.rows(0, 4), plans[0])[-1]
    assert empty.input_ids_BT.shape == (1, 1) and empty.num_tokens == 0 and not empty.loss_weights_BT.any()


def test_plans_leave_out_samples_without_weight_and_check_the_budget():
    batch = _batch(LENGTHS, keep=[True, False, True, True, False, True, True, True])
    (plan,) = packed_plans([batch], max_tokens=16)
    assert {1, 4}.isdisjoint(row for rows in plan.rows for row in rows)  # 16 and 25 tokens, no weight: left out
    (plan,) = packed_plans([_batch(LENGTHS, keep=[False] * 8)], max_tokens=16)
    assert plan.rows == ((),)  # still one micro-batch: every rank steps the optimizer
    with pytest.raises(ValueError, match="learner.max_tokens_per_micro_batch: a sample of 25 tokens"):
        packed_plans([batch.rows(0, 4), _batch(LENGTHS)], max_tokens=24)


def test_packed_rows_restart_positions_and_keep_fields_aligned():
    batch = _batch(LENGTHS)
    packed = pack_rows(batch, (0, 2, 3))
    assert packed.input_ids_BT.shape == (1, 5 + 4 + 5) and padding_tokens(packed) == 0
    assert packed.position_ids_BT.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    for field in ("input_ids_BT", "loss_weights_BT", "advantages_BT", "sampler_logprobs_BT"):
        expected = torch.cat([getattr(batch, field)[row, :n] for row, n in ((0, 5), (2, 4), (3, 5))])
        assert torch.equal(getattr(packed, field)[0], expected), field
    assert sequence_ids(packed.position_ids_BT).tolist() == [[0] * 5 + [1] * 4 + [2] * 5]
    torch.testing.assert_close(sequence_sum(packed.loss_weights_BT, sequence_ids(packed.position_ids_BT)),
                               torch.cat([torch.full((n,), float(batch.loss_weights_BT[row].sum()))
                                          for row, n in ((0, 5), (2, 4), (3, 5))])[None])
    # Padded micro-batches: consecutive rows, trimmed, each padded to its longest row.
    padded = micro_batches(batch, padded_plan(batch.num_rows, 4))
    assert [m.input_ids_BT.shape for m in padded] == [(2, 16), (2, 5), (2, 25), (2, 11)]
    assert sum(padding_tokens(m) for m in padded) == 2 * (16 + 5 + 25 + 11) - batch.num_tokens


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=64, attn_implementation="sdpa")
    return LlamaForCausalLM(config).double()


def _loss_and_grads(model, loss_fn, micros):
    """The step's loss and parameter gradients, summed over ``micros`` as the learner accumulates them."""
    model.zero_grad()
    total = 0.0
    for micro in micros:
        loss, _ = loss_fn(model(**micro.model_inputs()).logits, micro)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind, mode, correction", [
    *[("ppo", mode, "none") for mode in MODES],
    ("gspo", "seq_mean_token_mean", "none"),
    ("cispo", "token_mean", "none"),
    ("sapo", "seq_mean_token_sum", "none"),
    ("ppo", "seq_mean_token_mean", "sequence"),
    ("gspo", "token_mean", "sequence"),
])
def test_a_causal_lm_gives_the_same_loss_and_gradients_packed_as_padded(model, kind, mode, correction):
    """Attention stays inside each packed sample (restarting positions), and every per-sequence quantity sums over
    the sample's tokens: packed micro-batches make the padded step's loss and gradients."""
    batch = _batch(LENGTHS, mode, seed=3)
    # Old and sampler log-probabilities near the model's, so that some ratios are clipped (or capped) and some not.
    gen = torch.Generator().manual_seed(4)
    response_BT = batch.loss_weights_BT != 0
    with torch.no_grad():
        logprobs_BT = token_logprobs(model(**batch.model_inputs()).logits, batch.input_ids_BT).float()
    batch = dataclasses.replace(
        batch,
        loss_weights_BT=batch.loss_weights_BT.double(),
        old_logprobs_BT=(logprobs_BT + 0.1 * torch.randn(logprobs_BT.shape, generator=gen)) * response_BT,
        sampler_logprobs_BT=(logprobs_BT + 0.2 * torch.randn(logprobs_BT.shape, generator=gen)) * response_BT,
    )
    loss_fn = PolicyLoss(kind=kind, clip_low=0.05, clip_high=0.05, kl_coef=0.05, entropy_coef=0.01,
                         cispo_max_weight=1.05,
                         off_policy_correction="tis" if correction == "sequence" else "none", is_level="sequence",
                         is_cap=1.2)
    padded_loss, padded_grads = _loss_and_grads(model, loss_fn, micro_batches(batch, padded_plan(8, 4)))
    plan = packed_plans(batch.split(2), max_tokens=26)[0]  # rank 0's share, as a learner packs it
    padded_share_loss, padded_share_grads = _loss_and_grads(model, loss_fn,
                                                            micro_batches(batch.rows(0, 4), padded_plan(4, 2)))
    packed_loss, packed_grads = _loss_and_grads(model, loss_fn, micro_batches(batch.rows(0, 4), plan))
    assert max(len(rows) for rows in plan.rows) > 1
    assert packed_loss == pytest.approx(padded_share_loss, rel=1e-9, abs=1e-12)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_share_grads[name], rtol=1e-7, atol=1e-10, msg=name)
    # The whole step packed (one share, several rows) equals the whole step padded too.
    (plan,) = packed_plans([batch], max_tokens=26)
    packed_loss, packed_grads = _loss_and_grads(model, loss_fn, micro_batches(batch, plan))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-9, abs=1e-12)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-7, atol=1e-10, msg=name)
