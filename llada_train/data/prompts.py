"""RL prompt rows (files, `hf:` datasets or task families) and the decode budget rule shared by SFT
and RL evaluation."""

from __future__ import annotations

from ..errors import ConfigError, UserError
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
            raise UserError(f"{source}:{line}: {raw}")
        if not isinstance(raw, dict) or not isinstance(raw.get(prompt_field), (str, list)):
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise UserError(f"{source}:{line}: expected an object with a {prompt_field!r} string (or chat "
                            f"messages list); got keys {found} (set data.prompt_field to the prompt column)")
        rows.append(dict(raw))
    if not rows:
        raise UserError(f"{source}: no rows")
    return rows


def response_budget(tokenizer, answers: list[str], block_size: int) -> int:
    """Decode budget for responses like `answers`: the longest in tokens plus its EOS, in whole blocks."""
    longest = max(len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]) + 1
    return -(-longest // block_size) * block_size


def load_rl_rows(data, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows of an RL `data` section: dicts with the prompt under `prompt_field`
    plus any columns (`answer`, `task`, `tests`, ...) the reward functions read. `seed` picks the
    task families' problems."""
    if data.train == "tasks":
        train = _task_rows(data, seed, "train", data.num_train)
    else:
        train = read_prompt_rows(data.train, data.prompt_field)[: data.num_train]
    return train, load_heldout_rows(data, seed)


def load_heldout_rows(data, seed: int) -> list[dict]:
    """`data.eval` (first `data.num_eval` rows), else the task families' eval split, else none."""
    if data.eval:
        return read_prompt_rows(data.eval, data.prompt_field)[: data.num_eval]
    return _task_rows(data, seed, "eval", data.num_eval) if data.train == "tasks" else []


def _task_rows(data, seed: int, split: str, n: int) -> list[dict]:
    try:
        return make_rows(list(data.tasks), n, split=split, seed=seed, kind="rl", **data.task_options)
    except UserError as e:  # not ValueError: a bug inside a generator keeps its traceback
        raise ConfigError(f"bad value for 'data.tasks' / 'data.task_options' / 'data.num_*': {e}") from e
