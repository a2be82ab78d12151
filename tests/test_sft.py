"""SFT through its public entry points: `rlft train` and `rlft.controller.sft.sft`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlft.config import load_config
from rlft.controller.common import resolve_paths
from rlft.controller.sft import load_sft_rows, sft
from rlft.metrics import read_metrics
from conftest import run_rlft

ROOT = Path(__file__).resolve().parents[1]


def _rlft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_rlft(*args, cwd=cwd)


def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]}


def test_malformed_row_stops_before_training(tmp_path):
    bad = {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "robot", "content": "3"}]}
    data = _write_rows(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    out = tmp_path / "run"
    proc = _rlft(
        "train", str(ROOT / "configs/sft_tiny.yaml"), f"data.train_path={data}", f"logging.output_dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data}:3: messages[1].role:" in proc.stderr
    # Nothing started: not Ray (the first rows are checked before anything starts), no metrics, no checkpoints.
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()


def test_invalid_json_line_is_named(tmp_path):
    data = _write_rows(tmp_path / "train.jsonl", [GOOD, "{not json", GOOD])
    proc = _rlft("train", str(ROOT / "configs/sft_tiny.yaml"), f"data.train_path={data}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{data}:2:" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_skip_mode_drops_and_counts(tmp_path):
    bad_weight = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}
    data = _write_rows(tmp_path / "train.jsonl", [GOOD, bad_weight, "[1, 2]", GOOD, GOOD])
    cfg = resolve_paths(load_config(None, [f"data.train_path={data}", "data.on_bad_row=skip"]))
    rows, counts = load_sft_rows(cfg, AutoTokenizer.from_pretrained(cfg.model.path))
    assert len(rows) == 3
    assert counts["data/rows_skipped_malformed"] == 2
    assert counts["data/train_rows"] == 3


def test_too_few_rows_for_a_step(tmp_path, ray_cluster):
    data = _write_rows(tmp_path / "train.jsonl", [GOOD] * 5)
    cfg = load_config(None, [f"data.train_path={data}", f"logging.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="trainer.global_batch_size: 64 rows per step but .* gives only 5"):
        sft(cfg)


@pytest.mark.slow
def test_sft_demo_end_to_end(sft_demo_run):
    """The README's main job: SFT of the tiny model on 2 ZeRO-2 learners lifts held-out accuracy well above chance."""
    proc, out = sft_demo_run.proc, sft_demo_run.output_dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    cfg = load_config(ROOT / "configs/sft_tiny.yaml")
    assert [r["step"] for r in train] == list(range(1, cfg.trainer.max_steps + 1))
    assert sum(r["train/loss"] for r in train[-10:]) < 0.5 * sum(r["train/loss"] for r in train[:10])
    assert all(r["perf/tokens_per_second"] > 0 and r["train/grad_norm"] > 0 for r in train)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == cfg.trainer.max_steps
    # The untrained model answers nothing right. The SFT model has learned the arithmetic (on the plateau past the
    # abrupt rise, so well above chance, ~1 %, on any machine) in its teacher's usual style, "Answer: <sum>": the
    # extracted answer is right far more often than the exact match.
    assert evals[0]["eval/accuracy"] < 0.05 and evals[0]["eval/extracted_accuracy"] < 0.05
    assert evals[-1]["eval/extracted_accuracy"] >= 0.8, evals[-1]
    final = [json.loads(line) for line in (out / "eval_samples_final.jsonl").read_text().splitlines()]
    either_style = [r["completion"].strip() in (r["answer"], "Answer: " + r["answer"]) for r in final]
    assert sum(either_style) / len(final) <= evals[-1]["eval/extracted_accuracy"] + 1e-9
    assert sum(r["completion"].startswith("Answer:") for r in final) >= 0.5 * len(final)
    assert evals[-1]["eval/accuracy"] < evals[-1]["eval/extracted_accuracy"]
    assert "held-out accuracy" in proc.stdout
    # Outputs: offline wandb run, a checkpoint, a Hugging Face model that transformers loads and that generates.
    assert list((out / "wandb").glob("offline-run-*"))
    assert (out / f"checkpoints/step_{cfg.trainer.max_steps:06d}/model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "final_model")
    assert model.num_parameters() > 0 and tokenizer.chat_template
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_end"] == evals[-1]["eval/accuracy"]
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_resume_from_checkpoint_continues_exactly(tmp_path, ray_cluster):
    """6 steps straight vs resuming at step 3: the same losses for steps 4-6 (ZeRO-3, packed rows)."""
    common = [
        "trainer.max_steps=6",
        "trainer.global_batch_size=16",
        "learner.micro_batch_size_per_learner=4",
        "learner.zero_stage=3",
        "data.packing=true",
        "data.max_seq_len=128",
        "eval.num_examples=0",
        "logging.wandb=false",
        "logging.progress_bar=false",
    ]
    straight = tmp_path / "straight"
    sft(load_config(None, [*common, f"logging.output_dir={straight}", "checkpoint.every_n_steps=3", "checkpoint.keep_last=0"]))
    ckpt = straight / "checkpoints/step_000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3

    resumed = tmp_path / "resumed"
    sft(load_config(None, [*common, f"logging.output_dir={resumed}", f"checkpoint.resume={ckpt}"]))

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    # Packed rows: a step's row holds several examples.
    assert read_metrics(straight / "metrics.jsonl")[0]["data/train_rows"] < read_metrics(straight / "metrics.jsonl")[0]["data/rows_read"]


def test_local_mode_sft_without_ray(tmp_path):
    """`ray.local_mode=true`: the learner runs in the driver's process, no Ray cluster starts."""
    out = tmp_path / "run"
    proc = _rlft(
        "train",
        str(ROOT / "configs/sft_tiny.yaml"),
        "ray.local_mode=true",
        "learner.num_learners=1",
        "learner.micro_batch_size_per_learner=16",
        "trainer.global_batch_size=32",
        "trainer.max_steps=3",
        "eval.num_examples=10",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]
    assert (out / "final_model/model.safetensors").exists()
