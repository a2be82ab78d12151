"""Pure tensor math shared by every role: no Ray, no I/O."""

from rlft.algorithms.advantages import (
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token,
)
from rlft.algorithms.aggregation import AggregationMode, aggregate, aggregation_weights
from rlft.algorithms.dpo import DPO_LOSS_TYPES, DPOLoss, PreferenceBatch, dpo_loss
from rlft.algorithms.kl import KLKind, kl_estimate
from rlft.algorithms.off_policy import (
    ISLevel,
    OffPolicyCorrection,
    check_off_policy_correction,
    importance_weights,
    importance_weights_by_token,
)
from rlft.algorithms.policy_loss import (
    PolicyLoss,
    PolicyLossKind,
    cispo_policy_loss,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gspo_policy_loss,
    sapo_policy_loss,
)
from rlft.algorithms.sft import SFTLoss, token_logprobs

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLoss",
    "PreferenceBatch",
    "AggregationMode",
    "ISLevel",
    "KLKind",
    "OffPolicyCorrection",
    "PolicyLoss",
    "PolicyLossKind",
    "SFTLoss",
    "aggregate",
    "aggregation_weights",
    "check_off_policy_correction",
    "cispo_policy_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "gspo_policy_loss",
    "importance_weights",
    "importance_weights_by_token",
    "kl_estimate",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "sapo_policy_loss",
    "sequence_to_token",
    "token_logprobs",
]
