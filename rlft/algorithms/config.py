"""The names the loss and advantage math answers to, which the config selects by (``rl.*``, ``dpo.loss_type``).

Plain names, no torch: the config loader imports them from here (``rlft config show`` loads no torch), and the
math in this package checks its arguments against the same lists.
"""

from __future__ import annotations

from typing import Literal

# How a per-token loss becomes one number (``rlft.algorithms.aggregation``).
AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
# The per-token KL estimator (``rlft.algorithms.kl``).
KLKind = Literal["k1", "k2", "k3"]
# What GRPO divides group-centred rewards by (``rlft.algorithms.advantages``).
AdvantageScale = Literal["group", "batch", "none"]
# Critic-free advantage estimators (``rlft.algorithms.advantages``).
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
# The policy losses ``PolicyLoss`` computes (``rlft.algorithms.policy_loss``).
PolicyLossKind = Literal["ppo", "gspo", "cispo", "sapo"]
# Importance weights for the sampler ↔ learner gap, and their level (``rlft.algorithms.off_policy``).
OffPolicyCorrection = Literal["none", "tis", "mis"]
ISLevel = Literal["token", "sequence"]
# The preference losses (``rlft.algorithms.dpo``).
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero")
