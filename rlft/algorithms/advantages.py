"""Advantage estimators: how much better a sampled response (or token) was than expected.

Public API:

- ``gae(rewards_BT, values_BT, mask_BT, gamma, lam) -> (advantages_BT, returns_BT)``
- ``grpo_advantages(rewards_BG, scale, eps=1e-6) -> advantages_BG``
- ``rloo_advantages(rewards_BG) -> advantages_BG``
- ``reinforce_pp_advantages(rewards_B, kl_penalty_BT, mask_BT, gamma=1.0, eps=1e-6) -> advantages_BT``
- ``reinforce_pp_baseline_advantages(rewards_BG, kl_penalty_BT, mask_BT, gamma=1.0, eps=1e-6) -> advantages_BT``
- ``sequence_to_token(adv_B, mask_BT) -> adv_BT``

Shapes: ``B`` rows (samples) or prompts, ``G`` samples per prompt (a group), ``T`` tokens. Per-token tensors are
aligned with ``input_ids_BT`` and ``mask_BT`` is non-zero on the response tokens only (prompt and padding are 0).
Where group and per-token tensors meet, the token rows are the groups flattened in order: row ``b * G + g``.
Every estimator returns a target, not a graph: results carry no gradient.
"""

from __future__ import annotations

import torch

from rlft.algorithms.config import AdvantageScale


@torch.no_grad()
def gae(
    rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the response tokens of each row.

        δ_t = r_t + γ V_{t+1} − V_t,     A_t = δ_t + γλ A_{t+1},     R_t = A_t + V_t

    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438. Here "t+1" is the next token with a non-zero mask: masked tokens (prompt, padding, or a
    masked span inside a response) are skipped, not treated as steps, and the episode ends after the last response
    token (V and A past it are 0; a response cut at ``max_new_tokens`` is not bootstrapped). Advantages and
    returns are 0 where the mask is 0.
    """
    valid_BT = mask_BT != 0
    advantages_BT = torch.zeros_like(rewards_BT)
    next_value_B = torch.zeros_like(rewards_BT[:, 0])
    next_advantage_B = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        advantage_B = delta_B + gamma * lam * next_advantage_B
        valid_B = valid_BT[:, t]
        advantages_BT[:, t] = torch.where(valid_B, advantage_B, 0.0)
        next_value_B = torch.where(valid_B, values_BT[:, t], next_value_B)
        next_advantage_B = torch.where(valid_B, advantage_B, next_advantage_B)
    returns_BT = torch.where(valid_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT


@torch.no_grad()
def grpo_advantages(rewards_BG: torch.Tensor, scale: AdvantageScale, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: A_i = (r_i − mean(r_group)) / s, one per sample.

    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300 (outcome supervision), where s = std(r_group) + eps. ``scale`` picks s:

    - ``"group"``: the group's standard deviation (GRPO). A group whose rewards are all equal gets 0.
    - ``"batch"``: the standard deviation of all B·G rewards ("group mean, batch std"), so that a group that is
      almost all right or all wrong (small group std) is not blown up; a global scale like REINFORCE++'s
      (arXiv:2501.03262).
    - ``"none"``: s = 1. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
      Perspective", arXiv:2503.20783) drops the division, which up-weights prompts that are too easy or too hard.

    Standard deviations use Bessel's correction (n − 1), like ``torch.std``; groups need G ≥ 2.
    """
    _check_groups(rewards_BG)
    centered_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered_BG / (rewards_BG.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centered_BG / (rewards_BG.std() + eps)
    if scale == "none":
        return centered_BG
    raise ValueError(f"unknown GRPO advantage scale {scale!r}; expected 'group', 'batch' or 'none'")


@torch.no_grad()
def rloo_advantages(rewards_BG: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out: A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean(r_group)).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv:2402.14740. Each sample's baseline is the mean reward of the other samples of its
    prompt, so it is independent of the sample itself. Groups need G ≥ 2.
    """
    _check_groups(rewards_BG)
    group_size = rewards_BG.shape[1]
    return group_size / (group_size - 1) * (rewards_BG - rewards_BG.mean(dim=1, keepdim=True))


@torch.no_grad()
def reinforce_pp_advantages(
    rewards_B: torch.Tensor,
    kl_penalty_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """REINFORCE++: the discounted token-level return, normalised over all valid tokens of the batch.

        r_t = −kl_penalty_t + [t = last response token] · reward,     G_t = Σ_{s ≥ t} γ^{s−t} r_s,
        A_t = (G_t − mean(G)) / (std(G) + eps)     (mean and std over every valid token of the batch)

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", arXiv:2501.03262.
    ``kl_penalty_BT`` is the per-token penalty already multiplied by its coefficient (e.g.
    ``kl_coef * kl_estimate(logprobs, ref_logprobs, "k1")``); pass zeros for none. The statistics are those of the
    tensors given: pass the whole step's batch, not one learner's share. The std is the population std over
    tokens. Rows with an all-zero mask get 0.
    """
    valid_BT = mask_BT != 0
    token_rewards_BT = torch.where(valid_BT, -kl_penalty_BT, 0.0)
    rows_B = torch.arange(mask_BT.shape[0], device=mask_BT.device)
    token_rewards_BT[rows_B, _last_valid_index(valid_BT)] += torch.where(valid_BT.any(dim=1), rewards_B, 0.0)
    returns_BT = _discounted_returns(token_rewards_BT, valid_BT, gamma)
    return _whiten(returns_BT, valid_BT, eps)


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards_BG: torch.Tensor,
    kl_penalty_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean reward, then ``reinforce_pp_advantages``.

        r'_i = r_i − mean(r_group),     then the token returns of r'_i normalised over the batch's valid tokens

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", arXiv:2501.03262
    (the variant for several samples per prompt). Token rows are the groups flattened: row ``b * G + g`` holds
    the response scored by ``rewards_BG[b, g]``.
    """
    _check_groups(rewards_BG)
    centered_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    return reinforce_pp_advantages(centered_BG.reshape(-1), kl_penalty_BT, mask_BT, gamma, eps)


def sequence_to_token(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence over its response tokens: A_it = A_i · [m_it ≠ 0] (0 elsewhere).

    For group estimators, flatten first: ``sequence_to_token(grpo_advantages(r_BG, ...).reshape(-1), mask_BT)``.
    """
    return torch.where(mask_BT != 0, adv_B[:, None], 0.0)


def _discounted_returns(rewards_BT: torch.Tensor, valid_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ G_{t'} with t' the next valid token of the row (0 past the last); 0 on invalid tokens."""
    returns_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        running_B = torch.where(valid_BT[:, t], rewards_BT[:, t] + gamma * running_B, running_B)
        returns_BT[:, t] = torch.where(valid_BT[:, t], running_B, 0.0)
    return returns_BT


def _whiten(x_BT: torch.Tensor, valid_BT: torch.Tensor, eps: float) -> torch.Tensor:
    """(x − mean) / (std + eps) with the mean and population std over valid tokens; 0 on invalid tokens."""
    count = valid_BT.sum().clamp(min=1)
    mean = torch.where(valid_BT, x_BT, 0.0).sum() / count
    var = torch.where(valid_BT, (x_BT - mean) ** 2, 0.0).sum() / count
    return torch.where(valid_BT, (x_BT - mean) / (var.sqrt() + eps), 0.0)


def _last_valid_index(valid_BT: torch.Tensor) -> torch.Tensor:
    positions_BT = torch.arange(valid_BT.shape[1], device=valid_BT.device).expand_as(valid_BT)
    return torch.where(valid_BT, positions_BT, 0).amax(dim=1)


def _check_groups(rewards_BG: torch.Tensor) -> None:
    if rewards_BG.dim() != 2 or rewards_BG.shape[1] < 2:
        raise ValueError(f"rewards_BG must be (prompts, samples per prompt ≥ 2), got shape {tuple(rewards_BG.shape)}")
