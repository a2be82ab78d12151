"""The learner group: 2 DeepSpeed ranks in Ray actors over gloo, ZeRO 0-3, on the embedded tiny model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rlft.algorithms import SFTLoss
from rlft.config import load_config
from rlft.data import formats
from rlft.data.packing import collate, normalize_loss_weights
from rlft.data.tokenize import tokenize_sft_examples
from rlft.learner import LearnerGroup
from rlft.tiny import resolve

pytestmark = pytest.mark.ray

NUM_STEPS = 4
ROWS_PER_STEP = 16


def _config(model_dir: str, stage: int, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"learner.zero_stage={stage}",
            "learner.num_learners=2",
            "learner.micro_batch_size_per_learner=4",
            f"trainer.global_batch_size={ROWS_PER_STEP}",
            "trainer.lr=3e-3",
            "trainer.warmup_steps=0",
            "trainer.lr_scheduler=constant",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    """NUM_STEPS + 1 fixed global batches of SFT rows from the tiny arithmetic task."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = formats.load_examples(
        resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft, limit=ROWS_PER_STEP * (NUM_STEPS + 1)
    )
    rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
    return [
        normalize_loss_weights(collate(rows[i : i + ROWS_PER_STEP], tokenizer.pad_token_id))
        for i in range(0, len(rows), ROWS_PER_STEP)
    ]


@dataclass
class Run:
    metrics: list[dict]
    weights: dict[str, torch.Tensor]
    hf_dir: Path
    wrong_size_error: str


def _train(model_dir, stage, batches, out_dir: Path) -> Run:
    group = LearnerGroup(_config(model_dir, stage), total_steps=NUM_STEPS)
    try:
        metrics = [group.train_step(b, SFTLoss()).metrics for b in batches[:NUM_STEPS]]
        with pytest.raises(ValueError) as wrong_size:
            group.train_step(batches[0].rows(0, 8), SFTLoss())
        return Run(metrics, group.export_weights(), group.save_pretrained(out_dir), str(wrong_size.value))
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir, batches, tmp_path_factory):
    out = tmp_path_factory.mktemp("learner")
    return {stage: _train(tiny_model_dir, stage, batches, out / f"stage{stage}") for stage in (0, 1, 2, 3)}


@pytest.mark.slow  # the runs fixture starts a DeepSpeed group of 2 ranks per ZeRO stage
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls(runs, stage):
    """The first of the module's tests pays for ``runs``: a DeepSpeed group of 2 ranks per ZeRO stage, trained a few
    steps each, which the other tests share."""
    metrics = runs[stage].metrics
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] * 0.8, losses
    assert all(torch.isfinite(torch.tensor([m["grad_norm"] for m in metrics]))), metrics
    assert all(m["num_tokens"] > 0 for m in metrics)


@pytest.mark.slow  # the runs fixture starts a DeepSpeed group of 2 ranks per ZeRO stage
def test_stages_agree(runs):
    """Every ZeRO stage computes the same losses from the same start (gloo reductions are deterministic)."""
    reference = [m["loss"] for m in runs[0].metrics]
    for stage in (1, 2, 3):
        assert [m["loss"] for m in runs[stage].metrics] == pytest.approx(reference, rel=1e-4), stage


@pytest.mark.slow  # the runs fixture starts a DeepSpeed group of 2 ranks per ZeRO stage
def test_zero3_export_equals_zero0(runs, tiny_model_dir):
    """ZeRO-3 gathers its shards into the same full tensors that ZeRO-0 (replicated) training produced, up to
    float reduction order (Adam magnifies a 1e-7 gradient difference on parameters with tiny second moments)."""
    weights0, weights3 = runs[0].weights, runs[3].weights
    assert weights0.keys() == weights3.keys()
    for name, tensor in weights0.items():
        assert weights3[name].shape == tensor.shape, name
        torch.testing.assert_close(weights3[name], tensor, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    # And training changed them: the export is not the initial model.
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.allclose(initial[n], t) for n, t in weights0.items())


@pytest.mark.slow  # starts DeepSpeed groups of 2 ranks
def test_checkpoint_resume_gives_same_next_loss(ray_cluster, tiny_model_dir, batches, tmp_path):
    """Stop after two steps, restore into a fresh group: step three's loss equals the uninterrupted run's."""
    cfg = _config(tiny_model_dir, 2)
    group = LearnerGroup(cfg, total_steps=NUM_STEPS)
    try:
        for b in batches[:2]:
            group.train_step(b, SFTLoss())
        ckpt = group.save_checkpoint(tmp_path / "step_000002", {"step": 2, "data": {"epoch": 0, "index": 32}})
        straight = group.train_step(batches[2], SFTLoss()).metrics
    finally:
        group.shutdown()
    assert (ckpt / "model.safetensors").exists()
    assert not ckpt.with_name(ckpt.name + ".partial").exists()

    resumed_group = LearnerGroup(cfg, total_steps=NUM_STEPS)
    try:
        state = resumed_group.load_checkpoint(ckpt)
        resumed = resumed_group.train_step(batches[2], SFTLoss()).metrics
    finally:
        resumed_group.shutdown()
    assert state == {"step": 2, "data": {"epoch": 0, "index": 32}}
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-6)
    assert resumed["lr"] == straight["lr"]
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"], rel=1e-5)


@pytest.mark.slow  # the runs fixture starts a DeepSpeed group of 2 ranks per ZeRO stage
@pytest.mark.parametrize("stage", [0, 3])
def test_save_pretrained_loads_in_transformers(runs, stage):
    from transformers import AutoModelForCausalLM

    run = runs[stage]
    params = dict(AutoModelForCausalLM.from_pretrained(run.hf_dir).named_parameters())
    for name, tensor in run.weights.items():
        torch.testing.assert_close(params[name], tensor)
    assert AutoTokenizer.from_pretrained(run.hf_dir).chat_template


@pytest.mark.slow  # the runs fixture starts a DeepSpeed group of 2 ranks per ZeRO stage
def test_wrong_batch_size_is_rejected(runs):
    assert "must hold 16 rows" in runs[1].wrong_size_error


LOCAL_SCRIPT = """
import json, sys
from rlft.algorithms import SFTLoss
from rlft.config import load_config
from rlft.data import formats
from rlft.data.packing import collate, normalize_loss_weights
from rlft.data.tokenize import tokenize_sft_examples
from rlft.learner import LearnerGroup
from rlft.tiny import resolve
from transformers import AutoTokenizer

model_dir = resolve("tiny://model")
cfg = load_config(None, [f"model.path={model_dir}", "learner.num_learners=1", "learner.micro_batch_size_per_learner=8",
                         "trainer.global_batch_size=16", "trainer.lr=3e-3", "trainer.warmup_steps=0"])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
loaded = formats.load_examples(resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft, limit=16)
rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
batch = normalize_loss_weights(collate(rows, tokenizer.pad_token_id))
group = LearnerGroup(cfg, total_steps=5, local=True)
losses = [group.train_step(batch, SFTLoss()).metrics["loss"] for _ in range(5)]
group.shutdown()
import ray
print(json.dumps({"losses": losses, "ray_started": ray.is_initialized(),
                  "inductor_loaded": "functorch.compile" in sys.modules}))
"""


def test_in_process_learner_without_ray(tiny_model_dir):
    """The debugging backend: the same worker class in the driver's process, no Ray started. Its ZeRO-2 engine is
    built without loading torch's inductor (DeepSpeed's Muon module, imported by the ZeRO optimizer check, would
    ``torch.compile`` a kernel as it loads: about 2 CPU-seconds per learner)."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_SCRIPT], capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ray_started"] is False
    assert result["inductor_loaded"] is False
    assert result["losses"][-1] < result["losses"][0] * 0.7, result


def test_compiled_ops_are_cached_per_python_environment(monkeypatch, tmp_path):
    """A DeepSpeed op build records the paths of the environment that made it, so each Python environment keeps its
    builds in a directory of its own (two checkouts sharing one would rebuild each other's op at every switch);
    TORCH_EXTENSIONS_DIR, when set, wins."""
    import sys

    from rlft.learner.worker import extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("RLFT_CACHE_DIR", str(tmp_path))
    here = Path(extensions_dir())
    assert here.parent == tmp_path / "torch_extensions"
    assert Path(extensions_dir()) == here
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another" / ".venv"))
    elsewhere = Path(extensions_dir())
    assert elsewhere.parent == here.parent and elsewhere != here
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert extensions_dir() == str(tmp_path / "mine")


def test_in_process_backend_needs_one_learner(tiny_model_dir):
    cfg = _config(tiny_model_dir, 0)
    with pytest.raises(ValueError, match="learner.num_learners: the in-process"):
        LearnerGroup(cfg, total_steps=1, local=True)


def _long_tailed_policy_batch(tokenizer_dir: str):
    """A GRPO step's batch of 16 samples with long-tailed response lengths, the long ones all in the first rank's
    half: packed into rows of 64 tokens, rank 0's samples fill 4 rows and rank 1's 2 (then 2 empty ones)."""
    from rlft.algorithms import aggregation_weights
    from rlft.data.batch import policy_batch
    from rlft.rollout import Sample

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    gen = torch.Generator().manual_seed(0)
    lengths = [40, 30, 25, 20, 3, 2, 2, 1] + [2, 3, 1, 4, 2, 5, 3, 2]
    samples = []
    for response in lengths:
        ids = torch.randint(3, vocab, (8 + response,), generator=gen).tolist()
        samples.append(Sample(prompt_index=0, prompt_token_ids=ids[:8], response_token_ids=ids[8:],
                              response_logprobs=(-torch.rand(response, generator=gen) * 3).tolist(),
                              response_text="", finish_reason="stop", policy_version=0))
    batch = policy_batch(samples, torch.randn(len(samples), generator=gen), 0, 48)
    return dataclasses.replace(batch, loss_weights_BT=aggregation_weights(batch.loss_weights_BT != 0,
                                                                          "seq_mean_token_mean"))


@pytest.mark.slow  # starts DeepSpeed groups of 2 ranks
@pytest.mark.parametrize("stage", [2, 3])
def test_packed_micro_batches_step_like_padded_ones(ray_cluster, tiny_model_dir, stage):
    """``learner.max_tokens_per_micro_batch``: the ranks run as many micro-batches (one rank's short samples fill
    fewer rows; ZeRO-2 and -3 would hang otherwise), and the step's loss and gradient norm are the padded step's.
    The learning rate is tiny, so the weights barely move between the steps compared."""
    from rlft.algorithms import PolicyLoss

    cfg = load_config(None, [
        "algorithm=grpo", f"model.path={tiny_model_dir}", f"learner.zero_stage={stage}", "learner.num_learners=2",
        "learner.micro_batch_size_per_learner=4", f"trainer.global_batch_size={ROWS_PER_STEP}",
        "rl.num_prompts_per_step=2", "rl.num_samples_per_prompt=8", "rollout.max_model_len=48",
        "learner.max_tokens_per_micro_batch=64", "trainer.lr=1e-9", "trainer.warmup_steps=0",
        "trainer.lr_scheduler=constant", "trainer.max_grad_norm=0",
    ])
    batch = _long_tailed_policy_batch(tiny_model_dir)
    loss = PolicyLoss(kind="gspo", clip_low=0.2, clip_high=0.2, old_logprobs_from_update=True,
                      off_policy_correction="tis", is_level="sequence", is_cap=1.5, entropy_coef=0.01)
    group = LearnerGroup(cfg, total_steps=3)
    try:
        packed = group.train_step(batch, loss).metrics
        group.spec = dataclasses.replace(group.spec, max_tokens_per_micro_batch=0)  # the same ranks, padded
        padded = group.train_step(batch, loss).metrics
    finally:
        group.shutdown()
    assert padded["num_micro_batches"] == 2 * cfg.gradient_accumulation_steps  # summed over the 2 ranks
    assert packed["num_micro_batches"] == 2 * 4
    assert packed["padding_tokens"] == 2 and padded["padding_tokens"] == 63  # rank 1's 2 empty micro-batches
    for key in ("policy_loss", "entropy", "is_weight_mean", "grad_norm"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4), key
