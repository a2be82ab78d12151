"""DPO end to end on CPU (DeepSpeed learners, reference server actor, on-disk reference cache) and its parts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, run_rlft
from rlft.algorithms import DPOLoss, PreferenceBatch, dpo_loss
from rlft.config import ConfigError, load_config
from rlft.metrics import read_metrics

pytestmark = [pytest.mark.ray]


def test_dpo_loss_on_a_batch_is_the_weighted_mean_of_pair_losses():
    """Two pairs as four rows; logits built so that each row's response log-probability is known."""
    torch.manual_seed(0)
    logits_BTV = torch.randn(4, 5, 7)
    input_ids_BT = torch.randint(0, 7, (4, 5))
    mask_BT = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    ref_BT = torch.zeros(4, 5)
    ref_BT[:, 2] = torch.tensor([-1.0, -2.0, -1.5, -0.5])
    weights_BT = torch.zeros(4, 5)
    weights_BT[0::2] = 0.5
    batch = PreferenceBatch(input_ids_BT, torch.ones_like(input_ids_BT), torch.arange(5).expand(4, 5), mask_BT,
                            ref_BT * mask_BT, weights_BT)
    loss, metrics = DPOLoss(beta=0.2, loss_type="sigmoid")(logits_BTV, batch)
    logps_B = (torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, input_ids_BT[:, 1:, None])[..., 0]
               * mask_BT[:, 1:]).sum(1)
    ref_B = (ref_BT * mask_BT).sum(1)
    expected, chosen, rejected = dpo_loss(logps_B[0::2], logps_B[1::2], ref_B[0::2], ref_B[1::2], beta=0.2,
                                          loss_type="sigmoid")
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert metrics["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)


def test_dpo_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="dpo.loss_type: 'kto' is not one of sigmoid"):
        load_config(None, ["algorithm=dpo", "dpo.loss_type=kto"])
    with pytest.raises(ConfigError, match="dpo.beta: must be positive"):
        load_config(None, ["algorithm=dpo", "dpo.beta=0"])


def test_malformed_preference_row_stops_before_actors(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}\n{"prompt": "x", "chosen": "2"}\n')
    proc = run_rlft("train", str(ROOT / "configs/dpo_tiny.yaml"), f"data.train_path={bad}", "model.path=tiny://model",
                    f"logging.output_dir={tmp_path / 'run'}", cwd=tmp_path, timeout_s=120)
    assert proc.returncode == 2
    assert f"{bad}:2: rejected" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # the first rows are checked first


@pytest.mark.slow
def test_dpo_raises_preference_and_task_accuracy(dpo_runs):
    """DPO from the SFT model raises preference and task accuracy. Over 60 s: the first test to ask for
    ``dpo_runs`` pays for both of its runs (30 steps, then 8 with a killed learner)."""
    first = dpo_runs.first
    records = read_metrics(first / "metrics.jsonl")
    evals = [r for r in records if "eval/preference_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 30]
    # At step 0 the policy is the reference: every implicit reward is 0, no pair is won.
    assert evals[0]["eval/preference_accuracy"] == 0.0 and evals[0]["eval/reward_margin"] == 0.0
    assert evals[-1]["eval/preference_accuracy"] >= 0.55 and evals[-1]["eval/reward_margin"] > 0
    assert evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"] + 0.1
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 30 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    for key in ("train/margin", "train/accuracy", "train/chosen_logps", "train/rejected_logps", "time/update_seconds"):
        assert key in train[0]
    assert (first / "final_model/model.safetensors").exists() and (first / "curves.png").exists()


@pytest.mark.slow
def test_reference_cache_is_reused_across_runs(dpo_runs):
    work, first, second = dpo_runs.work, dpo_runs.first, dpo_runs.second
    assert len(list((work / "cache").glob("*.pt"))) == 2  # training pairs and held-out pairs
    setup = [r for r in read_metrics(first / "metrics.jsonl") if "time/reference_cache_seconds" in r][0]
    again = [r for r in read_metrics(second / "metrics.jsonl") if "time/reference_cache_seconds" in r][0]
    # The first run started a reference actor and scored 2,300 pairs; the second only read two files.
    assert again["time/reference_cache_seconds"] < 0.5 * setup["time/reference_cache_seconds"]
    first_eval = [r for r in read_metrics(first / "metrics.jsonl") if "eval/loss" in r][0]
    second_eval = [r for r in read_metrics(second / "metrics.jsonl") if "eval/loss" in r][0]
    assert second_eval["eval/loss"] == pytest.approx(first_eval["eval/loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_reference_server_mode_zero3_plain_pairs_in_one_process(sft_demo_run, tmp_path, loss_type):
    """dpo.reference=server scores each step's batch; plain {prompt, chosen, rejected} rows; ZeRO-3; no Ray."""
    src = ROOT / "configs/dpo_tiny.yaml"
    rows = []
    pref = load_config(src, [f"model.path={sft_demo_run.output_dir / 'final_model'}"]).data.train_path
    from rlft.tiny import resolve

    for line in open(resolve(pref)).read().splitlines()[:64]:
        row = json.loads(line)
        rows.append({"prompt": row["input"]["messages"], "chosen": row["preferred_output"],
                     "rejected": row["non_preferred_output"]})
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_rlft(
        "train", str(src),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={plain}",
        f"dpo.loss_type={loss_type}",
        "dpo.reference=server",
        "dpo.eval_path=",
        "ray.local_mode=true",
        "learner.num_learners=1",
        "learner.zero_stage=3",
        "learner.micro_batch_size_per_learner=16",
        "trainer.global_batch_size=32",
        "trainer.max_steps=3",
        "eval.num_examples=0",
        "logging.wandb=false",
        f"logging.output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "train/loss" in r]
    assert len(train) == 3 and all(r["time/reference_seconds"] > 0 for r in train)
    assert all(abs(r["train/loss"]) < 100 for r in train)


def test_online_pairs_are_best_against_worst_and_ties_are_dropped():
    from rlft.controller.online_dpo import best_and_worst
    from rlft.rollout import Sample

    def sample(p, g):
        return Sample(p, [1, 2], [10 + g, 2], [-0.1, -0.2], str(g), "stop", 0)

    samples = [sample(p, g) for p in range(3) for g in range(3)]
    rewards = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.2, 0.1, 0.2]])
    pairs, ties = best_and_worst(samples, rewards)
    assert ties == 1 and len(pairs) == 2
    # Prompt 0: best sample 1, worst 0; prompt 2: best 0 (first of equals), worst 1. Loss only on the response.
    assert [c.input_ids for c in pairs.chosen] == [[1, 2, 11, 2], [1, 2, 10, 2]]
    assert [r.input_ids for r in pairs.rejected] == [[1, 2, 10, 2], [1, 2, 11, 2]]
    assert pairs.chosen[0].loss_weights == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.vllm
def test_online_dpo_end_to_end_ranks_whole_trajectories(sft_demo_run, fixed_prompts, tmp_path):
    """Online DPO, one step off-policy, on 2-turn trajectories (tests/env_fixtures.py:Countdown): each pair is a
    prompt's best and worst trajectory, trained on the policy's tokens of both turns."""
    out = tmp_path / "run"
    proc = run_rlft(
        "train", str(ROOT / "configs/online_dpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        "trainer.max_steps=4",
        "dpo.ref_update_every_n_steps=2",
        "rl.max_staleness_steps=1",
        "eval.num_examples=50",
        "eval.every_n_steps=0",
        "eval.num_samples=0",
        "envs.name=tests.env_fixtures:Countdown",
        "envs.kwargs={turns: 2}",
        "rollout.max_model_len=128",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        cwd=tmp_path,
        user_modules=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "pairs/num" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["envs/turns_mean"] == 2 and r["envs/errors"] == r["envs/timeouts"] == 0, r
        assert r["pairs/num"] + r["pairs/ties_dropped"] == 32
        # The graders' reward (0 to 1) plus Countdown's 0.25 for its reply and 1 at the end.
        assert r["envs/reward_mean"] == 1.25 and 1.25 <= r["reward/mean"] <= 2.25 and r["sync/bytes"] > 0
        # One step off-policy: the pairs of step s come from the weights of step s − 2 (step 1: the start's).
        assert r["async/staleness_max"] == r["async/staleness_mean"] == min(r["step"] - 1, 1)
        if r["pairs/num"]:
            assert torch.isfinite(torch.tensor(r["train/loss"])) and r["time/reference_seconds"] > 0
    assert (out / "final_model/model.safetensors").exists()


@pytest.mark.slow
def test_a_reference_replica_that_dies_is_replaced(tmp_path):
    """dpo.reference=server on Ray: the reference replica is killed while it scores a step's pairs; the run goes on
    with a replacement (ray.max_actor_restarts) and counts it."""
    from cluster_helpers import kill_actor_during, rlft_popen

    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = rlft_popen(
        "train", str(ROOT / "configs/dpo_tiny.yaml"),
        "model.path=tiny://model",
        "dpo.reference=server",
        "dpo.eval_path=",
        "eval.num_examples=0",
        "ray.max_actor_restarts=1",
        "learner.num_learners=1",
        "learner.micro_batch_size_per_learner=16",
        "trainer.global_batch_size=32",
        "trainer.max_steps=5",
        "checkpoint.every_n_steps=0",
        "logging.wandb=false",
        "logging.progress_bar=false",
        f"logging.output_dir={out}",
        cwd=tmp_path, log=log,
    )
    try:
        kill_actor_during("ray::ReferenceWorker.logprobs_kept", "ray::ReferenceWorker.logprobs_kept", proc)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    train = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 6))
    assert train[-1]["faults/reference_restarts"] == 1
    assert all(abs(r["train/loss"]) < 100 for r in train)
