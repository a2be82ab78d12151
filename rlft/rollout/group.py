"""``RolloutGroup``: the typed facade over the rollout workers (Ray actors, or one in-process worker).

The controller hands it a step's prompts; the group cuts them into contiguous, balanced chunks, one per worker,
generates on all workers at once and returns the samples in prompt order (``generate``), or hands each chunk over
as soon as it is done (``generate_streamed``), so that grading overlaps generation. ``sync_weights`` pushes a new policy
version to every worker through the object store (``rlft/distributed/weight_sync.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import ray
import torch

from rlft.distributed.actors import Resources, balanced_chunks, kill, spawn, wait
from rlft.distributed.weight_sync import SyncStats, pack_buckets, publish_buckets
from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.rollout.types import Sample
from rlft.rollout.worker import RolloutWorker

_MIB = 2**20


class RolloutGroup:
    def __init__(self, model_path: str, cfg: RolloutConfig, local: bool = False):
        if local and cfg.num_rollout_workers != 1:
            raise ValueError("rollout.num_rollout_workers: the in-process (no Ray) backend runs exactly one worker")
        self.cfg = cfg
        self.local = local
        resources = Resources(num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker)
        self.workers = [
            spawn(RolloutWorker, model_path, cfg, resources=resources, local=local)
            for _ in range(cfg.num_rollout_workers)
        ]
        # Waits until every engine has started, so start-up errors surface here rather than at the first step.
        self.policy_versions()

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def policy_versions(self) -> list[int]:
        """Each worker's current policy version (equal after every completed ``sync_weights``)."""
        return wait([w.policy_version.remote() for w in self.workers])

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        prompt_indices: list[int] | None = None,
    ) -> list[Sample]:
        """``num_samples_per_prompt`` samples of every prompt (token ids), ordered by prompt, then by sample.

        ``prompt_indices`` name the prompts (default: their positions 0 .. P-1); with the sampling seed and the
        policy version they seed each prompt's samples and come back as ``Sample.prompt_index``.
        """
        chunks = dict(self.generate_streamed(prompts, sampling, num_samples_per_prompt, prompt_indices, 1))
        return [sample for first in sorted(chunks) for sample in chunks[first]]

    def generate_streamed(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        prompt_indices: list[int] | None = None,
        chunks_per_worker: int = 1,
    ) -> Iterator[tuple[int, list[Sample]]]:
        """Like ``generate``, but yields ``(first prompt's position, samples)`` for each chunk as soon as it is done,
        in completion order: each worker's prompts are cut into ``chunks_per_worker`` consecutive calls, so grading
        the first chunks can start while later ones are generated. Samples do not depend on the chunking."""
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt indices")
        pending = {}
        for worker, (start, stop) in zip(self.workers, balanced_chunks(len(prompts), self.num_workers)):
            for first, end in balanced_chunks(stop - start, chunks_per_worker):
                if end > first:
                    a, b = start + first, start + end
                    ref = worker.generate.remote(prompts[a:b], sampling, num_samples_per_prompt, indices[a:b])
                    pending[ref] = a
        while pending:
            if self.local:
                ref = next(iter(pending))
            else:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ref), wait(ref)

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of given sequences under the workers' current weights (spread like ``generate``)."""
        calls = [
            worker.token_logprobs.remote(sequences[start:stop])
            for worker, (start, stop) in zip(self.workers, balanced_chunks(len(sequences), self.num_workers))
            if stop > start
        ]
        return [row for rows in wait(calls) for row in rows]

    def sync_weights(self, policy_version: int, weights_by_name: dict[str, torch.Tensor]) -> SyncStats:
        """Give every worker the full weights of ``policy_version`` (e.g. ``LearnerGroup.export_weights()``);
        returns when all workers generate with them."""
        start = time.perf_counter()
        buckets = pack_buckets(weights_by_name, int(self.cfg.weight_sync_bucket_mib * _MIB))
        bucket_refs = publish_buckets(buckets, self.local)
        wait([w.update_weights.remote(policy_version, bucket_refs) for w in self.workers])
        return SyncStats.since(start, buckets)

    def shutdown(self) -> None:
        kill(self.workers)
        self.workers = []
