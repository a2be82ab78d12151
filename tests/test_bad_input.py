"""Bad input stops `rlft train` before Ray starts: one line on stderr naming the field or file:line, exit code 2.

Most cases run the real command in a fresh process (``run_train``), with Ray's temporary directory pointed into the
test's own directory, so that a Ray start would leave it behind. Cases that need the data modules (which import
torch) call ``rlft.cli.main`` in this process instead, where importing is paid once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from unittest import mock

import pytest

from rlft.cli import main
from rlft.config import Config, ConfigError, load_config
from rlft.data.sources import read_rows
from rlft.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
# The GRPO demo config, from the embedded model (the config itself starts from the SFT demo's output).
GRPO = (str(ROOT / "configs/grpo_tiny.yaml"), "model.path=tiny://model")
PROMPT = {"messages": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"}


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``rlft train ARGS`` in a fresh process, with Ray's session files (if Ray started) under ``tmp_path``."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray_tmp"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rlft.cli", "train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_stopped_before_ray(proc: subprocess.CompletedProcess, tmp_path: Path, message: str,
                              one_line: bool = True) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if one_line:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ray_tmp").exists()


def train_in_process(capsys, *args: str) -> str:
    """``rlft train ARGS`` through ``rlft.cli.main`` in this process; returns stderr after checking the exit code
    and that Ray was not started."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        assert main(["train", *args]) == 2
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    else:  # another test in this process started Ray (pytest -n runs several modules in a worker)
        from rlft.distributed import cluster

        with mock.patch.object(cluster, "init_ray", wraps=cluster.init_ray) as init_ray:
            assert main(["train", *args]) == 2
        assert not init_ray.called, "the job started (or joined) Ray before it stopped"
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------- config files


def test_config_path_that_is_a_directory(tmp_path):
    proc = run_train(tmp_path, str(tmp_path))
    assert_stopped_before_ray(proc, tmp_path, f"rlft: config error: {tmp_path}: is a directory; expected a YAML")


def test_config_file_that_is_not_utf8_names_the_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("trainer:\n  lr: 0.001\n# r\u00e9glage\n".encode("latin-1"))
    proc = run_train(tmp_path, str(config))
    assert_stopped_before_ray(proc, tmp_path, f"rlft: config error: {config}:3: not UTF-8 text (byte 0xe9 at column 4)")


def test_defaults_that_refer_back_or_are_not_a_list(tmp_path):
    (tmp_path / "self.yaml").write_text("defaults: [self.yaml]\n")
    with pytest.raises(ConfigError, match=r"self.yaml: defaults: self.yaml refers back to a file that includes it"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\ntrainer: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("defaults: c.yaml\n")
    (tmp_path / "c.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    a, b, c = (str((tmp_path / n).resolve()) for n in ("a.yaml", "b.yaml", "c.yaml"))
    assert str(err.value) == (f"{tmp_path / 'c.yaml'}: defaults: a.yaml refers back to a file that includes it "
                              f"({a} -> {b} -> {c} -> {a})")
    (tmp_path / "mapping.yaml").write_text("defaults: {base: a.yaml}\n")
    proc = run_train(tmp_path, str(tmp_path / "mapping.yaml"))
    assert_stopped_before_ray(
        proc, tmp_path, f"{tmp_path / 'mapping.yaml'}: defaults: expected a list of config files (relative to this "
                        "one), got {'base': 'a.yaml'}")
    # A file included twice without a cycle is fine.
    (tmp_path / "base.yaml").write_text("trainer: {seed: 3}\n")
    (tmp_path / "mid.yaml").write_text("defaults: [base.yaml]\n")
    (tmp_path / "top.yaml").write_text("defaults: [base.yaml, mid.yaml]\n")
    assert load_config(tmp_path / "top.yaml").trainer.seed == 3


# ---------------------------------------------------------------------------------------------------- float fields


def float_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted path of every float field of the config (and of each element of a tuple of floats)."""
    paths = []
    for f in dataclasses.fields(cls):
        tp, path = typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            paths += float_fields(tp, f"{path}.")
        elif tp is float or float in typing.get_args(tp) and typing.get_origin(tp) is not tuple:
            paths.append(path)
        elif typing.get_origin(tp) is tuple and float in typing.get_args(tp):
            paths.append(f"{path}[0]")
    return paths


def test_nan_and_inf_are_rejected_in_every_float_field():
    paths = float_fields()
    assert {"trainer.lr", "rl.dual_clip", "rollout.sampling.temperature", "graders.max_error_rate"} <= set(paths)
    for path in paths:
        # 1e999 overflows to inf (inside a YAML list it reads as a string, an error of its own).
        for value in (".nan", "-.inf") if path.endswith("]") else (".nan", "-.inf", "1e999"):
            override = f"{path.removesuffix('[0]')}=[{value}, 0.9]" if path.endswith("[0]") else f"{path}={value}"
            with pytest.raises(ConfigError) as err:
                load_config(None, [override])
            assert re.fullmatch(rf"{re.escape(path)}: must be a finite number, got (nan|-?inf)", str(err.value))


def test_nan_in_a_yaml_file_and_on_the_command_line(tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text("rl:\n  clip_high: .inf\n")
    proc = run_train(tmp_path, str(config))
    assert_stopped_before_ray(proc, tmp_path, "rlft: config error: rl.clip_high: must be a finite number, got inf")
    proc = run_train(tmp_path, *GRPO, "trainer.lr=.nan")
    assert_stopped_before_ray(proc, tmp_path, "rlft: config error: trainer.lr: must be a finite number, got nan")


# ---------------------------------------------------------------------------------------------------- paths


def test_missing_local_model_and_tokenizer_paths_name_the_field(tmp_path):
    proc = run_train(tmp_path, *GRPO, "model.path=/no/such/model")
    assert_stopped_before_ray(proc, tmp_path, "rlft: config error: model.path: /no/such/model: no such directory")
    proc = run_train(tmp_path, *GRPO, "model.tokenizer_path=./tokenizer")
    assert_stopped_before_ray(proc, tmp_path,
                              "rlft: config error: model.tokenizer_path: ./tokenizer: no such directory")


def test_hub_ids_and_existing_directories_are_not_local_path_errors(tmp_path):
    from rlft.config import check_local_paths

    (tmp_path / "model").mkdir()
    for path in ("Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "tiny://model", str(tmp_path / "model")):
        check_local_paths(load_config(None, [f"model.path={path}", f"logging.output_dir={tmp_path / 'out'}"]))


def test_a_lora_adapter_as_model_path_points_to_its_merged_model(tmp_path):
    adapter = tmp_path / "final_model"
    (adapter / "merged").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "merged/config.json").write_text("{}")
    proc = run_train(tmp_path, *GRPO, f"model.path={adapter}")
    assert_stopped_before_ray(proc, tmp_path, f"rlft: config error: model.path: {adapter} holds a LoRA adapter, not "
                                              f"a model (its merged model is in merged/)")


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    proc = run_train(tmp_path, *GRPO, f"logging.output_dir={tmp_path / 'taken'}")
    assert_stopped_before_ray(
        proc, tmp_path, f"rlft: config error: logging.output_dir: {tmp_path / 'taken'} is a file; expected a directory")
    proc = run_train(tmp_path, *GRPO, f"checkpoint.dir={tmp_path / 'taken' / 'ckpt'}")
    assert_stopped_before_ray(proc, tmp_path, f"rlft: config error: checkpoint.dir: {tmp_path / 'taken' / 'ckpt'} "
                                              f"cannot be made: {tmp_path / 'taken'} is a file")


# ---------------------------------------------------------------------------------------------------- data files


def test_data_line_that_is_not_utf8(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(json.dumps(PROMPT).encode() + b"\n" + b'{"messages": [], "answer": "caf\xe9"}\n')
    proc = run_train(tmp_path, *GRPO, f"data.train_path={data}")
    assert_stopped_before_ray(proc, tmp_path, f"rlft: data error: {data}:2: not UTF-8 text (byte 0xe9 at column 32)")
    # data.on_bad_row=skip skips the line like any other bad one.
    skipped = []
    assert [r.where for r in read_rows(str(data), on_bad_line=skipped.append)] == [f"{data}:1"]
    assert [e.where for e in skipped] == [f"{data}:2"]


def test_corrupt_parquet_names_the_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    err = train_in_process(capsys, *GRPO, f"data.train_path={garbage}")
    assert err.startswith(f"rlft: data error: {garbage}: not a readable Parquet file:")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"answer": str(i), "text": "x" * 200} for i in range(500)]), good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"^{truncated}: not a readable Parquet file"):
        list(read_rows(str(truncated)))


# ---------------------------------------------------------------------------------------------------- graders


def test_rft_rows_without_the_answer_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": PROMPT["messages"], "solution": "5"}] * 20)
    err = train_in_process(capsys, *GRPO, f"data.train_path={data}")
    assert err == (f"rlft: data error: {data}:1: answer: missing; graders.items[0] (grader 'correct') reads it as its "
                   "answer_field (graders.items[0].answer_field)\n")


def test_grader_fields_are_checked_against_the_first_rows(tmp_path, capsys):
    rows = [PROMPT] * 3 + [{"messages": PROMPT["messages"]}] + [PROMPT] * 20
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    err = train_in_process(capsys, *GRPO, f"data.train_path={data}")
    assert f"rlft: data error: {data}:4: answer: missing; graders.items[0] (grader 'correct')" in err

    data = write_jsonl(tmp_path / "meta.jsonl", [{**PROMPT, "meta": {"level": 1}}] * 20)
    spec = ('{type: string_check, name: s, input: "{{sample.output_text}}", reference: "{{ item.meta.unit }}", '
            'operation: eq}')
    graders = f"graders.items=[{{name: exact, type: exact_match}}, {{name: judge, type: openai, spec: {spec}}}]"
    err = train_in_process(capsys, *GRPO, f"data.train_path={data}", graders)
    assert err.strip() == (f"rlft: data error: {data}:1: meta.unit: missing; graders.items[1] (grader 'judge') reads "
                           "it in the template {{ item.meta.unit }} at graders.items[1].spec.reference")

    math = "graders.items=[{name: m, type: math, answer_field: solution}]"
    err = train_in_process(capsys, *GRPO, f"data.train_path={data}", math)
    assert f"{data}:1: solution: missing; graders.items[0] (grader 'm') reads it as its answer_field" in err


def test_held_out_prompts_without_an_answer(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [PROMPT] * 20)
    held_out = write_jsonl(tmp_path / "test.jsonl", [{"messages": PROMPT["messages"], "answer": 5}])
    err = train_in_process(capsys, *GRPO, f"data.train_path={train}", f"eval.path={held_out}")
    assert f"rlft: data error: {held_out}:1: answer: held-out prompts (eval.path) need a string 'answer'" in err


def test_a_grader_that_fails_on_every_sample_stops_the_job_by_default():
    from rlft.graders import GradeRequest, GraderPool
    from rlft.graders.config import GraderConfig, GraderItemConfig
    from rlft.graders.pool import GraderFailureRateError

    assert GraderConfig().max_error_rate == 0.5
    items = [GraderItemConfig(name="correct"),
             GraderItemConfig(name="buggy", type="python_function", function="tests.grader_fixtures:raises")]
    requests = [GradeRequest([], "5", {"answer": "5"})] * 4
    with pytest.raises(GraderFailureRateError, match=r"grader 'buggy' failed on 4 of 4 samples .*a bug in a user"):
        GraderPool(GraderConfig(items=items), local=True).grade(requests)
    # Half the samples failing is noise the default tolerates; 1.0 never stops.
    half = [GradeRequest([], "5", {"answer": "5"}), GradeRequest([], "5", {})] * 2
    assert GraderPool(GraderConfig(items=items[:1]), local=True).grade(half).num_errors == 2
    assert GraderPool(GraderConfig(items=items, max_error_rate=1.0), local=True).grade(requests).num_errors == 4


# ---------------------------------------------------------------------------------------------------- resources


def test_job_that_needs_more_gpus_than_the_machine_stops_before_ray_starts(tmp_path):
    chat = {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]}
    data = write_jsonl(tmp_path / "sft.jsonl", [chat] * 128)  # one step's rows: the check comes after reading data
    proc = run_train(tmp_path, str(ROOT / "configs/sft_tiny.yaml"), "learner.num_gpus_per_learner=64",
                     f"data.train_path={data}", "eval.path=", f"logging.output_dir={tmp_path / 'run'}")
    assert_stopped_before_ray(
        proc, tmp_path, "rlft: config error: learner.num_learners, learner.num_cpus_per_learner, "
                        "learner.num_gpus_per_learner: the job does not fit this machine: it needs", one_line=False)
    assert "no node has room for one learners actor (1 CPU, 64 GPU)" in proc.stderr.splitlines()[0]
    assert proc.stderr.splitlines()[-1] == ("Lower those fields, or set ray.address to a cluster that has them (unset, "
                                            "the job starts a local Ray cluster).")


def test_local_gpus_are_counted_as_ray_counts_them(monkeypatch):
    from rlft.config import RayConfig
    from rlft.distributed.cluster import local_num_cpus, local_num_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_num_gpus() == 0
    assert local_num_cpus(RayConfig(num_cpus=2), num_cpus_needed=3.5) == 4
    assert local_num_cpus(RayConfig(num_cpus=8), num_cpus_needed=3.5) == 8
