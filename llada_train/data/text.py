"""CPT corpora: read documents, tokenize, pack into fixed-length rows with document ids, and
serve them in a deterministic, resumable order.

Bad rows (empty, not a string, undecodable, binary, absurdly long lines, malformed JSON) are
skipped and counted in `stats`; they never stop a run. A path that cannot be read is a user
error and raises UserError naming it. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, UserError
from ..progress import progress
from .sources import ROW_SUFFIXES, MalformedRow, iter_file_rows, iter_hf_rows

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
MAX_LINE_CHARS = 20_000  # longer lines are minified code / data dumps, not prose: skip the doc
ACCEPTED = (
    "a .txt/.py/.md file (one document), a .jsonl/.json/.parquet file (one document per row, "
    "field `text_field`), a directory of those (recursive), 'stdlib' (the Python standard "
    "library's .py files) or 'hf:name[:config[:split]]' (a Hugging Face dataset)"
)
_TEST_DIRS = {"test", "tests", "idle_test"}
_CACHE_VERSION = 1
_BATCH_DOCS = 256  # documents per tokenizer batch call


def stdlib_files() -> list[Path]:
    """The local Python stdlib's .py files without test suites and installed packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = _TEST_DIRS | ({"site-packages", "dist-packages"} if Path(dirpath) == root else set())
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: never walk installed packages
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# ----------------------------------------------------------------------------- reading documents


def _resolve(paths: Sequence[str] | str) -> list[str | Path]:
    """Expand user paths into an ordered list of files and `hf:` specs; raise on bad paths."""
    if isinstance(paths, str):
        paths = [paths]
    sources: list[str | Path] = []
    for spec in paths:
        if spec == "stdlib":
            sources.extend(stdlib_files())
        elif spec.startswith("hf:"):
            if not spec[3:].split(":")[0]:
                raise UserError(f"data path {spec!r}: missing dataset name; expected {ACCEPTED}")
            sources.append(spec)
        else:
            sources.extend(_resolve_local(Path(spec), spec))
    return sources


def _resolve_local(path: Path, spec: str) -> list[Path]:
    if not path.exists():
        raise UserError(f"data path {spec!r} does not exist; expected {ACCEPTED}")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"data directory {spec!r} is not readable (check its permissions)")
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + ROW_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(f"data directory {spec!r} holds no {'/'.join(TEXT_SUFFIXES + ROW_SUFFIXES)} "
                            f"files; expected {ACCEPTED}")
        return files
    if path.suffix not in TEXT_SUFFIXES + ROW_SUFFIXES:
        raise UserError(f"data file {spec!r} has an unsupported suffix {path.suffix!r}; expected {ACCEPTED}")
    if not os.access(path, os.R_OK):
        raise UserError(f"data file {spec!r} is not readable (check its permissions)")
    return [path]


def _reject_reason(text: object, max_line_chars: int) -> str | None:
    """Why a row is not a usable document (a `skipped_*` counter name), or None if it is."""
    if not isinstance(text, str):
        return "skipped_not_text"
    if "\x00" in text:
        return "skipped_binary"
    if not text.strip():
        return "skipped_empty"
    if len(text) > max_line_chars and max(map(len, text.split("\n"))) > max_line_chars:
        return "skipped_long_line"
    try:
        text.encode("utf-8")  # lone surrogates from JSON escapes would crash the tokenizer
    except UnicodeEncodeError:
        return "skipped_undecodable"
    return None


def _text_file_rows(path: Path) -> Iterator[tuple[object, str | None]]:
    data = path.read_bytes()
    if b"\x00" in data:
        yield None, "skipped_binary"
        return
    try:
        yield data.decode("utf-8"), None
    except UnicodeDecodeError:
        yield None, "skipped_undecodable"


# sources.MalformedRow kinds -> this reader's skip counters
_PARSE_REASONS = {"empty": "skipped_empty", "undecodable": "skipped_undecodable", "bad_json": "skipped_bad_json",
                  "bad_parquet": "skipped_bad_parquet"}


def _field_rows(rows, text_field: str) -> Iterator[tuple[object, str | None]]:
    for _, row in rows:
        if isinstance(row, MalformedRow):
            yield None, _PARSE_REASONS[row.kind]
        else:
            yield (row.get(text_field) if isinstance(row, dict) else None), None


def _rows(source: str | Path, text_field: str) -> Iterator[tuple[object, str | None]]:
    """(text or None, skip reason or None) per row of one source."""
    if isinstance(source, str):
        return _field_rows(iter_hf_rows(source, streaming=True, columns=[text_field]), text_field)
    if source.suffix in TEXT_SUFFIXES:
        return _text_file_rows(source)
    return _field_rows(iter_file_rows(source, columns=[text_field]), text_field)


def load_documents(
    paths: Sequence[str] | str,
    *,
    text_field: str = "text",
    max_docs: int | None = None,
    max_line_chars: int = MAX_LINE_CHARS,
) -> tuple[Iterator[str], Counter]:
    """Documents from `paths` (see ACCEPTED), lazily, plus a Counter filled in as they are read.

    Paths are checked now (UserError naming a bad one); rows are read on iteration. Counters:
    `files`, `docs`, and one `skipped_<reason>` per kind of bad row.
    """
    sources = _resolve(paths)
    stats: Counter = Counter()
    return _iter_documents(sources, text_field, max_docs, max_line_chars, stats), stats


def _iter_documents(sources, text_field, max_docs, max_line_chars, stats) -> Iterator[str]:
    warned = 0
    for source in sources:
        if max_docs is not None and stats["docs"] >= max_docs:
            break
        stats["files"] += 1
        rows = _rows(source, text_field)
        for i, (text, reason) in enumerate(_guard(rows, source)):
            reason = reason or _reject_reason(text, max_line_chars)
            if reason is not None:
                stats[reason] += 1
                if warned < 5:  # a few examples to find them by; the counts tell the rest
                    warned += 1
                    level = logging.INFO if reason == "skipped_empty" else logging.WARNING
                    log.log(level, "%s: row %d of %s", reason.replace("_", " "), i + 1, source)
                continue
            stats["docs"] += 1
            yield text
            if max_docs is not None and stats["docs"] >= max_docs:
                break
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped_")}
    if skipped:
        log.info("skipped bad rows: %s (kept %d documents)", skipped, stats["docs"])


def _guard(rows: Iterator, source) -> Iterator:
    """Turn an I/O error in the middle of a file into a UserError naming the file."""
    try:
        yield from rows
    except OSError as e:
        raise UserError(f"data file '{source}' could not be read: {e}") from e


# ----------------------------------------------------------------------------- packing


def pack_documents(
    token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of `seq_len`.

    Returns `input_ids` (N, seq_len) int64 and `doc_ids` (N, seq_len) int32: documents numbered
    0, 1, 2... within each row (a document cut at a row boundary gets id 0 in the next row; its
    EOS belongs to it). The last row is padded with EOS whose doc id is -1.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    flat = np.full(rows * seq_len, eos_id, dtype=np.int64)
    ends = np.cumsum(lengths)
    for t, end, n in zip(token_lists, ends.tolist(), lengths.tolist(), strict=True):
        flat[end - n:end - 1] = t  # flat[end - 1] stays EOS
    doc = np.full(rows * seq_len, -1, dtype=np.int64)
    doc[:total] = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    doc = doc.reshape(rows, seq_len)
    doc = np.where(doc >= 0, doc - doc[:, :1], -1)  # renumber from 0 in each row
    return torch.from_numpy(flat.reshape(rows, seq_len)), torch.from_numpy(doc.astype(np.int32))


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    train_ids: torch.Tensor   # (N, L) int64
    train_docs: torch.Tensor  # (N, L) int32, -1 = padding
    eval_ids: torch.Tensor    # (M, L) int64
    eval_docs: torch.Tensor   # (M, L) int32
    stats: dict = field(default_factory=dict)


def _split_hash(text: str, seed: int) -> float:
    """Position of a document in [0, 1) from its content: the split survives adding files."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class _Encoder:
    """Tokenizes a batch of documents and hashes each one for the train/eval split."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer, self.seed = tokenizer, seed

    def __call__(self, texts: list[str]) -> tuple[list[np.ndarray], list[float]]:
        # split_special_tokens: a literal "<|endoftext|>" in a source file is text, not EOS
        ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                             return_attention_mask=False)["input_ids"]
        return [np.asarray(t, dtype=np.int32) for t in ids], [_split_hash(t, self.seed) for t in texts]


_worker: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _worker
    _worker = encoder


def _pool(num_proc: int, encoder: _Encoder):
    """Tokenizer worker processes. Fork (where there is one) starts in milliseconds; the Rust
    tokenizer is told not to use its thread pool in the children, which is what it does after a
    fork anyway, minus the warning."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return multiprocessing.get_context(method).Pool(num_proc, _init_worker, (encoder,))
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _encode_in_worker(texts: list[str]):
    return _worker(texts)


def _cache_key(sources, tokenizer, **settings) -> str:
    h = hashlib.sha256()
    for s in sources:
        if isinstance(s, Path):
            st = s.stat()
            s = f"{s.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        h.update(s.encode("utf-8", "surrogateescape") + b"\n")
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps({**settings, "v": _CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _tokenize_split(docs, encoder, eval_fraction: float, num_proc: int):
    """Token ids per document, split by content hash: (train, eval, index of the train document
    closest to the eval side)."""
    batches = iter(lambda: list(itertools.islice(docs, _BATCH_DOCS)), [])
    train: list[np.ndarray] = []
    evals: list[np.ndarray] = []
    first_train = (2.0, -1)  # (hash, index) of the train doc closest to the eval side
    with progress(desc="tokenize", unit="doc", leave=False) as bar:
        pool = _pool(num_proc, encoder) if num_proc > 1 else None
        results = pool.imap(_encode_in_worker, batches) if pool is not None else map(encoder, batches)
        try:
            for ids, hashes in results:
                for toks, h in zip(ids, hashes, strict=True):
                    if h < eval_fraction:
                        evals.append(toks)
                    else:
                        first_train = min(first_train, (h, len(train)))
                        train.append(toks)
                bar.update(len(ids))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return train, evals, first_train[1]


def build_corpus(
    paths: Sequence[str] | str,
    tokenizer,
    *,
    seq_len: int,
    eval_fraction: float = 0.02,
    seed: int = 0,
    max_docs: int | None = None,
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> Corpus:
    """Read, tokenize, split (by document content hash) and pack a CPT corpus.

    With `cache_dir`, the packed tensors are stored under a key of (sources with their sizes and
    mtimes, tokenizer, seq_len, split, max_docs), so a second run loads them instantly.
    """
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; CPT packing needs one to separate documents")
    sources = _resolve(paths)
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(sources, tokenizer, seq_len=seq_len, eval_fraction=eval_fraction, seed=seed,
                         max_docs=max_docs, text_field=text_field)
        cache_file = Path(cache_dir) / f"corpus-{key}.pt"
        if cache_file.exists():
            blob = torch.load(cache_file, weights_only=True)
            return Corpus(**{k: blob[k] for k in ("train_ids", "train_docs", "eval_ids", "eval_docs")},
                          stats={**blob["stats"], "cache_hit": 1})

    stats: Counter = Counter()
    docs = _iter_documents(sources, text_field, max_docs, MAX_LINE_CHARS, stats)
    train, evals, first_train = _tokenize_split(docs, _Encoder(tokenizer, seed), eval_fraction, num_proc)
    if eval_fraction > 0 and not evals and len(train) >= 2:
        evals.append(train.pop(first_train))  # tiny corpora: keep the eval split non-empty
    if not train:
        raise UserError(f"data paths {list(paths) if not isinstance(paths, str) else [paths]} "
                        f"yielded no training documents (read stats: {dict(stats)})")

    eos = tokenizer.eos_token_id
    train_ids, train_docs = pack_documents(train, seq_len, eos)
    eval_ids, eval_docs = pack_documents(evals, seq_len, eos)
    stats.update(
        train_docs=len(train), eval_docs=len(evals),
        train_tokens=sum(map(len, train)) + len(train), eval_tokens=sum(map(len, evals)) + len(evals),
        train_rows=train_ids.shape[0], eval_rows=eval_ids.shape[0],
    )
    corpus = Corpus(train_ids, train_docs, eval_ids, eval_docs, dict(stats))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"train_ids": train_ids, "train_docs": train_docs, "eval_ids": eval_ids,
                    "eval_docs": eval_docs, "stats": dict(stats)}, tmp)
        os.replace(tmp, cache_file)  # atomic: a killed run never leaves a half-written cache
    return corpus


# ----------------------------------------------------------------------------- batch order


class BatchIterator:
    """Endless, deterministic, resumable row order: a fresh permutation of all rows per epoch
    from (seed, epoch); each global batch of `batch_size` rows is cut into `world_size`
    contiguous shards and this rank yields its own. `state_dict()` names the next batch, so a
    resumed run continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if batch_size <= 0 or batch_size % world_size:
            raise UserError(f"global batch size {batch_size} (train.batch_size) must be a positive multiple of "
                            f"the world size {world_size} (processes launched)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        steps = num_rows // batch_size if drop_last else -(-num_rows // batch_size)
        if steps == 0:
            raise UserError(f"the corpus has {num_rows} rows, fewer than one global batch of "
                            f"{batch_size}; lower the batch size or seq_len, or add data")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.steps_per_epoch = rank, world_size, steps
        self.epoch, self.step_in_epoch = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, torch.from_numpy(rng.permutation(self.num_rows)))
        return self._perm[1]

    def __next__(self) -> torch.Tensor:
        start = self.step_in_epoch * self.batch_size
        batch = self._permutation()[start:start + self.batch_size]  # (B,) global batch
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return torch.tensor_split(batch, self.world_size)[self.rank]  # (B / world_size,)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad data-order state {state!r}: expected integer 'epoch' and "
                             f"'step_in_epoch'") from e
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise UserError(f"data-order state {state!r} does not fit this corpus "
                            f"({self.steps_per_epoch} steps per epoch); was the data changed?")
        self.epoch, self.step_in_epoch = epoch, step
