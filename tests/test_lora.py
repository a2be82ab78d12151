"""LoRA (``model.lora``): the learners train adapters only, under every ZeRO stage; checkpoints and final models hold
the adapter; the reference is the base model with the adapter disabled; the config is checked before any actor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, run_rlft
from rlft.algorithms import SFTLoss
from rlft.algorithms.sft import token_logprobs
from rlft.config import ConfigError, load_config
from rlft.data import formats
from rlft.data.packing import collate, normalize_loss_weights
from rlft.data.tokenize import tokenize_sft_examples
from rlft.learner import LearnerGroup
from rlft.learner.lora import check_target_modules
from rlft.metrics import read_metrics
from rlft.tiny import resolve

NUM_STEPS = 3
ROWS_PER_STEP = 16
RANK = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(model_dir: str, stage: int, *extra: str):
    return load_config(None, [
        f"model.path={model_dir}",
        f"learner.zero_stage={stage}",
        "learner.num_learners=2",
        "learner.micro_batch_size_per_learner=4",
        f"trainer.global_batch_size={ROWS_PER_STEP}",
        "trainer.lr=1e-2",
        "trainer.warmup_steps=0",
        "trainer.lr_scheduler=constant",
        f"model.lora.rank={RANK}",
        f"model.lora.target_modules=[{','.join(TARGETS)}]",
        "model.lora.save_merged=true",
        *extra,
    ])


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = formats.load_examples(resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft,
                                   limit=ROWS_PER_STEP * NUM_STEPS)
    rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
    return [normalize_loss_weights(collate(rows[i : i + ROWS_PER_STEP], tokenizer.pad_token_id))
            for i in range(0, len(rows), ROWS_PER_STEP)]


@dataclass
class LoraRun:
    losses: list[float]
    trainable: int
    total: int
    adapter: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor]
    policy_BT: torch.Tensor
    reference_BT: torch.Tensor
    final_dir: Path


def _train(model_dir: str, stage: int, batches, out_dir: Path) -> LoraRun:
    group = LearnerGroup(_config(model_dir, stage), total_steps=NUM_STEPS)
    try:
        losses = [group.train_step(b, SFTLoss()).metrics["loss"] for b in batches]
        probe = batches[0].rows(0, 6)
        return LoraRun(losses, group.num_trainable_parameters, group.num_parameters, group.export_weights(),
                       group.export_weights(adapter=False), group.compute_logprobs(batches[0]),
                       group.reference().logprobs(probe), group.save_pretrained(out_dir))
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def lora_runs(ray_cluster, tiny_model_dir, batches, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return {stage: _train(tiny_model_dir, stage, batches, out / f"stage{stage}") for stage in (0, 1, 2, 3)}


@pytest.mark.slow  # lora_runs starts 4 DeepSpeed groups of 2 ranks (ZeRO 0-3)
@pytest.mark.ray
def test_only_the_adapters_train_under_every_zero_stage(lora_runs, tiny_model_dir):
    """Only the LoRA adapters change, under ZeRO 0-3. Over 60 s: the first test to ask for ``lora_runs`` pays for it
    (four LoRA learner groups of 2 ranks, 3 steps each)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = base.config
    per_layer = sum(RANK * (module.in_features + module.out_features)
                    for name, module in base.model.layers[0].named_modules() if name.rpartition(".")[2] in TARGETS)
    initial = dict(base.named_parameters())
    for stage, run in lora_runs.items():
        assert run.trainable == per_layer * config.num_hidden_layers, stage
        assert run.total == sum(p.numel() for p in initial.values()) + run.trainable, stage
        assert run.losses[-1] < run.losses[0], (stage, run.losses)
        assert run.losses == pytest.approx(lora_runs[0].losses, rel=1e-4), stage
        assert len(run.adapter) == 2 * len(TARGETS) * config.num_hidden_layers
        assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in run.adapter)
        assert any(t.abs().max() > 0 for n, t in run.adapter.items() if "lora_B" in n), "B stayed 0: nothing trained"
        for name, tensor in run.adapter.items():
            torch.testing.assert_close(tensor, lora_runs[0].adapter[name], rtol=1e-3, atol=1e-4)
        # The merged weights carry the base model's names; the frozen ones are the base model's own, bit for bit.
        assert run.merged.keys() == initial.keys()
        for name, tensor in run.merged.items():
            adapted = name.rpartition(".")[0].rpartition(".")[2] in TARGETS
            if not adapted:
                assert torch.equal(tensor, initial[name].detach()), (stage, name)
        assert any(not torch.equal(t, initial[n].detach()) for n, t in run.merged.items())


@pytest.mark.slow
@pytest.mark.ray
def test_reference_is_the_base_model_with_the_adapter_off(lora_runs, batches, tiny_model_dir):
    probe = batches[0].rows(0, 6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected_BT = token_logprobs(base(**probe.model_inputs()).logits, probe.input_ids_BT) * probe.attention_mask_BT
    for stage, run in lora_runs.items():
        torch.testing.assert_close(run.reference_BT, expected_BT, rtol=0, atol=1e-5, msg=lambda m: f"{stage}: {m}")
        # The policy's log-probabilities moved away from it (the adapter is on there).
        assert (run.policy_BT[:6] - expected_BT).abs().max() > 1e-3, stage


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("stage", [0, 3])
def test_final_model_is_a_peft_adapter_and_a_merged_model(lora_runs, batches, tiny_model_dir, stage):
    from peft import PeftModel

    run = lora_runs[stage]
    assert (run.final_dir / "adapter_config.json").exists() and not (run.final_dir / "model.safetensors").exists()
    probe = batches[1].rows(0, 4)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.final_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(run.final_dir / "merged").eval()
    with torch.no_grad():
        logits_peft = adapted(**probe.model_inputs()).logits
        logits_merged = merged(**probe.model_inputs()).logits
    mask_BT = probe.attention_mask_BT.bool()
    torch.testing.assert_close(logits_merged[mask_BT], logits_peft[mask_BT], rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(run.final_dir).chat_template


@pytest.mark.slow
@pytest.mark.ray
def test_checkpoint_holds_the_adapter_and_resumes_exactly(ray_cluster, tiny_model_dir, batches, tmp_path):
    """ZeRO-3: two steps, checkpoint, a third; a fresh group restored from the checkpoint takes the same third step."""
    cfg = _config(tiny_model_dir, 3)
    group = LearnerGroup(cfg, total_steps=NUM_STEPS)
    try:
        for b in batches[:2]:
            group.train_step(b, SFTLoss())
        ckpt = group.save_checkpoint(tmp_path / "step_000002", {"step": 2})
        straight = group.train_step(batches[2], SFTLoss()).metrics
        straight_adapter = group.export_weights()
    finally:
        group.shutdown()
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    # The frozen base weights are not in the checkpoint: it is smaller than the model's weights alone.
    model_bytes = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) < model_bytes

    resumed = LearnerGroup(cfg, total_steps=NUM_STEPS)
    try:
        assert resumed.load_checkpoint(ckpt) == {"step": 2}
        again = resumed.train_step(batches[2], SFTLoss()).metrics
        again_adapter = resumed.export_weights()
    finally:
        resumed.shutdown()
    assert again["loss"] == straight["loss"] and again["grad_norm"] == straight["grad_norm"]
    assert all(torch.equal(again_adapter[n], t) for n, t in straight_adapter.items())


def test_target_modules_the_model_lacks_are_named(tiny_model_dir):
    cfg = load_config(None, ["model.lora.rank=8", "model.lora.target_modules=[q_proj,qkv_proj]"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: .* no linear module named 'qkv_proj'"):
        check_target_modules(tiny_model_dir, cfg.model.lora)
    with pytest.raises(ConfigError, match=r"model.lora.layers: .* has \d+ layers"):
        check_target_modules(tiny_model_dir, load_config(None, ["model.lora.rank=8", "model.lora.layers=[0,99]"]).model.lora)
    check_target_modules(tiny_model_dir, load_config(None, ["model.lora.rank=8", "model.lora.layers=[0]"]).model.lora)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.rank=-1"], "model.lora.rank: must not be negative"),
    (["model.lora.rank=8", "model.lora.alpha=0"], "model.lora.alpha: must be positive"),
    (["model.lora.rank=8", "model.lora.dropout=1.0"], r"model.lora.dropout: must be in \[0, 1\)"),
    (["model.lora.rank=8", "model.lora.target_modules=[]"], "model.lora.target_modules: names no module"),
    (["algorithm=grpo", "model.lora.rank=8", "model.lora.sync=adapter", "rollout.engine=hf"],
     "model.lora.sync: adapter sync needs rollout.engine=vllm"),
    (["algorithm=online_dpo", "model.lora.rank=8", "dpo.ref_update_every_n_steps=5", "rl.num_prompts_per_step=64"],
     "dpo.ref_update_every_n_steps: with model.lora"),
])
def test_lora_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_target_module_stops_rlft_train_before_any_actor(tmp_path):
    out = tmp_path / "run"
    proc = run_rlft("train", str(ROOT / "configs/grpo_tiny.yaml"), "model.path=tiny://model", "model.lora.rank=8",
                    "model.lora.target_modules=[q_proj,c_attn]", f"logging.output_dir={out}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "model.lora.target_modules" in proc.stderr and "'c_attn'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- end to end


# The LoRA runs of SFT and online DPO run every role in the driver's process (``ray.local_mode``, one learner):
# what they check is LoRA's, and the same code runs under Ray in the GRPO runs above and in each algorithm's own
# tests; a process with no Ray cluster to start takes about half the time. (PPO's critic needs a process of its own.)
IN_PROCESS = ["ray.local_mode=true", "learner.num_learners=1"]


def _lora_grpo_args(sft_demo_run, fixed_prompts, out: Path, *extra: str) -> list[str]:
    return [
        "train", str(ROOT / "configs/grpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        "model.lora.rank=16",
        "model.lora.alpha=32",
        "rl.kl_coef=0.01",
        "trainer.max_steps=4",
        "trainer.lr=2e-3",
        "trainer.warmup_steps=0",
        "checkpoint.every_n_steps=2",
        "eval.num_examples=50",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_grpo_run(sft_demo_run, fixed_prompts, tmp_path_factory) -> Path:
    assert sft_demo_run.proc.returncode == 0, sft_demo_run.proc.stderr[-3000:]
    work = tmp_path_factory.mktemp("lora_grpo")
    proc = run_rlft(*_lora_grpo_args(sft_demo_run, fixed_prompts, work / "run"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "run"


@pytest.mark.slow
@pytest.mark.ray
def test_grpo_with_lora_syncs_the_adapter_to_vllm(lora_grpo_run, sft_demo_run):
    """vLLM serves the adapter it receives (LoRARequest): its log-probabilities match the learners'."""
    from safetensors.torch import load_file

    steps = [r for r in read_metrics(lora_grpo_run / "metrics.jsonl") if "reward/mean" in r]
    assert len(steps) == 4
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in steps), [r["sync/logprob_max_abs_diff"] for r in steps]
    assert all(r["train/kl"] >= 0 for r in steps) and steps[-1]["train/kl"] > 0  # the policy left the base model
    adapter = load_file(lora_grpo_run / "final_model/adapter_model.safetensors")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    full_bytes = sum(t.numel() * t.element_size()
                     for t in AutoModelForCausalLM.from_pretrained(sft_demo_run.output_dir / "final_model").parameters())
    assert all(r["sync/bytes"] == adapter_bytes for r in steps)
    assert adapter_bytes < full_bytes / 5


@pytest.mark.slow
@pytest.mark.ray
def test_resumed_lora_run_continues_exactly(lora_grpo_run, sft_demo_run, fixed_prompts, tmp_path):
    """``lora_grpo_run``'s job again from its step-2 checkpoint (``checkpoint.resume``): a whole job's start and two
    steps. Steps 3-4 equal the straight run's, and the final adapters are bit-identical."""
    out = tmp_path / "resumed"
    proc = run_rlft(*_lora_grpo_args(sft_demo_run, fixed_prompts, out,
                                     f"checkpoint.resume={lora_grpo_run / 'checkpoints/step_000002'}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight = {r["step"]: r for r in read_metrics(lora_grpo_run / "metrics.jsonl") if "reward/mean" in r}
    resumed = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "train/policy_loss", "train/kl", "train/grad_norm"):
            assert resumed[step][key] == straight[step][key], (step, key)
    from safetensors.torch import load_file

    a = load_file(lora_grpo_run / "final_model/adapter_model.safetensors")
    b = load_file(out / "final_model/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sft_with_lora_under_zero3_writes_adapter_and_merged_model(tmp_path):
    """With gradient checkpointing: the frozen embedding's output is made to carry gradients to the adapters. In
    one process, so the evaluator loads its model whole beside a ZeRO-3 learner (which partitions only its own)."""
    out = tmp_path / "run"
    proc = run_rlft("train", str(ROOT / "configs/sft_tiny.yaml"), *IN_PROCESS, "learner.zero_stage=3",
                    "model.lora.rank=8", "model.gradient_checkpointing=true",
                    "model.lora.save_merged=true", "trainer.max_steps=20", "eval.num_examples=20",
                    "logging.wandb=false", f"logging.output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(out / "metrics.jsonl")
    first = next(r for r in records if "model/num_parameters" in r)
    assert 0 < first["model/num_trainable_parameters"] < first["model/num_parameters"] / 5
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0] * 0.9, losses
    assert (out / "final_model/adapter_model.safetensors").exists()
    assert (out / "final_model/merged/model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "final_model/merged").num_parameters() > 0


@pytest.mark.slow
@pytest.mark.ray
def test_dpo_with_lora_needs_no_reference_server(sft_demo_run, tmp_path):
    """The reference sums come from the learners with the adapter off: no reference actor starts."""
    out = tmp_path / "run"
    proc = run_rlft("train", str(ROOT / "configs/dpo_tiny.yaml"),
                    f"model.path={sft_demo_run.output_dir / 'final_model'}", "model.lora.rank=16",
                    "model.lora.alpha=32", "trainer.lr=3e-3", "trainer.max_steps=10", f"dpo.cache_dir={tmp_path / 'cache'}",
                    "eval.num_examples=20", "dpo.eval_num_pairs=100", "logging.wandb=false",
                    f"logging.output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ReferenceWorker" not in proc.stderr + proc.stdout
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == 10 and steps[-1]["train/margin"] > 0, [r["train/margin"] for r in steps]
    evals = [r["eval/preference_accuracy"] for r in records if "eval/preference_accuracy" in r]
    assert evals[0] == 0 and evals[-1] > 0.5, evals  # policy = reference at the start: no pair is preferred
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # the learners' reference pass, cached
    assert (out / "final_model/adapter_model.safetensors").exists()


@pytest.mark.slow
def test_online_dpo_with_lora_syncs_the_adapter(sft_demo_run, fixed_prompts, tmp_path):
    """Online DPO with adapter sync, in one process: the rollout workers generate with the learners' adapter. (PPO
    with merged-weight sync, ``model.lora.sync=merged``, under Ray, is tests/test_learner_restart.py's PPO run.)"""
    out = tmp_path / "run"
    proc = run_rlft("train", str(ROOT / "configs/online_dpo_tiny.yaml"), *IN_PROCESS,
                    f"model.path={sft_demo_run.output_dir / 'final_model'}", f"data.train_path={fixed_prompts}",
                    "rl.num_prompts_per_step=32", "rl.num_samples_per_prompt=4", "trainer.max_steps=3",
                    "trainer.lr=2e-3", "trainer.global_batch_size=32",
                    "model.lora.rank=16", "model.lora.alpha=32", "model.lora.sync=adapter", "eval.num_examples=20",
                    "eval.every_n_steps=0", "logging.wandb=false", f"logging.output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(steps) == 3
    assert all(r["pairs/num"] > 0 and math.isfinite(r["train/loss"]) for r in steps)
    full_bytes = sum(t.numel() * t.element_size()
                     for t in AutoModelForCausalLM.from_pretrained(sft_demo_run.output_dir / "final_model").parameters())
    assert all(0 < r["sync/bytes"] < full_bytes / 5 for r in steps)
    assert (out / "final_model/adapter_model.safetensors").exists()
