"""The GPU weight transports on one CUDA GPU: a DeepSpeed learner (NCCL) and a vLLM rollout worker sharing it.
``collective`` broadcasts over an NCCL weight group (vLLM's stateless group); ``cuda_ipc`` opens the learner's
buffers in place. After each, the worker scores tokens as the learner's weights do. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlft.config import load_config
from rlft.learner import LearnerGroup
from rlft.rollout import RolloutConfig
from rlft.rollout.group import RolloutGroup

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.vllm]


@pytest.mark.parametrize("transport", ["collective", "cuda_ipc"])
def test_gpu_transport_carries_the_learners_weights(ray_cluster, tiny_model_dir, transport):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "learner.num_learners=1", "learner.num_gpus_per_learner=0.4",
        "learner.micro_batch_size_per_learner=1", "trainer.global_batch_size=1",
    ])
    learners = LearnerGroup(cfg, total_steps=1)
    rollout = RolloutGroup(tiny_model_dir, RolloutConfig(num_gpus_per_worker=0.4, gpu_memory_utilization=0.2,
                                                         weight_transport=transport, weight_sync_timeout_s=60))
    try:
        weights = {name: t.clone() for name, t in learners.export_weights().items()}
        stats = rollout.sync_from(learners, 1)
        assert stats.transport == transport and rollout.policy_versions() == [1]
        assert stats.driver_bytes < stats.num_bytes / 100
        sequences = [[1, 5, 9, 13, 17, 21], [2, 4, 6, 8]]
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            for seq, got in zip(sequences, rollout.token_logprobs(sequences)):
                ids = torch.tensor([seq])
                want = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                assert max(abs(a - b) for a, b in zip(got, want.tolist())) < 1e-3
    finally:
        rollout.shutdown()
        learners.shutdown()
