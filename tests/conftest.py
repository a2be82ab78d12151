"""Shared fixtures: the embedded tiny model (built once, cached) and one local Ray cluster per test session."""

from __future__ import annotations

import json
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


def pytest_collection_modifyitems(config, items):
    """Modules whose tests need the SFT demo's model run last, so that the demo, started with the session
    (``sft_demo_in_background``), runs beside the others; each module stays in one piece (``pytest -n`` hands out
    whole modules, ``--dist loadscope``). Tests that need a GPU are skipped without one."""
    needs_demo = {item.module.__name__ for item in items if "sft_demo_run" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ in needs_demo)  # stable: the order within each part stays
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


def shared_dir(tmp_path_factory) -> Path:
    """Where the session's shared runs live. Under ``pytest -n`` every worker has its own base temporary directory,
    and their parent is the session's: one ``sft_demo_run``, ``grpo_run`` and ``dpo_runs`` serve every worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def run_once(tmp_path_factory, name: str, run) -> dict:
    """``run(work)`` once per session, whichever worker asks first (the others wait for it); its JSON result."""
    from filelock import FileLock

    root = shared_dir(tmp_path_factory)
    result = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.exists():
            work = root / name
            work.mkdir()
            result.write_text(json.dumps(run(work)))
    return json.loads(result.read_text())


SFT_DEMO = "sft_demo"


def start_sft_demo(tmp_path_factory) -> Path:
    """Start the README's SFT job (configs/sft_tiny.yaml) in the background, unless a worker of this session has;
    its directory. It writes its exit status to ``returncode`` when it ends, whoever started it."""
    from filelock import FileLock

    work = shared_dir(tmp_path_factory) / SFT_DEMO
    with FileLock(str(work) + ".lock"):
        if not work.exists():
            work.mkdir()
            command = [sys.executable, "-m", "rlft.cli", "train", str(ROOT / "configs/sft_tiny.yaml"),
                       f"logging.output_dir={work / 'run'}"]
            subprocess.Popen(
                ["sh", "-c", '"$@" >stdout 2>stderr; echo $? >returncode.part && mv returncode.part returncode',
                 "sh", *command],
                cwd=work, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
            )
    return work


@pytest.fixture(scope="session", autouse=True)
def sft_demo_in_background(request, tmp_path_factory):
    """The SFT demo takes about four minutes and a third of every RL test's start: it starts with the session, while
    the tests that do not need it run (``pytest_collection_modifyitems`` orders those first)."""
    if any("sft_demo_run" in item.fixturenames for item in request.session.items):
        start_sft_demo(tmp_path_factory)


@pytest.fixture(scope="session")
def sft_demo_run(tmp_path_factory) -> CompletedRun:
    """The README's SFT job (configs/sft_tiny.yaml), run once per session: its test checks it, RL tests start
    from its model."""
    from cluster_helpers import wait_until

    work = start_sft_demo(tmp_path_factory)
    wait_until(lambda: (work / "returncode").exists(), f"the SFT demo in {work} to end", timeout_s=1200)
    proc = subprocess.CompletedProcess(
        [], int((work / "returncode").read_text()), (work / "stdout").read_text(), (work / "stderr").read_text())
    return CompletedRun(proc, work / "run")


@pytest.fixture(scope="session")
def fixed_prompts(tmp_path_factory) -> Path:
    """32 arithmetic prompts: every RL step samples the same prompts, so a rising reward is learning, not luck."""
    from rlft.tiny import resolve

    rows = Path(resolve("tiny://arithmetic/rft_train.jsonl")).read_text().splitlines()[:32]
    path = shared_dir(tmp_path_factory) / "fixed_prompts.jsonl"
    part = path.with_name(f"{path.name}.{os.getpid()}")
    part.write_text("\n".join(rows) + "\n")
    os.replace(part, path)  # the same bytes from every worker; a job reading it never sees a partial file
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

    def run(work: Path) -> dict:
        out = work / "run"
        proc = run_rlft(*grpo_args(sft_demo_run, fixed_prompts), f"logging.output_dir={out}", cwd=work)
        return {"out": str(out), "returncode": proc.returncode, "stderr": proc.stderr[-4000:]}

    result = run_once(tmp_path_factory, "grpo", run)
    assert result["returncode"] == 0, result["stderr"]
    return Path(result["out"])


@dataclass
class DPORuns:
    work: Path  # holds the shared reference cache, work / "cache"
    first: Path
    second: Path
    second_log: str  # the second run's console output


DPO_SECOND_RUN_STEPS = 8


@pytest.fixture(scope="session")
def dpo_runs(sft_demo_run, tmp_path_factory) -> DPORuns:
    """configs/dpo_tiny.yaml for 30 steps, then for 8, with one cache directory: the second run reuses the
    reference sums, checkpoints every 2 steps and has a learner rank killed (SIGKILL) in a step after the step-2
    checkpoint, which its learner restart redoes (tests/test_reproducibility.py compares its steps with the first
    run's; tests/test_learner_restart.py checks the restart)."""
    assert sft_demo_run.proc.returncode == 0

    def run(work: Path) -> dict:
        from cluster_helpers import kill_own_learner_in_train_step, rlft_popen, wait_until

        args = [
            "train", str(ROOT / "configs/dpo_tiny.yaml"),
            f"model.path={sft_demo_run.output_dir / 'final_model'}",
            f"dpo.cache_dir={work / 'cache'}",
            "eval.every_n_steps=0",
            "eval.num_examples=200",
            "logging.wandb=false",
        ]
        first = work / "first"
        proc = run_rlft(*args, "trainer.max_steps=30", f"logging.output_dir={first}", cwd=work)
        assert proc.returncode == 0, proc.stderr[-4000:]
        second, log = work / "second", work / "second.log"
        killed = rlft_popen(*args, f"trainer.max_steps={DPO_SECOND_RUN_STEPS}", "checkpoint.every_n_steps=2",
                            f"logging.output_dir={second}", cwd=work, log=log)
        try:
            wait_until(lambda: (second / "checkpoints/step_000002/trainer_state.json").exists(),
                       "the step-2 checkpoint", proc=killed, log=log)
            kill_own_learner_in_train_step(killed)
            assert killed.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            killed.kill()
        return {"work": str(work)}

    work = Path(run_once(tmp_path_factory, "dpo", run)["work"])
    return DPORuns(work, work / "first", work / "second", (work / "second.log").read_text())
