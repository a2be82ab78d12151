"""Shared fixtures: the embedded tiny model (built once, cached) and one local Ray cluster per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["time_budget"]  # the suite's time budget (pyproject.toml's [tool.rlft.test_budget])

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/rlft/torch_extensions"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rlft.tiny import resolve

    return resolve("tiny://model")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster bound to loopback, shared by every test that starts actors."""
    import ray

    from rlft.config import RayConfig
    from rlft.distributed.cluster import init_ray

    # Logical CPUs: actors ask for whole CPUs; a 2-core machine still runs 2 learners beside other roles.
    init_ray(RayConfig(num_cpus=4), num_cpus_needed=4)
    yield
    ray.shutdown()


@dataclass
class CompletedRun:
    proc: subprocess.CompletedProcess
    output_dir: Path


def run_rlft(*args: str, cwd: Path, timeout_s: int = 900, user_modules: bool = False) -> subprocess.CompletedProcess:
    """``rlft ARGS`` in a fresh process, as a user runs it; ``user_modules``: with this checkout on ``PYTHONPATH``, as
    a user's own modules (``tests.env_fixtures``) would be."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if user_modules:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "rlft.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture(scope="session")
def sft_demo_run(tmp_path_factory) -> CompletedRun:
    """The README's SFT job (configs/sft_tiny.yaml), run once per session: its test checks it, RL tests start
    from its model."""
    work = tmp_path_factory.mktemp("sft_demo")
    out = work / "run"
    proc = run_rlft("train", str(ROOT / "configs/sft_tiny.yaml"), f"logging.output_dir={out}", cwd=work)
    return CompletedRun(proc, out)


@pytest.fixture(scope="session")
def fixed_prompts(tmp_path_factory) -> Path:
    """32 arithmetic prompts: every RL step samples the same prompts, so a rising reward is learning, not luck."""
    from rlft.tiny import resolve

    rows = Path(resolve("tiny://arithmetic/rft_train.jsonl")).read_text().splitlines()[:32]
    path = tmp_path_factory.mktemp("rl_data") / "prompts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


GRPO_NUM_STEPS = 15


def grpo_args(sft_demo_run, fixed_prompts) -> list[str]:
    """The GRPO job most of tests/test_grpo.py checks (``grpo_run``); the resume test runs it again, stopped and
    resumed, and tests/test_reproducibility.py runs its first steps again."""
    return [
        "train",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        f"trainer.max_steps={GRPO_NUM_STEPS}",
        "trainer.lr=1e-4",
        "trainer.warmup_steps=0",
        "checkpoint.every_n_steps=5",
        "eval.num_examples=100",
        "eval.every_n_steps=0",
        "eval.num_samples=2",
        "rollout.chunks_per_worker=2",
        "logging.wandb=false",
        "logging.progress_bar=false",
    ]


@pytest.fixture(scope="session")
def grpo_run(sft_demo_run, fixed_prompts, tmp_path_factory) -> Path:
    assert sft_demo_run.proc.returncode == 0, sft_demo_run.proc.stderr[-3000:]
    work = tmp_path_factory.mktemp("grpo")
    out = work / "run"
    proc = run_rlft(*grpo_args(sft_demo_run, fixed_prompts), f"logging.output_dir={out}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def dpo_runs(sft_demo_run, tmp_path_factory) -> tuple[Path, list[Path]]:
    """configs/dpo_tiny.yaml for 30 steps, then for 4, with one cache directory (the second run reuses the
    reference sums; tests/test_reproducibility.py compares its steps with the first run's)."""
    assert sft_demo_run.proc.returncode == 0
    work = tmp_path_factory.mktemp("dpo")
    outs = []
    for name, steps in (("first", 30), ("second", 4)):
        out = work / name
        proc = run_rlft(
            "train", str(ROOT / "configs/dpo_tiny.yaml"),
            f"model.path={sft_demo_run.output_dir / 'final_model'}",
            f"dpo.cache_dir={work / 'cache'}",
            f"trainer.max_steps={steps}",
            "eval.every_n_steps=0",
            "eval.num_examples=200",
            "logging.wandb=false",
            f"logging.output_dir={out}",
            cwd=work,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs.append(out)
    return work, outs
