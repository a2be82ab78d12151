"""GSPO, CISPO and SAPO (``rl.policy_loss``): hand-computed values, TRL 1.16's formulas on random inputs, and the
learner's ``PolicyLoss`` exact across micro-batches for each."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.algorithms import (
    PolicyLoss,
    aggregation_weights,
    cispo_policy_loss,
    clipped_policy_loss,
    gspo_policy_loss,
    sapo_policy_loss,
    token_logprobs,
)
from rlft.config import ConfigError, load_config
from rlft.data.batch import PolicyBatch
from test_algorithms import _policy_batch, assert_exact_across_micro_batches

KINDS = ["ppo", "gspo", "cispo", "sapo"]


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_gspo_by_hand():
    # Row 0: log-ratios 0.1, −0.3 → s = e^−0.1 inside the clip; row 1: 0.2, 0.4, 0.0 → s = e^0.2, clipped at 1.05.
    old = _t([-1.0, -1.0, 0.0, 0.0], [-2.0, -2.0, -2.0, 0.0])
    logp = (old + _t([0.1, -0.3, 0.0, 0.0], [0.2, 0.4, 0.0, 0.0])).requires_grad_()
    mask = _t([1, 1, 0, 0], [1, 1, 1, 0])
    adv = _t([1.0, 1.0, 0, 0], [1.0, 1.0, 1.0, 0])
    loss, stats = gspo_policy_loss(logp, old, adv, mask, clip_low=0.05, clip_high=0.05)
    s0 = math.exp(-0.1)
    assert loss.item() == pytest.approx((-s0 - 1.05) / 2)
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlog π_t of −½ s_0 = −½ · s_0 · ½ on row 0's tokens; row 1 is clipped (no gradient); padding none.
    torch.testing.assert_close(grad, _t([-s0 / 4, -s0 / 4, 0, 0], [0, 0, 0, 0]))


def test_cispo_by_hand():
    # Ratios e^0.5 (capped at 1.5) and e^−1; the weights carry no gradient, so d/dlog π_t = −w_t A_t / 2.
    logp = _t([-1.0, -2.0, 0.0]).requires_grad_()
    old = _t([-1.5, -1.0, 0.0])
    adv, mask = _t([2.0, -1.0, 0.0]), _t([1, 1, 0])
    loss, stats = cispo_policy_loss(logp, old, adv, mask, max_weight=1.5)
    w1 = math.exp(-1.0)
    assert loss.item() == pytest.approx((-(1.5 * 2.0 * -1.0) - (w1 * -1.0 * -2.0)) / 2)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, _t([-3.0 / 2, w1 / 2, 0.0]))


def test_sapo_by_hand():
    logp = _t([-1.0, -1.0]).requires_grad_()
    old = _t([-1.0, -1.5])
    adv, mask = _t([1.0, -1.0]), _t([1, 1])
    loss, stats = sapo_policy_loss(logp, old, adv, mask, temperature_pos=1.0, temperature_neg=2.0,
                                   aggregation="token_mean")
    gate = 1 / (1 + math.exp(-2.0 * (math.exp(0.5) - 1))) * 4 / 2.0
    assert loss.item() == pytest.approx((-2.0 + gate) / 2)  # ratio 1: σ(0) · 4 = 2
    assert stats["clip_fraction"].item() == 0
    (grad,) = torch.autograd.grad(loss, logp)
    # At ratio 1 the gradient is the policy gradient's, −A / 2 here.
    assert grad[0, 0].item() == pytest.approx(-0.5)


def _trl_per_token_loss(kind, logp, old, adv_B, mask, eps_low, eps_high, tau_pos=1.0, tau_neg=1.05):
    """TRL 1.16's GRPOTrainer per-token losses, written from its formulas: ``grpo`` with importance_sampling_level
    ``sequence`` (GSPO), ``cispo`` and ``sapo`` (token level), the advantages one per sequence."""
    log_ratio = logp - old
    adv = adv_B[:, None]
    if kind == "gspo":
        coef = torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None])
        return -torch.min(coef * adv, torch.clamp(coef, 1 - eps_low, 1 + eps_high) * adv)
    coef = torch.exp(log_ratio)
    if kind == "cispo":
        return -torch.clamp(coef, max=eps_high).detach() * adv * logp
    tau = torch.where(adv > 0, tau_pos, tau_neg)
    return -torch.sigmoid(tau * (coef - 1)) * 4 / tau * adv


@pytest.mark.parametrize("kind", ["gspo", "cispo", "sapo"])
def test_losses_match_trl_formulas_on_random_inputs(kind):
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 9
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    adv_B = torch.randn(B, generator=gen, dtype=torch.float64)
    adv = adv_B[:, None] * mask
    eps_low, eps_high = (0.02, 0.03) if kind == "gspo" else (0.2, 1.3)
    trl = _trl_per_token_loss(kind, logp, old, adv_B, mask, eps_low, eps_high).expand(B, T)
    if kind == "gspo":  # TRL's "grpo" aggregation: each sequence's token mean, then the mean over sequences
        expected = ((trl * mask).sum(-1) / mask.sum(-1)).mean()
        ours, _ = gspo_policy_loss(logp, old, adv, mask, eps_low, eps_high, aggregation="seq_mean_token_mean")
    elif kind == "cispo":  # TRL's "dapo" normalisation in one process: a token mean over the batch
        expected = (trl * mask).sum() / mask.sum()
        ours, _ = cispo_policy_loss(logp, old, adv, mask, max_weight=eps_high, aggregation="token_mean")
    else:
        expected = ((trl * mask).sum(-1) / mask.sum(-1)).mean()
        ours, _ = sapo_policy_loss(logp, old, adv, mask, aggregation="seq_mean_token_mean")
    assert abs(ours.item() - expected.item()) <= 1e-6
    (ours_grad,) = torch.autograd.grad(ours, logp)
    (trl_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(ours_grad, trl_grad, atol=1e-6, rtol=0)


def test_every_kind_agrees_with_ppo_at_ratio_one():
    """At π = π_old every kind's gradient is the plain policy gradient Σ_t w_t (−A_t) ∇log π(a_t)."""
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mask = _t([1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0])
    adv = torch.randn(3, 1, generator=gen, dtype=torch.float64) * mask
    grads = {}
    for kind, fn in (("ppo", clipped_policy_loss), ("gspo", gspo_policy_loss), ("cispo", cispo_policy_loss),
                     ("sapo", sapo_policy_loss)):
        x = logp.clone().requires_grad_()
        loss, _ = fn(x, logp, adv, mask, aggregation="seq_mean_token_mean")
        grads[kind] = torch.autograd.grad(loss, x)[0]
    for kind in KINDS[1:]:
        torch.testing.assert_close(grads[kind], grads["ppo"])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_policy_loss_kinds_are_exact_across_micro_batches(kind, packed):
    batch, logits = _policy_batch(seed=2)
    loss_fn = PolicyLoss(kind=kind, clip_low=0.1, clip_high=0.2, kl_coef=0.05, entropy_coef=0.01,
                         cispo_max_weight=1.1, off_policy_correction="tis")
    assert_exact_across_micro_batches(loss_fn, batch, logits, packed)
    # The learner's loss is the pure function's, with the step's weights (seq_mean_token_mean here).
    if kind != "ppo":
        pure = {"gspo": gspo_policy_loss, "cispo": cispo_policy_loss, "sapo": sapo_policy_loss}[kind]
        settings = {"gspo": (0.1, 0.2), "cispo": (1.1,), "sapo": ()}[kind]
        plain = PolicyLoss(kind=kind, clip_low=0.1, clip_high=0.2, cispo_max_weight=1.1)
        _, metrics = plain(logits, batch)
        response = batch.loss_weights_BT != 0
        expected, _ = pure(token_logprobs(logits, batch.input_ids_BT), batch.old_logprobs_BT, batch.advantages_BT,
                           response, *settings, aggregation="seq_mean_token_mean")
        assert metrics["policy_loss"] == pytest.approx(expected.item())
    assert torch.equal(batch.loss_weights_BT, aggregation_weights(batch.loss_weights_BT != 0, "seq_mean_token_mean"))


def test_policy_loss_kinds_validate():
    with pytest.raises(ValueError, match="unknown policy loss"):
        PolicyLoss(kind="trpo")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(kind="gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match="CISPO"):
        PolicyLoss(kind="cispo", cispo_max_weight=0.0)
    with pytest.raises(ValueError, match="SAPO"):
        PolicyLoss(kind="sapo", sapo_temperature_neg=-1.0)


@pytest.mark.parametrize("override, field", [
    ("rl.policy_loss=trpo", "rl.policy_loss"),
    ("rl.cispo_max_weight=0", "rl.cispo_max_weight"),
    ("rl.sapo_temperature_pos=0", "rl.sapo_temperature_pos"),
])
def test_config_rejects_bad_policy_loss_settings(override, field):
    from conftest import ROOT

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs/grpo_tiny.yaml", [override])


def test_config_rejects_dual_clip_outside_ppo_loss():
    from conftest import ROOT

    with pytest.raises(ConfigError, match=r"rl\.dual_clip"):
        load_config(ROOT / "configs/grpo_tiny.yaml", ["rl.policy_loss=gspo", "rl.dual_clip=3.0"])
