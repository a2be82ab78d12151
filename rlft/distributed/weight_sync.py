"""Weights learner → rollout workers (and the reference server), without passing through the driver.

The learner ranks publish a new policy version themselves (``LearnerGroup.publish_weights``). What the driver gets
back is a ``WeightHandle``: the version, the bucket tables (which tensor lies where) and either object-store
references or the collective to join. Consumers apply it with ``receive_buckets`` and one engine update::

    learner ranks:  gather parameter by parameter (ZeRO-3) ──► fill bucket k ──► emit bucket k
                    emit = ray.put (object_store) | broadcast on the weight group (collective) | IPC handle (cuda_ipc)
    driver:         handle = learners.publish_weights(version)       # a few KB: tables and references
    each worker:    engine.update_weights(iter_bucket_weights(receive_buckets(handle, receiver)))

A bucket is one contiguous byte buffer of several tensors (at most ``bucket_bytes``; a bigger tensor goes alone)
with a table saying where each tensor lies. The tables are planned from names, dtypes and shapes alone, so every
rank and every consumer knows them before any byte moves.

Transports (``rollout.weight_transport``):

- ``object_store``: the learner process puts each bucket once; every worker on a node maps it from shared memory
  without copying. The default, on CPU and across nodes. A worker started between syncs (a replacement, ``rlft
  scale``) is served from the last object-store handle.
- ``collective``: a process group of its own (``WeightGroup``), outside the learners' group: learner rank 0 is its
  rank 0 and every rollout worker (every tensor-parallel rank of it) joins it. Each bucket is broadcast from rank 0.
  gloo on CPU, NCCL (vLLM's ``PyNcclCommunicator`` over a stateless group) on GPU. The group is formed again when
  the set of workers changes.
- ``cuda_ipc``: a rollout worker on the learner's GPU opens the learner's bucket buffers through CUDA IPC handles.

Why one engine update for all buckets: vLLM reloads layer by layer and processes a layer once all its weights
arrived within one reload; q/k/v (or gate/up) projections split over two reloads leave the fused layer corrupt.
Without Ray (the in-process backend) the buckets themselves stand where the references would.
"""

from __future__ import annotations

import datetime
import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Union, get_args

import numpy as np
import ray
import torch

from rlft.distributed.net import listen_socket, local_address_toward, tcp_store
from rlft.errors import WeightSyncError
from rlft.names import WeightTransport

# Tensors start at multiples of this many bytes in a bucket's buffer, so every dtype can be viewed in place.
_ALIGN_BYTES = 64

TRANSPORTS = get_args(WeightTransport)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a bucket's buffer."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset_bytes: int
    num_bytes: int


@dataclass(frozen=True)
class BucketTable:
    """The tensors of one bucket and the size of its buffer (alignment included)."""

    slots: tuple[TensorSlot, ...]
    buffer_bytes: int

    @property
    def num_bytes(self) -> int:
        return sum(slot.num_bytes for slot in self.slots)


@dataclass
class WeightBucket:
    """A bucket's table with its filled buffer (uint8, 1-D: a numpy array read from the object store, or a torch
    tensor received over a collective or opened through CUDA IPC)."""

    table: BucketTable
    buffer: Any

    @property
    def num_bytes(self) -> int:
        return self.table.num_bytes

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors as views of the buffer (no copy); read them only."""
        data = as_uint8_tensor(self.buffer)
        for slot in self.table.slots:
            raw = data[slot.offset_bytes : slot.offset_bytes + slot.num_bytes]
            yield slot.name, raw.view(getattr(torch, slot.dtype)).reshape(slot.shape)


@dataclass(frozen=True)
class CollectiveSpec:
    """The weight group to join: where its rendezvous listens, its size, and how long any peer may keep the others
    waiting. ``generation`` counts re-formations (a new group each time the set of workers changes)."""

    backend: str  # "gloo" | "nccl"
    address: str
    port: int
    world_size: int
    generation: int
    timeout_s: float


@dataclass(frozen=True)
class WeightHandle:
    """One published policy version, as the driver and every consumer see it. Small: tables and references only.

    ``bucket_refs``: object-store references, one per bucket (``object_store``; in-process, the buckets themselves).
    ``collective``: the group whose rank 0 broadcasts the buckets (``collective``); ``sending`` are the learner
    ranks' calls doing it, which the consumer side waits for together with its own receives.
    ``ipc_handles``: per bucket, the CUDA IPC handle of the learner's buffer (``cuda_ipc``).
    ``adapter``: the buckets hold a LoRA adapter, not full weights; its PEFT config (``adapter_config.json``).
    """

    version: int
    transport: str
    tables: tuple[BucketTable, ...]
    bucket_refs: tuple = ()
    collective: CollectiveSpec | None = None
    sending: tuple = field(default=(), compare=False)
    ipc_handles: tuple = ()
    adapter: dict | None = field(default=None, compare=False)

    @property
    def num_bytes(self) -> int:
        """Bytes of one copy of the weights (every consumer receives all of them)."""
        return sum(table.num_bytes for table in self.tables)


# What a rollout worker receives per bucket: an object-store reference on Ray, the bucket itself in-process.
BucketRef = Union[ray.ObjectRef, WeightBucket]


@dataclass
class SyncStats:
    """One weight sync, from the learners starting to publish to the last consumer having applied the weights.
    The one definition of the sync figure: ``gb_per_s`` = bytes of one copy of the weights / ``seconds``."""

    seconds: float
    num_bytes: int
    num_buckets: int
    transport: str
    # What the driver received while syncing (handles, versions): it must stay tiny next to ``num_bytes``.
    driver_bytes: int = 0
    # Of ``seconds``, the slowest consumer's engine reload (vLLM re-processing its layers); the rest is the
    # transfer: publishing until every consumer holds the bytes.
    load_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9

    @property
    def transfer_gb_per_s(self) -> float:
        return self.num_bytes / max(self.seconds - self.load_seconds, 1e-9) / 1e9

    @classmethod
    def since(cls, start_s: float, handle: WeightHandle, driver_bytes: int = 0, load_seconds: float = 0.0) -> SyncStats:
        return cls(time.perf_counter() - start_s, handle.num_bytes, len(handle.tables), handle.transport, driver_bytes,
                   load_seconds)


# --------------------------------------------------------------------------------------------- bucket planning


def plan_buckets(tensors: Iterable[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> list[BucketTable]:
    """Group ``(name, dtype, shape)`` in their order into buckets of at most ``bucket_bytes``. Keeping the order
    keeps the tensors of one layer together, which vLLM's layerwise reload prefers."""
    groups: list[list[TensorSlot]] = [[]]
    offset = 0
    for name, dtype, shape in tensors:
        num_bytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        size = _aligned(num_bytes)
        if groups[-1] and offset + size > bucket_bytes:
            groups.append([])
            offset = 0
        groups[-1].append(TensorSlot(name, dtype, tuple(shape), offset, num_bytes))
        offset += size
    return [
        BucketTable(tuple(slots), slots[-1].offset_bytes + _aligned(slots[-1].num_bytes)) for slots in groups if slots
    ]


def tensor_meta(name: str, tensor: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    """``(name, dtype, full shape)`` of a parameter; under ZeRO-3 the local tensor is a shard, ``ds_shape`` whole."""
    shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
    return name, str(tensor.dtype).removeprefix("torch."), shape


def fill_bucket(
    table: BucketTable, tensors: Iterable[torch.Tensor], device: str = "cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """``tensors`` (in the table's order) copied into their slots of ``out`` (uint8, ``table.buffer_bytes`` long),
    or of a new buffer."""
    buffer = torch.empty(table.buffer_bytes, dtype=torch.uint8, device=device) if out is None else out
    for slot, tensor in zip(table.slots, tensors, strict=True):
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[slot.offset_bytes : slot.offset_bytes + slot.num_bytes].copy_(raw)
    return buffer


def pack_buckets(weights: dict[str, torch.Tensor], bucket_bytes: int) -> list[WeightBucket]:
    """Whole weights (a state dict) as filled buckets; for tests and tools that already hold the tensors."""
    tables = plan_buckets((tensor_meta(n, t) for n, t in weights.items()), bucket_bytes)
    values = iter(weights.values())
    return [
        WeightBucket(table, fill_bucket(table, itertools.islice(values, len(table.slots))).numpy())
        for table in tables
    ]


class WeightSource(Protocol):
    """What publishes weights: the learners (``LearnerGroup``, every transport) or weights a caller holds
    (``StateDictSource``, the object store). The handle it returns is small; the buckets stay with the source."""

    def publish_weights(self, version: int, transport: WeightTransport, bucket_bytes: int,
                        adapter: bool = False) -> WeightHandle: ...


class CollectiveWeightSource(WeightSource, Protocol):
    """A source that also broadcasts (``collective``): it opens a weight group with its consumers' ranks
    (``LearnerGroup``)."""

    @property
    def weight_group_open(self) -> bool: ...

    def open_weight_group(self, num_receivers: int, timeout_s: float) -> tuple[CollectiveSpec, Any]: ...


class StateDictSource:
    """Weights this process already holds (a state dict), published the way a ``LearnerGroup`` publishes them,
    through the object store: for tests and tools that sync chosen weights into rollout workers."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def publish_weights(self, version: int, transport: str, bucket_bytes: int, adapter: bool = False) -> WeightHandle:
        if adapter:
            raise ValueError("a state dict held by the caller is full weights, not a LoRA adapter")
        if transport != "object_store":
            raise ValueError(f"a state dict held by the caller is published through the object store, not {transport}")
        buckets = pack_buckets(self.weights, bucket_bytes)
        refs = [ray.put(bucket) for bucket in buckets] if ray.is_initialized() else buckets
        return WeightHandle(version, transport, tuple(b.table for b in buckets), bucket_refs=tuple(refs))


# --------------------------------------------------------------------------------------------- the weight group


class WeightGroup:
    """A process group of its own for broadcasting weights: rank 0 is learner rank 0, the others are rollout
    workers (or their tensor-parallel ranks). Every operation has ``spec.timeout_s``; a peer that does not take part
    in time becomes ``WeightSyncError`` here, and the driver names which peer it was."""

    def __init__(self, spec: CollectiveSpec, rank: int, listener=None):
        """``listener``: rank 0's socket listening at ``spec.address:spec.port`` (``LearnerWorker.address``); without
        it rank 0 opens one there. Either way the rendezvous listens on that address only, and the group's own
        connections on the address of this machine that reaches it (loopback on a local cluster)."""
        self.spec, self.rank = spec, rank
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if rank == 0 and listener is None:
            listener = listen_socket(spec.address, spec.port)
        if spec.backend == "nccl":
            # vLLM's stateless group: its own TCP rendezvous, nothing shared with torch.distributed's default group.
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            pg = StatelessProcessGroup.create(
                host=spec.address, port=spec.port, rank=rank, world_size=spec.world_size,
                store_timeout=int(spec.timeout_s), listen_socket=listener,
            )
            self._nccl = PyNcclCommunicator(pg, device=torch.cuda.current_device())
            self._gloo = None
        else:
            from torch.distributed import PrefixStore, ProcessGroupGloo

            store = tcp_store(spec.address, spec.port, spec.world_size, timeout, listener)
            self._store = store  # the master's store must outlive the group
            options = ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [ProcessGroupGloo.create_device(hostname=local_address_toward(spec.address))]
            self._gloo = ProcessGroupGloo(PrefixStore(f"rlft-weights-{spec.generation}/", store), rank,
                                          spec.world_size, options)
            self._nccl = None

    @property
    def device(self) -> str:
        return "cuda" if self._nccl is not None else "cpu"

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's ``buffer`` into every other rank's ``buffer`` (same size)."""
        try:
            if self._nccl is not None:
                self._nccl.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
                torch.cuda.current_stream().synchronize()
            else:
                from torch.distributed import BroadcastOptions

                options = BroadcastOptions()
                options.rootRank = 0
                self._gloo.broadcast([buffer], options).wait()
        except RuntimeError as err:
            raise WeightSyncError(
                f"weight group (generation {self.spec.generation}, rank {self.rank} of {self.spec.world_size}): "
                f"broadcast failed within {self.spec.timeout_s:g} s: {str(err).splitlines()[0]}"
            ) from err


# --------------------------------------------------------------------------------------------- consumers


def receive_buckets(handle: WeightHandle, group: WeightGroup | None = None) -> list[WeightBucket]:
    """The filled buckets of ``handle`` on a consumer: mapped from the object store, received over the weight
    group (``group``: this consumer's membership), or opened through CUDA IPC."""
    if handle.transport == "object_store":
        refs = list(handle.bucket_refs)
        if all(isinstance(ref, WeightBucket) for ref in refs):
            return refs
        return ray.get(refs)
    if handle.transport == "collective":
        if group is None or group.spec != handle.collective:
            raise WeightSyncError(f"weights version {handle.version}: this worker is not in the weight group "
                                  f"(generation {handle.collective.generation})")
        buckets = []
        for table in handle.tables:
            buffer = torch.empty(table.buffer_bytes, dtype=torch.uint8, device=group.device)
            group.broadcast(buffer)
            buckets.append(WeightBucket(table, buffer))
        return buckets
    if handle.transport == "cuda_ipc":
        # Each handle is (rebuild function, arguments) from torch.multiprocessing.reductions.reduce_tensor.
        return [WeightBucket(table, rebuild(*args)) for table, (rebuild, args) in zip(handle.tables,
                                                                                   handle.ipc_handles)]
    raise ValueError(f"unknown weight transport {handle.transport!r}; expected one of {TRANSPORTS}")


def table_to_plain(table: BucketTable) -> list:
    """A table as lists, strings and numbers only (what vLLM's RPC between its processes carries)."""
    return [table.buffer_bytes, [[s.name, s.dtype, list(s.shape), s.offset_bytes, s.num_bytes] for s in table.slots]]


def table_from_plain(plain: list) -> BucketTable:
    buffer_bytes, slots = plain
    return BucketTable(tuple(TensorSlot(n, d, tuple(shape), o, b) for n, d, shape, o, b in slots), buffer_bytes)


def iter_bucket_weights(buckets: list[WeightBucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """All (name, tensor) pairs of the buckets in order; the tensors are views of the buckets' buffers."""
    return itertools.chain.from_iterable(bucket.named_tensors() for bucket in buckets)


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // _ALIGN_BYTES) * _ALIGN_BYTES


def as_uint8_tensor(buffer) -> torch.Tensor:
    """The buffer as a torch tensor sharing its memory. Arrays read from the object store are read-only, which
    torch warns about; the tensors are only ever copied from, so the warning is silenced here."""
    if isinstance(buffer, torch.Tensor):
        return buffer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(buffer)
