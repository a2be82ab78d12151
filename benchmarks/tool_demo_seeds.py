"""The tool-use demo over seeds: held-out success, turns and tool calls along GRPO, from the SFT model.

    python benchmarks/tool_demo_seeds.py --sft-seeds 0 --seeds 0 1 2 --out benchmarks/results/tool_demo_seeds

Each SFT seed runs ``rlft train configs/sft_tool_tiny.yaml`` once; each GRPO seed then runs ``rlft train
configs/grpo_tool_tiny.yaml`` from that model, in fresh processes, with ``trainer.seed=S`` (data order, learner RNG,
sampling seed). The report gives every run's held-out figures at each evaluation (greedy success, sampled success,
tool calls and turns per greedy trajectory) and the min-max over runs. A finished run is read back from its directory
instead of being run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from logged_run import run_logged

FIGURES = {"greedy": "eval/accuracy", "sampled": "eval/sampled_accuracy", "tool_calls": "eval/tool_calls_mean",
           "turns": "eval/turns_mean"}


def stage(config: str, where: Path, overrides: list[str]) -> Path:
    if not (where / "summary.json").exists():
        cmd = [sys.executable, "-m", "rlft.cli", "train", config, *overrides, "logging.progress_bar=false",
               f"logging.output_dir={where}"]
        run_logged(cmd, where.with_suffix(".log"))
    return where


def grpo_run(sft_seed: int, seed: int, out: Path, extra: list[str]) -> dict:
    sft = stage("configs/sft_tool_tiny.yaml", out / f"sft-seed{sft_seed}", [f"trainer.seed={sft_seed}"])
    grpo = stage("configs/grpo_tool_tiny.yaml", out / f"sft-seed{sft_seed}-grpo-seed{seed}",
                 [f"trainer.seed={seed}", f"model.path={sft / 'final_model'}", *extra])
    records = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    return {
        "sft_seed": sft_seed,
        "seed": seed,
        "curve": [{"step": r["step"], **{name: r[key] for name, key in FIGURES.items()}} for r in evals],
        "seconds": {name: round(json.loads((where / "summary.json").read_text())["seconds"], 1)
                    for name, where in (("sft", sft), ("grpo", grpo))},
    }


def markdown(runs: list[dict]) -> str:
    steps = [point["step"] for point in runs[0]["curve"]]
    lines = ["| SFT seed | GRPO seed | greedy success at steps " + " / ".join(map(str, steps))
             + " | sampled success | tool calls per greedy answer | turns | wall s (SFT, GRPO) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        def row(name, scale=100.0, digits=1):
            return " / ".join(f"{scale * p[name]:.{digits}f}" for p in r["curve"])

        lines.append(f"| {r['sft_seed']} | {r['seed']} | {row('greedy')} | {row('sampled')} | "
                     f"{row('tool_calls', 1.0, 2)} | {row('turns', 1.0, 2)} | "
                     f"{r['seconds']['sft']:.0f}, {r['seconds']['grpo']:.0f} |")
    start = [r["curve"][0]["greedy"] for r in runs]
    end = [r["curve"][-1]["greedy"] for r in runs]
    calls = [r["curve"][-1]["tool_calls"] for r in runs]
    lines += ["", f"Over {len(runs)} runs: greedy held-out success {100 * min(start):.1f}-{100 * max(start):.1f} % at "
              f"the SFT start, {100 * min(end):.1f}-{100 * max(end):.1f} % after {steps[-1]} GRPO steps; tool calls "
              f"per greedy answer {min(calls):.2f}-{max(calls):.2f} at the end."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/tool_demo_seeds")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="overrides for the GRPO stage")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for sft_seed in args.sft_seeds:
        for seed in args.seeds:
            runs.append(grpo_run(sft_seed, seed, out, args.extra))
            (out / "result.json").write_text(json.dumps(runs, indent=2) + "\n")
            (out / "result.md").write_text(markdown(runs))
            print(markdown(runs), flush=True)


if __name__ == "__main__":
    main()
