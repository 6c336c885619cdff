"""RL prompt rows (files, `hf:` datasets or task families) and the decode budget rule shared by SFT
and RL evaluation."""

from __future__ import annotations

from ..config import ConfigError
from .sources import MalformedRow, open_rows
from .tasks import make_rows


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


def load_rl_rows(cfg) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows: dicts with the prompt under `data.prompt_field` plus any columns
    (`answer`, `task`, `tests`, ...) the reward functions read."""
    d = cfg.data
    if d.train == "tasks":
        train = _task_rows(cfg, "train", d.num_train)
    else:
        train = read_prompt_rows(d.train, d.prompt_field)[: d.num_train]
    return train, load_heldout_rows(cfg)


def load_heldout_rows(cfg) -> list[dict]:
    """`data.eval` (first `data.num_eval` rows), else the task families' eval split, else none."""
    d = cfg.data
    if d.eval:
        return read_prompt_rows(d.eval, d.prompt_field)[: d.num_eval]
    return _task_rows(cfg, "eval", d.num_eval) if d.train == "tasks" else []


def _task_rows(cfg, split: str, n: int) -> list[dict]:
    d = cfg.data
    try:
        return make_rows(list(d.tasks), n, split=split, seed=cfg.run.seed, kind="rl", **d.task_options)
    except ValueError as e:
        raise ConfigError(f"bad value for 'data.tasks' / 'data.task_options' / 'data.num_*': {e}") from e
