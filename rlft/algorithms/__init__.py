"""Pure tensor math shared by every role: no Ray, no I/O. The names the config selects by are in
``rlft.algorithms.config``, which imports no torch.

    advantages_BG = grpo_advantages(rewards_BG, scale="group")             # rlft.algorithms.advantages
    loss, metrics = PolicyLoss(kind="gspo")(logits_BTV, batch)              # rlft.algorithms.policy_loss
"""

from rlft import lazy_names

# Each name loads its module on first use, so importing ``rlft.algorithms.config`` (the config loader does) loads
# no torch.
_MODULE_OF = {
    "gae": "advantages",
    "grpo_advantages": "advantages",
    "reinforce_pp_advantages": "advantages",
    "reinforce_pp_baseline_advantages": "advantages",
    "rloo_advantages": "advantages",
    "sequence_to_token": "advantages",
    "aggregate": "aggregation",
    "aggregation_weights": "aggregation",
    "AggregationMode": "config",
    "DPO_LOSS_TYPES": "config",
    "ISLevel": "config",
    "KLKind": "config",
    "OffPolicyCorrection": "config",
    "PolicyLossKind": "config",
    "DPOLoss": "dpo",
    "PreferenceBatch": "dpo",
    "dpo_loss": "dpo",
    "kl_estimate": "kl",
    "check_off_policy_correction": "off_policy",
    "importance_weights": "off_policy",
    "importance_weights_by_token": "off_policy",
    "PolicyLoss": "policy_loss",
    "cispo_policy_loss": "policy_loss",
    "clipped_policy_loss": "policy_loss",
    "clipped_value_loss": "policy_loss",
    "entropy_from_logits": "policy_loss",
    "gspo_policy_loss": "policy_loss",
    "sapo_policy_loss": "policy_loss",
    "SFTLoss": "sft",
    "token_logprobs": "sft",
}

__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_names(__name__, _MODULE_OF)
