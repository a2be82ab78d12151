"""The DPO family's losses against hand-computed values.

One pair throughout: log π(y_c) = −2, log π(y_r) = −5, log π_ref(y_c) = −3, log π_ref(y_r) = −4, so the chosen
log-ratio is +1, the rejected −1 and the margin h = 2; with β = 0.5 the implicit rewards are r_c = 0.5, r_r = −0.5.
"""

from __future__ import annotations

import pytest
import torch

from rlft.algorithms import DPO_LOSS_TYPES, dpo_loss


def pair(**kwargs):
    t = lambda x: torch.tensor([float(x)])  # noqa: E731
    args = dict(beta=0.5, **kwargs)
    if "chosen_lengths" in args:
        args["chosen_lengths"] = t(args["chosen_lengths"])
    if "rejected_lengths" in args:
        args["rejected_lengths"] = t(args["rejected_lengths"])
    losses, chosen, rejected = dpo_loss(t(-2), t(-5), t(-3), t(-4), **args)
    return losses.item(), chosen.item(), rejected.item()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # −log σ(βh) = log(1 + e^−1)
        ({"loss_type": "sigmoid"}, 0.313262),
        # cDPO, ε = 0.1: 0.9 · log(1 + e^−1) + 0.1 · log(1 + e^1)
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, 0.413262),
        # (0.9 · log(1 + e^−1) − 0.1 · log(1 + e^1)) / 0.8
        ({"loss_type": "robust", "label_smoothing": 0.1}, 0.188262),
        # (h − 1/(2β))² = (2 − 1)²
        ({"loss_type": "ipo"}, 1.0),
        # per-token: h = 1/2 − (−1/4) = 0.75, (0.75 − 1)²
        ({"loss_type": "ipo", "chosen_lengths": 2, "rejected_lengths": 4}, 0.0625),
        # max(0, 1 − βh) = max(0, 1 − 1)
        ({"loss_type": "hinge"}, 0.0),
        ({"loss_type": "hinge", "beta_override": 0.25}, 0.5),
        # means −1 and −1: z = 0.5 · 0 − 0.5, −log σ(−0.5) = log(1 + e^0.5)
        ({"loss_type": "simpo", "chosen_lengths": 2, "rejected_lengths": 5}, 0.974077),
        # −log σ(0.5) − ½ log σ(−0.5) − ½ log σ(0.5)
        ({"loss_type": "nca_pair"}, 1.198154),
        # δ = mean(0.5, −0.5) = 0: −log σ(0.5) − log σ(0.5)
        ({"loss_type": "bco_pair"}, 0.948154),
        # δ = 0.5: −log σ(0) − log σ(1)
        ({"loss_type": "bco_pair", "bco_delta": 0.5}, 0.693147 + 0.313262),
        # (1 − 1/(2·0.5))² + (−1 + 1)²
        ({"loss_type": "sppo_hard"}, 0.0),
        ({"loss_type": "sppo_hard", "beta_override": 1.0}, 0.5),
        # 1 − σ(0.5) + σ(−0.5)
        ({"loss_type": "apo_zero"}, 0.755081),
        # RPO: + α · (−log π(y_c)/|y_c|) = + 1 · 2/2
        ({"loss_type": "sigmoid", "rpo_alpha": 1.0, "chosen_lengths": 2}, 1.313262),
    ],
)
def test_losses_by_hand(kwargs, expected):
    beta = kwargs.pop("beta_override", None)
    if beta is not None:
        t = lambda x: torch.tensor([float(x)])  # noqa: E731
        losses, _, _ = dpo_loss(t(-2), t(-5), t(-3), t(-4), beta=beta, **kwargs)
        assert losses.item() == pytest.approx(expected, abs=1e-5)
    else:
        assert pair(**kwargs)[0] == pytest.approx(expected, abs=1e-5)


def test_rewards_are_beta_log_ratios_or_simpo_means():
    assert pair(loss_type="sigmoid")[1:] == pytest.approx((0.5, -0.5))
    # SimPO's rewards: β · log π(y)/|y| = 0.5 · (−2/2), 0.5 · (−5/5); no reference needed.
    t = lambda x: torch.tensor([float(x)])  # noqa: E731
    _, chosen, rejected = dpo_loss(t(-2), t(-5), None, None, beta=0.5, loss_type="simpo",
                                   chosen_lengths=t(2), rejected_lengths=t(5))
    assert (chosen.item(), rejected.item()) == pytest.approx((-0.5, -0.5))


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_prefers_the_chosen_response(loss_type):
    """Gradient descent on any of them raises the chosen log-probability relative to the rejected one."""
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-4.0, -5.0], requires_grad=True)
    ref_c, ref_r, lengths = torch.tensor([-4.0, -6.0]), torch.tensor([-4.0, -5.0]), torch.tensor([3.0, 4.0])
    losses, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, loss_type=loss_type,
                            chosen_lengths=lengths, rejected_lengths=lengths)
    losses.mean().backward()
    assert (chosen.grad - rejected.grad < 0).all(), (chosen.grad, rejected.grad)
    assert torch.isfinite(losses).all()


def test_bad_arguments_are_named():
    t = torch.tensor([0.0])
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(t, t, t, t, beta=0.0, loss_type="sigmoid")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="simpo needs the response lengths"):
        dpo_loss(t, t, None, None, beta=0.1, loss_type="simpo")
    with pytest.raises(ValueError, match="sigmoid needs the reference"):
        dpo_loss(t, t, None, None, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="rpo_alpha > 0 needs the response lengths"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="sigmoid", rpo_alpha=1.0)
