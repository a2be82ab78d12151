"""The demo's GRPO stage synchronous and one step off-policy, over seeds: same steps, accuracy and wall time.

    python benchmarks/async_learning.py --start-model runs/sft_tiny/final_model --seeds 0 1 2 \
        --staleness 0 1 --out benchmarks/results/async_learning

Each run is ``rlft train configs/grpo_tiny.yaml`` from one SFT model in a fresh process, with ``trainer.seed=S``
and ``rl.max_staleness_steps=K`` (everything else as the demo runs it: 60 steps, held-out exact match every 10).
Runs alternate between the staleness values seed by seed, so a drift in the machine's load falls on both. The
report gives, per K, the held-out accuracy along the run and its wall time (mean and min-max over seeds), the
final accuracy gap to K = 0, and a PNG of the curves against steps and against seconds. A finished run is read
back from its directory instead of being run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from logged_run import run_logged


def one_run(start_model: str, seed: int, staleness: int, out: Path, extra: list[str]) -> dict:
    where = out / f"k{staleness}-seed{seed}"
    if not (where / "summary.json").exists():
        cmd = [sys.executable, "-m", "rlft.cli", "train", "configs/grpo_tiny.yaml", f"model.path={start_model}",
               f"trainer.seed={seed}", f"rl.max_staleness_steps={staleness}", "logging.progress_bar=false",
               "logging.wandb=false", *extra, f"logging.output_dir={where}"]
        run_logged(cmd, out / f"k{staleness}-seed{seed}.log")
    records = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step_seconds" in r]
    # Wall time of the training loop: the steps plus the evaluations between them (the start-up is not learning).
    elapsed, curve = 0.0, []
    for r in records:
        if "time/step_seconds" in r:
            elapsed += r["time/step_seconds"]
        if "eval/accuracy" in r:
            curve.append({"step": r["step"], "seconds": round(elapsed, 1), "accuracy": r["eval/accuracy"]})
            elapsed += r.get("eval/seconds", 0.0)
    summary = json.loads((where / "summary.json").read_text())
    return {
        "seed": seed,
        "staleness": staleness,
        "curve": curve,
        "final_accuracy": summary["eval_accuracy_end"],
        "train_seconds": round(sum(r["time/step_seconds"] for r in steps), 1),
        "median_step_seconds": statistics.median(r["time/step_seconds"] for r in steps),
        "startup_seconds": steps[0].get("run/startup_seconds"),
        "run_seconds": summary["seconds"],
    }


def report(runs: list[dict], staleness: list[int]) -> str:
    def span(values: list[float], digits: int = 3) -> str:
        return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    lines = ["| max_staleness_steps | final held-out accuracy | steps' wall s | median step s | run s | start-up s |",
             "|---|---|---|---|---|---|"]
    by_k = {k: [r for r in runs if r["staleness"] == k] for k in staleness}
    for k, rs in by_k.items():
        lines.append(f"| {k} | {span([r['final_accuracy'] for r in rs])} | {span([r['train_seconds'] for r in rs], 1)} "
                     f"| {span([r['median_step_seconds'] for r in rs], 2)} | {span([r['run_seconds'] for r in rs], 1)} "
                     f"| {span([r['startup_seconds'] for r in rs], 1)} |")
    if 0 in by_k:
        base = statistics.mean(r["final_accuracy"] for r in by_k[0])
        for k, rs in by_k.items():
            if k:
                gap = 100 * (statistics.mean(r["final_accuracy"] for r in rs) - base)
                lines.append(f"\nk = {k}: final accuracy {gap:+.1f} points against k = 0 (mean over seeds).")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], staleness: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {k: f"C{i}" for i, k in enumerate(staleness)}
    for r in runs:
        label = f"k={r['staleness']}" if r["seed"] == min(x["seed"] for x in runs) else None
        steps = [p["step"] for p in r["curve"]]
        seconds = [p["seconds"] for p in r["curve"]]
        accuracy = [p["accuracy"] for p in r["curve"]]
        by_step.plot(steps, accuracy, "o-", color=colors[r["staleness"]], alpha=0.7, label=label)
        by_time.plot(seconds, accuracy, "o-", color=colors[r["staleness"]], alpha=0.7, label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (steps and evaluations, start-up excluded)")
    by_step.set_ylabel("held-out exact match")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GRPO on the embedded task: synchronous (k=0) and asynchronous (k>0), one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-model", required=True, help="the SFT model GRPO starts from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="benchmarks/results/async_learning")
    parser.add_argument("extra", nargs="*", help="more KEY=VALUE overrides for every run")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    runs = []
    for i, seed in enumerate(args.seeds):
        order = args.staleness if i % 2 == 0 else list(reversed(args.staleness))
        for k in order:
            runs.append(one_run(str(Path(args.start_model).absolute()), seed, k, out, args.extra))
            print(json.dumps(runs[-1]), flush=True)
    (out / "async_learning.json").write_text(json.dumps(runs, indent=1))
    (out / "async_learning.md").write_text(report(runs, args.staleness))
    plot(runs, args.staleness, out / "async_learning.png")
    print(report(runs, args.staleness))


if __name__ == "__main__":
    main()
