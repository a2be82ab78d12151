"""The reference server: real Ray actors, results equal to a direct forward pass, in row order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlft.algorithms import token_logprobs
from rlft.data import formats
from rlft.data.packing import collate
from rlft.data.tokenize import tokenize_sft_examples
from rlft.distributed.actors import DRIVER_INBOX
from rlft.reference import ReferenceConfig, ReferenceGroup
from rlft.tiny import resolve


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = formats.load_examples(resolve("tiny://reverse/sft_train.jsonl"), formats.parse_sft, limit=7)
    rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
    return collate(rows, tokenizer.pad_token_id)


def _direct(model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return token_logprobs(model(**batch.model_inputs()).logits, batch.input_ids_BT) * batch.attention_mask_BT


@pytest.mark.ray
def test_replicas_match_a_direct_forward(ray_cluster, tiny_model_dir, batch):
    expected = _direct(tiny_model_dir, batch)
    # 7 rows over 3 replicas (3 + 2 + 2), micro-batches of 2 inside each: order and padding must survive.
    group = ReferenceGroup(ReferenceConfig(num_replicas=3, num_cpus_per_replica=0.5, micro_batch_size=2), tiny_model_dir)
    try:
        got = group.logprobs(batch)
        # Kept in the object store for the learners: only references come back to the driver.
        before = DRIVER_INBOX.num_bytes
        kept = group.keep_logprobs(batch)
        assert DRIVER_INBOX.num_bytes - before < 1000
        assert [rows for _, rows in kept.parts] == [3, 2, 2]
        torch.testing.assert_close(kept.resolve(), got)
    finally:
        group.shutdown()
    assert got.shape == batch.input_ids_BT.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[batch.attention_mask_BT == 0] == 0).all()
    assert (got[:, 1:][batch.attention_mask_BT[:, 1:] == 1] < 0).all()


def test_in_process_replica(tiny_model_dir, batch):
    group = ReferenceGroup(ReferenceConfig(num_replicas=1, micro_batch_size=4), tiny_model_dir, local=True)
    torch.testing.assert_close(group.logprobs(batch), _direct(tiny_model_dir, batch), rtol=1e-5, atol=1e-5)
