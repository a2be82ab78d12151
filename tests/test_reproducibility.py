"""Same config, same seed, same machine: the same metrics.

Each check compares the first steps of a job that a shared fixture has already run in full with another run of the
same job, metric by metric and exactly: every metric that is computed rather than timed, i.e. losses, gradient
norms, learning rates, token counts and evaluations, and for GRPO the rewards, sampled response lengths and
accuracies (vLLM samples are seeded by the sampling seed, the policy version and the prompt's index) and the
learner/sampler log-probability gap. Nothing in these runs may depend on timing or scheduling. Here: DPO (the
fixture's own second, shorter run) and a seed that changes SFT's data order. The same check for SFT is
tests/test_learner_restart.py's SFT run (the demo's first steps again, across a restart), and for GRPO
tests/test_grpo.py's resume test (``grpo_run`` again, across a restart and a resume).

A shorter run differs from the fixture's in ``trainer.max_steps`` (and in where and how it logs), so over the
compared steps the learning rate must not depend on the run's length: a constant schedule, or the warm-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_helpers import wait_until
from conftest import DPO_SECOND_RUN_STEPS, ROOT
from rlft.config import TrainerConfig, load_config
from rlft.controller import run_job
from rlft.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SFT_CONFIG = ROOT / "configs/sft_tiny.yaml"


def is_wall_clock(key: str) -> bool:
    """Measured, not computed: the record's timestamp, phase and engine seconds, throughputs (tokens/s, GB/s), a
    process's memory (MiB)."""
    return key == "time" or key.startswith(("time/", "perf/", "engine/")) or key.endswith(("seconds", "_per_s", "_mib"))


def computed_records(run: Path, last_step: int, evaluations: bool, final_evaluation: bool = False) -> list[dict]:
    """The run's records of steps 0 .. ``last_step`` in the order logged, without wall-clock keys, and without
    evaluations unless ``evaluations``. Evaluations at ``last_step`` are left out unless ``final_evaluation``: a
    shorter run's is its final one, which the longer run does not do there."""
    records = []
    for record in read_metrics(run / "metrics.jsonl"):
        evaluation = any(key.startswith("eval/") for key in record)
        final = record["step"] == last_step and not final_evaluation
        if record["step"] <= last_step and not (evaluation and (final or not evaluations)):
            records.append(computed(record))
    return records


def computed(record: dict) -> dict:
    """A metrics record without its wall-clock keys."""
    return {key: value for key, value in record.items() if not is_wall_clock(key)}


def assert_same_records(a: list[dict], b: list[dict], ignore: frozenset[str] = frozenset(),
                        what: str = "(original, repeated)") -> set[str]:
    """Both lists hold the same steps, and each pair of records the same values (but for the keys in ``ignore``);
    returns the keys compared."""
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        differing = {key: (ra.get(key), rb.get(key)) for key in ra.keys() | rb.keys()
                     if key not in ignore and ra.get(key) != rb.get(key)}
        assert not differing, f"step {ra['step']}, {what}: {differing}"
    return set().union(*a) - ignore


def assert_same_metrics(original: Path, repeated: Path, last_step: int, evaluations: bool = True,
                        final_evaluation: bool = False, ignore: frozenset[str] = frozenset()) -> set[str]:
    """Every computed metric of steps 0 .. ``last_step`` (but those in ``ignore``) is equal in both runs; returns the
    keys compared. ``final_evaluation``: both runs evaluated at ``last_step`` (the same length), and that is compared
    too."""
    a, b = (computed_records(run, last_step, evaluations, final_evaluation) for run in (original, repeated))
    assert a[-1]["step"] == last_step
    return assert_same_records(a, b, ignore)


def steps_with_same_lr(trainer: TrainerConfig, wanted: int) -> int:
    """How many of the first ``wanted`` steps train and log the same learning rate whatever ``trainer.max_steps``
    is: all of them under a constant schedule; under a decaying one, those strictly inside the warm-up (the rate
    logged after step s is the one step s + 1 uses, and a run no longer than its warm-up ends a linear decay at 0
    there)."""
    if trainer.lr_scheduler == "constant":
        return wanted
    return max(0, min(wanted, trainer.warmup_steps - 1))


@pytest.fixture
def free_cluster(ray_cluster):
    """The session's Ray cluster with all its CPUs free (a GRPO job takes all of them), left so for the next test:
    removed placement groups and killed actors return their CPUs a moment after a job ends."""
    import ray

    def all_free() -> bool:
        return ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")

    wait_until(all_free, "the shared Ray cluster's CPUs to be free", 60)
    yield
    wait_until(all_free, "the job's CPUs to be released", 60)


def short_sft(out: Path, max_steps: int, *overrides: str) -> Path:
    """configs/sft_tiny.yaml for ``max_steps`` steps without evaluation, in this process, on the shared cluster."""
    quiet = ["eval.num_examples=0", "logging.wandb=false", "logging.progress_bar=false", f"logging.output_dir={out}"]
    run_job(load_config(SFT_CONFIG, [f"trainer.max_steps={max_steps}", *overrides, *quiet]))
    return out


def test_sft_another_seed_changes_the_data_order(sft_demo_run, free_cluster, tmp_path):
    """``trainer.seed`` is not ignored: another seed draws other rows, so the first step's loss (taken before any
    update, so whatever the learning rate) differs from the demo's."""
    assert sft_demo_run.proc.returncode == 0, sft_demo_run.proc.stderr[-3000:]
    other = short_sft(tmp_path / "other_seed", 1, f"trainer.seed={load_config(SFT_CONFIG).trainer.seed + 1}")
    demo_loss, other_loss = (
        next(r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if r["step"] == 1 and "train/loss" in r)
        for run in (sft_demo_run.output_dir, other)
    )
    assert other_loss != demo_loss


def test_dpo_same_seed_same_metrics(dpo_runs):
    """The two runs of ``dpo_runs`` differ only in ``trainer.max_steps`` (and the second's checkpoints and killed
    learner, which its restart redoes): the second's steps and start evaluation match the first's. (The second reads
    the reference sums the first computed and cached.)"""
    assert load_config(ROOT / "configs/dpo_tiny.yaml").trainer.lr_scheduler == "constant", \
        "the compared steps need a constant lr"
    steps = max(r["step"] for r in read_metrics(dpo_runs.second / "metrics.jsonl"))
    assert steps == DPO_SECOND_RUN_STEPS
    keys = assert_same_metrics(dpo_runs.first, dpo_runs.second, steps, ignore=frozenset({"faults/learner_restarts"}))
    assert {"train/loss", "train/margin", "train/chosen_logps", "train/lr", "eval/preference_accuracy",
            "eval/accuracy"} <= keys
