"""Preference losses of the DPO family, on summed sequence log-probabilities.

Public API:

- ``dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, loss_type,
  label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, simpo_gamma=0.5, bco_delta=None, rpo_alpha=0.0)
  -> (losses_B, chosen_rewards_B, rejected_rewards_B)``
- ``DPO_LOSS_TYPES``: the ``loss_type`` names (defined in ``rlft.algorithms.config``, which loads without torch).
- ``PreferenceBatch`` (a ``TokenBatch`` of chosen/rejected row pairs) and ``DPOLoss``, the learner's loss on it.

Inputs are per pair (shape ``B``): ``*_logps`` is the sum over the response's tokens of log π(token), for the
chosen and the rejected response, under the policy and under the frozen reference. ``*_lengths`` are the responses'
token counts (needed by ``simpo``, ``ipo`` uses them when given, and the RPO term). Write

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))      (the implicit reward margin, over β)
    r_c = β (log π(y_c) − log π_ref(y_c)),   r_r = β (log π(y_r) − log π_ref(y_r))

and σ the logistic function. Losses, one per pair (mean them for the batch loss):

- ``sigmoid``: −(1 − ε) log σ(β h) − ε log σ(−β h). Rafailov et al. 2023, "Direct Preference Optimization",
  arXiv:2305.18290; ε = ``label_smoothing`` > 0 is conservative DPO (cDPO, Mitchell 2023).
- ``robust``: [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε), unbiased under label noise ε. Chowdhury et al.
  2024, "Provably Robust DPO", arXiv:2403.00409.
- ``ipo``: (h − 1/(2β))², with per-token mean log-probabilities in h when lengths are given (as the paper's
  derivation assumes). Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036.
- ``hinge``: max(0, 1 − β h). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
  arXiv:2305.10425.
- ``simpo``: −(1 − ε) log σ(β m − γ) − ε log σ(−(β m − γ)), m = log π(y_c)/|y_c| − log π(y_r)/|y_r|,
  γ = ``simpo_gamma``; reference-free (the reference log-probabilities are ignored and may be None); rewards are
  β log π(y)/|y|. Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734.
- ``nca_pair``: −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r). Chen et al. 2024, "Noise Contrastive Alignment of
  Language Models with Explicit Rewards", arXiv:2402.05369.
- ``bco_pair``: −log σ(r_c − δ) − log σ(−(r_r − δ)), δ = ``bco_delta`` (default: the mean of this batch's r_c
  and r_r, without gradient; trainers usually pass a running mean). Jung et al. 2024, "Binary Classifier
  Optimization for Large Language Model Alignment", arXiv:2404.04656.
- ``sppo_hard``: (a − 1/(2β))² + (b + 1/(2β))², a and b the chosen and rejected log-ratios. Wu et al. 2024,
  "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675 (hard labels: the winner's
  probability 1).
- ``apo_zero``: 1 − σ(r_c) + σ(r_r): raise the chosen likelihood, lower the rejected. D'Oosterlinck et al. 2024,
  "Anchored Preference Optimization and Contrastive Revisions", arXiv:2408.06266.

``rpo_alpha`` > 0 adds α · NLL(y_c) = −α log π(y_c)/|y_c| to every loss (RPO: Pang et al. 2024, "Iterative
Reasoning Preference Optimization", arXiv:2404.19733), which needs ``chosen_lengths``.

``chosen_rewards`` and ``rejected_rewards`` are returned without gradient; the preference accuracy of a batch is
``(chosen_rewards > rejected_rewards).float().mean()`` and the margin ``(chosen_rewards − rejected_rewards).mean()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlft.algorithms.sft import token_logprobs
from rlft.algorithms.config import DPO_LOSS_TYPES
from rlft.data.batch import TokenBatch


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    bco_delta: float | torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of ``loss_type`` and the implicit rewards of the chosen and rejected responses."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    needs_lengths = loss_type == "simpo" or rpo_alpha > 0
    if needs_lengths and (chosen_lengths is None or (loss_type == "simpo" and rejected_lengths is None)):
        raise ValueError(f"{'simpo' if loss_type == 'simpo' else 'rpo_alpha > 0'} needs the response lengths")
    eps = label_smoothing

    if loss_type == "simpo":
        chosen_mean = policy_chosen_logps / chosen_lengths
        rejected_mean = policy_rejected_logps / rejected_lengths
        z = beta * (chosen_mean - rejected_mean) - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{loss_type} needs the reference log-probabilities")
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        h = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            if chosen_lengths is not None and rejected_lengths is not None:
                h = chosen_ratio / chosen_lengths - rejected_ratio / rejected_lengths
            losses = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * h)
        elif loss_type == "nca_pair":
            losses = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "bco_pair":
            delta = bco_delta
            if delta is None:
                delta = torch.cat([chosen_rewards, rejected_rewards]).mean().detach()
            losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
        elif loss_type == "sppo_hard":
            losses = (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
        else:  # apo_zero
            losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)

    if rpo_alpha > 0:
        losses = losses - rpo_alpha * policy_chosen_logps / chosen_lengths
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ---------------------------------------------------------------------------------------------------------------
# The learner's side: a batch of pairs and the loss over it.


@dataclass
class PreferenceBatch(TokenBatch):
    """Pairs as consecutive rows: row 2i is pair i's chosen sequence, row 2i+1 its rejected one (splits into
    micro-batches and ranks keep pairs whole as long as every part has an even number of rows).

    ``loss_weights_BT`` is 1 on response tokens, 0 elsewhere. ``ref_logprobs_BT`` holds the reference model's
    log-probabilities of the response tokens (only their sum per row is used, so a cached per-row sum may stand on
    one response token). ``pair_weights_BT`` is the weight of pair i in the step's mean, in every column of row 2i
    (0 on rejected rows), so a micro-batch's loss share sums to the step's mean loss."""

    ref_logprobs_BT: torch.Tensor
    pair_weights_BT: torch.Tensor


@dataclass(frozen=True)
class DPOLoss:
    """``dpo_loss`` on a ``PreferenceBatch``: sequence log-probabilities summed over response tokens, the loss a
    weighted mean over pairs. Metrics are additive over micro-batches: ``loss``, ``accuracy`` (chosen reward >
    rejected), ``margin``, ``chosen_rewards``, ``rejected_rewards``, ``chosen_logps``, ``rejected_logps``."""

    beta: float
    loss_type: str
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0

    def __call__(self, logits_BTV: torch.Tensor, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask_BT = (batch.loss_weights_BT != 0).to(torch.float32)
        logps_B = (token_logprobs(logits_BTV, batch.input_ids_BT) * mask_BT).sum(dim=1)
        ref_B = (batch.ref_logprobs_BT * mask_BT).sum(dim=1)
        lengths_B = mask_BT.sum(dim=1).clamp(min=1)
        weights_P = batch.pair_weights_BT[0::2, 0]
        losses_P, chosen_P, rejected_P = dpo_loss(
            logps_B[0::2], logps_B[1::2], ref_B[0::2], ref_B[1::2],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=lengths_B[0::2],
            rejected_lengths=lengths_B[1::2],
            simpo_gamma=self.simpo_gamma,
            rpo_alpha=self.rpo_alpha,
        )
        loss = (losses_P * weights_P).sum()

        def mean(x_P: torch.Tensor) -> float:
            return (x_P.detach().float() * weights_P).sum().item()

        metrics = {
            "loss": loss.item(),
            "accuracy": mean((chosen_P > rejected_P).float()),
            "margin": mean(chosen_P - rejected_P),
            "chosen_rewards": mean(chosen_P),
            "rejected_rewards": mean(rejected_P),
            "chosen_logps": mean(logps_B[0::2]),
            "rejected_logps": mean(logps_B[1::2]),
        }
        return loss, metrics
