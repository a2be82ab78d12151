"""benchmarks/gpu_bench.py on one CUDA GPU, with few steps: it runs end to end (0.5B model built locally, GRPO and
DPO benches, bare vLLM) and its report holds sane figures. Skipped without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from rlft.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

NUM_STEPS, NUM_WARMUP = 2, 1


def test_gpu_bench_reports_positive_figures_and_the_ratio_to_bare_vllm(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_bench.py"), "--out", str(tmp_path),
         "--steps", str(NUM_STEPS), "--warmup", str(NUM_WARMUP), "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert (tmp_path / "gpu_bench.md").read_text().startswith("# GPU bench")
    assert report["machine"]["gpu"] and report["machine"]["gpu_memory_gib"] > 0
    assert 450_000_000 < report["num_parameters"] < 550_000_000

    grpo, dpo = report["grpo"]["figures"], report["dpo"]["figures"]
    for name in ("step_seconds", "generation_tokens_per_second", "grading_samples_per_second",
                 "training_tokens_per_second", "weight_sync_seconds", "weight_sync_gb_per_second",
                 "samples_per_second"):
        assert grpo[name] > 0, name
    for name in ("step_seconds", "reference_tokens_per_second", "training_tokens_per_second"):
        assert dpo[name] > 0, name

    # Every transport carried the weights, and the driver saw no payload.
    by_transport = report["weight_sync_by_transport"]
    assert set(by_transport) == {"object_store", "collective", "cuda_ipc"}
    for transport, figures in by_transport.items():
        assert figures["weight_sync_gb_per_second"] > 0, transport
        assert figures["driver_received_bytes"] < 10 * 2**20, transport

    rollout = report["rollout_vs_bare_vllm"]
    assert rollout["bare_vllm_tokens_per_second"] > 0
    assert rollout["engine_ratio"] > 0
    # rlft's rollout adds work to the engine's; beating bare vLLM by half would mean the two measured different things.
    assert 0 < rollout["ratio"] < 1.5

    # Within each step the phases run one after another.
    for job in ("grpo", "dpo"):
        steps = [r for r in read_metrics(tmp_path / job / "job" / "metrics.jsonl") if "time/step_seconds" in r]
        assert len(steps) == NUM_WARMUP + NUM_STEPS, job
        for record in steps:
            phases = sum(v for k, v in record.items()
                         if k.startswith("time/") and k.endswith("_seconds") and k != "time/step_seconds")
            assert 0 < phases <= record["time/step_seconds"], (job, record["step"])
