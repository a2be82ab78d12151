"""Packed vs padded RL micro-batches (``learner.max_tokens_per_micro_batch``) on long-tailed response lengths.

    .venv/bin/python benchmarks/packing_rl.py [--model tiny://small-model] [--repeats 5]
        [--max-tokens 1024 2048] [--out benchmarks/results/packing_rl]

One GRPO update step's batch: ``--num-samples`` samples with prompts of 16-32 tokens and responses of lognormal
length (median ``--median-response`` tokens, σ ``--sigma``, cut at ``--max-new-tokens``), the long tail RL rollouts
have. One in-process learner (DeepSpeed ZeRO-2 on CPU) runs the same GRPO loss (PPO clip, token mean) on it,
padded (micro-batches of ``--micro-batch-size`` rows, each padded to its longest row) and packed (rows of at most
each ``--max-tokens`` tokens, several samples to a row), interleaved, ``--repeats`` times each after one warm-up
step each. The learning rate is tiny so both run on practically the same weights.

Reported per mode: padding waste (the share of the micro-batches' positions that hold no token, computed for
nothing) and update tokens/s (the batch's real tokens / the step's seconds; median and range over the repeats).
Writes ``<out>/packing_rl.json`` and ``<out>/packing_rl.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def long_tailed_batch(args: argparse.Namespace, vocab_size: int):
    """A GRPO step's policy batch with lognormal response lengths, weighted by token mean."""
    import torch

    from rlft.algorithms import aggregation_weights
    from rlft.data.batch import policy_batch
    from rlft.rollout import Sample

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    responses = torch.distributions.LogNormal(torch.tensor(args.median_response).log(), args.sigma)
    response_lengths = responses.sample((args.num_samples,)).round().clamp(1, args.max_new_tokens).long().tolist()
    prompt_lengths = torch.randint(16, 33, (args.num_samples,), generator=gen).tolist()
    samples = []
    for prompt, response in zip(prompt_lengths, response_lengths):
        ids = torch.randint(3, vocab_size, (prompt + response,), generator=gen).tolist()
        samples.append(Sample(prompt_index=0, prompt_token_ids=ids[:prompt], response_token_ids=ids[prompt:],
                              response_logprobs=(-torch.rand(response, generator=gen) * 3).tolist(),
                              response_text="", finish_reason="stop", policy_version=0))
    width = 32 + args.max_new_tokens
    batch = policy_batch(samples, torch.randn(args.num_samples, generator=gen), 0, width)
    weights_BT = aggregation_weights(batch.loss_weights_BT != 0, "token_mean")
    return dataclasses.replace(batch, loss_weights_BT=weights_BT), response_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny://small-model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--median-response", type=float, default=24.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/packing_rl")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import AutoConfig

    from rlft.algorithms import PolicyLoss
    from rlft.bench import _cpu_name
    from rlft.config import load_config
    from rlft.learner import LearnerGroup
    from rlft.tiny import resolve

    model_dir = resolve(args.model)
    batch, response_lengths = long_tailed_batch(args, AutoConfig.from_pretrained(model_dir).vocab_size)
    cfg = load_config(None, [
        "algorithm=grpo", f"model.path={model_dir}", "learner.num_learners=1", "learner.zero_stage=2",
        f"learner.micro_batch_size_per_learner={args.micro_batch_size}",
        f"trainer.global_batch_size={args.num_samples}", f"rl.num_prompts_per_step={args.num_samples // 8}",
        "rl.num_samples_per_prompt=8", f"rollout.max_model_len={32 + args.max_new_tokens}",
        f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
        f"learner.max_tokens_per_micro_batch={max(args.max_tokens)}",
        "trainer.lr=1e-9", "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
    ])
    loss = PolicyLoss(clip_high=0.28, old_logprobs_from_update=True)
    group = LearnerGroup(cfg, total_steps=2 * (args.repeats + 1), local=True)
    budgets = {"padded": 0, **{f"packed_{n}": n for n in args.max_tokens}}
    seconds: dict[str, list[float]] = {mode: [] for mode in budgets}
    step_metrics: dict[str, dict] = {}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up
            for mode in budgets:
                group.spec = dataclasses.replace(group.spec, max_tokens_per_micro_batch=budgets[mode])
                start = time.perf_counter()
                step_metrics[mode] = group.train_step(batch, loss).metrics
                if repeat:
                    seconds[mode].append(time.perf_counter() - start)
                print(f"repeat {repeat} {mode}: {time.perf_counter() - start:.2f} s", flush=True)
    finally:
        group.shutdown()

    results = []
    for mode in budgets:
        m = step_metrics[mode]
        rates = sorted(batch.num_tokens / s for s in seconds[mode])
        results.append({
            "mode": mode,
            "max_tokens_per_micro_batch": budgets[mode],
            "micro_batches": int(m["num_micro_batches"]),
            "padding_waste": m["padding_tokens"] / (m["padding_tokens"] + batch.num_tokens),
            "step_seconds": seconds[mode],
            "tokens_per_second_median": statistics.median(rates),
            "tokens_per_second_range": [rates[0], rates[-1]],
        })
    report = {
        "machine": f"{platform.machine()}, {_cpu_name()}, {len(os.sched_getaffinity(0))} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/packing_rl.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "num_samples": args.num_samples,
        "batch_tokens": batch.num_tokens,
        "response_tokens": {"median": statistics.median(response_lengths), "max": max(response_lengths),
                            "mean": statistics.mean(response_lengths)},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    lines = [
        f"{args.num_samples} samples, {batch.num_tokens} tokens; response lengths lognormal: median "
        f"{report['response_tokens']['median']}, mean {report['response_tokens']['mean']:.1f}, max "
        f"{report['response_tokens']['max']} (cut at {args.max_new_tokens}); {args.model}, 1 learner (ZeRO-2, CPU), "
        f"{args.repeats} interleaved repeats.",
        "",
        "| micro-batches | count | padding waste | update tokens/s, median (range) |",
        "|---|---|---|---|",
    ]
    for r in results:
        what = (f"padded, {args.micro_batch_size} rows each" if r["mode"] == "padded"
                else f"packed, ≤ {r['max_tokens_per_micro_batch']} tokens")
        low, high = r["tokens_per_second_range"]
        lines.append(f"| {what} | {r['micro_batches']} | {100 * r['padding_waste']:.1f} % | "
                     f"{r['tokens_per_second_median']:,.0f} ({low:,.0f}–{high:,.0f}) |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing_rl.json").write_text(json.dumps(report, indent=1))
    (out / "packing_rl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
