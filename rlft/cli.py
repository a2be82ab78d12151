"""The ``rlft`` command.

    rlft train CONFIG [key.sub=value ...]      run the job the config describes (SFT, GRPO, PPO, DPO, ...)
    rlft bench CONFIG [key.sub=value ...]      run it for a few steps and report throughput and time per phase
    rlft submit CONFIG [...] --address URL     run it on a Ray cluster through the Ray Jobs API
    rlft scale JOB --rollout-workers N         resize a running job's rollout workers (between steps)
    rlft config show CONFIG [key.sub=value ...] print the resolved config
    rlft tiny build --out DIR                  build the embedded tiny model, tokenizer and task data

Each command imports what it needs when it runs: ``rlft config show`` loads no Ray, torch or vLLM.
"""

from __future__ import annotations

import argparse
import os
import sys

from rlft.config import Config, check_local_paths, load_config, to_yaml
from rlft.errors import (
    ConfigError,
    DataError,
    GraderFailureRateError,
    LearnerFailedError,
    PeerTimeoutError,
    RestartBudgetError,
)


# How many rows of the training prompts are checked for the fields the graders read, before anything starts.
NUM_ROWS_CHECKED = 16


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    _name_the_cpu_accelerator()
    from rlft.controller import run_job

    result = run_job(cfg)
    print(f"final model: {result.final_model_dir}")
    if result.eval_accuracy_end is not None:
        start = "n/a" if result.eval_accuracy_start is None else f"{result.eval_accuracy_start:.3f}"
        print(f"held-out accuracy: {start} -> {result.eval_accuracy_end:.3f}  ({result.num_steps} steps, {result.seconds:.0f} s)")
    return 0


def check_inputs(cfg: Config) -> None:
    """What ``rlft train`` and ``rlft bench`` check before they start anything (Ray, a model, a tokenizer, torch),
    beyond ``load_config``: the paths the job reads and writes (``check_local_paths``); that the first
    ``NUM_ROWS_CHECKED`` training rows parse in the algorithm's format (SFT examples, preference pairs, RL prompts),
    so that a malformed file stops the job in a second, naming ``file:line``; and for an RL job that those prompts
    have every field its graders read and, when it evaluates, that held-out prompts have an ``answer``. Rows past
    the first are checked where the job reads them all."""
    check_local_paths(cfg)
    from rlft.data import formats
    from rlft.graders.config import check_rows_have_grader_fields
    from rlft.tiny import resolve

    def first_rows(field: str, path: str, parse) -> list:
        try:
            path = resolve(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"{field}: {exc}") from None
        return formats.load_examples(path, parse, on_bad_row=cfg.data.on_bad_row, limit=NUM_ROWS_CHECKED).examples

    if cfg.algorithm == "sft":
        first_rows("data.train_path", cfg.data.train_path, lambda row: formats.parse_sft(row, cfg.data.format))
        return
    if cfg.algorithm == "dpo":
        first_rows("data.train_path", cfg.data.train_path, formats.parse_preference)
        return
    train = first_rows("data.train_path", cfg.data.train_path, formats.parse_rft)
    check_rows_have_grader_fields(cfg.graders, [(p.where, p.extra) for p in train])
    if cfg.eval.path and cfg.eval.num_examples:
        for prompt in first_rows("eval.path", cfg.eval.path, formats.parse_rft)[: cfg.eval.num_examples]:
            if not isinstance(prompt.extra.get("answer"), str):
                raise DataError(prompt.where, "answer", "held-out prompts (eval.path) need a string 'answer' field, "
                                                        "which the evaluation compares completions with")


def _bench(args: argparse.Namespace) -> int:
    if args.steps < 1:  # the command's own arguments first, then the job's inputs
        raise ConfigError(f"--steps: need at least 1 measured step, got {args.steps}")
    check_inputs(load_config(args.config, args.overrides))
    _name_the_cpu_accelerator()
    from pathlib import Path

    from rlft.bench import bench, markdown

    out = Path(args.out or f"runs/bench/{Path(args.config).stem}")
    result = bench(args.config, args.overrides, args.steps, args.warmup, out)
    print(markdown(result))
    print(f"bench: {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from rlft.jobs import submit

    return submit(args.config, args.overrides, args.address, args.follow, args.env, args.job_id)


def _scale(args: argparse.Namespace) -> int:
    from rlft.jobs import scale

    return scale(args.job, args.rollout_workers, args.address)


def _config_show(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _grade(args: argparse.Namespace) -> int:
    _name_the_cpu_accelerator()
    from rlft.grade import grade_file, report

    grades = grade_file(args.grader_config, args.samples)
    print(report(grades, show=args.show))
    return 0


def _tiny_build(args: argparse.Namespace) -> int:
    _name_the_cpu_accelerator()
    from rlft.tiny import build

    path = build(args.out, seed=args.seed, preset=args.preset)
    print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rlft", description="Fine-tune language models: SFT, RL with graders, DPO.")
    commands = top.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run the job a config describes")
    train.add_argument("config", help="YAML config file, e.g. configs/sft_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-4")
    train.set_defaults(run=_train)

    bench = commands.add_parser("bench", help="measure where a job's step time goes (throughput per phase)")
    bench.add_argument("config", help="YAML config file, e.g. configs/grpo_tiny.yaml")
    bench.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_rollout_workers=2")
    bench.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the figures (default 2)")
    bench.add_argument("--out", default="", help="where bench.json, bench.md and bench.png go "
                                                 "(default runs/bench/<config name>)")
    bench.set_defaults(run=_bench)

    submit = commands.add_parser("submit", help="run the job on a Ray cluster (Ray Jobs API)")
    submit.add_argument("config", help="YAML config file")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-4")
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's job server (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit 1 if it fails")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job's processes (repeatable)")
    submit.add_argument("--job-id", default="", help="the submission id (default: rlft-<run name>-<time>)")
    submit.set_defaults(run=_submit)

    scale = commands.add_parser("scale", help="resize a running job's rollout workers from its next step")
    scale.add_argument("job", help="the job id `rlft submit` printed (or the run name of an `rlft train` job)")
    scale.add_argument("--rollout-workers", type=int, required=True, help="the number of rollout workers wanted")
    scale.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                       help="the job server (http://HEAD:8265) or a Ray address (auto, HEAD:6379)")
    scale.set_defaults(run=_scale)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config (defaults, file, overrides)")
    show.add_argument("config", nargs="?", default=None, help="YAML config file (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides")
    show.set_defaults(run=_config_show)

    grade = commands.add_parser("grade", help="score a JSONL file of samples with a grader config, offline")
    grade.add_argument("grader_config", help="OpenAI grader JSON/YAML, or a file with a graders: section")
    grade.add_argument("--samples", required=True, help='JSONL: {"completion": ..., "item": {...}} per line')
    grade.add_argument("--show", type=int, default=0, help="also print the first N samples' scores")
    grade.set_defaults(run=_grade)

    tiny = commands.add_parser("tiny", help="the embedded tiny model and tasks")
    tiny_commands = tiny.add_subparsers(dest="tiny_command", required=True)
    tiny_build = tiny_commands.add_parser("build", help="build the tiny model, tokenizer and task data")
    tiny_build.add_argument("--out", required=True, help="output directory")
    tiny_build.add_argument("--seed", type=int, default=0)
    tiny_build.add_argument("--preset", default="tiny", help="model size preset (tiny, small, half_b)")
    tiny_build.set_defaults(run=_tiny_build)
    return top


def _name_the_cpu_accelerator() -> None:
    """DeepSpeed (imported by transformers when a model loads) prints a warning on stdout when it has to guess
    the accelerator; on a machine without a GPU, say it is the CPU. Called by the commands that load models.

    A machine with no GPU device node (NVIDIA's or ROCm's) has no GPU, which is known without importing torch (a few
    CPU-seconds, which ``rlft train`` would otherwise spend before Ray starts); elsewhere torch decides."""
    import glob

    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"rlft: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"rlft: data error: {exc}", file=sys.stderr)
        return 2
    except GraderFailureRateError as exc:
        print(f"rlft: grader error: {exc}", file=sys.stderr)
        return 1
    except (LearnerFailedError, RestartBudgetError, PeerTimeoutError) as exc:
        print(f"rlft: job stopped: {exc}", file=sys.stderr)
        checkpoint = _latest_checkpoint(args)
        if checkpoint:
            print(f"rlft: the last checkpoint is {checkpoint}; run again with checkpoint.resume=auto to continue "
                  "from it", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"rlft: cannot reach the cluster: {exc}", file=sys.stderr)
        return 1


def _latest_checkpoint(args: argparse.Namespace):
    from pathlib import Path

    from rlft.controller.common import latest_checkpoint

    if getattr(args, "config", None) is None or args.run is not _train:
        return None
    return latest_checkpoint(Path(load_config(args.config, args.overrides).checkpoint_dir))


if __name__ == "__main__":
    sys.exit(main())
