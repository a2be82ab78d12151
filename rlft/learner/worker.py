"""One learner rank: a DeepSpeed ZeRO engine over a causal LM, driven by ``LearnerGroup``.

All ranks of a group form one torch.distributed group (gloo on CPU, NCCL on GPU). Each ``train_step`` call is one
optimizer step: the rank's share of the global batch is cut into micro-batches as the group's plan says (padded
rows, or samples packed by ``learner.max_tokens_per_micro_batch``: ``rlft/learner/micro_batches.py``) and DeepSpeed
accumulates their gradients, reduces them across ranks and steps the optimizer at the last one.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rlft import startup
from rlft.algorithms.policy_loss import token_values
from rlft.algorithms.sft import token_logprobs
from rlft.config import LoraConfig
from rlft.data.batch import TokenBatch
from rlft.distributed.actors import cache_dir
from rlft.distributed.net import bind_collectives_to, listen_socket, local_address_toward, tcp_store
from rlft.distributed.remote_rows import keep_here, resolve_rows
from rlft.learner.micro_batches import MicroBatchPlan, micro_batches, padding_tokens
from rlft.names import Phase
from rlft.timing import PhaseTimer

# A loss takes the micro-batch's logits and the micro-batch and returns the micro-batch's share of the step's loss
# (so the shares of all micro-batches on all ranks add up to the step's loss) and additive metrics.
Loss = Callable[[torch.Tensor, TokenBatch], tuple[torch.Tensor, dict[str, float]]]



@dataclass(frozen=True)
class LearnerSpec:
    """What every rank needs to build its engine; made by ``LearnerGroup`` from the config."""

    model_path: str
    dtype: str
    zero_stage: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    # > 0: RL micro-batches packed to at most this many tokens (their count per step then varies).
    max_tokens_per_micro_batch: int
    world_size: int
    lr: float
    weight_decay: float
    adam_betas: tuple[float, float]
    adam_eps: float
    lr_scheduler: str
    warmup_steps: int
    total_steps: int
    max_grad_norm: float
    gradient_checkpointing: bool
    backend: str
    seed: int
    # ``lm``: a causal LM (the policy); ``value``: the same backbone with a scalar head per token (PPO's critic).
    head: str = "lm"
    # LoRA adapters on a frozen model (``model.lora``); None trains every weight.
    lora: LoraConfig | None = None

    def deepspeed_config(self) -> dict:
        zero: dict = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            # Small models: gather every parameter up front rather than tuning prefetch buckets.
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train_batch_size": self.micro_batch_size * self.gradient_accumulation_steps * self.world_size,
            "gradient_clipping": self.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "fp16": {"enabled": self.dtype == "float16"},
            # torch's AdamW as the client optimizer: no compiled op, works on CPU and GPU alike.
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }


def _use_this_environments_ninja() -> None:
    """Put the ``ninja`` of this Python environment first on PATH.

    DeepSpeed builds its CPU communication op into ``TORCH_EXTENSIONS_DIR`` with the first ``ninja`` on PATH. A
    machine can have two: the system's (1.11 here) and the one pip installs beside torch (1.13). They record build
    commands under different hashes, so each takes the other's build for a stale one and builds the op again
    (30-80 s) whenever the processes that load it differ in PATH. Every learner, and ``make warm-caches``, use the
    environment's own.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=bin_dir) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def extensions_dir() -> str:
    """Where DeepSpeed's compiled ops are cached: ``TORCH_EXTENSIONS_DIR`` when it is set, else a directory of
    rlft's cache for this Python environment (``cache_dir()``/torch_extensions/ and a key of ``sys.prefix``).

    A build records the paths of the environment that made it (torch's headers). Two environments on one machine
    (two checkouts, each with its ``.venv``) sharing one directory would each take the other's build for stale and
    build the op again (about 40 s) whenever runs alternate between them; one directory per environment keeps each
    build.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    key = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), "torch_extensions", key)


def _use_this_environments_build() -> None:
    """Before DeepSpeed loads (or builds) its CPU communication op: this environment's ``ninja`` and its own
    directory of compiled ops, so that every learner and ``make setup`` agree on one build."""
    _use_this_environments_ninja()
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()


def build_communication_op() -> None:
    """Build (or find built) DeepSpeed's CPU communication op where every learner of this environment loads it
    from; ``make setup`` calls it, so no run compiles."""
    _use_this_environments_build()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _import_deepspeeds_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with TorchDynamo off for that import alone.

    Under ZeRO, ``deepspeed.initialize`` checks the client optimizer against a list that it extends by importing
    its Muon optimizer module, and that module wraps a kernel in ``torch.compile`` as it loads. The wrapper loads
    torch's inductor: about 2 CPU-seconds in every learner, for an optimizer rlft never uses (its client optimizer
    is torch's AdamW). Imported here first, with ``TORCHDYNAMO_DISABLE=1`` (which ``torch.compile`` reads when it
    wraps), the kernel stays a plain function and DeepSpeed's check finds the module already imported.
    """
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without it: nothing to avoid
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def _forward_logits(model, batch: TokenBatch) -> torch.Tensor:
    """Logits for a right-padded, optionally packed, batch (``TokenBatch.model_inputs`` says why no mask)."""
    return model(**batch.model_inputs()).logits


class LearnerWorker:
    """One rank. Created by ``LearnerGroup``; its methods are called on every rank at once."""

    def __init__(self, rank: int):
        from rlft.distributed.stacks import install_handler

        install_handler()
        startup.mark("learner", "actor")
        self.rank = rank
        self.engine = None
        self.spec: LearnerSpec | None = None
        self._last_grad_norm = float("nan")
        self.clock = PhaseTimer()
        self._weight_group = None  # rank 0: the weight group it broadcasts on (``collective`` transport)
        self._ipc_buffers: list[torch.Tensor] = []
        self._scratch: dict[str, torch.Tensor] = {}  # by device, for filling buckets
        self._listeners: dict = {}  # by port: sockets ``address`` opened, until a store takes them over

    def memory(self) -> dict[str, float]:
        """This rank's memory in bytes: the process's resident set now and at its peak, and what the model state
        takes as torch holds it here (parameters, gradients, optimizer state; ZeRO shards counted as held)."""
        import resource

        import psutil

        def tensor_bytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        states = [t for state in optimizer.state.values() for t in state.values()]
        params = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        return {
            "rss_bytes": float(psutil.Process().memory_info().rss),
            "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "parameter_bytes": float(tensor_bytes(params)),
            "optimizer_state_bytes": float(tensor_bytes(states)),
            # ZeRO-1/2's fp32 copy of this rank's partition of the trained parameters.
            "fp32_master_bytes": float(tensor_bytes(getattr(self.engine.optimizer, "single_partition_of_fp32_groups",
                                                            []))),
        }

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside DeepSpeed since the last call, by phase: ``update``, ``sync`` (publishing weights) and
        the no-gradient forward: ``old_logprobs`` for the policy, ``values`` for the critic."""
        return self.clock.take()

    @property
    def _forward_phase(self) -> Phase:
        return Phase.VALUES if self.spec.head == "value" else Phase.OLD_LOGPROBS

    # ------------------------------------------------------------------------------------------------ set-up

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for a group's rendezvous (the learners' process group, a weight group): a socket
        already listening on this node's address only (loopback on a local cluster), kept until the group's store
        takes it over, so no other process can take the port meanwhile. Called on rank 0 only."""
        sock = listen_socket()
        host, port = sock.getsockname()[:2]
        self._listeners[port] = sock
        return host, port

    def setup(self, spec: LearnerSpec, master_addr: str, master_port: int) -> tuple[int, int]:
        """Join the process group, load the model and build the DeepSpeed engine; returns the counts of all and of
        trainable parameters."""
        import torch._dynamo  # noqa: F401  (must precede deepspeed.zero.Init; see ENVIRONMENT.md)
        import transformers
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        startup.mark("learner", "imports")
        self.spec = spec
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.rank if spec.backend == "nccl" else 0),
            WORLD_SIZE=str(spec.world_size),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        _seed_everything(spec.seed)
        self._init_process_group(spec, master_addr, master_port)
        _use_this_environments_build()
        deepspeed.init_distributed(dist_backend=spec.backend, auto_mpi_discovery=False)  # keeps the group above

        ds_config = spec.deepspeed_config()
        # Under ZeRO-3 this object must stay alive while from_pretrained runs, so parameters are partitioned as
        # they are created instead of materialised whole on every rank. It is dropped once the engine holds the
        # model: transformers reads it process-wide, and in-process roles (``ray.local_mode``: the evaluator, the
        # reference, the HF engine) must load their own models whole.
        hf_ds_config = HfDeepSpeedConfig(ds_config) if spec.zero_stage == 3 else None
        if spec.head == "value":
            # The critic starts from the policy's backbone with a fresh one-output head.
            model = transformers.AutoModelForTokenClassification.from_pretrained(
                spec.model_path, num_labels=1, dtype=spec.dtype
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=spec.dtype)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if spec.lora is not None:
            from rlft.learner.lora import apply_lora

            model = apply_lora(model, spec.lora)
            if spec.gradient_checkpointing:
                model.enable_input_require_grads()  # the frozen embedding's output must carry gradients
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=spec.lr, betas=spec.adam_betas, eps=spec.adam_eps,
            weight_decay=spec.weight_decay,
        )
        # Every schedule starts with ``warmup_steps`` of linear warm-up; transformers' plain "constant" has none.
        name = "constant_with_warmup" if spec.lr_scheduler == "constant" else spec.lr_scheduler
        scheduler = transformers.get_scheduler(
            name, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.total_steps
        )
        _import_deepspeeds_muon_uncompiled()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        del hf_ds_config
        self.engine.train()
        startup.mark("learner", "ready")
        params = list(self.engine.module.parameters())
        return sum(_numel(p) for p in params), sum(_numel(p) for p in params if p.requires_grad)

    def _init_process_group(self, spec: LearnerSpec, master_addr: str, master_port: int) -> None:
        """The ranks' process group, its rendezvous store served by rank 0 on the socket ``address`` opened and
        gloo's connections on the same interface: nothing listens beyond this node's address."""
        import torch.distributed as dist
        from torch.distributed.constants import default_pg_timeout

        bind_collectives_to(local_address_toward(master_addr))
        store = tcp_store(master_addr, master_port, spec.world_size, default_pg_timeout,
                          listener=self._listeners.pop(master_port) if self.rank == 0 else None)
        dist.init_process_group(spec.backend, store=store, rank=self.rank, world_size=spec.world_size,
                                timeout=default_pg_timeout)

    # ------------------------------------------------------------------------------------------------ training

    def train_step(self, batch: TokenBatch, loss_fn: Loss, plan: MicroBatchPlan) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch, in the micro-batches of ``plan`` (every
        rank's plan has the same length); returns additive metrics and step info. Log-probabilities the batch holds
        as references (``RemoteRows``) are fetched here, not by the driver."""
        with self.clock.phase(Phase.UPDATE):
            return self._train_step(resolve_rows(batch), loss_fn, plan)

    def _train_step(self, batch: TokenBatch, loss_fn: Loss, plan: MicroBatchPlan) -> dict[str, float]:
        spec = self.spec
        start = time.perf_counter()
        # DeepSpeed divides each micro-batch's gradient by the configured accumulation steps (whatever the plan's
        # count) and averages across ranks; the loss shares already sum to the step's loss, so undo both.
        scale = spec.gradient_accumulation_steps * spec.world_size
        metrics: dict[str, float] = {}
        micros = micro_batches(batch, plan)
        for index, micro in enumerate(micros):
            # The plan, not DeepSpeed's counter, says where the step ends: a packed step's count varies.
            is_last = index == len(micros) - 1
            self.engine.set_gradient_accumulation_boundary(is_last)
            logits_BTV = _forward_logits(self.engine, micro)
            loss, micro_metrics = loss_fn(logits_BTV, micro)
            self.engine.backward(loss * scale)
            if spec.zero_stage == 0 and is_last:
                # Without ZeRO, DeepSpeed clips but does not report the norm; gradients are reduced by now.
                self._last_grad_norm = _grad_norm(self.engine.module.parameters())
            self.engine.step()
            _add_metrics(metrics, micro_metrics)
        grad_norm = self._last_grad_norm if spec.zero_stage == 0 else self.engine.get_global_grad_norm()
        return {
            **metrics,
            "num_tokens": float(batch.num_tokens),
            "padding_tokens": float(sum(padding_tokens(micro) for micro in micros)),
            "num_micro_batches": float(len(micros)),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.engine.get_lr()[0]),
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def evaluate_loss(self, batch: TokenBatch, loss_fn: Loss, plan: MicroBatchPlan) -> dict[str, float]:
        """The loss of this rank's share without updating anything (the same micro-batching as training)."""
        self.engine.eval()
        batch = resolve_rows(batch)
        metrics: dict[str, float] = {}
        for micro in micro_batches(batch, plan):
            _, micro_metrics = loss_fn(_forward_logits(self.engine, micro), micro)
            _add_metrics(metrics, micro_metrics)
        self.engine.train()
        return metrics

    @torch.no_grad()
    def per_token_outputs(self, batch: TokenBatch) -> torch.Tensor:
        """This rank's share under the current weights, no gradient: ``logprobs_BT`` for a causal LM (the RL
        step's "old" log-probabilities), ``values_BT`` for a value head (see ``rlft.algorithms.token_values``)."""
        with self.clock.phase(self._forward_phase):
            return self._per_token_outputs(batch)

    @torch.no_grad()
    def logprobs_kept(self, batch: TokenBatch, sampler_logprobs_BT: torch.Tensor | None = None,
                      reference: bool = False):
        """This rank's share of ``logprobs_BT``, kept in the object store: returns the reference and, given the
        sampler's log-probabilities of the same tokens, the largest gap between the two on the response tokens
        (``loss_weights_BT`` != 0), the check that the rollout workers run these weights. ``reference``: under the
        base model, the LoRA adapter disabled (the reference policy of a LoRA run)."""
        from rlft.learner.lora import disabled_adapter

        if reference:
            with self.clock.phase(Phase.REFERENCE), disabled_adapter(self.engine.module):
                logprobs_BT = self._per_token_outputs(batch)
        else:
            with self.clock.phase(self._forward_phase):
                logprobs_BT = self._per_token_outputs(batch)
        gap = float("nan")
        if sampler_logprobs_BT is not None:
            mask_BT = batch.loss_weights_BT != 0
            gap = (logprobs_BT - sampler_logprobs_BT)[mask_BT].abs().max().item() if mask_BT.any() else 0.0
        return keep_here(logprobs_BT), gap

    @torch.no_grad()
    def _per_token_outputs(self, batch: TokenBatch) -> torch.Tensor:
        self.engine.eval()
        out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        size = self.spec.micro_batch_size
        for start in range(0, batch.num_rows, size):
            micro = batch.rows(start, start + size).trimmed()
            outputs = _forward_logits(self.engine, micro)
            if self.spec.head == "value":
                per_token_BT = token_values(outputs)
            else:
                per_token_BT = token_logprobs(outputs, micro.input_ids_BT)
            out_BT[start : start + micro.num_rows, : micro.input_ids_BT.shape[1]] = per_token_BT.float()
        self.engine.train()
        return out_BT * batch.attention_mask_BT

    # ------------------------------------------------------------------------------------------------ weights

    def weight_tables(self, bucket_bytes: int, adapter: bool = False) -> list:
        """How the parameters fall into buckets (names, dtypes, full shapes; no data moves). ``adapter``: the LoRA
        adapter's parameters only; otherwise every weight of the model (a LoRA adapter merged in)."""
        from rlft.distributed.weight_sync import plan_buckets, tensor_meta

        return plan_buckets((tensor_meta(n, p) for n, p in self._weight_params(adapter)), bucket_bytes)

    def _weight_params(self, adapter: bool) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the weights that leave this learner, in order, for their names and metadata."""
        from rlft.learner.lora import adapter_parameters, merged_parameters

        module = self.engine.module
        if self.spec.lora is None:
            if adapter:
                raise ValueError("adapter weights asked of a learner without model.lora")
            return list(module.named_parameters())
        if adapter:
            return list(adapter_parameters(module))
        return [(name, param) for name, param, _ in merged_parameters(module)]

    def adapter_config(self) -> dict:
        """The LoRA adapter's PEFT config (``adapter_config.json``), for consumers that load the adapter."""
        config = self.engine.module.peft_config["default"].to_dict()
        return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}

    def join_weight_group(self, spec) -> None:
        """Rank 0 only: open the weight group (its rank 0, hosting the rendezvous) and wait for every consumer."""
        from rlft.distributed.weight_sync import WeightGroup

        self._weight_group = None
        self._weight_group = WeightGroup(spec, 0, listener=self._listeners.pop(spec.port, None))

    def publish_weights(self, transport: str, bucket_bytes: int, adapter: bool = False) -> tuple[list, dict]:
        """Publish this version's weights bucket by bucket; every rank must call it (under ZeRO-3 each parameter is
        gathered in turn, so no rank ever holds a second full copy); ``adapter``: a LoRA adapter's weights only,
        else full weights (the adapter merged in). A bucket's owner fills it in a reused scratch
        buffer and emits it: ``object_store``, bucket k is put by rank k mod world size (the ranks share the work);
        ``collective``, rank 0 broadcasts every bucket on the weight group; ``cuda_ipc``, rank 0 keeps each bucket
        on the GPU and shares an IPC handle. Returns the bucket tables and what this rank emitted, by bucket
        index."""
        with self.clock.phase(Phase.SYNC):
            return self._publish_weights(transport, bucket_bytes, adapter)

    def _publish_weights(self, transport: str, bucket_bytes: int, adapter: bool) -> tuple[list, dict]:
        import ray

        from rlft.distributed.weight_sync import WeightBucket, fill_bucket

        tables = self.weight_tables(bucket_bytes, adapter)
        group = self._weight_group
        on_gpu = transport == "cuda_ipc" or (transport == "collective" and group is not None and group.device == "cuda")
        device = "cuda" if on_gpu else "cpu"
        if transport == "cuda_ipc":
            self._ipc_buffers = []  # the consumers open these; they live until the next publish
        params = self._full_parameters(adapter)
        emitted = {}
        for index, table in enumerate(tables):
            tensors = (tensor for _, tensor in itertools.islice(params, len(table.slots)))
            owner = index % self.spec.world_size if transport == "object_store" else 0
            if self.rank != owner:
                for _ in tensors:  # take part in the gathers
                    pass
                continue
            if transport == "cuda_ipc":
                from torch.multiprocessing.reductions import reduce_tensor

                self._ipc_buffers.append(fill_bucket(table, tensors, device))
                emitted[index] = reduce_tensor(self._ipc_buffers[-1])
                continue
            buffer = fill_bucket(table, tensors, device, out=self._scratch_buffer(table.buffer_bytes, device))
            if transport == "object_store":
                bucket = WeightBucket(table, buffer.numpy())
                emitted[index] = ray.put(bucket) if ray.is_initialized() else WeightBucket(table, buffer.numpy().copy())
            else:
                self._weight_group.broadcast(buffer)
        return tables, emitted

    def _scratch_buffer(self, num_bytes: int, device: str) -> torch.Tensor:
        """A reused byte buffer of at least ``num_bytes`` (fresh pages cost more than the copy itself)."""
        scratch = self._scratch.get(device)
        if scratch is None or scratch.numel() < num_bytes:
            scratch = self._scratch[device] = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return scratch[:num_bytes]

    def _gathered(self, params):
        """The context in which ``params`` are whole: gathered across ranks under ZeRO-3, as they are otherwise."""
        import deepspeed

        if self.spec.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _full_parameters(self, adapter: bool = False):
        """(name, whole tensor) in ``_weight_params``' order, each gathered across ranks under ZeRO-3 while it is
        looked at; with LoRA and not ``adapter``, the adapted weights merged."""
        from rlft.learner.lora import merged_tensors

        if self.spec.lora is not None and not adapter:
            yield from merged_tensors(self.engine.module, self._gathered)
            return
        for name, param in self._weight_params(adapter):
            with self._gathered([param]):
                yield name, param.data

    def export_weights(self, adapter: bool | None = None) -> dict[str, torch.Tensor] | None:
        """Whole parameters by name on rank 0, None on the others; for saving and comparing runs, not for syncing
        (that is ``publish_weights``). ``adapter`` (default: whether the model has one): the LoRA adapter's
        weights only, else full weights (an adapter merged in). Every rank must call it."""
        adapter = self.spec.lora is not None if adapter is None else adapter
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self._full_parameters(adapter):
            if self.rank == 0:
                out[name] = tensor.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    def save_pretrained(self, out_dir: str, tokenizer_path: str, save_merged: bool = False) -> None:
        """Write a Hugging Face model directory (config, safetensors weights, tokenizer) from rank 0. With LoRA: the
        adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``), and with
        ``save_merged`` the merged model in ``merged/`` beside it."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if self.rank == 0 else None
        if self.spec.lora is not None:
            adapter = self.export_weights(adapter=True)
            if self.rank == 0:
                self._save_adapter(Path(out_dir), adapter)
                tokenizer.save_pretrained(out_dir)
            if not save_merged:
                return
            out_dir = str(Path(out_dir) / "merged")
        weights = self.export_weights(adapter=False)
        if self.rank != 0:
            return
        model = self.engine.module.get_base_model() if self.spec.lora is not None else self.engine.module
        model.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

    def _save_adapter(self, out_dir: Path, adapter: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        self.engine.module.peft_config["default"].save_pretrained(str(out_dir))
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(out_dir / "adapter_model.safetensors"))

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Weights (safetensors, rank 0: the adapter alone with LoRA), DeepSpeed optimizer/scheduler state (every rank) and this rank's RNG."""
        from safetensors.torch import save_file

        path = Path(ckpt_dir)
        lora = self.spec.lora is not None
        weights = self.export_weights()
        if self.rank == 0 and lora:
            self._save_adapter(path, weights)
        elif self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
        # With LoRA the frozen base weights are the model's own files: the checkpoint holds the adapter only.
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=lora)
        torch.save(_rng_state(), path / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, ckpt_dir: str) -> None:
        path = Path(ckpt_dir)
        load_path, _ = self.engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=self.spec.lora is None,  # a LoRA checkpoint holds no frozen weight
        )
        if load_path is None:
            raise FileNotFoundError(f"{path / 'deepspeed'}: no DeepSpeed checkpoint to resume from")
        _set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _add_metrics(total: dict[str, float], micro: dict[str, float]) -> None:
    """Add a micro-batch's metrics to the step's: summed, the largest for ``*_max`` keys."""
    for key, value in micro.items():
        total[key] = max(total.get(key, value), value) if key.endswith("_max") else total.get(key, 0.0) + value


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _numel(param: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter's local tensor is a shard; ds_numel is the full size.
    return int(getattr(param, "ds_numel", param.numel()))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
