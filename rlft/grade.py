"""``rlft grade GRADER_CONFIG --samples FILE.jsonl``: score a file of samples offline, to debug graders before a run.

``GRADER_CONFIG`` is a YAML or JSON file holding one of:

- an OpenAI grader object (it has a ``type``: ``string_check``, ``text_similarity``, ``python``, ``multi``);
- an rlft ``graders:`` section (``items``, ``timeout_s``, ...), alone or inside a whole run config.

Each row of the samples file (JSONL, Parquet or a datasets directory) is ``{"completion": "...", "item": {...}}`` or OpenAI's ``{"sample":
{"output_text": "..."}, "item": {...}}``; a line without ``item`` uses its other fields as the item. Grading runs
in this process (no Ray) with the same graders, timeouts, sandbox and fallbacks as a training job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rlft.config import config_from_dict
from rlft.data.sources import DataError, read_rows
from rlft.errors import ConfigError
from rlft.graders.config import GraderConfig, GraderItemConfig
from rlft.graders.graders import GradeRequest
from rlft.graders.pool import GradeResult, GraderPool


@dataclass
class OfflineGrades:
    requests: list[GradeRequest]
    result: GradeResult


def load_grader_config(path: str | Path) -> GraderConfig:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a grader object or a graders: section")
    if "type" in data:  # one OpenAI grader
        name = data.get("name") or "grader"
        return GraderConfig(items=[GraderItemConfig(name=name, type="openai", spec=data)])
    section = data.get("graders", data)
    try:
        return config_from_dict({"graders": section}).graders
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_samples(path: str | Path) -> list[GradeRequest]:
    requests = []
    for row in read_rows(str(path)):
        data, where = row.data, row.where
        if "completion" in data:
            completion = data["completion"]
        elif isinstance(data.get("sample"), dict) and "output_text" in data["sample"]:
            completion = data["sample"]["output_text"]
        else:
            raise DataError(where, "completion", "missing (give completion or sample.output_text)")
        if not isinstance(completion, str):
            raise DataError(where, "completion", f"expected a string, got {completion!r:.60}")
        item = data.get("item")
        if item is None:
            item = {k: v for k, v in data.items() if k not in ("completion", "sample", "messages")}
        if not isinstance(item, dict):
            raise DataError(where, "item", "expected a JSON object")
        messages = data.get("messages") or item.get("messages") or []
        requests.append(GradeRequest(messages, completion, {k: v for k, v in item.items() if k != "messages"}))
    return requests


def grade_file(grader_config: str | Path, samples: str | Path) -> OfflineGrades:
    cfg = load_grader_config(grader_config)
    requests = load_samples(samples)
    pool = GraderPool(cfg, local=True)
    try:
        return OfflineGrades(requests, pool.grade(requests))
    finally:
        pool.shutdown()


def report(grades: OfflineGrades, show: int = 0) -> str:
    """A per-grader table (mean score, failures), an example failure per grader and the first ``show`` samples."""
    result, num = grades.result, len(grades.requests)
    lines = [f"{num} samples", f"{'grader':<24} {'mean':>8} {'failed':>8}"]
    for name, scores in result.scores.items():
        mean = sum(scores) / len(scores) if scores else float("nan")
        lines.append(f"{name:<24} {mean:>8.4f} {result.failures_by_grader[name]:>8}")
    lines.append(f"{'reward (weighted sum)':<24} {sum(result.rewards) / max(num, 1):>8.4f}")
    lines.append(f"errors {result.num_errors}, timeouts {result.num_timeouts}, invalid {result.num_invalid}")
    for name, example in result.examples.items():
        lines.append(f"example failure of {name!r}: {example}")
    for i, request in enumerate(grades.requests[:show]):
        scores = ", ".join(f"{name}={result.scores[name][i]:.4g}" for name in result.scores)
        lines.append(f"[{i}] {request.completion!r:.60}  {scores}")
    return "\n".join(lines)
