"""What an RL step reports besides its loss: rollout figures, the weight sync, engine times by phase, faults."""

from __future__ import annotations

import statistics

import torch

from rlft.data.prompts import PromptSet
from rlft.graders.exact import exact_match
from rlft.rollout import Sample


def rollout_metrics(samples: list[Sample], prompts: PromptSet, rewards_S: torch.Tensor, step: int) -> dict[str, float]:
    correct = [exact_match(s.response_text, prompts.answer(s.prompt_index) or "") for s in samples]
    return {
        "reward/mean": rewards_S.mean().item(),
        "reward/std": rewards_S.std().item(),
        "rollout/num_samples": len(samples),
        # Generated tokens: a multi-turn sample's observations are not counted.
        "rollout/response_tokens": sum(s.num_policy_tokens for s in samples),
        "rollout/accuracy": sum(correct) / max(len(correct), 1),
        "rollout/response_tokens_mean": statistics.mean(s.num_policy_tokens for s in samples),
        "rollout/truncated_fraction": statistics.mean(s.finish_reason == "length" for s in samples),
        # Samples come from the weights synced after the previous step: a lag above 0 means stale weights.
        "rollout/policy_version_lag": step - 1 - min(s.policy_version for s in samples),
    }


def sync_metrics(sync, logprob_gap: dict[str, float] | None = None,
                 update_results: list[dict[str, float]] | None = None) -> dict[str, float]:
    """Seconds, bytes and GB/s of a weight sync (and what the driver received meanwhile). In asynchronous mode
    the sync returns once the learners published: its seconds are the publishing, the workers load the weights
    behind their queued generation.

    ``sync/logprob_max_abs_diff``: the largest gap between the learner's log-probabilities of the sampled tokens
    and the sampler's own, from the forward pass before the update (``logprob_gap``) or, without one, from the
    update's (``logprob_diff_max`` in ``update_results``). In synchronous mode they agree up to numerics after a
    correct sync, so this is the check that rollout workers run the learner's weights; in asynchronous mode it
    also holds the staleness."""
    metrics = {"sync/seconds": sync.seconds, "sync/bytes": sync.num_bytes, "sync/gb_per_s": sync.gb_per_s,
               "sync/driver_bytes": sync.driver_bytes, "sync/load_seconds": sync.load_seconds,
               "sync/transfer_gb_per_s": sync.transfer_gb_per_s}
    if logprob_gap:
        metrics.update(logprob_gap)
    elif update_results and "logprob_diff_max" in update_results[0]:
        metrics["sync/logprob_max_abs_diff"] = max(r["logprob_diff_max"] for r in update_results)
    return metrics


def mean_metrics(results: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The mean of each metric over ``results`` (the step's optimizer steps); the largest for ``*_max`` keys."""
    keys = [k for k in results[0] if k != "seconds"]
    return {prefix + k: max(r[k] for r in results) if k.endswith("_max") else sum(r[k] for r in results) / len(results)
            for k in keys}


def engine_metrics(*roles) -> dict[str, float]:
    """``engine/<phase>_seconds``: how long the engines of ``roles`` (facades with ``engine_seconds()``, None
    skipped) worked in each phase since the last call. Within a role the slowest worker's share counts (workers run
    side by side); roles add up. Against ``time/<phase>_seconds`` this shows what dispatch, transfers and the
    controller add (``rlft bench``)."""
    totals: dict[str, float] = {}
    for role in roles:
        if role is None:
            continue
        for phase, seconds in role.engine_seconds().items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return {f"engine/{phase}_seconds": seconds for phase, seconds in totals.items()}
