"""Learner-group training throughput by ZeRO stage on the embedded tiny model (CPU, gloo).

    .venv/bin/python benchmarks/learner_throughput.py --stages 0 1 2 3 --steps 30

For each stage: start a 2-rank LearnerGroup on a local Ray cluster, run a few warm-up steps, then time
``--steps`` SFT steps on fixed batches of the arithmetic task. Prints a Markdown table (start-up seconds, median
step seconds, tokens/s) and writes the figures as JSON next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import ray
from transformers import AutoTokenizer

from rlft.algorithms import SFTLoss
from rlft.config import RayConfig, load_config
from rlft.data import formats
from rlft.data.packing import collate, normalize_loss_weights
from rlft.data.tokenize import tokenize_sft_examples
from rlft.distributed.cluster import init_ray
from rlft.learner import LearnerGroup
from rlft.tiny import resolve

NUM_WARMUP_STEPS = 3


def measure(stage: int, args: argparse.Namespace, batches) -> dict:
    cfg = load_config(
        None,
        [
            f"model.path={resolve(args.model)}",
            f"learner.zero_stage={stage}",
            f"learner.num_learners={args.num_learners}",
            f"learner.micro_batch_size_per_learner={args.micro_batch_size}",
            f"trainer.global_batch_size={args.rows_per_step}",
        ],
    )
    t0 = time.perf_counter()
    group = LearnerGroup(cfg, total_steps=args.steps + NUM_WARMUP_STEPS)
    startup_seconds = time.perf_counter() - t0
    try:
        step_seconds, tokens = [], 0
        for i in range(NUM_WARMUP_STEPS + args.steps):
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            group.train_step(batch, SFTLoss())
            if i >= NUM_WARMUP_STEPS:
                step_seconds.append(time.perf_counter() - t0)
                tokens += batch.num_tokens
    finally:
        group.shutdown()
    return {
        "zero_stage": stage,
        "startup_seconds": round(startup_seconds, 2),
        "median_step_seconds": round(statistics.median(step_seconds), 4),
        "tokens_per_second": round(tokens / sum(step_seconds)),
        "tokens_per_step": round(tokens / len(step_seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="tiny://model")
    parser.add_argument("--num-learners", type=int, default=2)
    parser.add_argument("--rows-per-step", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).with_name("learner_throughput.json")))
    args = parser.parse_args()

    model_dir = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded = formats.load_examples(
        resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft, limit=4 * args.rows_per_step
    )
    rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
    batches = [
        normalize_loss_weights(collate(rows[i : i + args.rows_per_step], tokenizer.pad_token_id))
        for i in range(0, len(rows) - args.rows_per_step + 1, args.rows_per_step)
    ]
    init_ray(RayConfig(), num_cpus_needed=args.num_learners)
    results = [measure(stage, args, batches) for stage in args.stages]
    ray.shutdown()

    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {len(os.sched_getaffinity(0))} cores",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "num_learners": args.num_learners,
        "rows_per_step": args.rows_per_step,
        "micro_batch_size": args.micro_batch_size,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| ZeRO stage | start-up s | median step s | tokens/s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['zero_stage']} | {r['startup_seconds']} | {r['median_step_seconds']} | {r['tokens_per_second']} |")


if __name__ == "__main__":
    main()
