"""What an evaluation returns and how it is scored, for both evaluators (the SFT/DPO worker and the RL rollout
workers): exact match by ``rlft.graders.exact`` (stripped of whitespace, the completion equals the stripped answer),
and with ``eval.extract_pattern`` a second, lenient figure that scores the answer the pattern finds in the
completion (``extracted_accuracy``). Held-out prompts are RFT prompt rows with an ``answer`` field. No torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from rlft.data import formats
from rlft.data.formats import DataError, RFTPrompt


@dataclass
class EvalResult:
    accuracy: float
    num_examples: int
    mean_completion_tokens: float
    samples: list[dict]
    # The share of completions whose extracted answer is right (``eval.extract_pattern``); None without a pattern.
    extracted_accuracy: float | None = None


def extracted_answer(completion: str, pattern: str) -> str | None:
    """The answer ``pattern`` finds in ``completion``: its last match, the first group if the pattern has one."""
    matches = list(re.finditer(pattern, completion))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def extracted_accuracy(records: list[dict], pattern: str) -> float:
    """The share of ``records`` (``completion`` and ``answer``) whose extracted answer equals the stripped answer."""
    right = [extracted_answer(r["completion"], pattern) == r["answer"].strip() for r in records]
    return sum(right) / max(len(right), 1)


def check_eval_items(items: list[RFTPrompt]) -> None:
    """Every held-out prompt needs a string ``answer``; checked before training starts."""
    for item in items:
        answer = item.extra.get("answer")
        if not isinstance(answer, str):
            raise DataError(item.where, "answer", "held-out prompts need a string 'answer' field")


def eval_items(cfg) -> list[RFTPrompt] | None:
    """The first ``eval.num_examples`` prompts of ``eval.path``, checked (each needs an ``answer``); None when the
    config asks for no evaluation. Called before any actor starts."""
    if not (cfg.eval.path and cfg.eval.num_examples):
        return None
    items = formats.load_examples(cfg.eval.path, formats.parse_rft).examples[: cfg.eval.num_examples]
    check_eval_items(items)
    return items


def write_samples(path: Path, result: EvalResult) -> None:
    with path.open("w") as f:
        for sample in result.samples:
            f.write(json.dumps(sample) + "\n")


def result_metrics(result: EvalResult) -> dict[str, float]:
    metrics = {
        "eval/accuracy": result.accuracy,
        "eval/num_examples": result.num_examples,
        "eval/mean_completion_tokens": result.mean_completion_tokens,
    }
    if result.extracted_accuracy is not None:
        metrics["eval/extracted_accuracy"] = result.extracted_accuracy
    return metrics
