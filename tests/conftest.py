"""Shared fixtures: the embedded tiny model (built once, cached) and one local Ray cluster per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


def run_rlft(*args: str, cwd: Path, timeout_s: int = 900) -> subprocess.CompletedProcess:
    """``rlft ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
