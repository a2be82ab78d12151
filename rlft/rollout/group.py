"""``RolloutGroup``: the typed facade over the rollout workers (Ray actors, or one in-process worker).

The controller hands it a step's prompts; the group cuts them into contiguous, balanced chunks, one per worker,
generates on all workers at once and returns the samples in prompt order (``generate``), or hands each chunk over
as soon as it is done (``generate_streamed``), so that grading overlaps generation. ``sync_weights`` pushes a new policy
version to every worker through the object store (``rlft/distributed/weight_sync.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from rlft.distributed.actors import WorkerSet, balanced_chunks, slowest, spawn, wait
from rlft.distributed.placement import role_resources
from rlft.distributed.weight_sync import SyncStats, pack_buckets, publish_buckets
from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.rollout.types import Sample
from rlft.rollout.worker import RolloutWorker

_MIB = 2**20


class RolloutGroup:
    def __init__(self, model_path: str, cfg: RolloutConfig, local: bool = False, placement=None,
                 max_restarts: int = 0):
        if local and cfg.num_rollout_workers != 1:
            raise ValueError("rollout.num_rollout_workers: the in-process (no Ray) backend runs exactly one worker")
        self.model_path = model_path
        self.cfg = cfg
        self.local = local
        self.placement = placement
        # The weights every worker serves (version, object-store buckets), kept so that a worker started later (a
        # replacement, or one added by ``resize``) gets them before it serves.
        self._weights: tuple[int, list] | None = None
        self.workers = WorkerSet("rollout", self._start_worker, cfg.num_rollout_workers, max_restarts, local)

    def _start_worker(self, slot: int):
        cfg = self.cfg
        resources = role_resources(self.placement, "rollout", slot, cfg.num_cpus_per_worker, cfg.num_gpus_per_worker)
        worker = spawn(RolloutWorker, self.model_path, self.cfg, resources=resources, local=self.local)
        # Waits until the engine has started, so start-up errors surface here rather than at the first step.
        wait(worker.policy_version.remote())
        if self._weights is not None:
            version, bucket_refs = self._weights
            wait(worker.update_weights.remote(version, bucket_refs))
        return worker

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def restarts(self) -> int:
        return self.workers.restarts

    def resize(self, num_workers: int) -> None:
        """Add or remove workers (between steps): an added worker starts with the current weights; the next
        ``generate`` spreads the prompts over the new number."""
        if self.local and num_workers != 1:
            raise ValueError("rollout.num_rollout_workers: the in-process (no Ray) backend runs exactly one worker")
        if num_workers < 1:
            raise ValueError(f"rollout workers: need at least 1, got {num_workers}")
        while self.num_workers < num_workers:
            self.workers.add()
        while self.num_workers > num_workers:
            self.workers.remove_last()
            if self.placement is not None:
                self.placement.release("rollout", self.num_workers)

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside the engines since the last call, by kind (the slowest worker's)."""
        return slowest(self.workers.call_all(lambda w: w.engine_seconds.remote()))

    def policy_versions(self) -> list[int]:
        """Each worker's current policy version (equal after every completed ``sync_weights``)."""
        return self.workers.call_all(lambda w: w.policy_version.remote())

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
        calls = {}
        for slot, (start, stop) in enumerate(balanced_chunks(len(prompts), self.num_workers)):
            for first, end in balanced_chunks(stop - start, chunks_per_worker):
                if end > first:
                    a, b = start + first, start + end
                    calls[a] = (slot, _generate_call(prompts[a:b], sampling, num_samples_per_prompt, indices[a:b]))
        # A chunk whose worker died is generated again by its replacement: the samples are the same (seeded by
        # prompt index and policy version), and each chunk is yielded once.
        yield from self.workers.as_completed(calls)

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of given sequences under the workers' current weights (spread like ``generate``)."""
        calls = [
            (slot, lambda w, part=sequences[start:stop]: w.token_logprobs.remote(part))
            for slot, (start, stop) in enumerate(balanced_chunks(len(sequences), self.num_workers))
            if stop > start
        ]
        return [row for rows in self.workers.call(calls) for row in rows]

    def sync_weights(self, policy_version: int, weights_by_name: dict[str, torch.Tensor]) -> SyncStats:
        """Give every worker the full weights of ``policy_version`` (e.g. ``LearnerGroup.export_weights()``);
        returns when all workers generate with them."""
        start = time.perf_counter()
        buckets = pack_buckets(weights_by_name, int(self.cfg.weight_sync_bucket_mib * _MIB))
        bucket_refs = publish_buckets(buckets, self.local)
        self._weights = (policy_version, bucket_refs)
        # A worker that dies here is replaced, and its replacement starts with these weights.
        self.workers.call_all(lambda w: w.update_weights.remote(policy_version, bucket_refs))
        return SyncStats.since(start, buckets)

    def shutdown(self) -> None:
        self.workers.shutdown()


def _generate_call(prompts, sampling, num_samples_per_prompt, indices):
    return lambda worker: worker.generate.remote(prompts, sampling, num_samples_per_prompt, indices)
