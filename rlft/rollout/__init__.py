"""Rollout workers: sample responses (token ids + sampler logprobs) with vLLM or transformers, take new weights.

    group = RolloutGroup(model_path, cfg.rollout)                         # rlft.rollout.group
    samples = group.generate(prompt_token_ids, cfg.rollout.sampling, num_samples_per_prompt=8)
    stats = group.sync_from(learners, policy_version=1)   # the learners publish, the workers take the handle

This package's top level holds only the configuration and result types, so ``rlft.config`` can import them without
pulling in torch, Ray or vLLM.
"""

from rlft.rollout.config import RolloutConfig, SamplingConfig, validate_rollout_config
from rlft.data.samples import Completion, FinishReason, Sample

__all__ = ["Completion", "FinishReason", "RolloutConfig", "Sample", "SamplingConfig", "validate_rollout_config"]
