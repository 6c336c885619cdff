"""One reader for row data, used by CPT text, SFT chat and RL prompt rows: .jsonl / .json /
.parquet files and `hf:name[:config[:split]]` datasets, or an in-memory list of rows.

Rows come as `(number, row)`: the 1-based line (jsonl) or row number and the parsed object. A row
that cannot be parsed is a `MalformedRow` saying why (its `kind` names the counter a caller
keeps), never an exception: bad rows are the caller's to skip and count. What a row must contain
is the caller's business too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


class MalformedRow(ValueError):
    """A data row that cannot be used; skipped and counted, never fatal. `kind`: empty,
    undecodable, bad_json, bad_parquet (parse failures) or invalid (the caller's own checks)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            yield number, MalformedRow("empty line", "empty")
            continue
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, MalformedRow("not UTF-8", "undecodable")
        except json.JSONDecodeError as e:
            yield number, MalformedRow(f"invalid JSON: {e.msg} at column {e.colno}", "bad_json")
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            yield number, MalformedRow("invalid JSON", "bad_json")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON list (one row per element) or object (one row); anything else is read as JSON lines."""
    data = path.read_bytes()
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        yield 1, MalformedRow("not UTF-8", "undecodable")
        return
    except (ValueError, RecursionError):  # many `.json` files are JSON Lines
        yield from _jsonl_rows(data.splitlines())
        return
    yield from enumerate(parsed if isinstance(parsed, list) else [parsed], start=1)


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # a `datasets` dependency
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException:  # empty, truncated or not Parquet at all: the whole file is one bad row
        yield 1, MalformedRow("not a readable Parquet file", "bad_parquet")
        return
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"data file '{path}' has no column {missing[0]!r} (columns: {pf.schema_arrow.names}); "
                        "set the field to one of them")
    number = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def iter_file_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of one .jsonl / .json / .parquet file (`columns`: read only these parquet columns)."""
    suffix = path.suffix.lower()
    if suffix not in ROW_SUFFIXES:
        raise UserError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")
    if suffix == ".parquet":
        return _parquet_rows(path, columns)
    if suffix == ".json":
        return _json_rows(path)
    return _jsonl_file_rows(path)


def _jsonl_file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        yield from _jsonl_rows(f)


def iter_hf_rows(spec: str, split: str = "train", *, streaming: bool = False,
                 columns: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of `hf:name[:config[:split]]` (a split in the spec wins over `split`)."""
    import datasets

    name, config, spec_split = [*spec[3:].split(":"), None, None][:3]
    try:
        ds = datasets.load_dataset(name, config or None, split=spec_split or split, streaming=streaming)
    except Exception as e:  # offline, unknown name, bad config: all user-facing
        raise UserError(f"data path {spec!r}: could not load the dataset ({type(e).__name__}: {e})") from e
    missing = [c for c in columns or [] if ds.column_names is not None and c not in ds.column_names]
    if missing:
        raise UserError(f"data path {spec!r} has no column {missing[0]!r} (columns: {ds.column_names})")
    return enumerate(ds, start=1)


def open_rows(source, split: str = "train") -> tuple[str, Iterable[tuple[int, Any]]]:
    """(name, rows) of a file path, an `hf:` spec or an in-memory list of rows."""
    if not isinstance(source, (str, Path)):
        return "rows", enumerate(source, start=1)
    name = str(source)
    if name.startswith("hf:"):
        return name, iter_hf_rows(name, split)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"data file {name!r} does not exist (or is not a file); "
                        "give a .jsonl/.json/.parquet path, 'hf:<dataset name>' or a list of rows")
    return name, iter_file_rows(path)
