"""Off-policy correction: importance weights against hand-computed numbers, and their use in ``PolicyLoss``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlft.algorithms import PolicyLoss, aggregation_weights, importance_weights, token_logprobs
from rlft.data.batch import PolicyBatch
from rlft.algorithms.policy_loss import _clipped_surrogate, _weighted_sum
from test_algorithms import assert_exact_across_micro_batches

INF = float("inf")

# Two rows; log-ratios log π_prox − log π_behav of log 0.5, log 1.5, log 3 (row 0) and log 1.2, log 1.5 (row 1).
# Off the mask, both policies hold garbage that must not reach anything.
MASK_BT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
BEHAVIOUR_BT = torch.tensor([[-1.0, -2.0, -3.0, INF], [-0.5, -1.5, -INF, INF]])
RATIOS_BT = torch.tensor([[0.5, 1.5, 3.0, 1.0], [1.2, 1.5, 1.0, 1.0]])
PROXIMAL_BT = torch.where(MASK_BT != 0, BEHAVIOUR_BT + RATIOS_BT.log(), torch.tensor([[0, 0, 0, INF], [0, 0, INF, -INF]]))
# k3 of KL(behaviour ‖ proximal) per valid token: r − 1 − log r.
SAMPLER_KL = sum(r - 1 - math.log(r) for r in (0.5, 1.5, 3.0, 1.2, 1.5)) / 5

# (correction, level) -> (weights_BT, weight mean, weight max, truncated fraction) with cap 2.
# Sequence ratios: row 0 is 0.5 · 1.5 · 3 = 2.25 > 2, row 1 is 1.2 · 1.5 = 1.8.
EXPECTED = {
    ("none", "token"): ([[1, 1, 1, 0], [1, 1, 0, 0]], 1.0, 1.0, 0.0),
    ("none", "sequence"): ([[1, 1, 1, 0], [1, 1, 0, 0]], 1.0, 1.0, 0.0),
    ("tis", "token"): ([[0.5, 1.5, 2.0, 0], [1.2, 1.5, 0, 0]], 6.7 / 5, 2.0, 1 / 5),
    ("mis", "token"): ([[0.5, 1.5, 0.0, 0], [1.2, 1.5, 0, 0]], 4.7 / 5, 1.5, 1 / 5),
    ("tis", "sequence"): ([[2.0, 2.0, 2.0, 0], [1.8, 1.8, 0, 0]], 9.6 / 5, 2.0, 3 / 5),
    ("mis", "sequence"): ([[0.0, 0.0, 0.0, 0], [1.8, 1.8, 0, 0]], 3.6 / 5, 1.8, 3 / 5),
}


@pytest.mark.parametrize(("correction", "level"), list(EXPECTED))
def test_importance_weights_match_hand_computed_values(correction, level):
    weights_BT, stats = importance_weights(PROXIMAL_BT, BEHAVIOUR_BT, MASK_BT, correction, level, cap=2.0)
    want_BT, mean, top, truncated = EXPECTED[correction, level]
    torch.testing.assert_close(weights_BT, torch.tensor(want_BT, dtype=torch.float32))
    assert stats["is_weight_mean"].item() == pytest.approx(mean, rel=1e-6)
    assert stats["is_weight_max"].item() == pytest.approx(top, rel=1e-6)
    assert stats["is_truncated_fraction"].item() == pytest.approx(truncated, rel=1e-6)
    assert stats["sampler_kl"].item() == pytest.approx(SAMPLER_KL, rel=1e-5)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_importance_weights_carry_no_gradient():
    proximal_BT = PROXIMAL_BT.clone().requires_grad_()
    behaviour_BT = BEHAVIOUR_BT.clone().requires_grad_()
    for correction in ("none", "tis", "mis"):
        for level in ("token", "sequence"):
            weights_BT, stats = importance_weights(proximal_BT, behaviour_BT, MASK_BT, correction, level)
            assert not weights_BT.requires_grad and weights_BT.grad_fn is None
            assert not any(v.requires_grad for v in stats.values())


def test_huge_log_ratios_do_not_overflow():
    # A long row whose summed log-ratio (30 · 200 = 6000) is far past float32's exp; a token with 1e30 alone.
    mask_BT = torch.ones(2, 200)
    proximal_BT = torch.zeros(2, 200)
    behaviour_BT = torch.full((2, 200), -30.0)
    behaviour_BT[1] = 0.0
    behaviour_BT[1, 0] = -1e30
    for correction, capped in (("tis", 3.0), ("mis", 0.0)):
        for level in ("token", "sequence"):
            weights_BT, stats = importance_weights(proximal_BT, behaviour_BT, mask_BT, correction, level, cap=3.0)
            assert torch.isfinite(weights_BT).all() and all(torch.isfinite(v) for v in stats.values())
            assert (weights_BT[0] == capped).all()
            if level == "token":
                assert weights_BT[1, 0].item() == capped and (weights_BT[1, 1:] == 1.0).all()
            else:
                assert (weights_BT[1] == capped).all()


def test_invalid_tokens_get_zero_weight_whatever_they_hold():
    mask_BT = torch.tensor([[0, 1, 0]])
    for garbage in (INF, -INF, float("nan")):
        proximal_BT = torch.tensor([[garbage, -1.0, garbage]])
        behaviour_BT = torch.tensor([[-garbage, -1.0, garbage]])
        for correction in ("none", "tis", "mis"):
            for level in ("token", "sequence"):
                weights_BT, stats = importance_weights(proximal_BT, behaviour_BT, mask_BT, correction, level)
                assert weights_BT.tolist() == [[0.0, 1.0, 0.0]]
                assert stats["sampler_kl"].item() == 0.0 and stats["is_weight_mean"].item() == 1.0
    # No valid token at all: zeros, no nan.
    weights_BT, stats = importance_weights(PROXIMAL_BT, BEHAVIOUR_BT, torch.zeros_like(MASK_BT), "tis", "sequence")
    assert (weights_BT == 0).all() and all(v.item() == 0.0 for v in stats.values())


def test_bad_settings_are_rejected():
    for cap in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="rl.is_cap"):
            importance_weights(PROXIMAL_BT, BEHAVIOUR_BT, MASK_BT, "tis", cap=cap)
        with pytest.raises(ValueError, match="rl.is_cap"):
            PolicyLoss(off_policy_correction="tis", is_cap=cap)
    with pytest.raises(ValueError, match="'none', 'tis', 'mis'"):
        importance_weights(PROXIMAL_BT, BEHAVIOUR_BT, MASK_BT, "vtrace")
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        importance_weights(PROXIMAL_BT, BEHAVIOUR_BT, MASK_BT, "tis", level="row")
    with pytest.raises(ValueError, match="off-policy correction"):
        PolicyLoss(off_policy_correction="vtrace")
    with pytest.raises(ValueError, match="importance-sampling level"):
        PolicyLoss(off_policy_correction="mis", is_level="row")


# ------------------------------------------------------------------------------------------------ PolicyLoss


def _policy_batch(seed: int = 0) -> tuple[PolicyBatch, torch.Tensor]:
    """4 rows of prompt + response (+ padding), V = 7; the sampler's log-probabilities are far enough from the
    learner's that some ratios pass a cap of 2, and hold inf off the response."""
    gen = torch.Generator().manual_seed(seed)
    B, T, V = 4, 7, 7
    prompt_lengths, total_lengths = [2, 1, 3, 2], [5, 7, 4, 3]
    positions = torch.arange(T)[None]
    attention = (positions < torch.tensor(total_lengths)[:, None]).long()
    response = attention * (positions >= torch.tensor(prompt_lengths)[:, None])
    logits = torch.randn(B, T, V, generator=gen)
    input_ids = torch.randint(0, V, (B, T), generator=gen) * attention
    old_logprobs = (token_logprobs(logits, input_ids) + 0.3 * torch.randn(B, T, generator=gen)) * response
    sampler_logprobs = old_logprobs + 0.8 * torch.randn(B, T, generator=gen)
    batch = PolicyBatch(
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        position_ids_BT=positions.expand(B, T) * attention,
        loss_weights_BT=aggregation_weights(response, "seq_mean_token_mean"),
        old_logprobs_BT=old_logprobs,
        advantages_BT=torch.randn(B, T, generator=gen) * response,
        ref_logprobs_BT=torch.zeros(B, T),
        sampler_logprobs_BT=torch.where(response != 0, sampler_logprobs, INF),
    )
    return batch, logits


def _hand_surrogate(logits: torch.Tensor, batch: PolicyBatch, clip_low: float = 0.2, clip_high: float = 0.28):
    """Per-token −min(ρA, clip(ρ)A) written out, and the policy's log-probabilities."""
    logp = torch.zeros_like(batch.old_logprobs_BT)
    logp[:, 1:] = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    adv = batch.advantages_BT
    ratio = torch.exp(logp - batch.old_logprobs_BT)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv), logp


def test_old_logprobs_from_update_is_the_detached_current_policy():
    batch, logits = _policy_batch()
    logits.requires_grad_()
    logp = token_logprobs(logits, batch.input_ids_BT).detach()
    explicit, explicit_metrics = PolicyLoss(clip_high=0.28)(logits, dataclasses.replace(batch, old_logprobs_BT=logp))
    (explicit_grad,) = torch.autograd.grad(explicit, logits)
    # The batch's own old log-probabilities are not read: nan there changes nothing.
    unread = dataclasses.replace(batch, old_logprobs_BT=torch.full_like(logp, float("nan")))
    loss, metrics = PolicyLoss(clip_high=0.28, old_logprobs_from_update=True)(logits, unread)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, explicit)
    torch.testing.assert_close(grad, explicit_grad)
    assert metrics == pytest.approx(explicit_metrics)
    assert metrics["approx_kl"] == 0.0 and metrics["clip_fraction"] == 0.0
    # Ratio 1: the plain policy gradient of Σ_t w_t (−A_t) log π(a_t).
    plain = (batch.loss_weights_BT * -batch.advantages_BT * token_logprobs(logits, batch.input_ids_BT)).sum()
    torch.testing.assert_close(grad, torch.autograd.grad(plain, logits)[0])


@pytest.mark.parametrize(("correction", "level"), [("tis", "token"), ("mis", "token"), ("tis", "sequence"),
                                                   ("mis", "sequence")])
def test_corrected_policy_loss_is_the_hand_weighted_surrogate(correction, level):
    batch, logits = _policy_batch()
    logits.requires_grad_()
    loss, metrics = PolicyLoss(clip_high=0.28, off_policy_correction=correction, is_level=level)(logits, batch)

    w = batch.loss_weights_BT
    valid = w != 0
    log_ratio = torch.where(valid, batch.old_logprobs_BT - batch.sampler_logprobs_BT, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    ratio = log_ratio.exp()
    over = valid & (ratio > 2.0)
    is_w = torch.where(over, 2.0 if correction == "tis" else 0.0, ratio) * valid
    surrogate, _ = _hand_surrogate(logits, batch)
    expected = (w * is_w * surrogate).sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])
    assert 0 < over.sum() < valid.sum()  # the cap acts on some tokens, not all
    assert metrics["is_weight_mean"] == pytest.approx((w * is_w).sum().item(), rel=1e-5)
    assert metrics["is_truncated_fraction"] == pytest.approx((w * over).sum().item(), rel=1e-5)
    assert metrics["is_weight_max"] == pytest.approx(is_w.max().item(), rel=1e-6)


def test_no_correction_leaves_the_loss_bit_for_bit():
    batch, logits = _policy_batch()
    loss, metrics = PolicyLoss(clip_high=0.28)(logits, batch)
    # The loss as it was before the sampler's log-probabilities existed: the weighted clipped surrogate.
    valid = batch.loss_weights_BT != 0
    logp = token_logprobs(logits, batch.input_ids_BT)
    surrogate, _ = _clipped_surrogate(logp, batch.old_logprobs_BT, batch.advantages_BT, valid, 0.2, 0.28, None)
    assert torch.equal(loss, _weighted_sum(surrogate, batch.loss_weights_BT))
    moved = dataclasses.replace(batch, sampler_logprobs_BT=batch.sampler_logprobs_BT - 5.0)
    assert torch.equal(PolicyLoss(clip_high=0.28)(logits, moved)[0], loss)
    assert not any(k.startswith("is_") for k in metrics)

    # Metrics that need no correction: the weighted k3 of KL(behaviour ‖ proximal) and the largest gap.
    w, old, sampler = batch.loss_weights_BT, batch.old_logprobs_BT, batch.sampler_logprobs_BT
    r = torch.where(valid, old - sampler, 0.0).exp()
    assert metrics["sampler_kl"] == pytest.approx((w * (r - 1 - r.log())).sum().item(), rel=1e-5)
    assert metrics["logprob_diff_max"] == pytest.approx((old - sampler)[valid].abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_corrected_loss_is_exact_across_micro_batches(packed):
    batch, logits = _policy_batch(seed=1)
    loss_fn = PolicyLoss(clip_high=0.28, off_policy_correction="mis", is_level="sequence", entropy_coef=0.01)
    whole_metrics = assert_exact_across_micro_batches(loss_fn, batch, logits, packed)
    assert {"is_weight_max", "logprob_diff_max"} <= set(whole_metrics)
