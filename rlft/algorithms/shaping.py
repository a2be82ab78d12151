"""The reward a sample trains on, and DAPO's data side: the overlong reward penalty and the groups that dynamic
sampling keeps.

Public API:

- ``shape_rewards(grader_rewards_S, env_rewards_S, lengths_S, max_length, buffer, factor) -> (rewards_S,
  penalties_S)``
- ``overlong_penalty(lengths_S, max_length, buffer, factor=1.0) -> penalties_S``
- ``informative_groups(rewards_PG) -> keep_P``

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476, sections 3.2
(dynamic sampling) and 3.4 (overlong reward shaping).
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths_S: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term (≤ 0) per sample from its length |y|:

        0                                     |y| ≤ L_max − L_cache
        factor · ((L_max − L_cache) − |y|) / L_cache      L_max − L_cache < |y| ≤ L_max
        −factor                                |y| > L_max

    with L_max = ``max_length`` and L_cache = ``buffer`` (0 < buffer ≤ max_length). A response that ran to the
    length limit gets −factor; one that ended in the buffer before it, a share of that growing with its length.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"the overlong buffer must be in (0, max_length = {max_length}], got {buffer}")
    excess_S = (lengths_S.float() - (max_length - buffer)).clamp(min=0)
    return -factor * (excess_S / buffer).clamp(max=1.0)


def shape_rewards(grader_rewards_S: torch.Tensor, env_rewards_S: torch.Tensor, lengths_S: torch.Tensor,
                  max_length: int, buffer: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each sample, r = r_graders + r_env + r_overlong, and the overlong term alone.

    ``grader_rewards_S``: the graders' weighted sum; ``env_rewards_S``: what a multi-turn environment gave (zeros
    for single-turn samples); ``lengths_S``: the policy's own tokens (every turn's, observations left out), which
    DAPO's ``overlong_penalty`` reads with ``max_length``, ``buffer`` and ``factor``; ``buffer`` 0 means no
    penalty. The sum runs in the rewards' dtype, in that order.
    """
    penalties_S = (overlong_penalty(lengths_S, max_length, buffer, factor) if buffer
                   else torch.zeros(lengths_S.shape, dtype=torch.float32))
    return grader_rewards_S + env_rewards_S + penalties_S.to(grader_rewards_S.dtype), penalties_S


def informative_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Which prompts' groups have rewards that are not all equal (bool, one per row): the others give every sample
    a group-relative advantage of 0, so they cost a step's compute and teach nothing (DAPO's dynamic sampling
    keeps the rest: 0 < accuracy < 1 for a 0/1 reward)."""
    return (rewards_PG != rewards_PG[:, :1]).any(dim=1)
