"""Time to the first step of ``rlft train`` runs, repeated, and where it goes per role.

    python benchmarks/startup.py --jobs grpo grpo_no_eval sft dpo tool tool_env tool_agent --repeats 3 \
        --out benchmarks/results/startup

Every run is ``rlft train CONFIG`` in a fresh process, as a user runs it, from a fresh temporary working directory,
with ``trainer.max_steps=2``, no checkpoints, no wandb and no progress bar. Its time to the first step is the
metric ``run/startup_seconds`` of its ``metrics.jsonl``: seconds from the driver process's start to the start of
step 1 (imports, config, Ray, the roles, the step-0 evaluation). Where those seconds go comes from the run's
``startup.jsonl`` (``rlft/startup.py``): every process of the run (the driver, each rollout worker, each learner
rank, the grader, the reference server, the evaluation worker) marks when the operating system started it
(``process``), when Ray gave it its actor (``actor``), when its modules were loaded (``imports``) and when its
engine was built (``ready``); the driver marks Ray's start (``ray_start``, ``ray_ready``), its own imports, the
roles' start (``roles_start``, ``roles_ready``), the step-0 evaluation's end (``first_eval``) and the first step
(``first_step``). A mark a job does not make is left out (no ``ray_*`` when Ray was up already, no
``first_eval`` without an evaluation, no ``roles_*`` when a job starts its roles one by one).

The jobs, all from ``configs/`` with ``model.path=tiny://model`` (the embedded 0.8M-parameter model, randomly
initialised: the configs' own model paths point at the SFT demo's model, which a start-up benchmark should not
need):

| job | config | overrides | roles |
|---|---|---|---|
| grpo | grpo_tiny.yaml | | 2 DeepSpeed learners, 1 vLLM-CPU rollout worker, 1 grader |
| grpo_no_eval | grpo_tiny.yaml | ``eval.num_examples=0`` | the same, no step-0 evaluation |
| trl_grpo | ``trl_compare.py trl --algorithm grpo`` | | TRL 1.16's ``GRPOTrainer``, one process (``pip install -e '.[bench]'``) |
| sft | sft_tiny.yaml | | 2 learners, an evaluation worker |
| dpo | dpo_tiny.yaml | ``dpo.cache_dir=OUT/dpo_reference_cache`` | 2 learners, an evaluator, a reference |
| trl_dpo | ``trl_compare.py trl --algorithm dpo`` | | TRL 1.16's ``DPOTrainer``, one process |
| tool | grpo_tool_tiny.yaml | ``envs.name= eval.num_examples=0`` (no environment) | as grpo |
| tool_env | grpo_tool_tiny.yaml | ``eval.num_examples=0`` (its Calculator environment) | as grpo, an environment actor |
| tool_agent | grpo_tool_tiny.yaml | ``envs.name= envs.agent=tests.env_fixtures:two_call_agent eval.num_examples=0`` | as grpo |

The ``tool*`` jobs run without the step-0 evaluation: its work differs between them (the test agent makes two model
calls per trajectory, twice the generation of a single turn), so with it the comparison would be of evaluations,
not of start-up.

grpo's step-0 evaluation is greedy and 4 samples on 500 held-out prompts; grpo_no_eval shows what it costs.
TRL's jobs are ``benchmarks/trl_compare.py``'s, the same step shapes on the same model; their time to the first step
is from the process's start to the first ``on_step_begin`` (they evaluate nothing first, so compare them with
grpo_no_eval and with dpo).

DPO's reference log-probabilities are cached on disk: the cache directory is emptied when this script starts, so
the first DPO repeat computes them (a reference server starts beside the learners and scores every pair between
``roles_ready`` and ``first_eval``: its "first evaluation" figure) and the later repeats read them (no reference
server). ``tool_env`` and ``tool_agent`` are reported against ``tool``, the same
job without either. The first run on a machine also builds the embedded model and data (``~/.cache/rlft/tiny``)
and DeepSpeed's CPU Adam extension; run this script once with ``--repeats 1`` before a measurement that counts.

Each repeat runs every job once, the order rotating by one from one repeat to the next, so a drift in the
machine's load falls on all of them. A run that fails is reported with the tail of its stderr; the others go on.

The report (``startup.json`` with every run's figures and marks, ``startup.md``): per job, the median time to the
first step over repeats and its range; per job, the medians of the breakdown: the driver's Ray start
(``ray_ready - ray_start``), when its imports were done, the roles' start (``roles_ready - roles_start``), when
the last role was ready, the first evaluation (``first_eval - roles_ready``, else ``first_eval`` less the last
role's ``ready``), then for each kind of role (the learner ranks pooled) its imports (``imports - actor``, or
``imports - process`` when the process has no ``actor`` mark) and its engine's construction (``ready - imports``;
a grader, a reference server and an evaluation worker, which mark no imports, from their ``actor`` mark). ``startup_timeline.png`` draws the grpo run whose
time to the first step is the median: a bar per process, coloured by phase; ``startup_timeline_JOB.png`` the same
for the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny://model"
MAX_STEPS = 2
STDERR_TAIL_LINES = 20
ROLE_KINDS = ["rollout", "learner", "grader", "reference", "evaluator"]


@dataclass(frozen=True)
class Job:
    name: str
    config: str  # relative to the repository root; for TRL's jobs, the algorithm
    overrides: tuple[str, ...] = ()
    user_modules: bool = False  # the checkout on PYTHONPATH (tests.env_fixtures)
    trl: bool = False  # TRL 1.16's trainer (benchmarks/trl_compare.py), not rlft


JOBS = {job.name: job for job in [
    Job("grpo", "configs/grpo_tiny.yaml"),
    Job("grpo_no_eval", "configs/grpo_tiny.yaml", ("eval.num_examples=0",)),
    Job("trl_grpo", "grpo", trl=True),
    Job("sft", "configs/sft_tiny.yaml"),
    Job("dpo", "configs/dpo_tiny.yaml"),
    Job("trl_dpo", "dpo", trl=True),
    Job("tool", "configs/grpo_tool_tiny.yaml", ("envs.name=", "eval.num_examples=0")),
    Job("tool_env", "configs/grpo_tool_tiny.yaml", ("eval.num_examples=0",)),
    Job("tool_agent", "configs/grpo_tool_tiny.yaml", ("envs.name=", "envs.agent=tests.env_fixtures:two_call_agent",
                                                      "eval.num_examples=0"),
        user_modules=True),
]}
BASELINE = {"tool_env": "tool", "tool_agent": "tool"}


def rotated(items: list, by: int) -> list:
    """``items`` started ``by`` places later: repeat r runs its jobs in this order with ``by=r``."""
    by %= len(items)
    return items[by:] + items[:by]


# ------------------------------------------------------------------------------------------------ one run


def run_job(job: Job, repeat: int, out: Path, dpo_cache: Path) -> dict:
    """One ``rlft train`` of ``job`` in a fresh process; its time to the first step, marks and breakdown."""
    where = out / "runs" / f"{job.name}-{repeat}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    output_dir = where / "job"
    if job.trl:
        # The step shape of trl_compare.py (as rlft's configs, without evaluation: TRL's trainers evaluate nothing
        # before their first step).
        cmd = [sys.executable, str(ROOT / "benchmarks/trl_compare.py"), "trl", "--algorithm", job.config,
               "--model", MODEL, "--steps", "1", "--warmup", "1", "--out", str(output_dir)]
    else:
        cmd = [sys.executable, "-m", "rlft.cli", "train", str(ROOT / job.config), f"model.path={MODEL}",
               *job.overrides, f"logging.output_dir={output_dir}", "logging.wandb=false",
               "logging.progress_bar=false", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=0"]
    if job.name == "dpo":
        cmd.append(f"dpo.cache_dir={dpo_cache}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    if job.user_modules:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    (where / "command.txt").write_text(" ".join(cmd) + "\n")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rlft-startup-") as cwd, \
            (where / "stdout.txt").open("w") as stdout, (where / "stderr.txt").open("w") as stderr:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    run = {"job": job.name, "repeat": repeat, "returncode": proc.returncode,
           "wall_seconds": round(time.time() - started, 1), "load_average_1m": os.getloadavg()[0],
           "startup_seconds": None, "error": None, "marks": [], "breakdown": None}
    if proc.returncode:
        tail = (where / "stderr.txt").read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:]
        run["error"] = "\n".join(tail)
    metrics_path = output_dir / "metrics.jsonl"
    if job.trl and (output_dir / "trl.json").exists():
        run["startup_seconds"] = json.loads((output_dir / "trl.json").read_text())["startup_seconds"]
    elif metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        run["startup_seconds"] = next((r["run/startup_seconds"] for r in records if "run/startup_seconds" in r), None)
    marks_path = output_dir / "startup.jsonl"
    if marks_path.exists():
        run["marks"] = [json.loads(line) for line in marks_path.read_text().splitlines() if line.strip()]
        run["breakdown"] = breakdown(run["marks"])
    return run


def _first_times(marks: list[dict]) -> dict[str, float]:
    """Event -> wall time of its first mark."""
    times: dict[str, float] = {}
    for m in marks:
        times.setdefault(m["event"], m["t"])
    return times


def _difference(times: dict[str, float], end: str, *starts: str) -> float | None:
    """``times[end]`` less the first of ``starts`` that was marked; None when either is missing."""
    start = next((s for s in starts if s in times), None)
    if end not in times or start is None:
        return None
    return times[end] - times[start]


def breakdown(marks: list[dict]) -> dict | None:
    """Where a run's start-up went, from its marks; times are seconds from the driver's ``process`` mark."""
    driver = _first_times([m for m in marks if m["role"] == "driver"])
    if "process" not in driver:
        return None
    zero = driver["process"]
    # The role processes, by (role, pid), in the order the operating system started them.
    by_process: dict[tuple[str, int], list[dict]] = {}
    for m in marks:
        if m["role"] != "driver":
            by_process.setdefault((m["role"], m["pid"]), []).append(m)
    keys = sorted(by_process, key=lambda key: _first_times(by_process[key]).get("process", float("inf")))
    counts = {role: sum(1 for r, _ in keys if r == role) for role, _ in keys}
    numbered: dict[str, int] = {}
    processes = []
    for role, pid in keys:
        times = _first_times(by_process[(role, pid)])
        index = numbered.get(role, 0)
        numbered[role] = index + 1
        processes.append({
            "role": role, "pid": pid, "label": f"{role} {index}" if counts[role] > 1 else role,
            "offsets_seconds": {event: t - zero for event, t in times.items()},
            "to_actor_seconds": _difference(times, "actor", "process"),
            "imports_seconds": _difference(times, "imports", "actor", "process"),
            "engine_seconds": _difference(times, "ready", "imports", "actor", "process"),
        })
    ready = [p["offsets_seconds"]["ready"] for p in processes if "ready" in p["offsets_seconds"]]
    last_ready_at = max(ready) if ready else None
    first_eval_seconds = _difference(driver, "first_eval", "roles_ready")
    if first_eval_seconds is None and "first_eval" in driver and last_ready_at is not None:
        first_eval_seconds = driver["first_eval"] - zero - last_ready_at
    return {
        "driver_offsets_seconds": {event: t - zero for event, t in driver.items()},
        "ray_start_seconds": _difference(driver, "ray_ready", "ray_start"),
        "imports_at_seconds": driver["imports"] - zero if "imports" in driver else None,
        "roles_seconds": _difference(driver, "roles_ready", "roles_start"),
        "last_role_ready_at_seconds": last_ready_at,
        "first_eval_seconds": first_eval_seconds,
        "processes": processes,
    }


# ------------------------------------------------------------------------------------------------ summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], jobs: list[str]) -> list[dict]:
    summary = []
    for name in jobs:
        mine = [r for r in runs if r["job"] == name]
        startup = [r["startup_seconds"] for r in mine if r["startup_seconds"] is not None]
        parts = [r["breakdown"] for r in mine if r["startup_seconds"] is not None and r["breakdown"]]
        row = {
            "job": name, "runs": len(mine), "runs_ok": len(startup),
            "startup_seconds_median": _median(startup),
            "startup_seconds_min": min(startup, default=None), "startup_seconds_max": max(startup, default=None),
        }
        for key in ("ray_start_seconds", "imports_at_seconds", "roles_seconds", "last_role_ready_at_seconds",
                    "first_eval_seconds"):
            row[key] = _median([b[key] for b in parts])
        for role in ROLE_KINDS:
            pooled = [p for b in parts for p in b["processes"] if p["role"] == role]
            if pooled:
                row[role] = {key: _median([p[key] for p in pooled])
                             for key in ("to_actor_seconds", "imports_seconds", "engine_seconds")}
        summary.append(row)
    medians = {row["job"]: row["startup_seconds_median"] for row in summary}
    for row in summary:
        base = BASELINE.get(row["job"])
        if base in medians and None not in (medians[base], row["startup_seconds_median"]):
            row["vs_baseline_seconds"] = row["startup_seconds_median"] - medians[base]
            row["baseline"] = base
    return summary


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = psutil.virtual_memory().total / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory_gib:.0f} GiB memory"


def markdown(result: dict) -> str:
    def fmt(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "# Time to the first step",
        "",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- repeats: {result['repeats']} (order rotating by one job per repeat); "
        f"1-minute load average at the start {result['load_average_1m_start']:.2f}, "
        f"at the end {result['load_average_1m_end']:.2f}",
        "",
        "| job | runs ok | time to the first step, median s | range s | median − tool's s |",
        "|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        span = "–" if s["startup_seconds_min"] is None else (
            f"{s['startup_seconds_min']:.1f}–{s['startup_seconds_max']:.1f}")
        versus = f"{s['vs_baseline_seconds']:+.1f}" if "vs_baseline_seconds" in s else ""
        lines.append(f"| {s['job']} | {s['runs_ok']}/{s['runs']} | {fmt(s['startup_seconds_median'])} | {span} "
                     f"| {versus} |")
    dpo = [r for r in result["runs"] if r["job"] == "dpo" and r["startup_seconds"] is not None]
    if dpo:
        first, later = dpo[0], [r["startup_seconds"] for r in dpo[1:]]
        lines += ["", f"DPO: the first repeat computed the reference log-probabilities into an empty cache "
                      f"({first['startup_seconds']:.1f} s to the first step)"
                  + (f"; the later repeats read them from it (median {statistics.median(later):.1f} s)." if later
                     else "; no later repeat read them from it.")]
    roles = [role for role in ROLE_KINDS if any(role in s for s in result["summary"])]
    lines += [
        "",
        "Medians of the breakdown (seconds; \"at\": from the driver process's start). Per role kind (learner ranks "
        "pooled): imports / engine construction; a grader, a reference server and an evaluation worker load their "
        "modules before their actor starts, so they mark no imports (their engine counts from their actor).",
        "",
        "| job | Ray start | driver imports done at | roles (start to ready) | last role ready at | first evaluation | "
        + " | ".join(roles) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(roles),
    ]
    for s in result["summary"]:
        cells = [f"{fmt(s[role]['imports_seconds'])} / {fmt(s[role]['engine_seconds'])}" if role in s else "–"
                 for role in roles]
        lines.append(f"| {s['job']} | {fmt(s['ray_start_seconds'])} | {fmt(s['imports_at_seconds'])} "
                     f"| {fmt(s['roles_seconds'])} | {fmt(s['last_role_ready_at_seconds'])} "
                     f"| {fmt(s['first_eval_seconds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Every run, in the order they ran:", "", "| job | repeat | time to the first step s | wall s "
              "| load average (1 min) after |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['job']} | {r['repeat']} | {fmt(r['startup_seconds'])} | {r['wall_seconds']:.0f} "
                     f"| {r['load_average_1m']:.2f} |")
    for r in result["runs"]:
        if r["returncode"]:
            lines += ["", f"{r['job']} repeat {r['repeat']} failed (exit {r['returncode']}); the end of its stderr:",
                      "", "```", r["error"] or "", "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ timeline


# A process's marks in the order of its start-up, each with the phase that ends at it.
DRIVER_PHASES = [("ray_start", "import / config"), ("ray_ready", "Ray start"), ("imports", "import / config"),
                 ("roles_start", "set-up (data, placement)"), ("roles_ready", "waiting for roles"),
                 ("first_eval", "first evaluation"), ("first_step", "other")]
ROLE_PHASES = [("actor", "waiting for the actor"), ("imports", "imports"), ("ready", "engine construction")]
COLOURS = {
    "import / config": "tab:blue", "Ray start": "tab:orange", "set-up (data, placement)": "tab:cyan",
    "waiting for roles": "silver", "first evaluation": "tab:red", "other": "tab:olive",
    "waiting for the actor": "gainsboro", "imports": "tab:purple", "engine construction": "tab:green",
    "waiting for the actor + imports (no actor mark)": "plum",
}
NO_ACTOR_PHASES = [("imports", "waiting for the actor + imports (no actor mark)"), ("ready", "engine construction")]
MIN_LEGEND_SECONDS = 0.05  # a phase drawn only shorter than this is left out of the legend


def _segments(offsets: dict[str, float], phases: list[tuple[str, str]]) -> list[tuple[float, float, str]]:
    """(start, end, phase) from the process's ``process`` mark on, each phase ending at its mark. A mark that is
    missing, or earlier than the one before (the driver's imports load while Ray starts), starts no segment."""
    segments, cursor = [], offsets.get("process", 0.0)
    for event, phase in phases:
        if event in offsets and offsets[event] > cursor:
            segments.append((cursor, offsets[event], phase))
            cursor = offsets[event]
    return segments


def plot_timeline(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = run["breakdown"]
    driver = dict(b["driver_offsets_seconds"])
    if "roles_ready" not in driver and b["last_role_ready_at_seconds"] is not None:
        driver["roles_ready"] = b["last_role_ready_at_seconds"]  # roles started one by one: the last one's ready
    bars = [("driver", _segments(driver, DRIVER_PHASES))]
    bars += [(p["label"], _segments(p["offsets_seconds"],
                                    ROLE_PHASES if "actor" in p["offsets_seconds"] else NO_ACTOR_PHASES))
             for p in b["processes"]]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(bars) + 1.6))
    used = []
    for y, (_, segments) in enumerate(bars):
        for start, end, phase in segments:
            ax.broken_barh([(start, end - start)], (y - 0.35, 0.7), color=COLOURS[phase])
            if end - start >= MIN_LEGEND_SECONDS and phase not in used:
                used.append(phase)
    first_step = driver.get("first_step", run["startup_seconds"])
    ax.axvline(first_step, color="black", linestyle="--", linewidth=1)
    ax.text(first_step, len(bars) - 0.5, f" first step {first_step:.1f} s", va="bottom", fontsize=8)
    ax.set_yticks(range(len(bars)), [label for label, _ in bars])
    ax.set_ylim(len(bars) - 0.3, -0.7)
    ax.set_xlabel("seconds from the driver process's start")
    ax.set_title(f"{run['job']}, repeat {run['repeat']}: time to the first step {run['startup_seconds']:.1f} s",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[phase]) for phase in used]
    ax.legend(handles, used, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def representative(runs: list[dict], job: str) -> dict | None:
    """The run of ``job`` whose time to the first step is the median (the lower of the middle two)."""
    mine = [r for r in runs if r["job"] == job and r["startup_seconds"] is not None and r["breakdown"]]
    if not mine:
        return None
    middle = statistics.median_low(r["startup_seconds"] for r in mine)
    return next(r for r in mine if r["startup_seconds"] == middle)


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/startup")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dpo_cache = out / "dpo_reference_cache"
    shutil.rmtree(dpo_cache, ignore_errors=True)  # so that the first DPO repeat computes it
    load_start = os.getloadavg()[0]
    runs = []
    for repeat in range(args.repeats):
        for name in rotated(args.jobs, repeat):
            run = run_job(JOBS[name], repeat, out, dpo_cache)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("marks", "breakdown", "error")}), flush=True)
            if run["returncode"]:
                print(f"{name} repeat {repeat} failed; the end of its stderr:\n{run['error']}", flush=True)
    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "jobs": args.jobs,
        "repeats": args.repeats, "model": MODEL, "max_steps": MAX_STEPS,
        "load_average_1m_start": load_start, "load_average_1m_end": os.getloadavg()[0],
        "summary": summarize(runs, args.jobs), "runs": runs,
    }
    (out / "startup.json").write_text(json.dumps(result, indent=1))
    (out / "startup.md").write_text(markdown(result))
    for name in args.jobs:
        run = representative(runs, name)
        if run is not None:
            plot_timeline(run, out / ("startup_timeline.png" if name == "grpo" else f"startup_timeline_{name}.png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
