"""Learners come back: a learner rank killed (SIGKILL) in the middle of a step restarts its whole group in the same
``rlft train`` process (``ray.max_learner_restarts``), from the run's latest checkpoint (GRPO, PPO with its critic,
DPO) or from the starting weights when there is none yet (SFT). The steps since are redone as a resumed run does
them, so every step is logged once and every computed metric equals, exactly, what the same job logs without the
kill. GRPO's restart, and a death beyond the budget that stops the job naming it,
are tests/test_grpo.py's resume test; DPO's restart is in ``dpo_runs``' second run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from cluster_helpers import kill_own_learner_in_train_step, rlft_popen, steps_logged, wait_until
from conftest import DPO_SECOND_RUN_STEPS, ROOT
from rlft.config import load_config
from rlft.metrics import MetricsLogger, read_metrics
from test_reproducibility import SFT_CONFIG, assert_same_metrics, assert_same_records, computed, steps_with_same_lr

QUIET = ["eval.num_examples=0", "logging.wandb=false", "logging.progress_bar=false"]

# GRPO on the untrained tiny model, 2 ZeRO-2 learner ranks; the reward (a digit anywhere in the completion) varies
# within groups, so the updates are not zero.
GRPO = [
    str(ROOT / "configs/grpo_tiny.yaml"),
    "model.path=tiny://model",
    'graders.items=[{name: digit, type: regex, pattern: "[0-9]"}]',
    "rl.num_prompts_per_step=16",
    "rl.num_samples_per_prompt=4",
    "trainer.global_batch_size=64",
    "learner.micro_batch_size_per_learner=32",
    "trainer.max_steps=4",
    "checkpoint.every_n_steps=2",
    *QUIET,
]

def test_metrics_log_rewind_keeps_each_step_once(tmp_path):
    """A rewind to step 2 drops what was logged after it (train and evaluation records); the redone steps follow."""
    cfg = load_config(None, [f"logging.output_dir={tmp_path}", "logging.wandb=false"])
    log = MetricsLogger(cfg)
    log.log(0, {"data/rows": 10}, console=False)
    for step in (1, 2, 3, 4):
        log.log(step, {"train/loss": float(step)}, console=False)
    log.log(4, {"eval/accuracy": 0.5}, console=False)
    log.rewind(2)
    for step in (3, 4):
        log.log(step, {"train/loss": 10.0 * step}, console=False)
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r.get("train/loss") for r in records] == [None, 1.0, 2.0, 30.0, 40.0]


def _train_records(run: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if key in r]


def run_killed(args: list[str], out: Path, tmp_path: Path, ready, what: str) -> str:
    """``rlft train ARGS``; once ``ready()``, one learner rank is killed in its next ``train_step``. The run's log."""
    log = tmp_path / "killed.log"
    proc = rlft_popen("train", *args, f"logging.output_dir={out}", cwd=tmp_path, log=log)
    try:
        wait_until(ready, what, proc=proc, log=log)
        kill_own_learner_in_train_step(proc)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    return log.read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_sft_learner_killed_before_any_checkpoint_starts_again_from_step_0(sft_demo_run, tmp_path):
    """The SFT demo's first 8 steps (configs/sft_tiny.yaml, inside its warm-up, so the learning rate does not depend
    on the run's length), without evaluation or checkpoints, and a learner rank killed in step 2. No checkpoint
    yet: the restarted ranks start from the model's weights and the data from its first batch. Every computed
    metric of the redone steps equals the demo's: this is also the check that the same seed gives the same SFT run
    (data order, losses, gradient norms, learning rates), and that evaluating does not disturb training."""
    assert sft_demo_run.proc.returncode == 0, sft_demo_run.proc.stderr[-3000:]
    steps = 8
    assert steps_with_same_lr(load_config(SFT_CONFIG).trainer, steps) == steps
    sft = [str(SFT_CONFIG), f"trainer.max_steps={steps}", "checkpoint.every_n_steps=0", *QUIET]
    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"

    def after_step_1() -> bool:
        return metrics.exists() and any('"train/loss"' in line and json.loads(line)["step"] >= 1
                                        for line in metrics.read_text().splitlines() if line.endswith("}"))

    output = run_killed(sft, out, tmp_path, after_step_1, "step 1")
    assert "learner restart 1 of 1 (ray.max_learner_restarts): a learner actor died: learners rank " in output
    assert "every rank starts again, from the starting weights at step 0" in output
    restarts = [r["faults/learner_restarts"] for r in _train_records(out, "train/loss")]
    assert restarts == [1] * steps, restarts
    keys = assert_same_metrics(sft_demo_run.output_dir, out, steps, evaluations=False,
                               ignore=frozenset({"faults/learner_restarts"}))
    assert {"data/train_rows", "train/loss", "train/grad_norm", "train/lr", "train/num_tokens"} <= keys


# PPO on the untrained tiny model: 2 learner and 2 critic ranks (the same actor class, so either may be killed);
# a checkpoint at step 3 (and the final one at 6). The policy trains a LoRA adapter and sends the rollout worker
# whole merged weights (``model.lora.sync=merged``, the fallback for engines without LoRA kernels); the critic is
# a full model.
PPO = [
    str(ROOT / "configs/ppo_tiny.yaml"),
    *[arg for arg in GRPO[1:] if not arg.startswith(("trainer.max_steps=", "checkpoint.every_n_steps="))],
    "rl.num_prompts_per_step=8",
    "trainer.global_batch_size=32",
    "learner.micro_batch_size_per_learner=16",
    "trainer.max_steps=6",
    "trainer.lr=2e-3",
    "checkpoint.every_n_steps=3",
    "model.lora.rank=16",
    "model.lora.alpha=32",
    "model.lora.sync=merged",
]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_ppo_learner_or_critic_killed_restarts_both_groups(tiny_model_dir, tmp_path):
    """PPO's critic is a second learner group. Once steps 4 and 5 are logged (after the step-3 checkpoint), a rank
    is killed in step 6: whichever it is, both groups start again from the step-3 checkpoint (the policy's LoRA
    adapter and the critic), and the redone steps 4 and 5 log what they logged before the kill (the same samples,
    values, losses and updates), as the uninterrupted run would. The rollout worker generates with the learners'
    policy throughout, before and after the restart: its log-probabilities match theirs, from whole merged weights.
    (About two minutes: the job's start, six steps and the restarted groups' start.)"""
    out = tmp_path / "killed"
    checkpoint = out / "checkpoints/step_000003"
    before: list[dict] = []

    def after_step_5() -> bool:
        before[:] = [r for r in steps_logged(out / "metrics.jsonl") if r["step"] in (4, 5)]
        return len(before) == 2

    output = run_killed(PPO, out, tmp_path, after_step_5, "step 5")
    assert "learner restart 1 of 1 (ray.max_learner_restarts): a learner actor died: " in output
    assert f"every rank starts again, from checkpoint {checkpoint}" in output
    after = _train_records(out, "critic/value_loss")
    assert [r["step"] for r in after] == list(range(1, 7))
    assert [r["faults/learner_restarts"] for r in after] == [0, 0, 0, 1, 1, 1]
    keys = assert_same_records([computed(r) for r in before], [computed(r) for r in after[3:5]],
                               ignore=frozenset({"faults/learner_restarts"}), what="(before the kill, redone)")
    assert {"critic/value_loss", "train/policy_loss", "reward/mean", "rollout/response_tokens_mean"} <= keys
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in after), [r["sync/logprob_max_abs_diff"] for r in after]
    model_bytes = sum(t.numel() * t.element_size()
                      for t in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert all(r["sync/bytes"] == model_bytes for r in after), [r["sync/bytes"] for r in after]
    assert (out / "final_model/adapter_model.safetensors").exists()


@pytest.mark.slow
def test_dpo_learner_killed_mid_step_is_restarted_from_the_checkpoint(dpo_runs):
    """Offline DPO (reference sums from the on-disk cache): ``dpo_runs``' second run checkpoints every 2 steps and
    has a learner rank killed in a step after the step-2 checkpoint (its steps are short, so which one is left to
    chance). The run goes back to the latest checkpoint, and the redone steps log the same pairs, losses and margins
    as the first run (``test_reproducibility.py::test_dpo_same_seed_same_metrics`` compares every step)."""
    output = dpo_runs.second_log
    assert "learner restart 1 of 1 (ray.max_learner_restarts): a learner actor died: learners rank " in output
    assert f"every rank starts again, from checkpoint {dpo_runs.second / 'checkpoints/step_00000'}" in output
    steps = [r for r in read_metrics(dpo_runs.second / "metrics.jsonl") if "train/margin" in r]
    assert [r["step"] for r in steps] == list(range(1, DPO_SECOND_RUN_STEPS + 1))
    assert steps[-1]["faults/learner_restarts"] == 1
