"""``RolloutGroup``: the typed facade over the rollout workers (Ray actors, or one in-process worker).

The controller hands it a step's prompts; the group cuts them into contiguous, balanced chunks, one per worker,
generates on all workers at once and returns the samples in prompt order (``generate``), or hands each chunk over
as soon as it is done (``generate_streamed``), so that grading overlaps generation. ``sync_from(learners, version)``
has the learners publish a new policy version and every worker take it, by ``rollout.weight_transport``
(``rlft/distributed/weight_sync.py``); the weights never pass through this process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import ray
from ray.exceptions import RayActorError

from rlft.distributed.actors import (
    DRIVER_INBOX,
    Submitted,
    WorkerSet,
    balanced_chunks,
    slowest,
    spawn,
    wait,
    wait_peers,
)
from rlft.distributed.placement import role_resources
from rlft.distributed.weight_sync import CollectiveWeightSource, SyncStats, WeightSource
from rlft.errors import WeightSyncError
from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.data.samples import Sample
from rlft.rollout.worker import RolloutWorker
from rlft.names import Role, WeightTransport

_MIB = 2**20
# Seconds the driver waits beyond the weight group's timeout before naming the peers still running as hung.
_PEER_MARGIN_S = 5.0


class RolloutGroup:
    def __init__(self, model_path: str, cfg: RolloutConfig, local: bool = False, placement=None,
                 max_restarts: int = 0, envs=None, lora_rank: int = 0):
        """``envs``: an ``EnvConfig`` naming an environment makes every rollout multi-turn; the prompts given to
        ``generate`` / ``submit`` are then the data rows (dicts with ``messages``), not token ids. ``lora_rank`` >
        0: the learners' LoRA adapter is what every sync sends (``model.lora.sync``), not full weights."""
        if local and cfg.num_rollout_workers != 1:
            raise ValueError("rollout.num_rollout_workers: the in-process (no Ray) backend runs exactly one worker")
        self.model_path = model_path
        self.cfg = cfg
        self.envs = envs
        self.lora_rank = lora_rank
        self.local = local
        self.placement = placement
        # How a worker started after the first sync (a replacement, or one added by ``resize``) gets the weights the
        # others serve: an object-store ``WeightHandle``, made when first needed.
        self._serving = None  # (version, function returning the handle)
        self._object_store_handle = None
        # The workers that formed the current weight group (``collective``): it is formed again when they change.
        self._group_members: list = []
        # Weight updates sent without waiting (``sync_from(wait_applied=False)``): reference -> (slot, worker).
        self._updates_sent: dict = {}
        # Generation is sent ahead of the steps (asynchronous RL): engine figures come one call late.
        self.queued_ahead = False
        self._engine_asked: list[list] = []  # the engine-seconds questions not yet answered, oldest first
        self.workers = WorkerSet(Role.ROLLOUT, self._start_worker, cfg.num_rollout_workers, max_restarts, local)

    def _start_worker(self, slot: int):
        cfg = self.cfg
        resources = role_resources(self.placement, Role.ROLLOUT, slot, cfg.num_cpus_per_worker, cfg.num_gpus_per_worker)
        worker = spawn(RolloutWorker, self.model_path, self.cfg, self.envs, self.local, self.lora_rank,
                       resources=resources, local=self.local)
        # Waits until the engine has started, so start-up errors surface here rather than at the first step.
        wait(worker.policy_version.remote())
        if self._serving is not None:
            wait(worker.update_weights.remote(self._current_object_store_handle()), self.cfg.weight_sync_timeout_s)
        return worker

    def _current_object_store_handle(self):
        version, publish = self._serving
        if self._object_store_handle is None or self._object_store_handle.version != version:
            self._object_store_handle = publish()
        return self._object_store_handle

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
                self.placement.release(Role.ROLLOUT, self.num_workers)

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside the engines since the last call, by kind (the slowest worker's).

        With batches queued ahead (asynchronous RL, ``queued_ahead``) a call to a worker would wait behind them, so
        each call sends the question and returns, without waiting, the answers of the earlier calls that have all
        arrived (each worker answers in order; an empty dict while none has). Over a run they add up to the same
        seconds, a step or two late."""
        if not self.queued_ahead:
            return slowest(self.workers.call_all(lambda w: w.engine_seconds.remote()))
        self._engine_asked.append([w.engine_seconds.remote() for w in self.workers.handles])
        totals: dict[str, float] = {}
        while self._engine_asked and (self.local or len(ray.wait(self._engine_asked[0], timeout=0,
                                                                 num_returns=len(self._engine_asked[0]))[0])
                                      == len(self._engine_asked[0])):
            answers = []
            for ref in self._engine_asked.pop(0):
                try:
                    answers.append(wait(ref))
                except RayActorError:  # the worker died since: its seconds are lost with it
                    pass
            for phase, seconds in slowest(answers).items():
                totals[phase] = totals.get(phase, 0.0) + seconds
        return totals

    def policy_versions(self) -> list[int]:
        """Each worker's current policy version (equal after every completed ``sync_from``)."""
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
        yield from self.chunks(self.submit(prompts, sampling, num_samples_per_prompt, prompt_indices, chunks_per_worker))

    def submit(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        prompt_indices: list[int] | None = None,
        chunks_per_worker: int = 1,
        num_threads: int = 0,
    ) -> Submitted:
        """Start generating now, chunk by chunk as ``generate_streamed`` cuts them; ``chunks`` yields them later.
        Each worker runs its calls in order, after the weight updates sent to it before: a chunk is generated with
        the newest weights the worker was sent before this call. ``num_threads`` > 0 sets each call's compute
        threads (``RolloutWorker.generate``)."""
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt indices")
        calls = {}
        for slot, (start, stop) in enumerate(balanced_chunks(len(prompts), self.num_workers)):
            for first, end in balanced_chunks(stop - start, chunks_per_worker):
                if end > first:
                    a, b = start + first, start + end
                    calls[a] = (slot, _generate_call(prompts[a:b], sampling, num_samples_per_prompt, indices[a:b],
                                                     num_threads))
        return self.workers.submit(calls)

    def chunks(self, submitted: Submitted) -> Iterator[tuple[int, list[Sample]]]:
        """The chunks of a ``submit``, as they finish. A chunk whose worker died (or was removed by ``resize``) is
        generated again by another: its samples carry the version that worker holds, and each chunk comes once."""
        yield from self.workers.results(submitted)

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of given sequences under the workers' current weights (spread like ``generate``)."""
        calls = [
            (slot, lambda w, part=sequences[start:stop]: w.token_logprobs.remote(part))
            for slot, (start, stop) in enumerate(balanced_chunks(len(sequences), self.num_workers))
            if stop > start
        ]
        return [row for rows in self.workers.call(calls) for row in rows]

    def sync_from(self, learners: WeightSource, policy_version: int, transport: WeightTransport | None = None,
                  wait_applied: bool = True, rewind: bool = False) -> SyncStats:
        """Have ``learners`` (a ``LearnerGroup``) publish their current weights as ``policy_version`` and every
        worker take them; returns when all workers generate with them. A worker that dies meanwhile is replaced
        (its replacement starts with these weights from the object store); one that does not answer within
        ``rollout.weight_sync_timeout_s`` is a ``WeightSyncError`` naming it. ``transport`` overrides
        ``rollout.weight_transport`` for this sync (benchmarks compare them on one group).

        ``wait_applied=False`` (asynchronous RL) returns once the learners have published: each worker applies the
        version after the generation calls already sent to it, before any sent later; the next sync checks that it
        did. The ``collective`` transport always waits (its broadcast needs every worker at once). ``rewind``
        lets the workers go back to an older version (after the learners restored a checkpoint)."""
        cfg = self.cfg
        transport = transport or cfg.weight_transport
        self._check_updates_sent()
        start, inbox_before = time.perf_counter(), DRIVER_INBOX.num_bytes
        bucket_bytes = int(cfg.weight_sync_bucket_mib * _MIB)
        adapter = self.lora_rank > 0
        self._serving = (policy_version, lambda: learners.publish_weights(policy_version, "object_store",
                                                                           bucket_bytes, adapter))
        if transport == "collective":
            if not self._same_members() or not learners.weight_group_open:  # new workers, or restarted learners
                self._form_group(learners)
            handle = learners.publish_weights(policy_version, "collective", bucket_bytes, adapter)
            try:
                timings = self._receive_collective(handle)
            except WeightSyncError as err:
                self._group_members = []  # a failed broadcast leaves the group unusable: form it again next time
                if not any(isinstance(e, RayActorError) for e in err.failed.values()):
                    raise  # a hung or failing peer: the message names it
                # A worker died mid-broadcast (it has been replaced): the others may hold a partial update or still
                # wait in the broadcast until its timeout. Serve everyone from the object store this time; the group
                # is formed again at the next sync.
                handle = self._current_object_store_handle()
                timings = self.workers.call_all(lambda w: w.update_weights.remote(handle), cfg.weight_sync_timeout_s)
        else:
            handle = learners.publish_weights(policy_version, transport, bucket_bytes, adapter)
            if handle.transport == "object_store":
                self._object_store_handle = handle
            if not wait_applied:
                for slot, worker in enumerate(self.workers.handles):
                    self._updates_sent[worker.update_weights.remote(handle, rewind)] = (slot, worker)
                return SyncStats.since(start, handle, DRIVER_INBOX.num_bytes - inbox_before)
            timings = self.workers.call_all(lambda w: w.update_weights.remote(handle, rewind),
                                            cfg.weight_sync_timeout_s)
        load_seconds = max(t["load_s"] for t in timings)
        return SyncStats.since(start, handle, DRIVER_INBOX.num_bytes - inbox_before, load_seconds)

    def _check_updates_sent(self) -> None:
        """The weight updates sent without waiting that have been applied since: a worker that died with one queued
        is replaced (the replacement starts with the newest weights); any other failure is a ``WeightSyncError``
        naming the worker. Updates still queued behind generation stay pending."""
        if not self._updates_sent:
            return
        done = list(self._updates_sent) if self.local else ray.wait(
            list(self._updates_sent), num_returns=len(self._updates_sent), timeout=0)[0]
        for ref in done:
            slot, worker = self._updates_sent.pop(ref)
            try:
                wait(ref)
            except RayActorError as err:
                if slot < self.num_workers and self.workers.handles[slot] is worker:
                    self.workers.replace(slot, type(err).__name__)
            except Exception as err:
                raise WeightSyncError(f"rollout worker {slot} failed to apply new weights: {err}") from err

    def _same_members(self) -> bool:
        handles = self.workers.handles
        return len(handles) == len(self._group_members) and all(a is b for a, b in zip(handles, self._group_members))

    def _form_group(self, learners: CollectiveWeightSource) -> None:
        """A new weight group of learner rank 0 and every worker's ranks (each tensor-parallel rank is one)."""
        timeout_s = self.cfg.weight_sync_timeout_s
        handles = list(self.workers.handles)
        what = "forming the weight group"
        ranks = list(wait_peers({f"rollout worker {slot}": w.weight_ranks.remote() for slot, w in enumerate(handles)},
                                _PEER_MARGIN_S, what).values())
        spec, learner_join = learners.open_weight_group(sum(ranks), timeout_s)
        calls = {"learner rank 0": learner_join}
        first = 1
        for slot, (worker, num) in enumerate(zip(handles, ranks)):
            calls[f"rollout worker {slot}"] = worker.join_weight_group.remote(spec, first)
            first += num
        # The driver waits a little longer than the group's own timeout: the live peers then fail with their own
        # timeout, and the one still running is the peer that hung.
        wait_peers(calls, timeout_s + _PEER_MARGIN_S, f"{what} (generation {spec.generation})")
        self._group_members = handles

    def _receive_collective(self, handle) -> list[dict[str, float]]:
        """The workers receive ``handle`` over the weight group while the learner ranks send; their timings."""
        calls = {f"learner rank {rank}": ref for rank, ref in enumerate(handle.sending)}
        slots = {f"rollout worker {slot}": slot for slot in range(self.num_workers)}
        calls.update({name: self.workers.handles[slot].update_weights.remote(handle) for name, slot in slots.items()})
        try:
            results = wait_peers(calls, self.cfg.weight_sync_timeout_s + _PEER_MARGIN_S,
                       f"weights version {handle.version} over the weight group (generation "
                       f"{handle.collective.generation})")
        except WeightSyncError as err:
            for name, failure in err.failed.items():
                if isinstance(failure, RayActorError) and name in slots:
                    self.workers.replace(slots[name], type(failure).__name__)
            raise
        return [results[name] for name in slots]

    def shutdown(self) -> None:
        self.workers.shutdown()


def _generate_call(prompts, sampling, num_samples_per_prompt, indices, num_threads=0):
    return lambda worker: worker.generate.remote(prompts, sampling, num_samples_per_prompt, indices, num_threads)
