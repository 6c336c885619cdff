"""SFT chat data: load rows, render them with the tokenizer's chat template, supervise only the
assistant turns.

Rows are ``messages`` (role/content, multi-turn, optional system) or alpaca
(``instruction``/``input``/``output``), from jsonl/json/parquet files, ``hf:name`` datasets or
in-memory dicts. Malformed rows are skipped and counted (with their first line numbers) in a
``ChatStats``, never fatal.

Prompt/response spans are found by rendering prefixes of the conversation, so they follow any
template: for the i-th message (an assistant turn), the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])`` is that
turn's content plus its end marker. Each span is tokenized on its own, exactly as at inference,
where the prompt (ending in the assistant header) is encoded alone and the answer generated after
it. Every example is padded with EOS to a multiple of the block size, with at least one EOS; the
padding is response (the model learns to stop).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .sources import MalformedRow, open_rows

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRUNCATE_POLICIES = ("drop", "truncate")
MAX_REPORTED = 10  # bad rows remembered by line number


@dataclass
class ChatStats:
    """Counts from loading and tokenizing; ``bad_lines`` are 1-based line (or row) numbers."""

    rows_read: int = 0
    rows_ok: int = 0
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    bad_lines: list[int] = field(default_factory=list)
    bad_examples: list[str] = field(default_factory=list)
    dropped_too_long: int = 0
    truncated: int = 0
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    response_tokens: int = 0

    def skip(self, source: str, line: int, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason.split(":")[0]] += 1
        if len(self.bad_lines) < MAX_REPORTED:
            self.bad_lines.append(line)
            self.bad_examples.append(f"{source}:{line}: {reason}")

    def summary(self) -> str:
        text = (f"{self.rows_ok}/{self.rows_read} rows ok, {self.skipped} skipped, "
                f"{self.dropped_too_long} dropped as too long, {self.truncated} truncated; "
                f"{self.examples} examples in {self.sequences} sequences, {self.tokens} tokens "
                f"({self.response_tokens} supervised)")
        if self.skipped:
            text += f"; skip reasons {dict(self.skip_reasons)}; first bad rows: " + "; ".join(self.bad_examples)
        return text


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise MalformedRow(f"wrong type: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise MalformedRow(f"empty: {what} is empty")
    return value


def normalize_row(raw: Any) -> dict:
    """One row as ``{"messages": [...], **other columns}``; raises ``MalformedRow``.

    Alpaca rows become a user turn (``instruction``, then ``input`` after a blank line when
    present) and an assistant turn (``output``); a row-level ``system`` string becomes a leading
    system message. Extra columns (``task``, ``answer``, ...) are kept.
    """
    if isinstance(raw, MalformedRow):
        raise raw
    if not isinstance(raw, dict):
        raise MalformedRow(f"wrong type: row must be a JSON object, got {type(raw).__name__}")
    system = raw.get("system")
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise MalformedRow("wrong type: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MalformedRow(f"missing role: message {i} needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise MalformedRow(f"missing role: message {i} has role {m['role']!r}, expected one of {ROLES}")
            content = _text(m["content"], f"message {i} content", allow_empty=m["role"] != "assistant")
            clean.append({"role": m["role"], "content": content})
        extra = {k: v for k, v in raw.items() if k not in ("messages", "system")}
    elif "instruction" in raw or "output" in raw:
        user = _text(raw.get("instruction"), "'instruction'")
        extra_input = raw.get("input") or ""
        if _text(extra_input, "'input'", allow_empty=True).strip():
            user = f"{user}\n\n{extra_input}"
        clean = [{"role": "user", "content": user},
                 {"role": "assistant", "content": _text(raw.get("output"), "'output'")}]
        extra = {k: v for k, v in raw.items() if k not in ("instruction", "input", "output", "system")}
    else:
        raise MalformedRow("missing role: row has neither 'messages' nor alpaca 'instruction'/'output'")
    if system is not None and clean[0]["role"] != "system":
        clean.insert(0, {"role": "system", "content": _text(system, "'system'", allow_empty=True)})
    if clean[-1]["role"] != "assistant":
        raise MalformedRow("empty response: the conversation must end with an assistant turn")
    return {"messages": clean, **extra}


def load_chat_rows(path_or_rows, *, split: str = "train") -> tuple[list[dict], ChatStats]:
    """Read and validate rows from a file, ``hf:name[:config]`` (``split`` picks the split) or an
    iterable of dicts. Returns the normalized rows and the stats (malformed rows are counted)."""
    source, items = open_rows(path_or_rows, split)
    rows, stats = [], ChatStats()
    for line, raw in items:
        if isinstance(raw, MalformedRow) and raw.kind == "empty":
            continue  # a blank line is not a row
        stats.rows_read += 1
        try:
            rows.append(normalize_row(raw))
        except MalformedRow as e:
            stats.skip(source, line, str(e))
    stats.rows_ok = len(rows)
    if stats.skipped:
        log.warning("chat data %s: %s", source, stats.summary())
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat_template; "
                        "use the project tokenizer (llada_train/data/tokenizer) or set tokenizer.chat_template")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(messages_or_prompt: str | list[dict], tokenizer, *, add_generation_prompt: bool = True) -> str:
    """The chat-template text a completion is generated after (the assistant header included
    unless `add_generation_prompt` is off). A plain string is a single user turn."""
    if isinstance(messages_or_prompt, str):
        messages_or_prompt = [{"role": "user", "content": messages_or_prompt}]
    _require_template(tokenizer)
    return _render(tokenizer, messages_or_prompt, add_generation_prompt=add_generation_prompt)


def response_spans(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive ``(text, is_response)`` segments; their texts
    concatenate to ``render(messages)``. Raises ``MalformedRow`` when the template does not
    render prefixes of the conversation as prefixes of its text."""
    try:
        full = _render(tokenizer, messages, add_generation_prompt=False)
        segments, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = _render(tokenizer, messages[:i], add_generation_prompt=True)
            through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
            if not (full.startswith(through) and through.startswith(head) and len(head) >= cursor):
                raise MalformedRow(f"template: rendering is not prefix-stable at message {i}")
            if m["content"].strip() not in through[len(head):]:
                raise MalformedRow(f"template: assistant message {i} content not found after its header")
            segments += [(full[cursor:len(head)], False), (through[len(head):], True)]
            cursor = len(through)
    except MalformedRow:
        raise
    except Exception as e:  # a template's own raise_exception (e.g. roles must alternate)
        raise MalformedRow(f"template: {type(e).__name__}: {e}") from e
    segments.append((full[cursor:], False))
    return [s for s in segments if s[0]]


class ChatDataset(Dataset):
    """Tokenized SFT examples: ``input_ids`` (L,), ``response_mask`` (L,) and ``doc_ids`` (L,),
    L a multiple of ``block_size``. Use ``collate`` as the DataLoader's ``collate_fn``."""

    def __init__(self, examples: list[dict[str, torch.Tensor]], *, block_size: int, pad_token_id: int,
                 stats: ChatStats):
        self.examples, self.block_size, self.pad_token_id, self.stats = examples, block_size, pad_token_id, stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]

    def collate(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to a common length (a multiple of ``block_size``) with EOS; batch padding is
        not supervised (``response_mask`` False) and belongs to no document (``doc_ids`` -1)."""
        length = max(ex["input_ids"].numel() for ex in batch)
        length += -length % self.block_size
        fill = {"input_ids": self.pad_token_id, "response_mask": False, "doc_ids": -1}
        out = {}
        for key, value in fill.items():
            rows = [torch.nn.functional.pad(ex[key], (0, length - ex[key].numel()), value=value) for ex in batch]
            out[key] = torch.stack(rows)  # (B, L)
        return out


def _example(ids: list[int], resp: list[bool], doc: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "response_mask": torch.tensor(resp, dtype=torch.bool),
            "doc_ids": torch.tensor(doc, dtype=torch.int32)}


def _pack(docs: list[tuple[list[int], list[bool]]], max_len: int, eos: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in-order packing into sequences of ``max_len``; docs are block-aligned, so every
    block lies in one document. Tail padding: EOS, not supervised, doc id -1."""
    out, ids, resp, doc = [], [], [], []

    def flush():
        pad = max_len - len(ids)
        out.append(_example(ids + [eos] * pad, resp + [False] * pad, doc + [-1] * pad))

    for d_ids, d_resp in docs:
        if len(ids) + len(d_ids) > max_len:
            flush()
            ids, resp, doc = [], [], []
        index = doc[-1] + 1 if doc else 0
        ids, resp, doc = ids + d_ids, resp + d_resp, doc + [index] * len(d_ids)
    if ids:
        flush()
    return out


def tokenize_chat(rows: list[dict], tokenizer, *, block_size: int, max_len: int | None,
                  truncate: str = "drop", pack: bool = False, stats: ChatStats | None = None) -> ChatDataset:
    """Tokenize normalized rows (from ``load_chat_rows``) into a ``ChatDataset``.

    Each example is padded with EOS to a multiple of ``block_size`` (at least one EOS unless the
    template already ends in EOS). Longer than ``max_len`` (a multiple of ``block_size``):
    ``truncate="drop"`` skips the example, ``"truncate"`` cuts it (and drops it if no response
    token survives); both counted in ``stats``. ``pack`` concatenates examples into sequences of
    exactly ``max_len`` with per-document ``doc_ids`` 0, 1, ... (unpacked examples: all 0).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if max_len is not None and (max_len < block_size or max_len % block_size):
        raise ValueError(f"max_len ({max_len}) must be a positive multiple of block_size ({block_size})")
    if truncate not in TRUNCATE_POLICIES:
        raise ValueError(f"truncate must be one of {TRUNCATE_POLICIES}, got {truncate!r}")
    if pack and max_len is None:
        raise ValueError("pack=True needs max_len (the packed sequence length)")
    _require_template(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; SFT pads with EOS")
    stats = stats if stats is not None else ChatStats(rows_read=len(rows), rows_ok=len(rows))

    segmented = []
    for number, row in enumerate(rows, start=1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list):
            raise ValueError(f"row {number} has no 'messages' list; pass rows through load_chat_rows first")
        try:
            segmented.append(response_spans(messages, tokenizer))
        except MalformedRow as e:
            stats.skip("rows", number, str(e))
            stats.rows_ok -= 1
    texts = [text for segments in segmented for text, _ in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])

    docs = []
    for segments in segmented:
        ids, resp = [], []
        for _, is_response in segments:
            piece = next(encoded)
            ids += piece
            resp += [is_response] * len(piece)
        pad = -len(ids) % block_size if ids and ids[-1] == eos else -(len(ids) + 1) % block_size + 1
        ids, resp = ids + [eos] * pad, resp + [True] * pad
        if max_len is not None and len(ids) > max_len:
            if truncate == "drop" or not any(resp[:max_len]):
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            ids, resp = ids[:max_len], resp[:max_len]
        docs.append((ids, resp))

    examples = _pack(docs, max_len, eos) if pack else [_example(i, r, [0] * len(i)) for i, r in docs]
    stats.examples, stats.sequences = len(docs), len(examples)
    stats.tokens = sum(len(i) for i, _ in docs)
    stats.response_tokens = sum(sum(r) for _, r in docs)
    return ChatDataset(examples, block_size=block_size, pad_token_id=eos, stats=stats)
