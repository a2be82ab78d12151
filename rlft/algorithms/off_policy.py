"""Off-policy correction: importance weights between the policy that sampled the tokens and the one being updated.

Public API:

- ``OffPolicyCorrection``: ``"none" | "tis" | "mis"``; ``ISLevel``: ``"token" | "sequence"``
- ``check_off_policy_correction(correction, level, cap)``: the validation of the three settings
- ``importance_weights(proximal_logprobs_BT, behaviour_logprobs_BT, mask_BT, correction, level="token", cap=2.0,
  sequence_ids_BT=None) -> (weights_BT, stats)``
- ``importance_weights_by_token(proximal_logprobs_BT, behaviour_logprobs_BT, mask_BT, correction, level="token",
  cap=2.0, sequence_ids_BT=None) -> (weights_BT, truncated_BT)``: the same weights and where the cap acted, per token, for a caller that
  aggregates with weights of its own (``PolicyLoss``)

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization", arXiv:2110.00641) separates
two policies that plain PPO takes to be one: the *behaviour* policy that sampled the tokens, and the *proximal*
policy that the clipped ratio keeps the update close to. Here the behaviour policy is the sampler's (vLLM's
log-probabilities, from another engine, numerics and possibly older weights) and the proximal policy is the learner's
own log-probabilities before the update. The surrogate is then

    l_t = w_t · clip-surrogate(π / π_prox),    w_t = f(π_prox(a_t) / π_behav(a_t))

as AReaL uses it for asynchronous RL (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning
System for Language Reasoning", arXiv:2505.24298). The weight w corrects for the sampler's mismatch and is a
constant of the loss (no gradient).
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from rlft.algorithms.aggregation import aggregate
from rlft.algorithms.config import ISLevel, OffPolicyCorrection
from rlft.algorithms.kl import kl_estimate
from rlft.algorithms.sequences import sequence_sum


def check_off_policy_correction(correction: str, level: str, cap: float) -> None:
    """Raise ``ValueError`` naming the bad setting: an unknown correction or level, or a cap that is not > 1."""
    if correction not in get_args(OffPolicyCorrection):
        choices = get_args(OffPolicyCorrection)
        raise ValueError(f"unknown off-policy correction {correction!r}; expected one of {choices}")
    if level not in get_args(ISLevel):
        raise ValueError(f"unknown importance-sampling level {level!r}; expected one of {get_args(ISLevel)}")
    if not cap > 1:
        raise ValueError(f"rl.is_cap must be > 1 (a bound on the importance ratio), got {cap}")


def importance_weights_by_token(
    proximal_logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correction: OffPolicyCorrection,
    level: ISLevel = "token",
    cap: float = 2.0,
    sequence_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token importance weights (detached, 0 off ``mask_BT``) and where the cap truncated or masked them.

    With r_t = exp(log π_prox(a_t) − log π_behav(a_t)) on valid tokens (mask ≠ 0):

    - ``none``: w_t = 1.
    - ``tis``, truncated IS: w_t = min(r_t, cap). Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
      You Off-Policy RL Training" (the sampler/learner mismatch); the truncation is IMPALA's (Espeholt et al. 2018,
      "IMPALA: Scalable Distributed Deep-RL with Importance Weighted Actor-Learner Architectures",
      arXiv:1802.01561).
    - ``mis``, masked IS (one-sided): w_t = r_t where r_t ≤ cap, else 0, so the token leaves the loss.

    ``level="sequence"`` uses one ratio per sequence, r = exp(Σ_t m_t (log π_prox − log π_behav)), truncated or
    masked the same way and given to each of the sequence's valid tokens (``mis`` then drops the whole sequence). A
    sequence is a row, or with ``sequence_ids_BT`` (``rlft.algorithms.sequences``) the tokens sharing an id, as in a
    packed row. The log-ratio is
    clamped at log(cap) before the exponential (its excess decides ``truncated_BT`` first), so a long row with a
    large summed log-ratio cannot overflow. Invalid tokens are zeroed before any arithmetic, so inf or nan there
    reaches nothing. ``truncated_BT`` is False for ``none``.
    """
    check_off_policy_correction(correction, level, cap)
    valid_BT = mask_BT != 0
    log_ratio_BT = torch.where(valid_BT, proximal_logprobs_BT.detach() - behaviour_logprobs_BT.detach(), 0.0)
    if correction == "none":
        return valid_BT.to(log_ratio_BT.dtype), torch.zeros_like(valid_BT)
    if level == "sequence":
        log_ratio_BT = sequence_sum(log_ratio_BT, sequence_ids_BT)
    log_cap = math.log(cap)
    truncated_BT = valid_BT & (log_ratio_BT > log_cap)
    weights_BT = torch.exp(log_ratio_BT.clamp(max=log_cap))
    if correction == "mis":
        weights_BT = torch.where(truncated_BT, 0.0, weights_BT)
    return torch.where(valid_BT, weights_BT, 0.0), truncated_BT


def importance_weights(
    proximal_logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correction: OffPolicyCorrection,
    level: ISLevel = "token",
    cap: float = 2.0,
    sequence_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights of the behaviour (sampler's) policy's tokens towards the proximal (learner's) policy.

    ``weights_BT`` as ``importance_weights_by_token``: multiply a per-token loss by it before aggregating.
    ``stats``, detached 0-dim tensors, token means over the valid tokens whatever ``level`` is:

    - ``is_weight_mean``, ``is_weight_max``: of the weights (1 and 1 for ``none``; 0 without valid tokens).
    - ``is_truncated_fraction``: the fraction of valid tokens whose weight the cap truncated (``tis``) or masked
      (``mis``); at sequence level, the tokens of such rows.
    - ``sampler_kl``: the k3 estimate of KL(π_behav ‖ π_prox) from the behaviour policy's samples,
      (r − 1) − log r (``kl_estimate(behaviour, proximal, "k3")``, whose log-ratio is clamped to ±10).
    """
    weights_BT, truncated_BT = importance_weights_by_token(
        proximal_logprobs_BT, behaviour_logprobs_BT, mask_BT, correction, level, cap, sequence_ids_BT
    )
    valid_BT = mask_BT != 0
    proximal_BT = torch.where(valid_BT, proximal_logprobs_BT.detach(), 0.0)
    behaviour_BT = torch.where(valid_BT, behaviour_logprobs_BT.detach(), 0.0)
    stats = {
        "is_weight_mean": aggregate(weights_BT, valid_BT, "token_mean"),
        "is_weight_max": weights_BT.max() if weights_BT.numel() else weights_BT.new_zeros(()),
        "is_truncated_fraction": aggregate(truncated_BT.to(weights_BT.dtype), valid_BT, "token_mean"),
        "sampler_kl": aggregate(kl_estimate(behaviour_BT, proximal_BT, "k3"), valid_BT, "token_mean"),
    }
    return weights_BT, stats
