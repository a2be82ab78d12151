"""The RL math of `rlft.algorithms` against values worked out by hand (fast CPU unit tests)."""

from __future__ import annotations

import dataclasses

import math
import pickle

import pytest
import torch

from rlft.algorithms import (
    PolicyLoss,
    aggregate,
    aggregation_weights,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token,
    token_logprobs,
)
from rlft.data.batch import PolicyBatch, TokenBatch
from rlft.learner.micro_batches import micro_batches, packed_plans, padded_plan

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _constant(mode: str) -> float | None:
    return 4.0 if mode == "seq_mean_token_sum_norm" else None


# ------------------------------------------------------------------------------------------------ advantages


def test_gae_three_tokens_by_hand():
    # gamma=0.9, lam=0.8 (gamma*lam=0.72), rewards [0, 0, 1], values [0.5, 0.6, 0.7], terminal after token 2:
    #   d2 = 1 - 0.7 = 0.3                 A2 = 0.3
    #   d1 = 0.9*0.7 - 0.6 = 0.03          A1 = 0.03 + 0.72*0.3 = 0.246
    #   d0 = 0.9*0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    adv, ret = gae(_t([0, 0, 1]), _t([0.5, 0.6, 0.7]), _t([1, 1, 1]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(ret, _t([0.71712, 0.846, 1.0]))


def test_gae_skips_prompt_padding_and_masked_spans():
    # The same 3 response tokens behind a prompt token, with a masked span inside and padding after.
    mask = _t([0, 1, 0, 1, 1, 0])
    adv, ret = gae(_t([5, 0, 7, 0, 1, 3]), _t([9, 0.5, 8, 0.6, 0.7, 4]), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t([0, 0.21712, 0, 0.246, 0.3, 0]))
    torch.testing.assert_close(ret, _t([0, 0.71712, 0, 0.846, 1.0, 0]))


def test_grpo_advantages_by_hand():
    # Group [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25], sample std sqrt(0.75/3) = 0.5.
    rewards = _t([1, 0, 0, 0])
    torch.testing.assert_close(grpo_advantages(rewards, "group", eps=0.0), _t([1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(grpo_advantages(rewards, "none"), _t([0.75, -0.25, -0.25, -0.25]))
    # Groups [2, 0] and [0, 0]: group stds sqrt(2) and 0 (an all-equal group gets 0); the batch of four rewards
    # has mean 0.5, squared deviations 2.25 + 3 * 0.25 = 3, sample std sqrt(3/3) = 1.
    rewards = _t([2, 0], [0, 0])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(grpo_advantages(rewards, "group"), _t([s, -s], [0, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(rewards, "batch", eps=0.0), _t([1, -1], [0, 0]))
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(rewards, "groups")
    with pytest.raises(ValueError, match="samples per prompt"):
        grpo_advantages(_t([1], [0]), "group")


def test_rloo_advantages_by_hand():
    # Each reward minus the mean of the others: [1 - 0, 0 - 1/3, ...]; [3 - 1.5, 1 - 2.5, 2 - 2].
    torch.testing.assert_close(rloo_advantages(_t([1, 0, 0, 0])), _t([1, -1 / 3, -1 / 3, -1 / 3]))
    torch.testing.assert_close(rloo_advantages(_t([3, 1, 2])), _t([1.5, -1.5, 0]))


def test_reinforce_pp_by_hand():
    # Row 0: prompt, then 2 response tokens, reward 1, KL penalty [., 0.1, 0.2]:
    #   token rewards [., -0.1, -0.2 + 1]; gamma=1 returns [., 0.7, 0.8].
    # Row 1: 2 response tokens, then padding, reward 0, KL penalty [0.1, 0.1, .]: returns [-0.2, -0.1, .].
    # Valid returns [0.7, 0.8, -0.2, -0.1]: mean 0.3, deviations [0.4, 0.5, -0.5, -0.4], variance 0.82/4 = 0.205.
    mask = _t([0, 1, 1], [1, 1, 0])
    kl = _t([9, 0.1, 0.2], [0.1, 0.1, 9])
    adv = reinforce_pp_advantages(_t(1, 0), kl, mask, eps=0.0)
    torch.testing.assert_close(adv, _t([0, 0.4, 0.5], [-0.5, -0.4, 0]) / math.sqrt(0.205))
    # gamma=0.5: row 0 returns [., -0.1 + 0.5*0.8, 0.8] = [., 0.3, 0.8]; row 1 [-0.1 + 0.5*-0.1, -0.1] =
    # [-0.15, -0.1]. Mean 0.85/4 = 0.2125; deviations [0.0875, 0.5875, -0.3625, -0.3125].
    adv = reinforce_pp_advantages(_t(1, 0), kl, mask, gamma=0.5, eps=0.0)
    dev = _t([0, 0.0875, 0.5875], [-0.3625, -0.3125, 0])
    torch.testing.assert_close(adv, dev / (dev[mask != 0].pow(2).mean().sqrt()))


def test_reinforce_pp_baseline_by_hand():
    # One prompt, rewards [1, 0] -> centred [0.5, -0.5]; responses of 2 and 1 tokens, no KL penalty:
    # returns [0.5, 0.5 | -0.5], mean 1/6, deviations [1/3, 1/3, -2/3], variance (1 + 1 + 4)/9/3 = 2/9.
    mask = _t([1, 1, 0], [1, 0, 0])
    adv = reinforce_pp_baseline_advantages(_t([1, 0]), torch.zeros_like(mask), mask, eps=0.0)
    torch.testing.assert_close(adv, _t([1 / 3, 1 / 3, 0], [-2 / 3, 0, 0]) / math.sqrt(2 / 9))


def test_sequence_to_token():
    mask = _t([0, 1, 1], [1, 0, 0])
    torch.testing.assert_close(sequence_to_token(_t(2, -1), mask), _t([0, 2, 2], [-1, 0, 0]))


def test_advantages_ignore_masked_positions():
    mask = _t([0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0])
    off = mask == 0
    rewards, values, kl = (torch.rand(3, 4, dtype=torch.float64) for _ in range(3))
    noisy = [torch.where(off, float("nan"), x) for x in (rewards, values, kl)]
    for a, b in zip(gae(rewards, values, mask, 0.9, 0.8), gae(*noisy[:2], mask, 0.9, 0.8)):
        torch.testing.assert_close(a, b)
    outcome = _t(1, 0, 0.5)
    torch.testing.assert_close(
        reinforce_pp_advantages(outcome, kl, mask), reinforce_pp_advantages(outcome, noisy[2], mask)
    )


# ------------------------------------------------------------------------------------------------ policy loss


@pytest.mark.parametrize(
    "advantage, ratio, clip_low, clip_high, dual_clip, loss, clipped",
    [
        (1.0, 1.1, 0.2, 0.2, None, -1.1, False),  # inside the trust region
        (1.0, 1.25, 0.2, 0.2, None, -1.2, True),  # above 1 + 0.2: clipped
        (1.0, 1.25, 0.2, 0.28, None, -1.25, False),  # clip-higher: 1.25 < 1.28 still learns
        (1.0, 1.5, 0.2, 0.28, None, -1.28, True),
        (1.0, 0.5, 0.2, 0.2, None, -0.5, False),  # A > 0: the low side never clips
        (-1.0, 0.5, 0.2, 0.2, None, 0.8, True),  # A < 0 below 1 - 0.2: max(0.5, 0.8)
        (-1.0, 0.9, 0.2, 0.2, None, 0.9, False),
        (-1.0, 4.0, 0.2, 0.2, None, 4.0, False),  # A < 0, ratio far up: unbounded without dual clip
        (-1.0, 4.0, 0.2, 0.2, 3.0, 3.0, True),  # dual clip bounds it at -A * 3
        (-1.0, 2.0, 0.2, 0.2, 3.0, 2.0, False),  # below the dual bound
        (1.0, 4.0, 0.2, 0.2, 3.0, -1.2, True),  # dual clip does not apply to A > 0
        (-2.0, 5.0, 0.2, 0.2, 3.0, 6.0, True),
    ],
)
def test_clipped_policy_loss_single_token(advantage, ratio, clip_low, clip_high, dual_clip, loss, clipped):
    logprobs = _t([math.log(ratio) - 1.0]).requires_grad_()
    out, stats = clipped_policy_loss(
        logprobs, _t([-1.0]), _t([advantage]), _t([1]), clip_low, clip_high, dual_clip
    )
    out.backward()
    torch.testing.assert_close(out, torch.tensor(loss, dtype=torch.float64))
    assert stats["clip_fraction"].item() == float(clipped)
    # d(-A * ratio)/d logprob = -A * ratio where the surrogate is unclipped; 0 where a clip is active.
    expected_grad = 0.0 if clipped else -advantage * ratio
    torch.testing.assert_close(logprobs.grad, _t([expected_grad]))


def test_clipped_policy_loss_stats_and_gradients():
    # Ratios [1.1, 1.5, ., 0.5] with A = [1, 1, ., -1]: the last two valid tokens are clipped -> 2/3.
    logprobs = torch.log(_t([1.1, 1.5, 7.0, 0.5])).requires_grad_()
    old = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    adv = _t([1, 1, 5, -1]).requires_grad_()
    loss, stats = clipped_policy_loss(logprobs, old, adv, _t([1, 1, 0, 1]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-1.1 - 1.2 + 0.8) / 3, dtype=torch.float64))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(2 / 3, dtype=torch.float64))
    # approx KL(old || new), k3 = ratio - 1 - log ratio per token.
    k3 = [r - 1 - math.log(r) for r in (1.1, 1.5, 0.5)]
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(sum(k3) / 3, dtype=torch.float64))
    assert old.grad is None and adv.grad is None
    torch.testing.assert_close(logprobs.grad, _t([-1.1 / 3, 0, 0, 0]))


def test_clipped_policy_loss_rejects_bad_clips():
    args = (_t([0.0]), _t([0.0]), _t([1.0]), _t([1]))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(*args, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        clipped_policy_loss(*args, clip_low=1.0)


def test_clipped_value_loss_by_hand():
    # old 1, return 2, clip 0.2.  v = 1.5: clipped value 1.2, max(0.25, 0.64) -> 0.5*0.64 = 0.32 (clipped).
    # v = 1.1: inside the clip, 0.5*0.81 = 0.405.  v = 0.5: clipped value 0.8, max(2.25, 1.44) -> 1.125.
    values = _t([1.5, 1.1, 0.5, 3.0]).requires_grad_()
    old = _t([1, 1, 1, 1]).requires_grad_()
    returns = _t([2, 2, 2, 2]).requires_grad_()
    loss, stats = clipped_value_loss(values, old, returns, _t([1, 1, 1, 0]), clip=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((0.32 + 0.405 + 1.125) / 3, dtype=torch.float64))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(1 / 3, dtype=torch.float64))
    # d/dv 0.5 (v - R)^2 / 3 = (v - R)/3 where unclipped.
    torch.testing.assert_close(values.grad, _t([0, -0.9 / 3, -1.5 / 3, 0]))
    assert old.grad is None and returns.grad is None


def test_losses_ignore_masked_positions():
    mask = _t([1, 1, 0], [1, 0, 0])
    off = mask == 0
    x = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    noisy = [torch.where(off, float("nan"), t) for t in x]
    for mode in MODES:
        kw = dict(aggregation=mode, aggregation_constant=_constant(mode))
        a, sa = clipped_policy_loss(*x, mask, dual_clip=3.0, **kw)
        b, sb = clipped_policy_loss(*noisy, mask, dual_clip=3.0, **kw)
        torch.testing.assert_close((a, sa), (b, sb))
        a, sa = clipped_value_loss(*x, mask, clip=0.2, **kw)
        b, sb = clipped_value_loss(*noisy, mask, clip=0.2, **kw)
        torch.testing.assert_close((a, sa), (b, sb))


# ------------------------------------------------------------------------------------------------ KL, entropy


@pytest.mark.parametrize(
    "log_ratio, k1, k2, k3",
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.5, 0.5, 0.125, math.exp(-0.5) - 1 + 0.5),  # 0.10653
        (-1.0, -1.0, 0.5, math.e - 2),  # 0.71828
    ],
)
def test_kl_estimators_at_known_ratios(log_ratio, k1, k2, k3):
    logprobs, ref = _t([-1.0 + log_ratio]), _t([-1.0])
    for kind, expected in (("k1", k1), ("k2", k2), ("k3", k3)):
        torch.testing.assert_close(kl_estimate(logprobs, ref, kind), _t([expected]))


def test_kl_k3_clamps_the_log_ratio():
    out = kl_estimate(_t([-60.0, 0.0]), _t([0.0, -60.0]), "k3")
    # log r = -60 is clamped to -10: exp(10) - 1 - 10; log r = +60 to +10: exp(-10) - 1 + 10.
    torch.testing.assert_close(out, _t([math.exp(10) - 11, math.exp(-10) + 9]))
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(out, out, "k4")


def test_kl_estimators_direction_and_gradients():
    # Exact expectations over a small vocabulary stand in for sampling from pi.
    torch.manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1).requires_grad_()
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    kl_forward = (p * (logp - ref)).sum()  # KL(pi || ref)
    kl_reverse = (ref.exp() * (ref - logp)).sum()  # KL(ref || pi)
    expect = {kind: (p.detach() * kl_estimate(logp, ref, kind)).sum() for kind in ("k1", "k2", "k3")}
    # k1 and k3 are unbiased estimates of KL(pi || ref); k2 is biased.
    torch.testing.assert_close(expect["k1"], kl_forward.detach())
    torch.testing.assert_close(expect["k3"], kl_forward.detach())
    # As on-policy loss terms: k1's gradient is 0, k2's is that of KL(pi || ref), k3's that of KL(ref || pi).
    grad = {kind: torch.autograd.grad(e, logits, retain_graph=True)[0] for kind, e in expect.items()}
    torch.testing.assert_close(grad["k1"], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(grad["k2"], torch.autograd.grad(kl_forward, logits, retain_graph=True)[0])
    torch.testing.assert_close(grad["k3"], torch.autograd.grad(kl_reverse, logits, retain_graph=True)[0])
    expect["k3"].backward()
    assert ref.grad is None


def test_entropy_from_logits():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    logits = torch.randn(2, 3, 5) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    # Huge logits: no overflow, a near-certain distribution has entropy ~0.
    huge = entropy_from_logits(torch.tensor([[[1e4, 0.0, -1e4]]]))
    assert torch.isfinite(huge).all() and huge.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ aggregation


def test_aggregation_modes_on_ragged_mask():
    # Rows of 3 and 1 valid tokens and an all-padding row that counts as no sequence; NaN where masked.
    nan = float("nan")
    loss = _t([1, 2, 3, nan], [4, nan, nan, nan], [nan, nan, nan, nan])
    mask = _t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    expected = {
        "token_mean": (1 + 2 + 3 + 4) / 4,  # 2.5
        "seq_mean_token_mean": (6 / 3 + 4 / 1) / 2,  # 3
        "seq_mean_token_sum": (6 + 4) / 2,  # 5
        "seq_mean_token_sum_norm": (6 / 4 + 4 / 4) / 2,  # 1.25 with C = 4
    }
    for mode, value in expected.items():
        out = aggregate(loss, mask, mode, _constant(mode))
        torch.testing.assert_close(out, torch.tensor(value, dtype=torch.float64))
        weights = aggregation_weights(mask, mode, _constant(mode))
        torch.testing.assert_close(torch.where(mask != 0, loss * weights, 0).sum(), out)
    assert aggregate(loss, torch.zeros_like(mask), "token_mean").item() == 0.0


def test_aggregation_constant_is_checked():
    x = _t([1.0])
    with pytest.raises(ValueError, match="positive constant"):
        aggregate(x, x, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="takes no constant"):
        aggregation_weights(x, "token_mean", 4.0)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(x, x, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_weights_are_exact_across_micro_batches(mode):
    torch.manual_seed(0)
    lengths = torch.tensor([3, 6, 1, 0, 4, 2, 5, 6])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    loss = torch.randn(8, 6)
    whole = aggregate(loss, mask, mode, _constant(mode))
    weights = aggregation_weights(mask, mode, _constant(mode))
    torch.testing.assert_close((loss * weights).sum(), whole)
    parts = sum((loss[i : i + 2] * weights[i : i + 2]).sum() for i in range(0, 8, 2))
    torch.testing.assert_close(parts, whole)
    # Means weigh to 1; the token-sum modes to the mean length of the 7 non-empty rows (27 / 7), over C.
    total_weight = {"token_mean": 1.0, "seq_mean_token_mean": 1.0, "seq_mean_token_sum": 27 / 7}
    torch.testing.assert_close(weights.sum(), torch.tensor(total_weight.get(mode, 27 / 7 / 4)))


# ------------------------------------------------------------------------------------------------ PolicyLoss


def _policy_batch(seed: int = 0, mode: str = "seq_mean_token_mean") -> tuple[PolicyBatch, torch.Tensor]:
    """4 rows of prompt + response (+ padding), V = 7; the response mask is ragged, one row's response is long. The
    loss weights are ``mode``'s aggregation weights."""
    gen = torch.Generator().manual_seed(seed)
    B, T, V = 4, 7, 7
    prompt_lengths, total_lengths = [2, 1, 3, 2], [5, 7, 4, 3]
    positions = torch.arange(T)[None]
    attention = (positions < torch.tensor(total_lengths)[:, None]).long()
    response = attention * (positions >= torch.tensor(prompt_lengths)[:, None])
    logits = torch.randn(B, T, V, generator=gen)
    input_ids = torch.randint(0, V, (B, T), generator=gen) * attention
    batch = PolicyBatch(
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        position_ids_BT=positions.expand(B, T) * attention,
        loss_weights_BT=aggregation_weights(response, mode, _constant(mode)),
        old_logprobs_BT=(token_logprobs(logits, input_ids) + 0.3 * torch.randn(B, T, generator=gen)) * response,
        advantages_BT=torch.randn(B, T, generator=gen) * response,
        ref_logprobs_BT=(token_logprobs(logits, input_ids) + 0.5 * torch.randn(B, T, generator=gen)) * response,
        sampler_logprobs_BT=(token_logprobs(logits, input_ids) + 0.2 * torch.randn(B, T, generator=gen)) * response,
    )
    return batch, logits


def assert_exact_across_micro_batches(loss_fn, batch: PolicyBatch, logits: torch.Tensor,
                                      packed: bool = False) -> dict[str, float]:
    """The loss, its gradient and the metrics of ``batch`` equal those of its micro-batches combined, as the learner
    makes them (``rlft.learner.micro_batches``): 2 padded rows each, or ``packed``, the samples with loss weight
    packed into rows of at most 8 tokens, several samples to a row. Returns the metrics."""
    logits = logits.detach().requires_grad_()
    whole, whole_metrics = loss_fn(logits, batch)
    plan = packed_plans([batch], max_tokens=8)[0] if packed else padded_plan(batch.num_rows, 2)
    assert not packed or max(len(rows) for rows in plan.rows) > 1  # a row holds several samples
    shares, combined = [], dict.fromkeys(whole_metrics, 0.0)
    for rows, micro in zip(plan.rows, micro_batches(batch, plan)):
        # With attention inside each sample, a causal LM's logits for a micro-batch are the whole batch's: the same
        # rows and leading columns (padded), or the rows' real tokens one after the other (packed).
        if packed:
            lengths = batch.attention_mask_BT.sum(dim=-1)
            micro_logits = torch.cat([logits[row, : lengths[row]] for row in rows])[None]
        else:
            micro_logits = logits[rows[0] : rows[-1] + 1, : micro.input_ids_BT.shape[1]]
        share, metrics = loss_fn(micro_logits, micro)
        shares.append(share)
        # Metrics named ``*_max`` combine by max, the others by sum.
        combined = {k: max(combined[k], v) if k.endswith("_max") else combined[k] + v for k, v in metrics.items()}
    torch.testing.assert_close(sum(shares), whole)
    (whole_grad,) = torch.autograd.grad(whole, logits)
    (shares_grad,) = torch.autograd.grad(sum(shares), logits)
    torch.testing.assert_close(shares_grad, whole_grad)
    assert combined == pytest.approx(whole_metrics)
    return whole_metrics


def test_policy_loss_matches_the_manual_formula():
    batch, logits = _policy_batch()
    logits.requires_grad_()
    loss_fn = PolicyLoss(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01)
    loss, metrics = loss_fn(logits, batch)

    # Written out directly: the objective form min(ratio * A, clip(ratio) * A), then the dual bound, negated.
    logp_all = torch.log_softmax(logits, -1)
    logp = torch.zeros_like(batch.old_logprobs_BT)
    logp[:, 1:] = logp_all[:, :-1].gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    w, adv = batch.loss_weights_BT, batch.advantages_BT
    ratio = torch.exp(logp - batch.old_logprobs_BT)
    objective = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    objective = torch.where(adv < 0, torch.maximum(objective, 3.0 * adv), objective)
    k3 = torch.exp(batch.ref_logprobs_BT - logp) - 1 - (batch.ref_logprobs_BT - logp)
    entropy = torch.zeros_like(logp)
    entropy[:, 1:] = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    expected = (w * -objective).sum() + 0.1 * (w * k3).sum() - 0.01 * (w * entropy).sum()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0])

    # The same numbers through the pure function with the mode the weights were made with.
    response = w != 0
    pure, stats = clipped_policy_loss(
        logp, batch.old_logprobs_BT, adv, response, 0.2, 0.28, 3.0, aggregation="seq_mean_token_mean"
    )
    assert metrics["policy_loss"] == pytest.approx(pure.item())
    assert metrics["kl"] == pytest.approx((w * k3).sum().item())
    assert metrics["entropy"] == pytest.approx((w * entropy).sum().item())
    assert 0 < metrics["clip_fraction"] < 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_is_exact_across_micro_batches(mode, packed):
    batch, logits = _policy_batch(seed=1, mode=mode)
    loss_fn = PolicyLoss(clip_high=0.28, kl_coef=0.05, entropy_coef=0.01)
    assert_exact_across_micro_batches(loss_fn, batch, logits, packed)


def test_policy_loss_without_kl_or_entropy_ignores_them():
    batch, logits = _policy_batch()
    logits.requires_grad_()
    batch.ref_logprobs_BT = torch.zeros_like(batch.ref_logprobs_BT)
    loss, metrics = PolicyLoss()(logits, batch)
    assert "kl" not in metrics and metrics["entropy"] > 0
    assert loss.item() == pytest.approx(metrics["policy_loss"])
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_policy_loss_pickles_and_validates():
    loss_fn = PolicyLoss(clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k2")
    assert pickle.loads(pickle.dumps(loss_fn)) == loss_fn
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="KL estimator"):
        PolicyLoss(kl_kind="k4")


def test_policy_batch_rows_split_trimmed_concat():
    batch, _ = _policy_batch()
    parts = [p.trimmed() for p in batch.split(2)]
    assert all(type(p) is PolicyBatch for p in parts + [batch.rows(1, 3)])
    assert parts[1].input_ids_BT.shape[1] < batch.input_ids_BT.shape[1]
    joined = PolicyBatch.concat(parts)
    assert type(joined) is PolicyBatch
    for name in ("input_ids_BT", "loss_weights_BT", "old_logprobs_BT", "advantages_BT", "ref_logprobs_BT",
                 "sampler_logprobs_BT"):
        torch.testing.assert_close(getattr(joined, name), getattr(batch, name))
    plain = TokenBatch.concat(parts)
    assert type(plain) is TokenBatch
    torch.testing.assert_close(plain.loss_weights_BT, batch.loss_weights_BT)


def test_remote_rows_slice_like_the_tensor_they_stand_for():
    """Log-probabilities held as references (``RemoteRows``, here in-process parts of 3 and 1 rows) follow the
    batch's rows, splits and trims by bookkeeping, and resolve to the slices of the real tensor."""
    from rlft.distributed.remote_rows import RemoteRows, resolve_rows

    batch, _ = _policy_batch()
    old_BT = batch.old_logprobs_BT
    remote = dataclasses.replace(batch, old_logprobs_BT=RemoteRows(((old_BT[:3], 3), (old_BT[3:], 1))))
    for part, want in zip(remote.split(2), batch.split(2)):
        part, want = part.trimmed(), want.trimmed()
        assert isinstance(part.old_logprobs_BT, RemoteRows) and part.old_logprobs_BT.num_rows == 2
        torch.testing.assert_close(resolve_rows(part).old_logprobs_BT, want.old_logprobs_BT)
    torch.testing.assert_close(remote.rows(1, 4).old_logprobs_BT.resolve(), old_BT[1:4])
    with pytest.raises(IndexError):
        remote.old_logprobs_BT[::2]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_grpo_controller_advantage_estimators(estimator):
    """``rl.advantage_estimator`` picks the estimator; hand-checked for one group of two and one of two equal."""
    from rlft.config import load_config
    from rlft.controller.grpo import critic_free_advantages

    cfg = load_config(None, ["algorithm=grpo", f"rl.advantage_estimator={estimator}", "rl.num_samples_per_prompt=2", "trainer.global_batch_size=32"])
    rewards_PG = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Row 0: 2 response tokens, rows 1-3: 1 token each; column 0 is the prompt.
    mask_BT = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.float32)
    adv_BT = critic_free_advantages(rewards_PG, mask_BT, cfg)
    assert (adv_BT[mask_BT == 0] == 0).all()
    per_row = [adv_BT[0, 1].item(), adv_BT[1, 1].item(), adv_BT[2, 1].item(), adv_BT[3, 1].item()]
    if estimator == "grpo":  # (r - mean) / group std (unbiased std of [1, 0] is 0.7071)
        assert per_row == pytest.approx([0.5 / 0.70711, -0.5 / 0.70711, 0.0, 0.0], abs=1e-4)
    elif estimator == "rloo":  # r_i - mean of the others
        assert per_row == pytest.approx([1.0, -1.0, 0.0, 0.0])
    elif estimator == "reinforce_pp":  # returns 1,1 | 0 | 1 | 1 whitened over the 5 valid tokens
        returns = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
        white = (returns - returns.mean()) / returns.std(unbiased=False)
        assert adv_BT[mask_BT != 0].tolist() == pytest.approx(white.tolist(), abs=1e-4)
    else:  # group means subtracted first: 0.5,0.5 | -0.5 | 0 | 0, then whitened
        centred = torch.tensor([0.5, 0.5, -0.5, 0.0, 0.0])
        white = (centred - centred.mean()) / centred.std(unbiased=False)
        assert adv_BT[mask_BT != 0].tolist() == pytest.approx(white.tolist(), abs=1e-4)


def test_unknown_advantage_estimator_is_a_config_error():
    from rlft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rl.advantage_estimator"):
        load_config(None, ["rl.advantage_estimator=gae"])
