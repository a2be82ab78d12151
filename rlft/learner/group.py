"""``LearnerGroup``: the typed facade over N learner ranks (Ray actors) that train one model together.

The controller hands it the step's whole batch; the group splits it evenly over ranks, plans every rank's
micro-batches (the same count on every rank: ``rlft/learner/micro_batches.py``), calls every rank at once and adds
up the ranks' metrics. SFT uses it now; the RL and preference controllers use the same ``train_step``
with their own losses.

A rank that dies makes the call a ``LearnerFailedError`` naming it. The ranks share one sharded optimizer state, so
none comes back alone: ``restart()`` starts every rank again, in the same placement bundles, from the model's
starting weights, and the run (``rlft/controller/run.py``) loads its latest checkpoint into them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from rlft.config import Config
from rlft.data.batch import TokenBatch
from rlft.distributed.actors import kill, slowest, spawn, wait_each
from rlft.distributed.placement import role_resources
from rlft.distributed.remote_rows import RemoteRows
from rlft.distributed.weight_sync import CollectiveSpec, WeightHandle
from rlft.errors import LearnerFailedError, WeightSyncError
from rlft.learner.micro_batches import MicroBatchPlan, packed_plans, padded_plan
from rlft.learner.worker import LearnerSpec, LearnerWorker, Loss
from rlft.names import Role

# Metrics every rank reports the same value of (the rest are summed over ranks).
_SHARED_METRICS = ("grad_norm", "lr")
# How long a failed call waits for Ray to notice which rank died (a survivor's collective can fail first).
_DEATH_NOTICE_S = 30.0


@dataclass
class StepResult:
    metrics: dict[str, float]
    seconds_slowest_rank: float


class LearnerGroup:
    def __init__(
        self,
        cfg: Config,
        total_steps: int,
        local: bool = False,
        head: str = "lm",
        lr: float | None = None,
        placement=None,
    ):
        """``head="value"`` makes a critic (scalar per token) from the same checkpoint; ``lr`` overrides
        ``trainer.lr`` (the critic's own learning rate). ``placement`` (``rlft.distributed.placement``) puts
        rank i on bundle i of the role's placement group."""
        learner = cfg.learner
        world_size = learner.num_learners
        if local and world_size != 1:
            raise ValueError("learner.num_learners: the in-process (no Ray) backend runs exactly one learner")
        backend = learner.backend
        if backend == "auto":
            backend = "nccl" if learner.num_gpus_per_learner > 0 else "gloo"
        self.spec = LearnerSpec(
            model_path=cfg.model.path,
            dtype=cfg.model.dtype,
            zero_stage=learner.zero_stage,
            micro_batch_size=learner.micro_batch_size_per_learner,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            max_tokens_per_micro_batch=learner.max_tokens_per_micro_batch,
            world_size=world_size,
            lr=cfg.trainer.lr if lr is None else lr,
            weight_decay=cfg.trainer.weight_decay,
            adam_betas=cfg.trainer.adam_betas,
            adam_eps=cfg.trainer.adam_eps,
            lr_scheduler=cfg.trainer.lr_scheduler,
            warmup_steps=cfg.trainer.warmup_steps,
            total_steps=total_steps,
            max_grad_norm=cfg.trainer.max_grad_norm,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            backend=backend,
            seed=cfg.trainer.seed,
            head=head,
            # The critic (a value head) trains whole; LoRA is the policy's.
            lora=cfg.model.lora if cfg.model.lora.rank and head == "lm" else None,
        )
        self.save_merged = cfg.model.lora.save_merged
        self.tokenizer_path = cfg.model.tokenizer_path or cfg.model.path
        self.role = Role.CRITIC if head == "value" else Role.LEARNERS
        self._local, self._placement = local, placement
        self._cpus, self._gpus = learner.num_cpus_per_learner, learner.num_gpus_per_learner
        self._weight_generation = 0
        self._start_ranks()

    def _start_ranks(self) -> None:
        """Spawn every rank in its placement bundle, form the process group and build the engines."""
        self._failed = False
        self._weight_spec = None  # the open weight group (``collective`` transport), None until one is opened
        self.workers = [
            spawn(
                LearnerWorker,
                rank,
                resources=role_resources(self._placement, self.role, rank, self._cpus, self._gpus),
                local=self._local,
            )
            for rank in range(self.spec.world_size)
        ]
        master_addr, master_port = self._wait(self.workers[0].address.remote())
        counts = self._wait([w.setup.remote(self.spec, master_addr, master_port) for w in self.workers])
        self.num_parameters, self.num_trainable_parameters = counts[0]
        self._adapter_config = self._wait(self.workers[0].adapter_config.remote()) if self.spec.lora else None

    def restart(self) -> None:
        """Every rank started again from the model's starting weights (after one died): the survivors are ended
        (they may be blocked in a collective with the dead one) and their bundles reused. The weight group, if one
        was open, is gone with rank 0; consumers form a new one (``weight_group_open``)."""
        kill(self.workers)
        self._start_ranks()

    @property
    def weight_group_open(self) -> bool:
        """Whether these ranks hold an open weight group (``collective`` transport)."""
        return self._weight_spec is not None

    def _wait(self, refs):
        """The results of calls on the ranks; the first rank that dies stops the group at once (the others may be
        blocked in a collective waiting for it) with ``LearnerFailedError`` naming it. A survivor's collective may
        fail before Ray reports the death: a failed call is a rank's death when a rank turns out dead."""
        try:
            return wait_each(refs)
        except (RayActorError, RayTaskError) as err:
            dead = self._dead_ranks()
            if not dead and not isinstance(err, RayActorError):
                raise
            self._failed = True
            ranks = ", ".join(map(str, dead)) or "?"
            first_line = f"{err}".strip().splitlines()[0] if f"{err}".strip() else ""
            raise LearnerFailedError(
                f"a learner actor died: {self.role} rank {ranks} ({type(err).__name__}: {first_line})"
            ) from err

    def _dead_ranks(self) -> list[int]:
        """The ranks whose actors are dead (each is pinged; Ray may take a moment to notice a killed process)."""
        if self._local:
            return []
        pings = {w.__ray_ready__.remote(): rank for rank, w in enumerate(self.workers)}
        deadline = time.monotonic() + _DEATH_NOTICE_S
        dead, pending = [], list(pings)
        while pending:
            # Once one is found dead, the others get a moment more (a survivor blocked in a collective never answers).
            left = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 2.0) if dead else left)
            if not ready:
                break
            try:
                ray.get(ready[0])
            except RayActorError:
                dead.append(pings[ready[0]])
        return sorted(dead)

    @property
    def world_size(self) -> int:
        return len(self.workers)

    @property
    def rows_per_step(self) -> int:
        return self.spec.micro_batch_size * self.spec.gradient_accumulation_steps * self.world_size

    def _shards(self, batch: TokenBatch) -> list[TokenBatch]:
        if batch.num_rows != self.rows_per_step:
            raise ValueError(
                f"a step's batch must hold {self.rows_per_step} rows "
                f"(micro batch × accumulation × learners), got {batch.num_rows}"
            )
        return batch.split(self.world_size)

    def _plans(self, shards: list[TokenBatch]) -> list[MicroBatchPlan]:
        """Every rank's micro-batches, as many on each: packed by the token budget, or padded rows."""
        if self.spec.max_tokens_per_micro_batch:
            return packed_plans(shards, self.spec.max_tokens_per_micro_batch)
        return [padded_plan(s.num_rows, self.spec.gradient_accumulation_steps) for s in shards]

    def train_step(self, batch: TokenBatch, loss: Loss) -> StepResult:
        """One optimizer step over the global ``batch`` with ``loss``; metrics summed over ranks."""
        shards = self._shards(batch)
        calls = [w.train_step.remote(s, loss, p) for w, s, p in zip(self.workers, shards, self._plans(shards))]
        results = self._wait(calls)
        return StepResult(_combine(results), max(r["seconds"] for r in results))

    def evaluate_loss(self, batch: TokenBatch, loss: Loss) -> dict[str, float]:
        shards = self._shards(batch)
        calls = [w.evaluate_loss.remote(s, loss, p) for w, s, p in zip(self.workers, shards, self._plans(shards))]
        return _combine(self._wait(calls))

    def compute_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``logprobs_BT`` of every row under the current policy weights, in row order."""
        if self.spec.head != "lm":
            raise TypeError("compute_logprobs needs a causal-LM learner group; this one is a critic")
        return self._per_token_outputs(batch)

    def keep_logprobs(
        self, batch: TokenBatch, sampler_logprobs_BT: torch.Tensor | None = None, reference: bool = False
    ) -> tuple[RemoteRows, float]:
        """``logprobs_BT`` of every row under the current policy weights, left on the ranks that computed them
        (``RemoteRows``: references the ranks resolve in ``train_step``), and the largest gap to
        ``sampler_logprobs_BT`` on the response tokens (nan without them). ``reference``: under the base model, the
        LoRA adapter disabled (``LearnerReference``)."""
        if self.spec.head != "lm":
            raise TypeError("keep_logprobs needs a causal-LM learner group; this one is a critic")
        shards = self._even_shards(batch)
        compare = [None] * self.world_size if sampler_logprobs_BT is None else sampler_logprobs_BT.chunk(self.world_size)
        results = self._wait([w.logprobs_kept.remote(s, c, reference)
                              for w, s, c in zip(self.workers, shards, compare)])
        parts = tuple((ref, shard.num_rows) for (ref, _), shard in zip(results, shards))
        return RemoteRows(parts), max(gap for _, gap in results)

    def compute_values(self, batch: TokenBatch) -> torch.Tensor:
        """``values_BT`` of every row under the current critic weights, in row order."""
        if self.spec.head != "value":
            raise TypeError("compute_values needs a critic (head='value') learner group")
        return self._per_token_outputs(batch)

    def _per_token_outputs(self, batch: TokenBatch) -> torch.Tensor:
        shards = self._even_shards(batch)
        return torch.cat(self._wait([w.per_token_outputs.remote(s) for w, s in zip(self.workers, shards)]))

    def _even_shards(self, batch: TokenBatch) -> list[TokenBatch]:
        """The batch's rows in one contiguous share per rank (any row count that divides evenly)."""
        if batch.num_rows % self.world_size:
            raise ValueError(f"{batch.num_rows} rows do not split evenly over {self.world_size} learners")
        return batch.split(self.world_size)

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside DeepSpeed since the last call, by kind: ``train``, ``forward``, ``export`` (the slowest
        rank's; ranks wait for each other in collectives)."""
        return slowest(self._wait([w.engine_seconds.remote() for w in self.workers]))

    def memory(self) -> list[dict[str, float]]:
        """Every rank's memory (``LearnerWorker.memory``), in rank order."""
        return self._wait([w.memory.remote() for w in self.workers])

    def export_weights(self, adapter: bool | None = None) -> dict:
        """Whole parameters by name (ZeRO-3 shards gathered), brought to the caller: for tests and comparing runs.
        With LoRA, the adapter's (``adapter=False``: full weights, the adapter merged in). Syncing consumers goes
        through ``publish_weights``, which never brings weights to the driver."""
        return self._wait([w.export_weights.remote(adapter) for w in self.workers])[0]

    def reference(self) -> LearnerReference:
        """The reference policy of a LoRA run: these ranks with the adapter disabled (no reference server)."""
        if self.spec.lora is None:
            raise TypeError("the learners are the reference only with model.lora (the adapter disabled)")
        return LearnerReference(self)

    def publish_weights(self, version: int, transport: str, bucket_bytes: int, adapter: bool = False) -> WeightHandle:
        """The ranks publish the current weights as ``version`` and the small ``WeightHandle`` comes back.
        ``adapter``: the LoRA adapter's weights only (the handle carries its PEFT config), else full weights.

        ``object_store`` and ``cuda_ipc``: returns once every bucket is out. ``collective``: returns at once with
        the ranks' sending calls in ``handle.sending``; the buckets flow while the consumers receive them (the group
        must have been opened with ``open_weight_group``)."""
        if adapter and self.spec.lora is None:
            raise ValueError("publish_weights(adapter=True): the learners train no LoRA adapter (model.lora.rank 0)")
        adapter_config = self._adapter_config if adapter else None
        if transport == "collective":
            if self._weight_spec is None:
                raise WeightSyncError("collective weight transport: the weight group is not open (open_weight_group)")
            # The consumers need the tables before the broadcast ends, so they are asked for first.
            tables = tuple(self._wait(self.workers[0].weight_tables.remote(bucket_bytes, adapter)))
            sending = tuple(w.publish_weights.remote(transport, bucket_bytes, adapter) for w in self.workers)
            return WeightHandle(version, transport, tables, collective=self._weight_spec, sending=sending,
                                adapter=adapter_config)
        results = self._wait([w.publish_weights.remote(transport, bucket_bytes, adapter) for w in self.workers])
        tables = tuple(results[0][0])
        emitted = {index: out for _, per_rank in results for index, out in per_rank.items()}
        in_order = tuple(emitted[index] for index in range(len(tables)))
        if transport == "object_store":
            return WeightHandle(version, transport, tables, bucket_refs=in_order, adapter=adapter_config)
        return WeightHandle(version, transport, tables, ipc_handles=in_order, adapter=adapter_config)

    def open_weight_group(self, num_receivers: int, timeout_s: float):
        """Start forming a new weight group of learner rank 0 and ``num_receivers`` consumer ranks; returns its
        ``CollectiveSpec`` and rank 0's pending join, which completes once every consumer has joined."""
        address, port = self._wait(self.workers[0].address.remote())
        self._weight_generation += 1
        backend = "nccl" if self.spec.backend == "nccl" else "gloo"
        self._weight_spec = CollectiveSpec(backend, address, port, 1 + num_receivers, self._weight_generation,
                                           timeout_s)
        return self._weight_spec, self.workers[0].join_weight_group.remote(self._weight_spec)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """A Hugging Face model directory (config, safetensors, tokenizer) loadable by transformers and vLLM; with
        LoRA, the adapter in PEFT's format (and the merged model in ``merged/`` with ``model.lora.save_merged``)."""
        out_dir = Path(out_dir).resolve()
        self._wait([w.save_pretrained.remote(str(out_dir), self.tokenizer_path, self.save_merged)
                    for w in self.workers])
        return out_dir

    def save_checkpoint(self, ckpt_dir: str | Path, trainer_state: dict) -> Path:
        """Weights, optimizer state and RNG of every rank, plus the controller's ``trainer_state`` (data position,
        step, its RNG). Written to a temporary directory first, so a crash never leaves a half checkpoint."""
        final = Path(ckpt_dir).resolve()
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self._wait([w.save_checkpoint.remote(str(partial)) for w in self.workers])
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        return final

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restore every rank from ``ckpt_dir``; returns the controller's saved ``trainer_state``."""
        path = Path(ckpt_dir)
        state_file = path / "trainer_state.json"
        if not state_file.exists():
            raise FileNotFoundError(f"{path}: not a checkpoint (no trainer_state.json)")
        self._wait([w.load_checkpoint.remote(str(path)) for w in self.workers])
        return json.loads(state_file.read_text())

    def shutdown(self) -> None:
        try:
            if not self._failed:
                wait_each([w.shutdown.remote() for w in self.workers], timeout_s=60)
        finally:
            kill(self.workers)


class LearnerReference:
    """The reference role of a LoRA run, played by the learners with the adapter disabled: the same calls as the
    reference server (``rlft.reference.ReferenceGroup``), its log-probabilities kept on the ranks."""

    restarts = 0  # the learners' own restarts are counted as theirs

    def __init__(self, learners: LearnerGroup):
        self.learners = learners

    def keep_logprobs(self, batch: TokenBatch) -> RemoteRows:
        return self.learners.keep_logprobs(batch, reference=True)[0]

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``logprobs_BT`` brought to the caller; any row count (the last row repeated to split evenly)."""
        rows, extra = batch.num_rows, -batch.num_rows % self.learners.world_size
        if extra:
            batch = TokenBatch.concat([batch] + [batch.rows(rows - 1, rows)] * extra)
        return self.keep_logprobs(batch).resolve()[:rows]

    def engine_seconds(self) -> dict[str, float]:
        return {}  # inside the learners' own (``reference``)

    def shutdown(self) -> None:
        pass  # the learners are shut down as themselves


def _combine(results: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in results[0]:
        if key in _SHARED_METRICS:
            out[key] = results[0][key]
        elif key == "seconds" or key.endswith("_max"):
            out[key] = max(r[key] for r in results)
        else:
            out[key] = sum(r[key] for r in results)
    return out
