"""Reference log-probabilities: the frozen starting policy scores the sampled sequences for the KL term.

``ReferenceGroup.logprobs(batch)`` splits the rows of a ``TokenBatch`` into contiguous chunks, one per replica,
scores them concurrently and returns ``logprobs_BT`` in the batch's row order, aligned with ``input_ids_BT`` (column
0 is 0, see ``rlft.algorithms.token_logprobs``). The controller starts no reference server when the KL
coefficient is 0.
"""

from __future__ import annotations

import torch

from rlft import startup
from rlft.algorithms.sft import token_logprobs
from rlft.data.batch import TokenBatch
from rlft.distributed.actors import WorkerSet, balanced_chunks, slowest, spawn, wait
from rlft.distributed.placement import role_resources
from rlft.distributed.remote_rows import RemoteRows, keep_here
from rlft.distributed.stacks import install_handler
from rlft.distributed.weight_sync import WeightSource
from rlft.reference.config import ReferenceConfig
from rlft.names import Phase
from rlft.timing import PhaseTimer
from rlft.names import Role

class ReferenceWorker:
    """One replica: a frozen Hugging Face causal LM in eval mode."""

    def __init__(self, model_path: str, dtype: str, micro_batch_size: int):
        import os

        from transformers import AutoModelForCausalLM

        install_handler()
        startup.mark("reference", "actor")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.clock = PhaseTimer()
        startup.mark("reference", "ready")

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside the model since the last call, by phase: ``reference``, ``sync`` (a refresh)."""
        return self.clock.take()

    def update_weights(self, handle) -> None:
        """Replace the frozen weights with a published version (a ``WeightHandle`` from the object store or CUDA
        IPC), e.g. online DPO refreshing its reference from the policy."""
        from rlft.distributed.weight_sync import iter_bucket_weights, receive_buckets

        buckets = receive_buckets(handle)
        # Tied parameters (an output head sharing the embedding) come once, so some names may be missing.
        with self.clock.phase(Phase.SYNC):
            result = self.model.load_state_dict({k: v.to(self.device) for k, v in iter_bucket_weights(buckets)},
                                                strict=False)
        if result.unexpected_keys:
            raise KeyError(f"weights the reference model does not have: {result.unexpected_keys[:5]}")

    @torch.no_grad()
    def logprobs_kept(self, batch: TokenBatch):
        """``logprobs_BT`` of every token of ``batch`` under the reference model (float32, on the CPU), kept in the
        object store: only the reference travels back."""
        with self.clock.phase(Phase.REFERENCE):
            return keep_here(self._logprobs(batch))

    def _logprobs(self, batch: TokenBatch) -> torch.Tensor:
        out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        for start in range(0, batch.num_rows, self.micro_batch_size):
            micro = batch.rows(start, start + self.micro_batch_size).trimmed()
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in micro.model_inputs().items()}
            logits_BTV = self.model(**inputs).logits
            width = micro.input_ids_BT.shape[1]
            out_BT[start : start + micro.num_rows, :width] = token_logprobs(logits_BTV, inputs["input_ids"]).float().cpu()
        return out_BT * batch.attention_mask_BT


class ReferenceGroup:
    """Typed facade over ``num_replicas`` reference workers; a replica that dies is replaced (with the weights it
    last had) and its rows scored again."""

    def __init__(self, cfg: ReferenceConfig, model_path: str, local: bool = False, placement=None,
                 max_restarts: int = 0):
        self.cfg, self.model_path, self.local, self.placement = cfg, model_path, local, placement
        self._weights = None  # the ``WeightHandle`` of the last ``sync_from``, for replacements
        self.workers = WorkerSet(Role.REFERENCE, self._start_worker, cfg.num_replicas, max_restarts, local)

    def _start_worker(self, slot: int):
        cfg = self.cfg
        resources = role_resources(self.placement, Role.REFERENCE, slot, cfg.num_cpus_per_replica,
                                   cfg.num_gpus_per_replica)
        worker = spawn(ReferenceWorker, self.model_path, cfg.dtype, cfg.micro_batch_size, resources=resources,
                       local=self.local)
        if self._weights is not None:
            wait(worker.update_weights.remote(self._weights))
        return worker

    @property
    def restarts(self) -> int:
        return self.workers.restarts

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``logprobs_BT`` brought to the caller (a reference pass over a whole data set, e.g. DPO's cache)."""
        return self.keep_logprobs(batch).resolve()

    def keep_logprobs(self, batch: TokenBatch) -> RemoteRows:
        """``logprobs_BT`` of the batch's rows, left in the object store for the learners to fetch
        (``RemoteRows``); a replica that dies is replaced and its rows scored again."""
        bounds = [(lo, hi) for lo, hi in balanced_chunks(batch.num_rows, len(self.workers)) if hi > lo]
        calls = [(slot, lambda w, part=batch.rows(lo, hi): w.logprobs_kept.remote(part))
                 for slot, (lo, hi) in enumerate(bounds)]
        refs = self.workers.call(calls)
        return RemoteRows(tuple((ref, hi - lo) for ref, (lo, hi) in zip(refs, bounds)))

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside the replicas since the last call, by kind (the slowest replica's)."""
        return slowest(self.workers.call_all(lambda w: w.engine_seconds.remote()))

    def sync_from(self, learners: WeightSource, version: int, bucket_bytes: int = 64 * 2**20,
                  timeout_s: float = 300.0) -> None:
        """Take the learners' current weights as the new reference: they publish them to the object store and
        every replica maps them (the weights never pass through the driver)."""
        self._weights = learners.publish_weights(version, "object_store", bucket_bytes)
        self.workers.call_all(lambda w: w.update_weights.remote(self._weights), timeout_s)

    def shutdown(self) -> None:
        self.workers.shutdown()
