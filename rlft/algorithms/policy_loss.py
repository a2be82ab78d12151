"""PPO-family losses: the clipped policy surrogate, the clipped value loss, the entropy, and the learner's loss.

Public API:

- ``clipped_policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, clip_low=0.2, clip_high=0.2,
  dual_clip=None, aggregation="token_mean", aggregation_constant=None) -> (loss, stats)``
- ``clipped_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip, aggregation="token_mean",
  aggregation_constant=None) -> (loss, stats)``
- ``gspo_policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, clip_low=3e-4, clip_high=4e-4,
  aggregation="seq_mean_token_mean", aggregation_constant=None, sequence_ids_BT=None) -> (loss, stats)``
- ``cispo_policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, max_weight=5.0,
  aggregation="token_mean", aggregation_constant=None) -> (loss, stats)``
- ``sapo_policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, temperature_pos=1.0,
  temperature_neg=1.05, aggregation="seq_mean_token_mean", aggregation_constant=None) -> (loss, stats)``
- ``PolicyLossKind``: ``"ppo" | "gspo" | "cispo" | "sapo"``, which of the four ``PolicyLoss`` computes
- ``entropy_from_logits(logits_BTV) -> entropy_BT``
- ``PolicyBatch`` (``rlft.data.batch``): a ``TokenBatch`` with ``old_logprobs_BT``, ``advantages_BT``,
  ``ref_logprobs_BT``, ``sampler_logprobs_BT``
- ``PolicyLoss(kind="ppo", clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_kind="k3",
  entropy_coef=0.0, old_logprobs_from_update=False, off_policy_correction="none", is_level="token", is_cap=2.0,
  cispo_max_weight=5.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)``:
  ``__call__(logits_BTV, batch: PolicyBatch) -> (loss, metrics)``, a learner ``Loss``

The pure functions take a mask and an aggregation mode (``rlft.algorithms.aggregation``) and return stats as
detached 0-dim tensors. ``PolicyLoss`` runs inside the learner on one micro-batch: it aggregates with the batch's
``loss_weights_BT``, which the batch producer made with ``aggregation_weights`` over the whole step (one sample a
row), so the learner may pack several samples into a row (``learner.max_tokens_per_micro_batch``): the loss finds
each sample from its position ids restarting at 0 (``rlft.algorithms.sequences``) for GSPO's sequence ratio and
sequence-level importance weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from rlft.algorithms.aggregation import aggregate
from rlft.algorithms.config import AggregationMode, ISLevel, KLKind, OffPolicyCorrection, PolicyLossKind
from rlft.algorithms.kl import kl_estimate
from rlft.algorithms.off_policy import check_off_policy_correction, importance_weights_by_token
from rlft.algorithms.sequences import sequence_ids, sequence_sum
from rlft.algorithms.sft import token_logprobs
from rlft.data.batch import PolicyBatch, ValueBatch


def clipped_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: AggregationMode = "token_mean",
    aggregation_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise, with asymmetric clipping and optional dual clipping.

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        l_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − clip_low, 1 + clip_high))
        l_t = min(l_t, −A_t · dual_clip)   where A_t < 0, if ``dual_clip`` is set

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (one ε for both sides).
    Separate ``clip_low`` / ``clip_high``: DAPO's clip-higher (Yu et al. 2025, "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", arXiv:2503.14476; e.g. 0.2 / 0.28), which lets unlikely tokens with
    positive advantage grow further. Dual clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
    Reinforcement Learning", arXiv:1912.09729; for a negative advantage it bounds the loss at ρ = ``dual_clip``
    (> 1), so a token whose probability already rose far cannot produce an unbounded update.

    The gradient flows through ``logprobs_BT`` only. ``stats``: ``clip_fraction``, the fraction of valid tokens
    where a clip is active (the gradient is cut), and ``approx_kl``, the k3 estimate of KL(π_old ‖ π) from the
    samples of π_old; both are token means whatever ``aggregation`` is.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    return _pure_loss("ppo", logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, aggregation, aggregation_constant,
                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


def gspo_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    aggregation: AggregationMode = "seq_mean_token_mean",
    aggregation_constant: float | None = None,
    sequence_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: PPO's clipped surrogate with one, length-normalised importance ratio per sequence.

        s_i = exp( (1/|y_i|) Σ_t (log π(y_i,t) − log π_old(y_i,t)) )
        l_i,t = max(−A_i,t s_i, −A_i,t clip(s_i, 1 − clip_low, 1 + clip_high))

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071. Each of a sequence's valid tokens
    carries the sequence's loss; under ``seq_mean_token_mean`` (the default) the aggregate is the paper's
    (1/G) Σ_i min(s_i A_i, clip(s_i) A_i), and its gradient reaches every token through the mean of s_i. The
    paper's clip range is small (3e-4 / 4e-4, the defaults here) because s_i is a geometric mean. A sequence is a
    row, or with ``sequence_ids_BT`` (``rlft.algorithms.sequences``, for packed rows; the aggregation then needs
    one row per sequence) the tokens sharing an id; its tokens are those with mask ≠ 0, the policy's tokens of every
    turn. ``stats`` as ``clipped_policy_loss``; ``clip_fraction`` counts the tokens of clipped sequences.
    """
    _check_clip(clip_low, clip_high, None)
    return _pure_loss("gspo", logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, aggregation, aggregation_constant,
                      sequence_ids_BT, clip_low=clip_low, clip_high=clip_high)


def cispo_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    max_weight: float = 5.0,
    aggregation: AggregationMode = "token_mean",
    aggregation_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: a REINFORCE token loss weighted by the clipped importance ratio, which carries no gradient.

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        l_t = −sg(min(ρ_t, max_weight)) · A_t · log π(a_t)

    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv:2506.13585
    (clip(ρ, 1 − ε_low, 1 + ε_high), with no lower bound in practice); the upper bound alone as ``max_weight``
    follows Khatri et al. 2025, "The Art of Scaling Reinforcement Learning Compute for LLMs", arXiv:2510.13786,
    which recommends 5. Unlike PPO's clip, no token's gradient is cut: clipping bounds its weight only. The loss's
    value is not an objective to read (it scales with log π); its gradient is Σ_t w_t sg(·) A_t ∇log π(a_t).
    ``stats``: ``clip_fraction`` (tokens whose weight was capped) and ``approx_kl``, token means.
    """
    _check_max_weight(max_weight)
    return _pure_loss("cispo", logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, aggregation, aggregation_constant,
                      cispo_max_weight=max_weight)


def sapo_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
    aggregation: AggregationMode = "seq_mean_token_mean",
    aggregation_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO: a smooth, temperature-controlled gate on the token ratio in place of the hard clip.

        ρ_t = exp(log π(a_t) − log π_old(a_t)),   τ_t = temperature_pos if A_t > 0 else temperature_neg
        l_t = −A_t · σ(τ_t (ρ_t − 1)) · 4 / τ_t

    Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347. At ρ = 1 the gradient equals the
    plain policy gradient's (σ' = 1/4); away from it, it fades smoothly instead of stopping at a clip edge, more
    quickly for negative advantages (the larger τ). ``stats``: ``clip_fraction`` is 0 (nothing is clipped) and
    ``approx_kl``, token means.
    """
    _check_temperatures(temperature_pos, temperature_neg)
    return _pure_loss("sapo", logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, aggregation, aggregation_constant,
                      sapo_temperature_pos=temperature_pos, sapo_temperature_neg=temperature_neg)


def _pure_loss(kind, logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, aggregation, aggregation_constant,
               sequence_ids_BT=None, **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``kind``'s per-token loss aggregated by ``aggregation``, with the stats every pure loss returns."""
    valid_BT = mask_BT != 0
    loss_BT, clipped_BT = PolicyLoss(kind=kind, **settings).surrogate(logprobs_BT, old_logprobs_BT, advantages_BT,
                                                                      valid_BT, sequence_ids_BT)
    approx_kl_BT = kl_estimate(old_logprobs_BT.detach(), logprobs_BT.detach(), "k3")
    stats = {
        "clip_fraction": aggregate(clipped_BT.to(loss_BT.dtype), valid_BT, "token_mean"),
        "approx_kl": aggregate(approx_kl_BT, valid_BT, "token_mean"),
    }
    return aggregate(loss_BT, valid_BT, aggregation, aggregation_constant), stats


def clipped_value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip: float,
    aggregation: AggregationMode = "token_mean",
    aggregation_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO2's clipped value loss: the new value may not move more than ``clip`` from the old one to help the fit.

        V^clip_t = V_old,t + clip(V_t − V_old,t, −clip, clip)
        l_t = ½ max((V_t − R_t)², (V^clip_t − R_t)²)

    From the PPO2 baselines implementation that accompanies Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", arXiv:1707.06347 (the paper itself uses an unclipped squared error). The gradient flows through
    ``values_BT`` only. ``stats``: ``clip_fraction``, the fraction of valid tokens where the clipped term is the
    larger (its gradient is then 0), a token mean.
    """
    if clip <= 0:
        raise ValueError(f"value clip must be positive, got {clip}")
    valid_BT = mask_BT != 0
    old_values_BT, returns_BT = old_values_BT.detach(), returns_BT.detach()
    clipped_values_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    unclipped_BT = (values_BT - returns_BT) ** 2
    clipped_BT = (clipped_values_BT - returns_BT) ** 2
    is_clipped_BT = clipped_BT > unclipped_BT
    loss_BT = 0.5 * torch.where(is_clipped_BT, clipped_BT, unclipped_BT)
    stats = {"clip_fraction": aggregate(is_clipped_BT.to(loss_BT.dtype), valid_BT, "token_mean")}
    return aggregate(loss_BT, valid_BT, aggregation, aggregation_constant), stats


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, in float32: H = logsumexp(z) − Σ_v softmax(z)_v z_v.

    Equal to −Σ_v p_v log p_v, written with logsumexp so that large logits do not overflow. Position t is the
    distribution over token t+1; ``PolicyLoss`` shifts it to line up with the tokens, like ``token_logprobs``.
    As a bonus in a loss: ``-coef * aggregate(entropy_BT, mask_BT, mode)``.
    """
    logits_BTV = logits_BTV.float()
    probs_BTV = torch.softmax(logits_BTV, dim=-1)
    return torch.logsumexp(logits_BTV, dim=-1) - (probs_BTV * logits_BTV).sum(dim=-1)


@dataclass(frozen=True)
class PolicyLoss:
    """The learner's policy-gradient loss on one micro-batch of a ``PolicyBatch``:

        L = Σ_t w_t l_t + kl_coef · Σ_t w_t k_t − entropy_coef · Σ_t w_t H_t

    with w = ``loss_weights_BT``, l the per-token loss of ``kind`` (``ppo``: ``clipped_policy_loss``; ``gspo``,
    ``cispo``, ``sapo``: ``gspo_policy_loss``, ``cispo_policy_loss``, ``sapo_policy_loss``), k the ``kl_kind`` estimate of
    KL(π ‖ π_ref) used as a loss term (GRPO's placement, arXiv:2402.03300, which uses k3), and H the entropy of
    the policy's next-token distribution at each token. Summed over the step's micro-batches this is
    ``clipped_policy_loss(..., aggregation=mode)`` plus the KL and entropy terms aggregated the same way, where
    mode is the one the weights were made with.

    The ratio's denominator is the *proximal* policy π_old: ``batch.old_logprobs_BT`` (the learner's log-probabilities
    before the update), or with ``old_logprobs_from_update`` this forward pass's own log-probabilities, detached. The
    ratio is then exactly 1 and the gradient is the plain policy gradient Σ_t w_t (−A_t) ∇log π(a_t), which is what
    PPO amounts to when each batch makes one optimizer step (TRL computes it so); ``batch.old_logprobs_BT`` is not
    read. With ``off_policy_correction`` other than ``"none"``, l_t is multiplied by the importance weight of the
    sampler's tokens towards π_old (``importance_weights`` of ``rlft.algorithms.off_policy``: decoupled PPO, with
    ``is_level`` and ``is_cap``) before the weighted sum; with ``"none"`` the loss is the surrogate alone.

    Metrics are weighted by w too, so their sums over the step's micro-batches are the step's values (means under
    the two mean modes, whose weights sum to 1; scaled like the loss under the token-sum modes): ``policy_loss``,
    ``clip_fraction``, ``approx_kl`` (k3 of KL(π_old ‖ π)), ``entropy``, ``sampler_kl`` (k3 of KL(π_behav ‖ π_old)
    from the sampler's tokens), ``kl`` when ``kl_coef`` is not 0, and ``is_weight_mean`` and
    ``is_truncated_fraction`` (the weighted share of tokens whose weight the cap truncated or masked) under a
    correction. Metrics whose names end in ``_max`` are maxima over the micro-batch's valid tokens, and a caller
    combines them over micro-batches and ranks by max, not sum: ``logprob_diff_max``, the largest
    |log π_old − log π_behav| (large when the sampler does not run the learner's weights), and ``is_weight_max``
    under a correction.
    """

    kind: PolicyLossKind = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: KLKind = "k3"
    entropy_coef: float = 0.0
    old_logprobs_from_update: bool = False
    off_policy_correction: OffPolicyCorrection = "none"
    is_level: ISLevel = "token"
    is_cap: float = 2.0
    cispo_max_weight: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self):
        if self.kind not in get_args(PolicyLossKind):
            raise ValueError(f"unknown policy loss {self.kind!r}; expected one of {get_args(PolicyLossKind)}")
        if self.dual_clip is not None and self.kind != "ppo":
            raise ValueError(f"dual_clip bounds PPO's clipped ratio; the {self.kind} loss has none")
        _check_clip(self.clip_low, self.clip_high, self.dual_clip)
        _check_max_weight(self.cispo_max_weight)
        _check_temperatures(self.sapo_temperature_pos, self.sapo_temperature_neg)
        if self.kl_kind not in get_args(KLKind):
            raise ValueError(f"unknown KL estimator {self.kl_kind!r}; expected one of {get_args(KLKind)}")
        check_off_policy_correction(self.off_policy_correction, self.is_level, self.is_cap)

    def __call__(self, logits_BTV: torch.Tensor, batch: PolicyBatch) -> tuple[torch.Tensor, dict[str, float]]:
        weights_BT = batch.loss_weights_BT
        valid_BT = weights_BT != 0
        # A packed row holds several samples: per-sequence quantities sum over each sample's tokens, not the row's.
        sequence_ids_BT = sequence_ids(batch.position_ids_BT)
        logprobs_BT = token_logprobs(logits_BTV, batch.input_ids_BT)
        proximal_BT = logprobs_BT.detach() if self.old_logprobs_from_update else batch.old_logprobs_BT
        surrogate_BT, clipped_BT = self.surrogate(logprobs_BT, proximal_BT, batch.advantages_BT, valid_BT,
                                                  sequence_ids_BT)
        if self.off_policy_correction != "none":
            is_weights_BT, truncated_BT = importance_weights_by_token(
                proximal_BT, batch.sampler_logprobs_BT, valid_BT, self.off_policy_correction, self.is_level, self.is_cap,
                sequence_ids_BT,
            )
            surrogate_BT = surrogate_BT * is_weights_BT
        policy_loss = _weighted_sum(surrogate_BT, weights_BT)
        # Without an entropy bonus the entropy is only a metric: no graph through the logits for it.
        entropy = _weighted_sum(_token_entropy(logits_BTV if self.entropy_coef else logits_BTV.detach()), weights_BT)
        approx_kl_BT = kl_estimate(proximal_BT, logprobs_BT.detach(), "k3")
        sampler_kl_BT = kl_estimate(batch.sampler_logprobs_BT, proximal_BT.detach(), "k3")
        loss = policy_loss - self.entropy_coef * entropy
        metrics = {
            "policy_loss": policy_loss.item(),
            "clip_fraction": _weighted_sum(clipped_BT.to(weights_BT.dtype), weights_BT).item(),
            "approx_kl": _weighted_sum(approx_kl_BT, weights_BT).item(),
            "entropy": entropy.item(),
            "sampler_kl": _weighted_sum(sampler_kl_BT, weights_BT).item(),
            "logprob_diff_max": _valid_max((proximal_BT.detach() - batch.sampler_logprobs_BT).abs(), valid_BT),
        }
        if self.off_policy_correction != "none":
            metrics["is_weight_mean"] = _weighted_sum(is_weights_BT, weights_BT).item()
            metrics["is_truncated_fraction"] = _weighted_sum(truncated_BT.to(weights_BT.dtype), weights_BT).item()
            metrics["is_weight_max"] = _valid_max(is_weights_BT, valid_BT)
        if self.kl_coef:
            kl = _weighted_sum(kl_estimate(logprobs_BT, batch.ref_logprobs_BT, self.kl_kind), weights_BT)
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    def surrogate(
        self, logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
        valid_BT: torch.Tensor, sequence_ids_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token loss of ``kind`` and where a clip acted; both 0 / False off ``valid_BT``. Invalid tokens
        are zeroed before the exponential, so garbage there reaches neither the loss nor a gradient. GSPO's
        sequences are rows, or the tokens sharing a ``sequence_ids_BT`` id (packed rows)."""
        if self.kind == "ppo":
            return _clipped_surrogate(logprobs_BT, old_logprobs_BT, advantages_BT, valid_BT, self.clip_low,
                                      self.clip_high, self.dual_clip)
        log_ratio_BT = torch.where(valid_BT, logprobs_BT - old_logprobs_BT.detach(), 0.0)
        advantages_BT = torch.where(valid_BT, advantages_BT.detach(), 0.0)
        if self.kind == "gspo":
            # log s_i, given to each of the sequence's tokens: the clipped surrogate of s_i against a ratio of 1.
            tokens_BT = sequence_sum(valid_BT.to(log_ratio_BT.dtype), sequence_ids_BT).clamp(min=1)
            sequence_log_ratio_BT = sequence_sum(log_ratio_BT, sequence_ids_BT) / tokens_BT
            return _clipped_surrogate(sequence_log_ratio_BT, torch.zeros_like(log_ratio_BT), advantages_BT, valid_BT,
                                      self.clip_low, self.clip_high, None)
        ratio_BT = torch.exp(log_ratio_BT)
        if self.kind == "cispo":
            weights_BT = ratio_BT.detach().clamp(max=self.cispo_max_weight)
            loss_BT = -weights_BT * advantages_BT * torch.where(valid_BT, logprobs_BT, 0.0)
            return loss_BT, valid_BT & (ratio_BT.detach() > self.cispo_max_weight)
        temperatures_BT = torch.where(advantages_BT > 0, self.sapo_temperature_pos, self.sapo_temperature_neg)
        gate_BT = torch.sigmoid(temperatures_BT * (ratio_BT - 1)) * 4 / temperatures_BT
        return torch.where(valid_BT, -advantages_BT * gate_BT, 0.0), torch.zeros_like(valid_BT)


def token_values(outputs_BT1: torch.Tensor) -> torch.Tensor:
    """A value head's outputs aligned with ``input_ids`` like ``token_logprobs``: ``values_BT[:, t]`` is V of the
    prefix before token t (the state in which token t was chosen), read at position t−1; column 0 is 0."""
    return torch.nn.functional.pad(outputs_BT1[:, :-1, 0].float(), (1, 0))


@dataclass(frozen=True)
class ValueLoss:
    """The critic's loss on one micro-batch: L = Σ_t w_t · ½ max((V_t − R_t)², (V^clip_t − R_t)²), the clipped value
    loss of ``clipped_value_loss`` with the step's aggregation weights w. Its input is the value head's output
    (B, T, 1), not vocabulary logits. Metrics (additive over micro-batches): ``value_loss``,
    ``value_clip_fraction``, ``value_mean``."""

    clip: float = 0.2

    def __call__(self, outputs_BT1: torch.Tensor, batch: ValueBatch) -> tuple[torch.Tensor, dict[str, float]]:
        weights_BT = batch.loss_weights_BT
        values_BT = token_values(outputs_BT1)
        old_BT, returns_BT = batch.old_values_BT, batch.returns_BT
        clipped_values_BT = old_BT + (values_BT - old_BT).clamp(-self.clip, self.clip)
        unclipped_BT = (values_BT - returns_BT) ** 2
        clipped_BT = (clipped_values_BT - returns_BT) ** 2
        is_clipped_BT = clipped_BT > unclipped_BT
        loss = _weighted_sum(0.5 * torch.where(is_clipped_BT, clipped_BT, unclipped_BT), weights_BT)
        metrics = {
            "value_loss": loss.item(),
            "value_clip_fraction": _weighted_sum(is_clipped_BT.float(), weights_BT).item(),
            "value_mean": _weighted_sum(values_BT.detach(), weights_BT).item(),
        }
        return loss, metrics


def _clipped_surrogate(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    valid_BT: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and where a clip is active; both 0 / False off ``valid_BT``.

    Invalid tokens are zeroed before the exponential, so garbage there can reach neither the loss nor a gradient.
    """
    log_ratio_BT = torch.where(valid_BT, logprobs_BT - old_logprobs_BT.detach(), 0.0)
    advantages_BT = torch.where(valid_BT, advantages_BT.detach(), 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    is_clipped_BT = clipped_BT > unclipped_BT
    loss_BT = torch.where(is_clipped_BT, clipped_BT, unclipped_BT)
    if dual_clip is not None:
        bound_BT = -advantages_BT * dual_clip
        is_dual_clipped_BT = (advantages_BT < 0) & (loss_BT > bound_BT)
        loss_BT = torch.where(is_dual_clipped_BT, bound_BT, loss_BT)
        is_clipped_BT = is_clipped_BT | is_dual_clipped_BT
    return loss_BT, is_clipped_BT


def _token_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of the policy's distribution over token t, aligned with ``input_ids`` (column 0 is 0)."""
    return torch.nn.functional.pad(entropy_from_logits(logits_BTV[:, :-1]), (1, 0))


def _weighted_sum(x_BT: torch.Tensor, weights_BT: torch.Tensor) -> torch.Tensor:
    return torch.where(weights_BT != 0, x_BT * weights_BT, 0.0).sum()


def _valid_max(x_BT: torch.Tensor, valid_BT: torch.Tensor) -> float:
    """The largest of ``x_BT`` (not negative) on valid tokens; 0 without any."""
    return torch.where(valid_BT, x_BT, 0.0).max().item() if x_BT.numel() else 0.0


def _check_max_weight(max_weight: float) -> None:
    if not max_weight > 0:
        raise ValueError(f"the CISPO weight cap must be positive, got {max_weight}")


def _check_temperatures(temperature_pos: float, temperature_neg: float) -> None:
    if not (temperature_pos > 0 and temperature_neg > 0):
        raise ValueError(f"SAPO's temperatures must be positive, got {temperature_pos} and {temperature_neg}")


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (a bound on the ratio for negative advantages), got {dual_clip}")
