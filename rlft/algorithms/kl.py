"""Per-token estimators of the KL divergence between the policy and a reference policy, from policy samples.

Public API:

- ``KLKind``: ``"k1" | "k2" | "k3"`` (defined in ``rlft.config``, which loads without torch)
- ``kl_estimate(logprobs_BT, ref_logprobs_BT, kind) -> kl_BT``
"""

from __future__ import annotations

import torch

from rlft.algorithms.config import KLKind

# k3 exponentiates a log-ratio; clamping it to ±K3_MAX_LOG_RATIO keeps exp() finite (k3 ≤ e^10 − 11 ≈ 2.2e4) when a
# token is far more likely under one policy than the other. Past the clamp the estimate is flat (no gradient).
K3_MAX_LOG_RATIO = 10.0


def kl_estimate(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) = E_{x∼π}[log π(x) − log π_ref(x)], for tokens x sampled from π.

    With log r = log π(x) − log π_ref(x) (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html):

    - ``k1`` = log r: unbiased, high variance, negative on some tokens.
    - ``k2`` = ½ (log r)²: biased (little when π is close to π_ref), low variance, never negative.
    - ``k3`` = (1/r − 1) + log r = exp(−log r) − 1 + log r: unbiased, low variance, never negative; −log r is
      clamped to ±``K3_MAX_LOG_RATIO`` before the exponential.

    The gradient flows through ``logprobs_BT`` only (``ref_logprobs_BT`` is detached). Used as a loss term on
    samples of the current policy, the three differ in what they optimise (in expectation): k1's gradient is 0,
    k2's is the gradient of KL(π ‖ π_ref), and k3's is the gradient of the reverse KL(π_ref ‖ π). As a reward
    penalty (REINFORCE++, PPO-RLHF) the caller detaches the result.
    """
    log_ratio_BT = logprobs_BT - ref_logprobs_BT.detach()
    if kind == "k1":
        return log_ratio_BT
    if kind == "k2":
        return 0.5 * log_ratio_BT**2
    if kind == "k3":
        neg_log_ratio_BT = (-log_ratio_BT).clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
        return torch.exp(neg_log_ratio_BT) - 1 - neg_log_ratio_BT
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")
