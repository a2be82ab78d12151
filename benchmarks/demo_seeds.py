"""`make demo` over seeds and learner thread counts: the range its figures hold in.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --threads 1 2 --out benchmarks/results/demo_seeds

Each run is the demo as a user runs it, ``rlft train configs/sft_tiny.yaml`` then ``rlft train
configs/grpo_tiny.yaml`` from its model, in fresh processes, with ``trainer.seed=S`` (data order, learner RNG and,
for GRPO, the sampling seed) and ``learner.num_cpus_per_learner=T`` (Ray gives each learner T threads). The report
gives every run's held-out exact match after SFT and along GRPO, and the min-max over all runs: the range the
README quotes. Runs go thread count by thread count, seed by seed; a finished run is read back from its directory
instead of being run again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from logged_run import run_logged
from rlft.tiny.tasks import MIXED_STYLE_PREFIX


def _evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/accuracy" in r]


def any_style_accuracy(samples_path: Path) -> float:
    """The share of held-out answers that are right in either of the teacher's styles ("82" or "Answer: 82"): the
    SFT model's arithmetic, whatever style it picked."""
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    right = [r["completion"].strip() in (r["answer"], MIXED_STYLE_PREFIX + r["answer"]) for r in rows]
    return sum(right) / len(rows)


def demo_run(seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    """SFT then GRPO with one seed and thread count; the held-out figures of both stages."""
    where = out / f"threads{threads}-seed{seed}"
    common = [f"trainer.seed={seed}", f"learner.num_cpus_per_learner={threads}", "logging.progress_bar=false"]
    for stage, config, more in (
        ("sft", "configs/sft_tiny.yaml", []),
        ("grpo", "configs/grpo_tiny.yaml", [f"model.path={where / 'sft' / 'final_model'}"]),
    ):
        if not (where / stage / "summary.json").exists():
            cmd = [sys.executable, "-m", "rlft.cli", "train", config, *common, *more, *extra,
                   f"logging.output_dir={where / stage}"]
            run_logged(cmd, where / f"{stage}.log")
    # The job's own wall time (start-up, training, evaluations, saving; not the interpreter's imports).
    seconds = {stage: round(json.loads((where / stage / "summary.json").read_text())["seconds"], 1)
               for stage in ("sft", "grpo")}
    sft_evals, grpo_evals = _evals(where / "sft"), _evals(where / "grpo")
    run = {
        "seed": seed,
        "threads_per_learner": threads,
        "sft_accuracy": sft_evals[-1]["eval/accuracy"],
        "sft_any_style_accuracy": any_style_accuracy(where / "sft" / "eval_samples_final.jsonl"),
        "grpo_accuracy_start": grpo_evals[0]["eval/accuracy"],
        "grpo_accuracy_end": grpo_evals[-1]["eval/accuracy"],
        # The last number of the answer, right or not whatever the style (eval.extract_pattern in the config).
        "grpo_extracted_accuracy_end": grpo_evals[-1].get("eval/extracted_accuracy"),
        "grpo_curve": [(r["step"], r["eval/accuracy"]) for r in grpo_evals],
        "grpo_sampled_curve": [(r["step"], r.get("eval/sampled_accuracy")) for r in grpo_evals],
        "seconds": seconds,
    }
    run["grpo_gain"] = run["grpo_accuracy_end"] - run["sft_accuracy"]
    return run


def summarize(runs: list[dict]) -> dict:
    def span(key):
        values = [r[key] for r in runs]
        return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}

    keys = ("sft_accuracy", "sft_any_style_accuracy", "grpo_accuracy_start", "grpo_accuracy_end", "grpo_gain")
    return {key: span(key) for key in keys}


def markdown(result: dict) -> str:
    steps = [step for step, _ in result["runs"][0]["grpo_curve"]]
    lines = [
        "| threads per learner | seed | SFT held-out (either style) | GRPO held-out at steps " + " / ".join(map(str, steps))
        + " | GRPO end, either style | gain (GRPO end − SFT) | wall s (SFT, GRPO) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        curve = " / ".join(f"{100 * acc:.1f}" for _, acc in r["grpo_curve"])
        wall = f"{r['seconds']['sft']:.0f}, {r['seconds']['grpo']:.0f}"
        either = r["grpo_extracted_accuracy_end"]
        either = "–" if either is None else f"{100 * either:.1f} %"
        lines.append(f"| {r['threads_per_learner']} | {r['seed']} | {100 * r['sft_accuracy']:.1f} % "
                     f"({100 * r['sft_any_style_accuracy']:.1f} %) | {curve} | {either} | {100 * r['grpo_gain']:+.1f} "
                     f"| {wall} |")
    s = result["summary"]
    lines.append("")
    lines.append(
        f"Over {len(result['runs'])} runs: SFT {100 * s['sft_accuracy']['min']:.1f}-{100 * s['sft_accuracy']['max']:.1f} % "
        f"({100 * s['sft_any_style_accuracy']['min']:.1f}-{100 * s['sft_any_style_accuracy']['max']:.1f} % in either "
        "style), "
        f"GRPO after {steps[-1]} steps {100 * s['grpo_accuracy_end']['min']:.1f}-"
        f"{100 * s['grpo_accuracy_end']['max']:.1f} %, gain {100 * s['grpo_gain']['min']:+.1f} to "
        f"{100 * s['grpo_gain']['max']:+.1f} points."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["runs"]:
        steps, accs = zip(*r["grpo_curve"])
        style = "-" if r["threads_per_learner"] == 1 else "--"
        ax.plot(steps, [100 * a for a in accs], style, alpha=0.8,
                label=f"seed {r['seed']}, {r['threads_per_learner']} thread(s)")
    ax.set_xlabel("GRPO step (0 = the SFT model)")
    ax.set_ylabel("held-out greedy exact match, %")
    ax.set_title("make demo: GRPO from the SFT model, every seed and thread count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="threads (CPUs) per learner")
    parser.add_argument("--out", default="benchmarks/results/demo_seeds")
    parser.add_argument("--report", action="store_true", help="run nothing; report every finished run in --out")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="overrides for both stages")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        # Every finished run in --out, whatever sweep left it there.
        done = sorted((int(p.parent.parent.name.split("-seed")[0].removeprefix("threads")),
                       int(p.parent.parent.name.split("-seed")[1])) for p in out.glob("threads*-seed*/grpo/summary.json"))
        runs = [demo_run(seed, threads, out, args.extra) for threads, seed in done]
    else:
        runs = []
        for threads in args.threads:
            for seed in args.seeds:
                run = demo_run(seed, threads, out, args.extra)
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if not k.endswith("curve")}), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, {_cpu_flags()}",
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "extra_overrides": args.extra,
              "runs": runs, "summary": summarize(runs)}
    (out / "demo_seeds.json").write_text(json.dumps(result, indent=1))
    (out / "demo_seeds.md").write_text(markdown(result))
    plot(result, out / "demo_seeds.png")
    print(markdown(result))


def _cpu_flags() -> str:
    """Whether this CPU has AVX-512 (the difference between otherwise alike machines)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")


if __name__ == "__main__":
    main()
