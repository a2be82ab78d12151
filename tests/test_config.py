"""Config: defaults, YAML, dotted overrides, rejection of unknown keys / wrong types, batch arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlft.config import Config, ConfigError, load_config, parse_override, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.gradient_accumulation_steps == cfg.trainer.global_batch_size // (
        cfg.learner.micro_batch_size_per_learner * cfg.learner.num_learners
    )


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  lr: 0.01\n  global_batch_size: 32\nlearner:\n  micro_batch_size_per_learner: 4\n")
    cfg = load_config(f, ["trainer.lr=1e-5", "learner.zero_stage=3", "data.packing=true", "trainer.adam_betas=[0.8, 0.9]"])
    assert cfg.trainer.lr == 1e-5
    assert cfg.trainer.global_batch_size == 32
    assert cfg.learner.zero_stage == 3
    assert cfg.data.packing is True
    assert cfg.trainer.adam_betas == (0.8, 0.9)
    assert cfg.gradient_accumulation_steps == 4
    # Round trip: the printed config loads back to the same config.
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


def test_defaults_list_merges_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("trainer:\n  lr: 0.5\n  seed: 7\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrainer:\n  lr: 0.25\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.trainer.lr, cfg.trainer.seed) == (0.25, 7)


def test_int_widens_to_float():
    assert load_config(None, ["trainer.lr=1"]).trainer.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lrr=1e-5", "trainer.lrr: unknown key"),
        ("trainr.lr=1e-5", "trainr: unknown key"),
        ("trainer.lr=fast", "trainer.lr: expected a number"),
        ("trainer.max_steps=1.5", "trainer.max_steps: expected an integer"),
        ("trainer.max_steps=true", "trainer.max_steps: expected an integer"),
        ("data.packing=yes please", "data.packing: expected true or false"),
        ("learner.zero_stage=4", "learner.zero_stage: expected one of 0, 1, 2, 3"),
        ("data.on_bad_row=ignore", "data.on_bad_row: expected one of 'error', 'skip'"),
        ("trainer=3", "trainer: expected a mapping"),
        ("trainer.adam_betas=[0.9]", "trainer.adam_betas: expected a list of 2 values"),
        ("trainer.adam_eps=0", "trainer.adam_eps"),
        ("trainer.lr=-1", "trainer.lr: must be positive"),
        ("learner.num_learners=0", "learner.num_learners: must be positive"),
        ("learner.backend=nccl", "learner.backend: nccl needs learner.num_gpus_per_learner > 0"),
        ("eval.extract_pattern=(\\d+", "eval.extract_pattern: not a regular expression"),
        ("rollout.weight_transport=nccl", "rollout.weight_transport: expected one of"),
        ("rollout.weight_transport=cuda_ipc", "rollout.weight_transport: cuda_ipc shares GPU memory"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_collective_weight_transport_needs_processes():
    with pytest.raises(ConfigError, match="rollout.weight_transport: collective broadcasts between processes"):
        load_config(None, ["rollout.weight_transport=collective", "ray.local_mode=true", "learner.num_learners=1"])
    with pytest.raises(ConfigError, match="ray.local_mode: PPO's critic is a second learner group"):
        load_config(ROOT / "configs/ppo_tiny.yaml", ["ray.local_mode=true", "learner.num_learners=1"])
    with pytest.raises(ConfigError, match="rollout.weight_sync_timeout_s: must be positive"):
        load_config(ROOT / "configs/grpo_tiny.yaml", ["rollout.weight_sync_timeout_s=0"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rl.max_staleness_steps=-1"], "rl.max_staleness_steps: must be 0 (synchronous) or more, got -1"),
        (["rl.is_cap=1.0"], "rl.is_cap: importance weights are capped above 1, got 1.0"),
        (["rl.old_logprobs=sampler", "rollout.engine=simulated"],
         "rl.old_logprobs: sampler needs the sampler's log-probabilities of the policy"),
        (["rl.old_logprobs=sampler", "rl.off_policy_correction=tis"],
         "rl.off_policy_correction: tis weighs the learner's log-probabilities against the sampler's"),
        (["rl.max_staleness_steps=1", "rollout.weight_transport=collective"],
         "asynchronous RL (rl.max_staleness_steps > 0) needs object_store or cuda_ipc"),
        (["rl.off_policy_correction=sometimes"], "rl.off_policy_correction"),
    ],
)
def test_bad_async_settings_name_the_field(overrides, message):
    for config in ("grpo_tiny.yaml", "ppo_tiny.yaml", "online_dpo_tiny.yaml"):
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "configs" / config, overrides)
        assert message in str(err.value), config


def test_async_defaults_resolve():
    from rlft.config import off_policy_correction, recomputes_old_logprobs

    sync = load_config(ROOT / "configs/grpo_tiny.yaml", [])
    assert off_policy_correction(sync) == "none" and not recomputes_old_logprobs(sync)
    one_off = load_config(ROOT / "configs/grpo_tiny.yaml", ["rl.max_staleness_steps=1"])
    assert off_policy_correction(one_off) == "tis" and not recomputes_old_logprobs(one_off)
    # Two optimizer steps per batch: the second needs the log-probabilities from before the first.
    two = load_config(ROOT / "configs/grpo_tiny.yaml", ["rl.num_mini_batches=2", "trainer.global_batch_size=128",
                                                         "learner.micro_batch_size_per_learner=32"])
    assert recomputes_old_logprobs(two)
    sampler = load_config(ROOT / "configs/grpo_tiny.yaml", ["rl.max_staleness_steps=1", "rl.old_logprobs=sampler"])
    assert off_policy_correction(sampler) == "none" and not recomputes_old_logprobs(sampler)


def test_batch_arithmetic_checked():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            ["trainer.global_batch_size=30", "learner.micro_batch_size_per_learner=4", "learner.num_learners=2"],
        )
    text = str(err.value)
    assert text.startswith("trainer.global_batch_size: 30 is not a multiple of")
    assert "4 × 2 = 8" in text


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("trainer.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("trainer..lr=1")
    # A value the shell split in two: named, not a YAML traceback.
    with pytest.raises(ConfigError, match=r"override 'envs.kwargs=\{turns:': the value is not YAML"):
        parse_override("envs.kwargs={turns:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["envs.name=my_envs:Env", "envs.agent=my_agents:run"], r"envs.agent: set envs.name .* or envs.agent"),
        (["envs.agent=not_a_path"], r"envs.agent: expected 'module:function'"),
        (["envs.name=m:Env", "envs.max_turns=0"], r"envs.max_turns: must be at least 1"),
        (["envs.name=m:Env", "ray.local_mode=true", "learner.num_learners=1"], r"envs.num_workers: ray.local_mode"),
    ],
)
def test_bad_environment_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/grpo_tiny.yaml", overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_cli_config_show():
    out = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "config", "show", str(ROOT / "configs/sft_tiny.yaml"), "trainer.lr=0.125"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lr: 0.125" in out
    assert "zero_stage: 2" in out


# Reading and checking a config (on a laptop, before a job starts) must not import these.
HEAVY_MODULES = ("ray", "torch", "vllm", "math_verify", "transformers")


def run_and_list_heavy_imports(code: str, *args: str, modules: tuple[str, ...] = HEAVY_MODULES
                               ) -> tuple[str, list[str]]:
    """Run ``code`` (with ``args`` as ``sys.argv[1:]``) in a fresh interpreter; return its stdout and which of
    ``modules`` it had imported by the end."""
    report = f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)), file=sys.stderr)"
    proc = subprocess.run(
        [sys.executable, "-c", f"import json, sys\n{code}\n{report}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["rlft.config", "rlft.rollout.config", "rlft.reference.config", "rlft.graders.config"])
def test_config_modules_import_no_heavy_dependency(module):
    _, imported = run_and_list_heavy_imports(f"import {module}")
    assert imported == []


@pytest.mark.parametrize("name", ["grpo_tiny.yaml", "dpo_tiny.yaml"])
def test_cli_config_show_imports_no_heavy_dependency(name):
    path = ROOT / "configs" / name
    show = "from rlft.cli import main\nassert main(sys.argv[1:]) == 0"
    out, imported = run_and_list_heavy_imports(show, "config", "show", str(path))
    assert imported == []
    assert out == to_yaml(load_config(path))


def test_cli_reports_config_error():
    proc = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "config", "show", str(ROOT / "configs/sft_tiny.yaml"), "learner.zero=3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "learner.zero: unknown key" in proc.stderr


@pytest.mark.parametrize(
    "completion, pattern, expected",
    [
        ("Answer: 82", r"(\d+)", "82"),
        ("82", r"(\d+)", "82"),
        ("9 + 73 = 82 ", r"(\d+)", "82"),  # the last match
        ("#### 1,234", r"#### ([\d,]+)", "1,234"),  # the first group
        ("the end", r"\d+", None),
        ("x=7", r"\d+", "7"),  # no group: the whole match
    ],
)
def test_extracted_answer(completion, pattern, expected):
    from rlft.evaluator.results import extracted_accuracy, extracted_answer

    assert extracted_answer(completion, pattern) == expected
    records = [{"completion": completion, "answer": " 82 "}, {"completion": "no number", "answer": "1"}]
    assert extracted_accuracy(records, pattern) == (0.5 if expected == "82" else 0.0)


@pytest.mark.parametrize(("config", "overrides", "message"), [
    ("grpo_tiny.yaml", ["learner.max_tokens_per_micro_batch=-8"],
     "learner.max_tokens_per_micro_batch: must be positive (or 0 for padded micro-batches), got -8"),
    # The embedded GRPO config's samples reach rollout.max_model_len = 64 tokens.
    ("grpo_tiny.yaml", ["learner.max_tokens_per_micro_batch=63"],
     "learner.max_tokens_per_micro_batch: 63 tokens cannot hold the longest possible sample, 64 tokens "
     "(rollout.max_model_len"),
    ("ppo_tiny.yaml", ["learner.max_tokens_per_micro_batch=32"], "cannot hold the longest possible sample"),
    ("grpo_tiny.yaml", ["envs.name=m:Env", "envs.max_total_tokens=48", "learner.max_tokens_per_micro_batch=40"],
     "learner.max_tokens_per_micro_batch: 40 tokens cannot hold the longest possible sample, 48 tokens "
     "(envs.max_total_tokens)"),
    ("sft_tiny.yaml", ["learner.max_tokens_per_micro_batch=256"],
     "learner.max_tokens_per_micro_batch: packs RL samples (algorithm grpo or ppo); algorithm 'sft' has data.packing"),
    ("dpo_tiny.yaml", ["learner.max_tokens_per_micro_batch=256"], "algorithm 'dpo' has none"),
])
def test_bad_packing_budget_names_the_field(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / config, overrides)
    assert message in str(err.value)


def test_packing_budget_at_the_longest_sample_validates():
    cfg = load_config(ROOT / "configs/grpo_tiny.yaml", ["learner.max_tokens_per_micro_batch=64"])
    assert cfg.learner.max_tokens_per_micro_batch == 64
    multi = load_config(ROOT / "configs/grpo_tiny.yaml",
                        ["envs.name=m:Env", "envs.max_total_tokens=48", "learner.max_tokens_per_micro_batch=48"])
    assert multi.learner.max_tokens_per_micro_batch == 48
