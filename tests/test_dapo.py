"""DAPO's data side (dynamic sampling, overlong reward shaping and filtering) and the sample filters: by hand, in
the config, and end to end through ``rlft train`` with the newer policy losses, synchronous (with packed
micro-batches) and asynchronous."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, run_rlft
from rlft.algorithms.shaping import informative_groups, overlong_penalty, shape_rewards
from rlft.config import ConfigError, load_config
from rlft.data.batch import policy_batch, trainable
from rlft.graders.pool import GradeResult
from rlft.metrics import read_metrics
from rlft.rollout import Sample


def test_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: no penalty up to 6 tokens, then −(|y| − 6) / 4 · factor, −factor past 10.
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5, -0.5]))
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 10, 11)


def test_shape_rewards_adds_graders_environment_and_overlong_terms():
    graders = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    env = torch.tensor([0.0, 0.25, 0.0, 0.5], dtype=torch.float64)
    lengths = torch.tensor([3, 7, 9, 12])
    # L_max = 10, L_cache = 4, factor 0.5: penalties 0, −0.125, −0.375, −0.5.
    rewards, penalties = shape_rewards(graders, env, lengths, 10, 4, 0.5)
    assert penalties.tolist() == [0.0, -0.125, -0.375, -0.5]
    assert rewards.dtype == torch.float64 and rewards.tolist() == [1.0, 0.125, 0.125, 1.0]
    # No buffer: no penalty, and the graders' and environment's rewards add exactly.
    rewards, penalties = shape_rewards(graders, env, lengths, 10, 0, 0.5)
    assert penalties.tolist() == [0.0] * 4 and rewards.tolist() == (graders + env).tolist()


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def _sample(logprobs, finish="stop", mask=None) -> Sample:
    return Sample(prompt_index=0, prompt_token_ids=[5, 6], response_token_ids=[7] * len(logprobs),
                  response_logprobs=logprobs, response_text="x", finish_reason=finish, policy_version=0,
                  response_mask=mask)


def test_trainable_masks_non_finite_and_truncated_samples():
    samples = [_sample([-0.1, -0.2]), _sample([-0.1, math.nan]), _sample([-0.3, -0.4], "length"),
               _sample([-math.inf, -0.1], "length")]
    keep, counts = trainable(samples, mask_truncated=False)
    assert keep == [True, False, True, False] and counts == {"filter/nonfinite_masked": 2,
                                                             "filter/truncated_masked": 0}
    keep, counts = trainable(samples, mask_truncated=True)
    assert keep == [True, False, False, False] and counts == {"filter/nonfinite_masked": 2,
                                                              "filter/truncated_masked": 1}
    batch = policy_batch(samples, torch.ones(4), 0, 6, keep)
    # Only the first row carries loss weights, and the NaN never reaches the batch.
    assert batch.loss_weights_BT.sum(1).tolist() == [2.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(batch.sampler_logprobs_BT).all() and batch.advantages_BT[1:].abs().sum() == 0


def test_grade_result_select_keeps_the_rows_in_order():
    graded = GradeResult(rewards=[0.0, 1.0, 2.0], scores={"g": [0.0, 1.0, 2.0]}, num_errors=1, num_timeouts=0,
                         num_invalid=0, failures_by_grader={"g": 1}, examples={"g": "boom"})
    picked = graded.select([2, 0])
    assert picked.rewards == [2.0, 0.0] and picked.scores == {"g": [2.0, 0.0]} and picked.num_errors == 1


@pytest.mark.parametrize("config, overrides, field", [
    ("ppo_tiny.yaml", ["rl.dynamic_sampling=true", "rl.num_samples_per_prompt=1", "rl.num_prompts_per_step=128",
                       "trainer.global_batch_size=128"], "rl.dynamic_sampling"),
    ("grpo_tiny.yaml", ["rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=0"],
     "rl.dynamic_sampling_max_rounds"),
    ("grpo_tiny.yaml", ["rl.overlong_buffer=7"], "rl.overlong_buffer"),  # max_new_tokens is 6
    ("grpo_tiny.yaml", ["rl.overlong_buffer=2", "rl.overlong_penalty=-1"], "rl.overlong_penalty"),
])
def test_config_rejects_bad_dapo_settings(config, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ":"):
        load_config(ROOT / "configs" / config, overrides)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("policy_loss, staleness, max_tokens_per_micro_batch", [("gspo", 0, 512), ("cispo", 1, 0)])
def test_dapo_sampling_and_shaping_end_to_end(policy_loss, staleness, max_tokens_per_micro_batch, sft_demo_run,
                                              fixed_prompts, tmp_path):
    """GRPO with DAPO's dynamic sampling, overlong shaping and filtering, under GSPO (synchronous, its samples
    packed into micro-batches of 512 tokens: GSPO's sequence ratio is per sample) and CISPO (one step off-policy,
    padded micro-batches): every step trains on 16 groups, the equal ones only where the extra rounds ran out."""
    out = tmp_path / "run"
    clips = ["rl.clip_low=0.0003", "rl.clip_high=0.0004"] if policy_loss == "gspo" else []
    proc = run_rlft(
        "train", str(ROOT / "configs/grpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        f"rl.policy_loss={policy_loss}", *clips,
        "rl.num_prompts_per_step=16", "trainer.global_batch_size=128",
        "rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=2",
        "rl.overlong_buffer=2", "rl.overlong_penalty=0.5", "rl.mask_truncated=true",
        f"rl.max_staleness_steps={staleness}",
        f"learner.max_tokens_per_micro_batch={max_tokens_per_micro_batch}",
        "trainer.max_steps=3", "trainer.warmup_steps=0",
        "eval.num_examples=20", "eval.every_n_steps=0", "eval.num_samples=0",
        "logging.wandb=false", f"logging.output_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["rollout/num_samples"] == 128
        assert r["dynamic/prompts_generated"] == 16 * (r["dynamic/rounds"] + 1) and r["dynamic/rounds"] <= 2
        # The batch's equal groups are exactly those that filled it, and only after every extra round ran.
        assert round(r["reward/groups_all_equal"] * 16) == r["dynamic/groups_filled"]
        assert r["dynamic/groups_filled"] == 0 or r["dynamic/rounds"] == 2
        # Overlong shaping: a truncated response (6 tokens) gets −0.5, one of 5 tokens −0.25, shorter ones 0.
        assert -0.5 <= r["reward/overlong_penalty_mean"] <= -0.5 * r["rollout/truncated_fraction"]
        assert r["filter/truncated_masked"] == round(128 * r["rollout/truncated_fraction"])
        assert r["filter/nonfinite_masked"] == 0
        # Extra rounds are generated with the current weights (staleness 0), the sent-ahead batch one step behind.
        assert r["async/staleness_max"] <= min(r["step"] - 1, staleness)
        assert math.isfinite(r["train/policy_loss"]) and 0 <= r["train/clip_fraction"] <= 1
        if max_tokens_per_micro_batch:
            # 128 samples of at most 64 tokens over 2 ranks: a few packed rows each, padded only by empty ones.
            assert 2 <= r["train/num_micro_batches"] <= 2 * 16
            assert r["train/padding_tokens"] <= r["train/num_micro_batches"]
        else:
            assert r["train/num_micro_batches"] == 2 and r["train/padding_tokens"] > 0
    assert max(r["async/staleness_max"] for r in steps) == staleness
    # Some steps needed extra rounds: the SFT model answers some prompts always or never right.
    assert sum(r["dynamic/rounds"] for r in steps) > 0, steps
