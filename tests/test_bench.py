"""``rlft bench``: the harness runs real jobs and its figures are consistent with each other (never timed here)."""

from __future__ import annotations

import json

import pytest

from cluster_helpers import wait_until
from conftest import ROOT, run_rlft
from rlft.bench import summarize
from rlft.metrics import read_metrics


def check_consistent(out, warmup: int, steps: int) -> dict:
    """What must hold for any bench: the files exist, the measured steps are the last ``steps``, the phases fit in
    the step, each engine time fits in its phase (grading excepted: it overlaps generation), and every throughput
    is its work over its time."""
    bench = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| phase | work per step |" in (out / "bench.md").read_text()
    assert bench["measured_steps"] == list(range(warmup + 1, warmup + steps + 1))
    records = [r for r in read_metrics(out / "job/metrics.jsonl") if "time/step_seconds" in r]
    assert len(records) == warmup + steps
    for r in records:
        phases = sum(v for k, v in r.items() if k.startswith("time/") and k != "time/step_seconds")
        assert phases <= r["time/step_seconds"] * 1.001, r
        for key, engine in r.items():
            if key.startswith("engine/") and key != "engine/grade_seconds":
                assert 0 < engine <= r["time/" + key.removeprefix("engine/")] * 1.001, (key, r)
    phases = {p["phase"]: p for p in bench["phases"]}
    for p in phases.values():
        if p["work"] is not None and p["phase"] != "grade":
            assert p["per_second"] == pytest.approx(p["work"] / p["wall_seconds"])
    assert sum(p["wall_seconds"] for p in phases.values()) <= bench["step_seconds"] * 1.05
    assert bench["orchestration_overhead"] > 0.9
    assert bench["environment"]["load_average_before"] and bench["environment"]["versions"]["torch"]
    return bench


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_bench_grpo_measures_every_phase(tmp_path):
    """A whole ``rlft bench`` job (Ray, 2 learners, a vLLM worker, a grader): its start is most of the minute."""
    out = tmp_path / "bench"
    proc = run_rlft(
        "bench", str(ROOT / "configs/grpo_tiny.yaml"),
        "model.path=tiny://model",
        "rl.kl_coef=0.01",
        # The forward pass before the update runs only when asked for (or needed): measured here too.
        "rl.old_logprobs=recompute",
        "logging.progress_bar=false",
        "--steps", "2", "--warmup", "1", "--out", str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "orchestration overhead" in proc.stdout
    bench = check_consistent(out, warmup=1, steps=2)
    phases = {p["phase"]: p for p in bench["phases"]}
    assert list(phases) == ["generate", "grade", "advantages", "old_logprobs", "reference", "update", "sync"]
    for name in ("generate", "grade", "old_logprobs", "reference", "update", "sync"):
        assert phases[name]["engine_seconds"] > 0, name
    # 32 prompts x 8 samples, each up to rollout.sampling.max_new_tokens (6) tokens.
    assert phases["grade"]["work"] == 256 and 256 <= phases["generate"]["work"] <= 256 * 6
    figures = bench["figures"]
    assert figures["generation_tokens_per_second"] > 0 and figures["training_tokens_per_second"] > 0
    assert figures["weight_sync_gb_per_second"] > 0 and figures["samples_per_second"] > 0
    # The bench runs no evaluation and keeps only the final checkpoint.
    metrics = read_metrics(out / "job/metrics.jsonl")
    assert not [r for r in metrics if "eval/accuracy" in r]
    assert [p.name for p in (out / "job/checkpoints").glob("step_*")] == ["step_000003"]


@pytest.mark.slow
def test_bench_dpo_with_a_reference_server_in_one_process(tmp_path):
    out = tmp_path / "bench"
    proc = run_rlft(
        "bench", str(ROOT / "configs/dpo_tiny.yaml"),
        "model.path=tiny://model",
        "dpo.reference=server",
        "ray.local_mode=true",
        "learner.num_learners=1",
        "trainer.global_batch_size=32",
        "logging.progress_bar=false",
        "--steps", "2", "--warmup", "1", "--out", str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    bench = check_consistent(out, warmup=1, steps=2)
    phases = {p["phase"]: p for p in bench["phases"]}
    assert list(phases) == ["data", "reference", "update"]
    assert phases["reference"]["engine_seconds"] > 0 and phases["update"]["unit"] == "tokens"


def test_bench_rejects_a_step_count_of_zero(tmp_path):
    proc = run_rlft("bench", str(ROOT / "configs/grpo_tiny.yaml"), "--steps", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--steps: need at least 1 measured step" in proc.stderr


def test_summary_medians_and_overhead():
    """Three steps whose phases are known: the medians, the throughputs and the overhead follow from them."""
    records = [
        {"step": s, "time/step_seconds": step, "time/generate_seconds": gen, "engine/generate_seconds": gen * 0.8,
         "time/update_seconds": 0.5, "engine/update_seconds": 0.4, "rollout/response_tokens": 1000,
         "rollout/num_samples": 100, "train/update_tokens": 2000}
        for s, step, gen in [(1, 2.0, 1.0), (2, 3.0, 2.0), (3, 2.5, 1.5)]
    ]
    result = summarize(records, "c.yaml", [], "grpo")
    phases = {p.name: p for p in result.phases}
    assert list(phases) == ["generate", "update"]
    assert result.step_s == 2.5 and phases["generate"].wall_s == 1.5
    assert phases["generate"].per_second == pytest.approx(1000 / 1.5)
    assert phases["update"].engine_per_second == pytest.approx(2000 / 0.4)
    # Per step: step / (0.8 gen + 0.4): 2.0 / 1.2, 3.0 / 2.0, 2.5 / 1.6; the median is 1.5625.
    assert result.overhead == pytest.approx(2.5 / 1.6)
    assert result.headline["samples_per_second"] == pytest.approx(100 / 2.5)
    with pytest.raises(ValueError, match="no measured steps"):
        summarize([], "c.yaml", [], "grpo")


@pytest.mark.slow  # starts four rollout worker actors (about 10 s on 2 cores)
@pytest.mark.ray
def test_simulated_workers_share_a_step_and_report_engine_time(ray_cluster, tiny_model_dir):
    """Four simulated workers: every prompt's samples come back once, in order, and each worker's engine time is
    the modelled time of its share."""
    import ray

    from rlft.rollout.config import RolloutConfig, SamplingConfig
    from rlft.rollout.group import RolloutGroup

    cpus_free = ray.available_resources()["CPU"]
    group = RolloutGroup(tiny_model_dir, RolloutConfig(engine="simulated", num_rollout_workers=4,
                                                       num_cpus_per_worker=0.01,
                                                       simulated_seconds_per_token=0.001))
    try:
        samples = group.generate([[5, 6, 7]] * 8, SamplingConfig(max_new_tokens=10), 2, list(range(8)))
        assert [s.prompt_index for s in samples] == [i for i in range(8) for _ in range(2)]
        assert all(len(s.response_token_ids) == 10 and s.finish_reason == "length" for s in samples)
        # Each worker: 2 prompts x 2 samples x 10 tokens x 1 ms.
        assert group.engine_seconds()["generate"] == pytest.approx(0.04, abs=0.02)
        assert group.engine_seconds() == {}
    finally:
        group.shutdown()
        # The session's cluster is shared: leave it with the CPUs it had (killed actors return theirs a moment later).
        wait_until(lambda: ray.available_resources().get("CPU") == cpus_free, "the workers' CPUs to be released", 30)
