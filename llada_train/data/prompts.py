"""RL prompt rows from files, and the decode budget rule shared by SFT and RL evaluation."""

from __future__ import annotations

from .sources import MalformedRow, open_rows


def read_prompt_rows(path: str, prompt_field: str) -> list[dict]:
    """Rows of a jsonl/json/parquet file or `hf:` dataset; a row without the prompt field is an
    error naming its line."""
    source, items = open_rows(path, "train")
    rows = []
    for line, raw in items:
        if isinstance(raw, MalformedRow):
            if raw.kind == "empty":
                continue  # a blank line is not a row
            raise ValueError(f"{source}:{line}: {raw}")
        if not isinstance(raw, dict) or not isinstance(raw.get(prompt_field), (str, list)):
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{source}:{line}: expected an object with a {prompt_field!r} string (or chat "
                             f"messages list); got keys {found} (set data.prompt_field to the prompt column)")
        rows.append(dict(raw))
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows


def response_budget(tokenizer, answers: list[str], block_size: int) -> int:
    """Decode budget for responses like `answers`: the longest in tokens plus its EOS, in whole blocks."""
    longest = max(len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]) + 1
    return -(-longest // block_size) * block_size
