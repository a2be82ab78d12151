"""``rlft bench CONFIG [overrides]``: where a step's time goes, phase by phase.

The job the config describes runs for ``--warmup`` + ``--steps`` steps with engine timing on
(``logging.engine_times``) and without evaluation or intermediate checkpoints. Each step logs two times per
phase: its wall time in the controller (``time/<phase>_seconds``) and the time the engines spent on it
(``engine/<phase>_seconds``: vLLM generating, graders grading, DeepSpeed's forward and backward, weights loaded;
for each role its slowest worker). Over the steps after the warm-up the bench reports medians:

| figure | from |
|---|---|
| generation tokens/s | response tokens / generate seconds |
| grading samples/s | samples / the graders' engine seconds (grading overlaps generation) |
| reference, old-logprob tokens/s | batch tokens / phase seconds |
| training tokens/s | tokens through the update / update seconds |
| weight sync | seconds and GB/s (bytes of one copy of the weights / sync seconds), and its share of memcpy |
| orchestration overhead | step seconds / the sum of the phases' engine seconds |

An overhead of 1.0 means the step is nothing but engine work; 1.25 means a fifth of the step is dispatch,
transfers, batching and the controller's own work. Grading that hides behind generation still counts in the sum,
so the ratio is a lower bound when grading is slow.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out`` (the job's own output is under ``--out/job``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlft.config import Config, ConfigError, load_config
from rlft.controller import run_job
from rlft.metrics import read_metrics
from rlft.names import Phase

# What each phase works on, per step: (the metric that counts it, its unit).
PHASE_WORK: dict[str, tuple[str, str]] = {
    Phase.GENERATE.value: ("rollout/response_tokens", "tokens"),
    Phase.ENV.value: ("envs/steps", "env steps"),
    Phase.GRADE.value: ("rollout/num_samples", "samples"),
    Phase.REFERENCE.value: ("train/batch_tokens", "tokens"),
    Phase.OLD_LOGPROBS.value: ("train/batch_tokens", "tokens"),
    Phase.VALUES.value: ("train/batch_tokens", "tokens"),
    Phase.UPDATE.value: ("train/update_tokens", "tokens"),
    Phase.SYNC.value: ("sync/bytes", "bytes"),
}
# The phases a step runs, in the order it runs them (``rlft.names.Phase``).
PHASE_ORDER = [phase.value for phase in Phase]


@dataclass
class PhaseFigures:
    name: str
    wall_s: float
    engine_s: float | None
    work: float | None
    unit: str | None

    @property
    def per_second(self) -> float | None:
        """Work per wall second of the phase (per engine second for grading, whose wall time is only the part
        that generation did not hide)."""
        seconds = self.engine_s if self.name == "grade" else self.wall_s
        if self.work is None or not seconds:
            return None
        return self.work / seconds

    @property
    def engine_per_second(self) -> float | None:
        if self.work is None or not self.engine_s:
            return None
        return self.work / self.engine_s


@dataclass
class BenchResult:
    """The medians over the measured steps, and how they were taken."""

    config: str
    overrides: list[str]
    algorithm: str
    steps: list[int]
    step_s: float
    overhead: float
    phases: list[PhaseFigures]
    headline: dict[str, float | None]
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "overrides": self.overrides,
            "algorithm": self.algorithm,
            "measured_steps": self.steps,
            "step_seconds": self.step_s,
            "orchestration_overhead": self.overhead,
            "figures": self.headline,
            "phases": [
                {
                    "phase": p.name,
                    "wall_seconds": p.wall_s,
                    "engine_seconds": p.engine_s,
                    "work": p.work,
                    "unit": p.unit,
                    "per_second": p.per_second,
                    "engine_per_second": p.engine_per_second,
                }
                for p in self.phases
            ],
            "environment": self.environment,
        }


def bench_overrides(steps: int, warmup: int, job_dir: Path) -> list[str]:
    """What the bench changes in any config: the step count, no evaluation, no intermediate checkpoints, engine
    timing on, the output under ``job_dir``."""
    return [
        f"trainer.max_steps={warmup + steps}",
        "eval.num_examples=0",
        "eval.every_n_steps=0",
        "dpo.eval_path=",
        "checkpoint.every_n_steps=0",
        "checkpoint.resume=none",
        "logging.engine_times=true",
        "logging.wandb=false",
        f"logging.output_dir={job_dir}",
    ]


def bench(config: str, overrides: list[str], steps: int, warmup: int, out: Path) -> BenchResult:
    """Run the job and write its figures; returns them."""
    if steps < 1:
        raise ConfigError(f"--steps: need at least 1 measured step, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup: must not be negative, got {warmup}")
    out = Path(out).absolute()
    job_dir = out / "job"
    cfg = load_config(config, [*overrides, *bench_overrides(steps, warmup, job_dir)])
    load_before = os.getloadavg()
    started = time.time()
    run_job(cfg)
    records = [r for r in read_metrics(job_dir / "metrics.jsonl") if "time/step_seconds" in r]
    result = summarize(records[warmup:], config, overrides, cfg.algorithm)
    command = shlex.join(["rlft", "bench", config, *overrides, "--steps", str(steps), "--warmup", str(warmup),
                          "--out", str(out)])
    result.environment = environment(cfg, load_before, os.getloadavg(), started, command)
    memcpy = memcpy_gb_per_second()
    result.headline["memcpy_gb_per_second"] = memcpy
    if result.headline["weight_sync_gb_per_second"]:
        result.headline["weight_sync_share_of_memcpy"] = result.headline["weight_sync_gb_per_second"] / memcpy
    result.headline["startup_seconds"] = records[0].get("run/startup_seconds") if records else None
    write_report(result, records, warmup, out)
    return result


def memcpy_gb_per_second(num_bytes: int = 100 * 2**20, repeats: int = 5) -> float:
    """This machine's memory copy bandwidth (the best of ``repeats`` copies of ``num_bytes``): the yardstick of
    the weight sync's GB/s on CPU."""
    import numpy as np

    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[dict], config: str, overrides: list[str], algorithm: str) -> BenchResult:
    """Medians over ``records`` (one per measured step). Per step, the overhead is the step's wall time over the
    sum of its phases' engine times; its median is reported."""
    if not records:
        raise ValueError("no measured steps: the job logged no step after the warm-up")
    names = [p for p in PHASE_ORDER if any(f"time/{p}_seconds" in r for r in records)]
    names += sorted({k[5:-8] for r in records for k in r if k.startswith("time/") and k.endswith("_seconds")}
                    - set(names) - {"step"})
    if any(f"engine/{Phase.ENV.value}_seconds" in r for r in records):
        # Multi-turn: the environments' time inside the rollout workers, a part of the generate phase's wall time
        # (its own wall column is empty).
        at = names.index(Phase.GENERATE.value) + 1 if Phase.GENERATE.value in names else len(names)
        names.insert(at, Phase.ENV.value)
    phases = []
    for name in names:
        work_key, unit = PHASE_WORK.get(name, (None, None))
        engine = [r[f"engine/{name}_seconds"] for r in records if f"engine/{name}_seconds" in r]
        work = [r[work_key] for r in records if work_key in r] if work_key else []
        phases.append(PhaseFigures(
            name=name,
            wall_s=_median([r.get(f"time/{name}_seconds", 0.0) for r in records]),
            engine_s=_median(engine),
            work=_median(work),
            unit=unit if work else None,
        ))
    overheads = [
        r["time/step_seconds"] / engine_sum
        for r in records
        if (engine_sum := sum(v for k, v in r.items() if k.startswith("engine/"))) > 0
    ]
    by_name = {p.name: p for p in phases}

    def rate(phase: Phase, engine: bool = False) -> float | None:
        p = by_name.get(phase.value)
        return None if p is None else (p.engine_per_second if engine else p.per_second)

    sync = by_name.get(Phase.SYNC.value)
    headline = {
        "step_seconds": _median([r["time/step_seconds"] for r in records]),
        "generation_tokens_per_second": rate(Phase.GENERATE),
        "env_steps_per_second": rate(Phase.ENV, engine=True),
        "grading_samples_per_second": rate(Phase.GRADE),
        "reference_tokens_per_second": rate(Phase.REFERENCE),
        "training_tokens_per_second": rate(Phase.UPDATE),
        # One definition, the phase table's: bytes of one copy of the weights / the sync phase's wall seconds
        # (the learners publishing until the last worker has loaded them).
        "weight_sync_seconds": sync.wall_s if sync else None,
        "weight_sync_gb_per_second": sync.per_second / 1e9 if sync and sync.per_second else None,
        # Of the sync, the engine's reload (the rest is the transfer: publishing until every worker has the bytes).
        "weight_sync_load_seconds": _median([r["sync/load_seconds"] for r in records if "sync/load_seconds" in r]),
        "weight_sync_transfer_gb_per_second": _median(
            [r["sync/transfer_gb_per_s"] for r in records if "sync/transfer_gb_per_s" in r]),
        # What role calls handed back to the driver per step: samples, grades, handles, metrics; no payloads.
        "driver_received_bytes": _median([r["driver/received_bytes"] for r in records if "driver/received_bytes" in r]),
        "orchestration_overhead": _median(overheads),
        # Asynchronous RL hides generation behind the learners' work: the step against the longer of the two sides'
        # engine times (1.0: perfect overlap; synchronous steps run them one after the other, so near 2 when even).
        "overlap_ratio": _median([ratio for r in records if (ratio := _overlap_ratio(r)) is not None]),
        "staleness_mean": _median([r["async/staleness_mean"] for r in records if "async/staleness_mean" in r]),
        "samples_per_second": _median([r["rollout/num_samples"] / r["time/step_seconds"] for r in records
                                       if "rollout/num_samples" in r]),
    }
    return BenchResult(
        config=config,
        overrides=list(overrides),
        algorithm=algorithm,
        steps=[r["step"] for r in records],
        step_s=headline["step_seconds"],
        overhead=headline["orchestration_overhead"],
        phases=phases,
        headline=headline,
    )


def _overlap_ratio(record: dict) -> float | None:
    """One step's wall time over max(generation's engine time, the other roles' engine time but grading's)."""
    generate = record.get("engine/generate_seconds")
    rest = sum(v for k, v in record.items() if k.startswith("engine/")
               and k not in ("engine/generate_seconds", "engine/grade_seconds"))
    if not generate or not rest:
        return None
    return record["time/step_seconds"] / max(generate, rest)


def environment(cfg: Config, load_before: tuple, load_after: tuple, started: float, command: str) -> dict:
    """Where and when the figures were taken: machine, versions, the job's shape, the load around the run."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("vllm", "deepspeed", "ray", "transformers"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:  # not installed, or an import that fails on this machine
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}" + (f", {gpu}" if gpu else ""),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "versions": versions,
        "model": cfg.model.path,
        "learners": f"{cfg.learner.num_learners} x ZeRO-{cfg.learner.zero_stage}",
        "rollout": f"{cfg.rollout.num_rollout_workers} x {cfg.rollout.engine}",
        "command": command,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------------------ the report


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _rate(value: float | None, unit: str | None) -> str:
    if value is None or unit is None:
        return "–"
    if unit == "bytes":
        return f"{value / 1e9:.3g} GB/s"
    return f"{_fmt(value)} {unit}/s"


def markdown(result: BenchResult) -> str:
    env = result.environment
    h = result.headline
    lines = [
        f"# rlft bench: {result.config}" + (f" {' '.join(result.overrides)}" if result.overrides else ""),
        "",
        f"- {result.algorithm}, {env.get('learners', '')} learners, {env.get('rollout', '')} rollout; "
        f"model {env.get('model', '')}",
        f"- {env.get('machine', '')}; {env.get('date', '')}; load average before {env.get('load_average_before')}, "
        f"after {env.get('load_average_after')}",
        f"- medians over steps {result.steps[0]}-{result.steps[-1]} ({len(result.steps)} steps after the warm-up)",
        f"- command: `{env.get('command', '')}`",
        "",
        "| phase | work per step | wall s | engine s | throughput (wall) | throughput (engine) |",
        "|---|---|---|---|---|---|",
    ]
    for p in result.phases:
        work = "–" if p.work is None else (f"{p.work / 1e6:.3g} MB" if p.unit == "bytes" else f"{_fmt(p.work)} {p.unit}")
        lines.append(f"| {p.name} | {work} | {_fmt(p.wall_s)} | {_fmt(p.engine_s)} | {_rate(p.per_second, p.unit)} "
                     f"| {_rate(p.engine_per_second, p.unit)} |")
    phase_sum = sum(p.wall_s for p in result.phases)
    engine_sum = sum(p.engine_s or 0.0 for p in result.phases)
    lines += [
        f"| **step** | | **{_fmt(h['step_seconds'])}** (phases {_fmt(phase_sum)}) | **{_fmt(engine_sum)}** | | |",
        "",
        "| figure | value |",
        "|---|---|",
        f"| step time | {_fmt(h['step_seconds'])} s |",
        f"| generation | {_rate(h['generation_tokens_per_second'], 'tokens')} |",
        *([f"| environments | {_rate(h['env_steps_per_second'], 'env steps')} (engine) |"]
          if h.get("env_steps_per_second") else []),
        f"| grading | {_rate(h['grading_samples_per_second'], 'samples')} |",
        f"| reference | {_rate(h['reference_tokens_per_second'], 'tokens')} |",
        f"| training | {_rate(h['training_tokens_per_second'], 'tokens')} |",
        f"| weight sync | {_fmt(h['weight_sync_seconds'])} s, {_fmt(h['weight_sync_gb_per_second'])} GB/s "
        f"({_fmt(100 * h['weight_sync_share_of_memcpy']) if h.get('weight_sync_share_of_memcpy') else '-'} % of this "
        f"machine's memcpy, {_fmt(h.get('memcpy_gb_per_second'))} GB/s) |",
        f"| driver received per step (samples, grades, handles, metrics) | "
        f"{_fmt(h.get('driver_received_bytes'))} bytes |",
        f"| samples per second (whole step) | {_fmt(h['samples_per_second'])} |",
        f"| orchestration overhead (step / engine sum) | {_fmt(h['orchestration_overhead'])} |",
        f"| overlap (step / max(generation engine, other engines)) | {_fmt(h.get('overlap_ratio'))} |",
        f"| staleness (policy versions, mean) | {_fmt(h.get('staleness_mean'))} |",
        f"| time to the first step (process start to step 1) | {_fmt(h.get('startup_seconds'))} s |",
        "",
    ]
    return "\n".join(lines)


def plot(result: BenchResult, records: list[dict], warmup: int, path: Path) -> None:
    """Left: each step's phase wall times stacked, with the step time (warm-up steps shaded). Right: each phase's
    median wall time against its engine time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in records]
    bottom = [0.0] * len(records)
    for p in result.phases:
        heights = [r.get(f"time/{p.name}_seconds", 0.0) for r in records]
        left.bar(steps, heights, bottom=bottom, label=p.name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    left.plot(steps, [r["time/step_seconds"] for r in records], "k.-", label="step")
    if warmup:
        left.axvspan(steps[0] - 0.5, steps[0] + warmup - 0.5, color="grey", alpha=0.15, label="warm-up")
    left.set_xlabel("step")
    left.set_ylabel("seconds")
    left.set_title("phase wall times per step")
    left.legend(fontsize=7, ncol=2)
    names = [p.name for p in result.phases]
    y = range(len(names))
    right.barh([i + 0.2 for i in y], [p.wall_s for p in result.phases], height=0.4, label="wall")
    right.barh([i - 0.2 for i in y], [p.engine_s or 0.0 for p in result.phases], height=0.4, label="engine")
    right.set_yticks(list(y), names)
    right.invert_yaxis()
    right.set_xlabel("median seconds per step")
    right.set_title(f"step {result.step_s:.3g} s, overhead {_fmt(result.overhead)}x")
    right.legend(fontsize=7)
    fig.suptitle(f"rlft bench: {Path(result.config).name} ({result.algorithm})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: BenchResult, records: list[dict], warmup: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=1))
    (out / "bench.md").write_text(markdown(result))
    plot(result, records, warmup, out / "bench.png")
