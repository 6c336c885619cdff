"""reasoning-gym task families (`data.tasks: [rg:<dataset>]`, docs/design.md §14).

A family `rg:<dataset>` draws entries from reasoning-gym's procedural generator `<dataset>` with
the options under `data.task_options["rg:<dataset>"]` (the generator's own config fields). The
question is the prompt (one user turn), the generator's answer the SFT target, and the entry
itself (question, answer, metadata) travels with RL rows as JSON text, so it survives Ray,
pickling and jsonl files; the reward rebuilds the dataset from (name, options) and calls its own
`score_answer`.

Seeding: entry i of `create_dataset(name, seed=s)` is entry 0 of seed s + i, so the problem sets
of two seeds overlap. The train/eval split is therefore a hash of the problem (`split.split_of`),
never the seed: no held-out question can be drawn into any train set. For Countdown and mini
Sudoku the hashed key is coarser than the question text, so rewordings do not leak either:
Countdown's templates and number orders state one problem (numbers, target) many ways, and a 4x4
Sudoku puzzle's key is its solution grid (there are only 288), so held-out puzzles come from grids
no train puzzle has.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from functools import lru_cache

from ..errors import ConfigError
from .split import normalize_completion, split_of

PREFIX = "rg:"
RESERVED_OPTIONS = ("seed", "size")  # set by the drawing loop, not by the user


def is_rg_task(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def dataset_name(task: str) -> str:
    """`rg:countdown` -> `countdown`."""
    return task[len(PREFIX):]


def generator_options(name: str) -> dict:
    """The generator's config fields (without seed/size) and their defaults; ConfigError when
    reasoning-gym has no dataset `name`."""
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = sorted(n for n in DATASETS if name[:3] in n)[:8]
        raise ConfigError(f"data.tasks: reasoning-gym has no dataset {name!r} (similar: {close or 'none'}); "
                          "see reasoning_gym.factory.DATASETS")
    config_cls = DATASETS[name][1]
    return {f.name: _default(f) for f in dataclasses.fields(config_cls) if f.name not in RESERVED_OPTIONS}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def validate_options(name: str, options) -> dict:
    """`options` checked against the generator's config: unknown keys and values its `validate`
    rejects raise ConfigError naming `data.task_options.rg:<name>`."""
    key = f"data.task_options.{PREFIX}{name}"
    known = generator_options(name)
    if not isinstance(options, dict):
        raise ConfigError(f"{key} must be a mapping of generator options, got {options!r}")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown option(s) {unknown}; the generator accepts {sorted(known)}")
    try:
        _dataset(name, _options_key(options))[0]  # some options only fail when a problem is drawn
    except ConfigError:
        raise
    except (AssertionError, TypeError, ValueError) as e:  # reasoning-gym's own check of the options
        raise ConfigError(f"{key}: reasoning-gym rejects {options}: {e or type(e).__name__}") from e
    return dict(options)


def _options_key(options: dict) -> str:
    return json.dumps(options, sort_keys=True)


@lru_cache(maxsize=64)
def _dataset(name: str, options_json: str, seed: int = 0, size: int = 1):
    """One dataset object per (name, options, seed, size): scoring reuses the seed-0 instance."""
    import reasoning_gym

    options = json.loads(options_json)
    if "operators" in options:  # JSON turns the tuple into a list; the config wants a tuple
        options["operators"] = tuple(options["operators"])
    return reasoning_gym.create_dataset(name, seed=seed, size=size, **_enum_values(name, options))


def _enum_values(name: str, options: dict) -> dict:
    """Strings to the generator's Enum members where its default is a list of them (YAML and JSON
    carry `task_types: [siblings, friends]` as text; `rg:aiw` wants `TaskType` members)."""
    defaults = generator_options(name)
    out = dict(options)
    for key, value in options.items():
        default = defaults.get(key)
        if isinstance(default, list) and default and isinstance(default[0], enum.Enum) and isinstance(value, list):
            kind = type(default[0])
            try:
                out[key] = [v if isinstance(v, kind) else kind(v) for v in value]
            except ValueError as e:
                raise ConfigError(f"data.task_options.{PREFIX}{name}.{key}: {e}; use some of "
                                  f"{[m.value for m in kind]}") from e
    return out


# dataset -> the problem a question states (the split key); other datasets: the question text
SPLIT_KEYS = {
    "countdown": lambda e: json.dumps([sorted(e["metadata"]["numbers"]), e["metadata"]["target"]]),
    "mini_sudoku": lambda e: json.dumps(e["metadata"]["solution"]),
}


def split_key(name: str, entry: dict) -> str:
    """What the train/eval hash reads: a function of the question text, coarser where the
    dataset states one problem in several texts."""
    return SPLIT_KEYS[name](entry) if name in SPLIT_KEYS else entry["question"]


def _base_seed(seed: int, task: str, split: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{task}:{split}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def draw_entries(task: str, n: int, split: str, seed: int, options: dict) -> list[dict]:
    """`n` entries of `split` with distinct questions, walked from a per-(seed, task, split) start.
    The split of an entry is the hash of its `split_key` (`split.split_of`), so it holds across seeds."""

    name = dataset_name(task)
    options = validate_options(name, options)
    budget = 50 * n + 1000
    data = _dataset(name, _options_key(options), _base_seed(seed, task, split), budget)
    seen: dict[str, dict] = {}
    for i in range(budget):
        if len(seen) == n:
            break
        entry = data[i]
        if entry["question"] not in seen and split_of(task, split_key(name, entry)) == split:
            seen[entry["question"]] = entry
    if len(seen) < n:
        raise ConfigError(f"data.task_options.{task} {options or '(defaults)'}: only about {len(seen)} distinct "
                          f"{split} questions, fewer than the {n} asked; ask for fewer rows or widen the options")
    return list(seen.values())


def entry_row(task: str, entry: dict, options: dict, kind: str) -> dict:
    """An SFT row (`messages` + `task`, `answer`) or an RL row (`prompt` + the reward's columns:
    `task`, `answer`, `rg_entry` and `rg_options` as JSON text)."""
    answer = str(entry["answer"])
    row = {"task": task, "answer": answer, "rg_entry": json.dumps(entry, default=str),
           "rg_options": _options_key(options)}
    if kind == "sft":
        return {"messages": [{"role": "user", "content": entry["question"]},
                             {"role": "assistant", "content": answer}], **row}
    return {"prompt": entry["question"], **row}


def score(task: str, completion: str, entry_json: str, options_json: str = "{}") -> float:
    """The dataset's own `score_answer` on the completion's answer part (cut at template markup,
    as `split.normalize_completion` does)."""

    data = _dataset(dataset_name(task), options_json)
    return float(data.score_answer(normalize_completion(completion), json.loads(entry_json)))


def is_correct(row: dict, completion: str) -> bool:
    """Exact = the scorer's full score (1.0)."""
    return score(row["task"], completion, row["rg_entry"], row.get("rg_options", "{}")) >= 1.0
