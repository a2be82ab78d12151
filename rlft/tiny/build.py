"""Build the embedded default (tokenizer, model, task data) and resolve ``tiny://`` paths to a cached build.

Layout of a build directory::

    BUILD_INFO.json                       seed, preset, format version, file list
    model/                                tokenizer + float32 safetensors model + generation config
    data/<task>/sft_train.jsonl           SFT chat rows
    data/<task>/sft_train_mixed.jsonl     the same rows, 80 % of the answers written "Answer: <answer>"
    data/<task>/rft_train.jsonl           RFT prompt rows with ``answer``
    data/<task>/test.jsonl                held-out RFT prompt rows
    data/<task>/preference_train.jsonl    OpenAI preference rows (correct vs near-miss answer)
    data/<task>/preference_test.jsonl     held-out preference rows
    data/calculator/                      the tool-use task (rlft/tiny/calculator.py): sft_train.jsonl (OpenAI
                                          tool-call transcripts), rft_train.jsonl and test.jsonl (rows with tools)

Held-out prompts (``test`` and ``preference_test``) are drawn first and excluded from every training file.
``tiny://model`` and ``tiny://arithmetic/test.jsonl`` name files of the build cached under
``$RLFT_CACHE_DIR/tiny/v<FORMAT_VERSION>-<preset>``; the first caller builds it, under a file lock, into a
temporary directory that is renamed into place, so concurrent actors and test processes see a whole build or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from rlft.tiny import calculator
from rlft.tiny.tasks import TASKS, make_examples, mixed_style_sft_row, preference_row, prompt_text, sft_row

# Bump when the files a build writes change, so stale caches are rebuilt rather than reused.
FORMAT_VERSION = 5
BUILD_INFO_NAME = "BUILD_INFO.json"
DEFAULT_CACHE_DIR = "~/.cache/rlft"
URL_PREFIX = "tiny://"
# ``tiny://<alias>`` names a file of another preset's build: (preset, path inside that build).
PRESET_ALIASES: dict[str, tuple[str, str]] = {"small-model": ("small", "model"), "half-b-model": ("half_b", "model")}
# A build takes seconds; waiting this long for another process's build means it is stuck.
BUILD_LOCK_TIMEOUT_S = 600

NUM_SFT_TRAIN_BY_TASK: dict[str, int] = {"arithmetic": 8_000, "reverse": 4_000}
NUM_RFT_TRAIN = 2_000
NUM_TEST = 500
NUM_PREFERENCE_TRAIN = 2_000
NUM_PREFERENCE_TEST = 300
NUM_CALCULATOR_SFT_TRAIN = 8_000


def split_seed(seed: int, task: str, split: str) -> int:
    """A seed for one (task, split), derived from the build seed so splits are independent but reproducible."""
    digest = hashlib.sha256(f"{seed}:{task}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as one JSON object per line, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_task_files(task: str, seed: int) -> dict[str, list[dict]]:
    """All data files of one task, by file name; held-out prompts appear in no training file."""
    held_out = make_examples(task, NUM_TEST + NUM_PREFERENCE_TEST, split_seed(seed, task, "held_out"))
    held_out_prompts = {prompt_text(row) for row in held_out}
    test, preference_test = held_out[:NUM_TEST], held_out[NUM_TEST:]

    def train_examples(split: str, num_examples: int) -> list[dict]:
        return make_examples(task, num_examples, split_seed(seed, task, split), exclude=held_out_prompts)

    preference_rng = random.Random(split_seed(seed, task, "near_miss"))
    style_rng = random.Random(split_seed(seed, task, "mixed_style"))
    sft_examples = train_examples("sft", NUM_SFT_TRAIN_BY_TASK[task])
    return {
        "sft_train.jsonl": [sft_row(row) for row in sft_examples],
        "sft_train_mixed.jsonl": [mixed_style_sft_row(row, style_rng) for row in sft_examples],
        "rft_train.jsonl": train_examples("rft", NUM_RFT_TRAIN),
        "test.jsonl": test,
        "preference_train.jsonl": [
            preference_row(row, preference_rng) for row in train_examples("preference", NUM_PREFERENCE_TRAIN)
        ],
        "preference_test.jsonl": [preference_row(row, preference_rng) for row in preference_test],
    }


def make_calculator_files(seed: int) -> dict[str, list[dict]]:
    """The tool-use task's files; held-out prompts appear in no training file."""
    task = calculator.TASK
    test = calculator.make_examples(NUM_TEST, split_seed(seed, task, "held_out"))
    held_out_prompts = {prompt_text(row) for row in test}
    sft = calculator.make_examples(NUM_CALCULATOR_SFT_TRAIN, split_seed(seed, task, "sft"), held_out_prompts)
    return {
        "sft_train.jsonl": calculator.sft_rows(sft, random.Random(split_seed(seed, task, "tool_use"))),
        "rft_train.jsonl": calculator.make_examples(NUM_RFT_TRAIN, split_seed(seed, task, "rft"), held_out_prompts),
        "test.jsonl": test,
    }


def build(out_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write the tokenizer, model and all task data into ``out_dir``; returns ``out_dir`` as a ``Path``.

    ``BUILD_INFO.json`` is written last, so its presence marks a complete build.
    """
    # Imported here so that reading tasks or resolving an existing build does not import torch and transformers.
    from rlft.tiny.model import build_model, count_parameters
    from rlft.tiny.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(build_tokenizer(), out_dir / "model", seed=seed, preset=preset)
    for task in TASKS:
        for file_name, rows in make_task_files(task, seed).items():
            write_jsonl(out_dir / "data" / task / file_name, rows)
    for file_name, rows in make_calculator_files(seed).items():
        write_jsonl(out_dir / "data" / calculator.TASK / file_name, rows)
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    info = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "preset": preset,
        "num_parameters": count_parameters(model),
        "files": files,
    }
    (out_dir / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def cache_dir(preset: str = "tiny") -> Path:
    """Where the cached build of ``preset`` lives: ``$RLFT_CACHE_DIR/tiny/v<FORMAT_VERSION>-<preset>``."""
    root = Path(os.environ.get("RLFT_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()
    return root.absolute() / "tiny" / f"v{FORMAT_VERSION}-{preset}"


def ensure_built(preset: str = "tiny") -> Path:
    """The cached build of ``preset`` (seed 0), building it first if absent; safe across processes."""
    target = cache_dir(preset)
    if (target / BUILD_INFO_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=BUILD_LOCK_TIMEOUT_S):
        if (target / BUILD_INFO_NAME).is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is read by every process of the user
            build(staging, seed=0, preset=preset)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def available_paths(build_dir: Path) -> list[str]:
    """The ``tiny://`` paths a build offers: ``model``, the aliases, and every data file as ``<task>/<file>``."""
    data_dir = build_dir / "data"
    data_files = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*.jsonl"))
    return [URL_PREFIX + name for name in ["model", *PRESET_ALIASES, *data_files]]


def resolve(path: str) -> str:
    """The absolute local path for a ``tiny://`` path (building the cache on first use); other paths unchanged.

    ``tiny://model`` is the model directory, ``tiny://<task>/<file>.jsonl`` a data file, ``tiny://small-model``
    and ``tiny://half-b-model`` the models of the "small" and "half_b" presets. Unknown ``tiny://`` paths raise
    ``FileNotFoundError`` listing what exists.
    """
    if not path.startswith(URL_PREFIX):
        return path
    name = path[len(URL_PREFIX) :].strip("/")
    preset, name = PRESET_ALIASES.get(name, ("tiny", name))
    build_dir = ensure_built(preset)
    candidate = build_dir / name if name == "model" else build_dir / "data" / name
    inside_build = candidate.resolve().is_relative_to(build_dir.resolve())
    if not name or not inside_build or not candidate.exists():
        raise FileNotFoundError(
            f"{path!r} is not part of the tiny build at {build_dir}; available: "
            + ", ".join(available_paths(build_dir))
        )
    return str(candidate)
