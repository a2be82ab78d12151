"""Reading rows from training files, each row tagged with where it came from.

Three kinds of source, one row type:

- JSONL (``*.jsonl``): one JSON object a line; ``where`` is ``"file.jsonl:LINE"`` with 1-based line numbers.
- Parquet (``*.parquet``): ``where`` is ``"file.parquet:row N"``.
- a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, whose ``train`` split is
  read): ``where`` is ``"dir:row N"``.

Row numbers ``N`` are 0-based, as ``dataset[N]`` and ``table.slice(N, 1)`` count them. Columnar sources store
every key of a struct in every row, so a message without a ``weight`` reads back with ``weight: None``; those
``None`` values are dropped, so that the same rows read the same from every kind of source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft.errors import DataError

SUPPORTED_KINDS = "a .jsonl file, a .parquet file, or a directory written by datasets' save_to_disk"


@dataclass
class Row:
    data: dict
    where: str  # "file.jsonl:LINE", "file.parquet:row N" or "dir:row N"


def read_rows(path: str, on_bad_line: Callable[[DataError], None] | None = None) -> Iterator[Row]:
    """Yield the rows of a JSONL file, a Parquet file or a ``datasets`` directory, in file order.

    A missing path or an unsupported kind of file raises ``DataError`` at once. A JSONL line that is not valid JSON,
    or not a JSON object, raises ``DataError`` when reached; given ``on_bad_line``, the error is passed to it instead
    and reading goes on with the next line.
    """
    source = Path(path)
    if not source.exists():
        raise DataError(path, "", "no such file or directory")
    if source.is_dir():
        return _read_dataset_dir(path)
    if source.suffix == ".jsonl":
        return _read_jsonl(path, on_bad_line or _raise)
    if source.suffix == ".parquet":
        return _read_parquet(path)
    kind = source.suffix or "(no extension)"
    raise DataError(path, "", f"unsupported kind of file {kind!r}; expected {SUPPORTED_KINDS}")


def _raise(error: DataError) -> None:
    raise error


def _read_jsonl(path: str, on_bad_line: Callable[[DataError], None]) -> Iterator[Row]:
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                on_bad_line(DataError(where, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                 f"{exc.start + 1}); save the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                on_bad_line(DataError(where, "", f"invalid JSON: {exc.msg} at column {exc.colno}"))
                continue
            if not isinstance(data, dict):
                on_bad_line(DataError(where, "", f"expected a JSON object, got {json_type_name(data)}"))
                continue
            yield Row(data, where)


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_number = 0
    try:
        for record_batch in pq.ParquetFile(path).iter_batches():
            for data in record_batch.to_pylist():
                yield Row(_without_nulls(data), f"{path}:row {row_number}")
                row_number += 1
    except (pa.ArrowException, OSError) as exc:
        where = f"{path}:row {row_number}" if row_number else path
        raise DataError(where, "", f"not a readable Parquet file: {exc}") from None


def _read_dataset_dir(path: str) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(path, "", f"not a dataset directory; expected {SUPPORTED_KINDS}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(sorted(dataset))
            raise DataError(path, "", f"a DatasetDict without a 'train' split (splits: {splits})")
        dataset = dataset["train"]
    return (Row(_without_nulls(data), f"{path}:row {n}") for n, data in enumerate(dataset))


def _without_nulls(value: Any) -> Any:
    """Drop the ``None`` entries that columnar storage adds for keys a struct did not have."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def json_type_name(value: Any) -> str:
    """How a value reads in an error message: its JSON type (``"a string"``, ``"an array"``, ``"null"``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    for kind, name in ((str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
