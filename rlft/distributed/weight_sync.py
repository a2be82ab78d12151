"""Weight transfer learner → rollout workers, in buckets through the Ray object store.

The learner's full weights (``LearnerGroup.export_weights()``, tensors by name) are packed into buckets: each
bucket is one contiguous byte buffer of several tensors (at most ``bucket_bytes``, a bigger tensor goes alone) with
a table saying where each tensor lies. Each bucket is put into the object store once; every rollout worker receives
the list of references, reads the buffers from shared memory without copying them, and applies all buckets in one
engine update::

    buckets = pack_buckets(weights_by_name, bucket_bytes)                   # driver
    bucket_refs = publish_buckets(buckets, local)                           # driver
    engine.update_weights(iter_bucket_weights(fetch_buckets(bucket_refs)))  # each rollout worker

Why one engine update for all buckets: vLLM reloads layer by layer and processes a layer once all its weights
arrived within one reload; q/k/v (or gate/up) projections split over two reloads leave the fused layer corrupt.
Without Ray (the in-process backend) the buckets themselves stand where the references would. GPU workers go
through the object store too (host memory); a direct NCCL or CUDA-IPC transfer is not implemented.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import numpy as np
import ray
import torch

# Tensors start at multiples of this many bytes in a bucket's buffer, so every dtype can be viewed in place.
_ALIGN_BYTES = 64


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a bucket's buffer."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset_bytes: int
    num_bytes: int


@dataclass
class WeightBucket:
    """Several named tensors packed back to back into one byte buffer (one object-store object)."""

    slots: list[TensorSlot]
    buffer: np.ndarray  # uint8, 1-D

    @property
    def num_bytes(self) -> int:
        return sum(slot.num_bytes for slot in self.slots)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors as views of the buffer (no copy); read them only."""
        data = _uint8_tensor(self.buffer)
        for slot in self.slots:
            raw = data[slot.offset_bytes : slot.offset_bytes + slot.num_bytes]
            yield slot.name, raw.view(getattr(torch, slot.dtype)).reshape(slot.shape)


# What a rollout worker receives per bucket: an object-store reference on Ray, the bucket itself in-process.
BucketRef = Union[ray.ObjectRef, WeightBucket]


@dataclass
class SyncStats:
    """One weight sync as seen by the driver: from packing to the last worker having applied the weights."""

    seconds: float
    # Bytes of one copy of the weights (every worker receives all of them).
    num_bytes: int
    gb_per_s: float
    num_buckets: int

    @classmethod
    def since(cls, start_s: float, buckets: list[WeightBucket]) -> SyncStats:
        seconds = time.perf_counter() - start_s
        num_bytes = sum(bucket.num_bytes for bucket in buckets)
        return cls(seconds, num_bytes, num_bytes / seconds / 1e9, len(buckets))


def pack_buckets(weights: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[WeightBucket]:
    """Group ``weights`` in their order into buckets of at most ``bucket_bytes`` and copy each group into one
    buffer. Keeping the order keeps the tensors of one layer together, which vLLM's layerwise reload prefers."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    group_bytes = 0
    for name, tensor in weights.items():
        size = _aligned(tensor.numel() * tensor.element_size())
        if groups[-1] and group_bytes + size > bucket_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append((name, tensor))
        group_bytes += size
    return [_pack(group) for group in groups if group]


def publish_buckets(buckets: list[WeightBucket], local: bool) -> list[BucketRef]:
    """Put each bucket into the object store once (shared by every worker); in-process, pass them as they are."""
    return list(buckets) if local else [ray.put(bucket) for bucket in buckets]


def fetch_buckets(bucket_refs: list[BucketRef]) -> list[WeightBucket]:
    """The buckets behind the references, fetched together (read from shared memory, not copied)."""
    if all(isinstance(ref, WeightBucket) for ref in bucket_refs):
        return list(bucket_refs)
    return ray.get(list(bucket_refs))


def iter_bucket_weights(buckets: list[WeightBucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """All (name, tensor) pairs of the buckets in order; the tensors are views of the buckets' buffers."""
    return itertools.chain.from_iterable(bucket.named_tensors() for bucket in buckets)


def _pack(named: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    slots, offset = [], 0
    for name, tensor in named:
        num_bytes = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        slots.append(TensorSlot(name, dtype, tuple(tensor.shape), offset, num_bytes))
        offset += _aligned(num_bytes)
    buffer = torch.empty(offset, dtype=torch.uint8)
    for slot, (_, tensor) in zip(slots, named):
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        buffer[slot.offset_bytes : slot.offset_bytes + slot.num_bytes] = raw
    return WeightBucket(slots, buffer.numpy())


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // _ALIGN_BYTES) * _ALIGN_BYTES


def _uint8_tensor(buffer: np.ndarray) -> torch.Tensor:
    """The buffer as a torch tensor sharing its memory. Arrays read from the object store are read-only, which
    torch warns about; the tensors are only ever copied from, so the warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(buffer)
