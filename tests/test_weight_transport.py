"""Weights from the learner ranks to real vLLM-CPU workers, over both transports, with a hung peer and a rescale.

Two DeepSpeed ZeRO-3 learners (each parameter gathered in turn while the buckets fill) publish to two rollout
workers over the ``collective`` transport (a gloo weight group of learner rank 0 and the workers) and through the
object store. The workers must then score tokens exactly as the learners' weights do; the driver must see only
the handle; a stopped worker must turn into an error that names it, not a hang.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlft.algorithms import SFTLoss
from rlft.config import load_config
from rlft.data import formats
from rlft.data.packing import collate, normalize_loss_weights
from rlft.data.tokenize import tokenize_sft_examples
from rlft.distributed.weight_sync import iter_bucket_weights, receive_buckets
from rlft.errors import WeightSyncError
from rlft.learner import LearnerGroup
from rlft.rollout import RolloutConfig
from rlft.rollout.group import RolloutGroup
from rlft.tiny import resolve

# About 80 s: two learners, two vLLM workers, a stopped worker waited out.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

ROWS_PER_STEP = 8
BUCKET_BYTES = 256 * 1024  # small buckets, so a sync takes many broadcasts


@pytest.fixture(scope="module")
def roles(ray_cluster, tiny_model_dir):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "learner.zero_stage=3", "learner.num_learners=2",
        "learner.micro_batch_size_per_learner=4", f"trainer.global_batch_size={ROWS_PER_STEP}", "trainer.lr=1e-2",
        "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
    ])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = formats.load_examples(resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft,
                                     limit=ROWS_PER_STEP).examples
    rows, _, _ = tokenize_sft_examples(examples, tokenizer, max_seq_len=64)
    batch = normalize_loss_weights(collate(rows, tokenizer.pad_token_id))
    learners = LearnerGroup(cfg, total_steps=10)
    rollout_cfg = RolloutConfig(num_rollout_workers=2, num_cpus_per_worker=0.5, weight_transport="collective",
                                weight_sync_bucket_mib=BUCKET_BYTES / 2**20, weight_sync_timeout_s=8)
    rollout = RolloutGroup(tiny_model_dir, rollout_cfg)
    sequences = [row.input_ids for row in rows[:4]]
    yield learners, rollout, batch, sequences, tiny_model_dir
    rollout.shutdown()
    learners.shutdown()


def _learner_logprobs(weights: dict[str, torch.Tensor], model_dir: str, sequences) -> list[list[float]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    model.load_state_dict(weights, strict=False)
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            out.append(logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return out


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _worker_pid(rollout: RolloutGroup, slot: int) -> int:
    return rollout.workers.handles[slot].__ray_call__.remote(lambda _: os.getpid()).future().result(timeout=30)


def test_collective_and_object_store_carry_the_learners_weights(roles):
    """The first test of the module pays for ``roles``: a ZeRO-3 learner group of 2 ranks and 2 vLLM rollout workers
    (a minute or more on a loaded 2-core machine), which the other tests share."""
    learners, rollout, batch, sequences, model_dir = roles
    learners.train_step(batch, SFTLoss())
    stats = rollout.sync_from(learners, 1)
    assert rollout.policy_versions() == [1, 1]
    assert stats.transport == "collective" and stats.num_buckets > 3
    # The driver saw tables and versions, not weights.
    assert 0 < stats.driver_bytes < stats.num_bytes / 100

    weights = learners.export_weights()
    want = _learner_logprobs(weights, model_dir, sequences)
    got = rollout.token_logprobs(sequences)
    assert _max_gap(got, want) < 1e-4

    # The object-store path, gathered under ZeRO-3 the same way, holds the same tensors.
    handle = learners.publish_weights(1, "object_store", BUCKET_BYTES)
    published = dict(iter_bucket_weights(receive_buckets(handle)))
    assert published.keys() == weights.keys()
    assert all(torch.equal(published[name], weights[name]) for name in weights)


def test_added_worker_is_served_then_the_group_is_formed_again(roles):
    learners, rollout, batch, sequences, model_dir = roles
    rollout.resize(3)  # the new worker gets version 1 from the object store
    assert rollout.policy_versions() == [1, 1, 1]
    learners.train_step(batch, SFTLoss())
    rollout.sync_from(learners, 2)  # three workers now: a new weight group
    assert rollout.policy_versions() == [2, 2, 2]
    want = _learner_logprobs(learners.export_weights(), model_dir, sequences)
    # Three sequences per worker: each worker scores its own share.
    spread = sequences[:3] * 3
    got = rollout.token_logprobs(spread)
    assert _max_gap(got, want[:3] * 3) < 1e-4
    rollout.resize(2)


def test_a_hung_worker_is_named_not_waited_for_forever(roles):
    learners, rollout, batch, sequences, model_dir = roles
    pid = _worker_pid(rollout, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(WeightSyncError, match=r": rollout worker 1 did not finish within \d+ s") as err:
            rollout.sync_from(learners, 3)
        assert err.value.pending == ["rollout worker 1"]
    finally:
        os.kill(pid, signal.SIGCONT)
    # The group is formed again and the next sync goes through.
    rollout.sync_from(learners, 4)
    assert rollout.policy_versions() == [4, 4]
