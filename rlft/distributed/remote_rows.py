"""Per-token tensors that stay where they were computed: the driver holds references and slices them like tensors.

The learners' old log-probabilities and the reference server's log-probabilities are ``[B, T]`` tensors the
learners need and the controller does not. The role that computes them puts its share into the object store and
hands back a reference; ``RemoteRows`` strings the shares together in row order and stands in a batch where the
tensor would::

    old, _ = learners.keep_logprobs(batch)            # RemoteRows: references, no tensor reaches the driver
    batch = dataclasses.replace(batch, old_logprobs_BT=old)
    batch.split(4)[1].trimmed()                         # rows and columns are sliced lazily, by bookkeeping
    resolve_rows(shard)                                 # on a learner: the tensors, fetched from the object store

Without Ray (the in-process backend) the parts are the tensors themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RemoteRows:
    """Rows ``start`` .. ``stop`` and columns ``:width`` of the tensor made of ``parts`` stacked in order; each
    part is ``(reference or tensor, its number of rows)``."""

    parts: tuple[tuple[Any, int], ...]
    start: int = 0
    stop: int | None = None
    width: int | None = None

    @property
    def num_rows(self) -> int:
        total = sum(rows for _, rows in self.parts)
        return (total if self.stop is None else self.stop) - self.start

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key) -> RemoteRows:
        """``x[a:b]`` narrows the rows; ``x[:, :w]`` the columns (what ``TokenBatch.rows`` and ``trimmed`` do)."""
        if isinstance(key, tuple):
            rows, columns = key
            if rows != slice(None) or columns.start not in (None, 0) or columns.step not in (None, 1):
                raise IndexError(f"RemoteRows supports x[a:b] and x[:, :w], not {key!r}")
            width = columns.stop if self.width is None else min(self.width, columns.stop)
            return dataclasses.replace(self, width=width)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError(f"RemoteRows supports x[a:b] and x[:, :w], not {key!r}")
        start, stop, _ = key.indices(self.num_rows)
        return dataclasses.replace(self, start=self.start + start, stop=self.start + max(start, stop))

    def resolve(self) -> torch.Tensor:
        """The tensor: the parts that hold these rows, fetched (shared memory on the same node) and sliced."""
        import ray

        pieces, first = [], 0
        stop = self.start + self.num_rows
        for part, rows in self.parts:
            lo, hi = max(self.start, first), min(stop, first + rows)
            if hi > lo:
                tensor = part if isinstance(part, torch.Tensor) else ray.get(part)
                pieces.append(tensor[lo - first : hi - first])
            first += rows
        out = torch.cat(pieces) if pieces else torch.zeros(0, 0)
        return out if self.width is None else out[:, : self.width]


def resolve_rows(batch):
    """``batch`` (a dataclass of tensors) with every ``RemoteRows`` field fetched; the batch itself if none is."""
    remote = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
              if isinstance(getattr(batch, f.name), RemoteRows)}
    if not remote:
        return batch
    return dataclasses.replace(batch, **{name: rows.resolve() for name, rows in remote.items()})


def keep_here(tensor: torch.Tensor):
    """On a role's process: put ``tensor`` into the object store and return the reference (the tensor itself
    without Ray), so that only the reference travels back to the caller."""
    import ray

    return ray.put(tensor) if ray.is_initialized() else tensor
