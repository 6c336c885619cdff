"""Small verifiable task families for the embedded SFT -> RL demo.

Each family draws a problem from a seeded RNG and knows its exact answer, so the same generator
feeds SFT (chat rows), RL (prompt + answer rows) and evaluation (``check``). The families are
sized for a few-million-parameter model trained on a CPU for minutes: SFT gets them partly right
and RL has measurable headroom.

Train/eval split: a problem belongs to ``eval`` iff a hash of its canonical text falls under
``EVAL_FRACTION``. The split depends on the problem only, never on the seed, so no eval problem
can appear in any train set whatever seeds are used.

``rg:<dataset>`` names a reasoning-gym generator instead (``reasoning_gym.py``: the same rows, its own
scorer, a split by the same hash); ``row_correct`` checks a row of either kind.

Answers never contain ``<``: ``check`` cuts a completion at the first ``<`` (template markup such
as ``<|role_end|>`` that a decoder may leave in) and compares the rest exactly, ignoring
surrounding whitespace.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import reasoning_gym
from .reasoning_gym import is_rg_task
from .split import normalize_completion, split_of

SPLITS = ("train", "eval")
KINDS = ("sft", "rl")
_LETTERS = string.ascii_lowercase


def exact_check(answer: str, completion: str) -> bool:
    """True iff the completion states exactly the gold answer."""
    return normalize_completion(completion) == answer.strip()


def _addition(rng: random.Random, max_digits: int = 3) -> tuple[str, str]:
    """``a+b=`` with each operand of 1..max_digits digits (the digit count drawn first, so short
    operands are as frequent as long ones)."""
    _require(max_digits >= 1, f"addition: max_digits must be >= 1, got {max_digits}")
    a, b = (_number(rng, rng.randint(1, max_digits)) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def _number(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly ``digits`` digits (0 counts as one digit)."""
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _require(ok: bool, message: str) -> None:
    """A generator option the user set (data.task_options) is out of range."""
    if not ok:
        raise UserError(message)


def _letters(rng: random.Random, alphabet: str, min_len: int, max_len: int, task: str) -> str:
    _require(1 <= min_len <= max_len, f"{task}: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def _reversal(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    """Reverse a string of lowercase letters."""
    s = _letters(rng, _LETTERS, min_len, max_len, "reversal")
    return f"reverse {s}", s[::-1]


def _sorting(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    """Sort a string of digits ascending."""
    s = _letters(rng, string.digits, min_len, max_len, "sorting")
    return f"sort {s}", "".join(sorted(s))


def _copy(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """Repeat a string of lowercase letters (a sanity task: easy to learn)."""
    s = _letters(rng, _LETTERS, min_len, max_len, "copy")
    return f"copy {s}", s


def _maximum(rng: random.Random, count: int = 4, max_value: int = 99) -> tuple[str, str]:
    """The largest of ``count`` numbers in [0, max_value]."""
    _require(count >= 1 and max_value >= 0, f"max: need count >= 1, max_value >= 0, got {count}, {max_value}")
    xs = [rng.randint(0, max_value) for _ in range(count)]
    return "max " + ",".join(map(str, xs)), str(max(xs))


@dataclass(frozen=True)
class TaskFamily:
    """A generator ``(rng, **kwargs) -> (problem, answer)`` and its verifier."""

    name: str
    generate: Callable[..., tuple[str, str]]
    check: Callable[[str, str], bool] = exact_check

    def options(self) -> dict:
        """The generator's keyword options and their defaults."""
        params = list(inspect.signature(self.generate).parameters.values())[1:]
        return {p.name: p.default for p in params}


TASKS: dict[str, TaskFamily] = {
    t.name: t
    for t in (
        TaskFamily("addition", _addition),
        TaskFamily("reversal", _reversal),
        TaskFamily("sorting", _sorting),
        TaskFamily("copy", _copy),
        TaskFamily("max", _maximum),
    )
}


def get_task(name: str) -> TaskFamily:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def check(task: str, answer: str, completion: str) -> bool:
    """Verify ``completion`` against ``answer`` with the task's own checker."""
    return get_task(task).check(answer, completion)


def is_checkable(row: dict) -> bool:
    """A row whose correctness ``row_correct`` can decide: a built-in family with its string answer,
    or a reasoning-gym family with its entry."""
    if is_rg_task(row.get("task")):
        return isinstance(row.get("rg_entry"), str)
    return row.get("task") in TASKS and row.get("answer") is not None


def row_correct(row: dict, completion: str) -> bool:
    """Exact correctness of a completion for a task row: the family's checker, or for ``rg:`` rows
    the dataset's own ``score_answer`` giving full marks."""
    if is_rg_task(row["task"]):
        return reasoning_gym.is_correct(row, completion)
    return check(row["task"], str(row["answer"]), completion)


def _draw(task: TaskFamily, n: int, split: str, seed: int, kwargs: dict) -> list[tuple[str, str]]:
    """``n`` distinct problems of ``split``, by rejection sampling from a per-task seeded RNG."""
    rng = random.Random(f"{seed}:{task.name}:{split}")
    seen: dict[str, str] = {}
    budget = 200 * n + 10_000
    for _ in range(budget):
        if len(seen) == n:
            break
        problem, answer = task.generate(rng, **kwargs)
        if problem not in seen and split_of(task.name, problem) == split:
            seen[problem] = answer
    if len(seen) < n:
        raise UserError(
            f"task {task.name!r} with {kwargs or 'default options'} has only about {len(seen)} distinct "
            f"{split} problems, fewer than the {n} asked; ask for fewer rows or widen the options "
            f"({task.options()})"
        )
    return list(seen.items())


def make_rows(tasks: list[str], n: int, *, split: str, seed: int, kind: str, **task_kwargs) -> list[dict]:
    """``n`` rows mixed evenly over ``tasks`` (deterministic in ``seed``), distinct within a task.

    ``task_kwargs`` maps a task name to its generator options, e.g. ``addition={"max_digits": 2}``
    or ``**{"rg:countdown": {"max_numbers": 3}}``. SFT rows: ``{"messages": [user, assistant], "task",
    "answer"}``; RL rows: ``{"prompt", "answer", "task"}`` (the prompt is the raw user text; render it
    with ``llada_train.data.chat.render_prompt``). ``rg:`` rows also carry ``rg_entry`` and
    ``rg_options`` (JSON text) for the reasoning-gym reward and checker.
    """
    _check_request(tasks, n, split, kind, task_kwargs)
    counts = [n // len(tasks) + (i < n % len(tasks)) for i in range(len(tasks))]
    rows = []
    for name, count in zip(tasks, counts, strict=True):
        options = task_kwargs.get(name, {})
        if is_rg_task(name):
            entries = reasoning_gym.draw_entries(name, count, split, seed, options)
            rows += [reasoning_gym.entry_row(name, e, options, kind) for e in entries]
            continue
        for problem, answer in _draw(get_task(name), count, split, seed, options):
            if kind == "sft":
                messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]
                rows.append({"messages": messages, "task": name, "answer": answer})
            else:
                rows.append({"prompt": problem, "answer": answer, "task": name})
    random.Random(f"{seed}:mix:{split}").shuffle(rows)
    return rows


def _check_request(tasks: list[str], n: int, split: str, kind: str, task_kwargs: dict) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not tasks:
        raise UserError("tasks is empty; name at least one of: " + ", ".join(TASKS) + ", or rg:<dataset>")
    if n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    for name in tasks:
        if is_rg_task(name):
            reasoning_gym.validate_options(reasoning_gym.dataset_name(name), task_kwargs.get(name, {}))
        else:
            get_task(name)
    for name, kw in task_kwargs.items():
        if name not in tasks:
            raise UserError(f"options given for task {name!r}, which is not in tasks {tasks}")
        family = None if is_rg_task(name) else get_task(name)
        if family is not None and (not isinstance(kw, dict) or set(kw) - set(family.options())):
            raise UserError(f"options for task {name!r} must be a dict with keys from {family.options()}, "
                            f"got {kw!r}")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llada_train.data.tasks", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help=f"comma-separated, from: {','.join(TASKS)}, rg:<dataset>")
    p.add_argument("--n", type=int, required=True, help="number of rows (split evenly over tasks)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--kind", choices=KINDS, default="sft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", default="{}",
                   help='per-task generator options as JSON, e.g. \'{"addition": {"max_digits": 2}}\'')
    p.add_argument("--out", required=True, help="output .jsonl path")
    args = p.parse_args(argv)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--options is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise SystemExit(f"--options must be a JSON object mapping task -> options, got {args.options}")
    try:
        rows = make_rows([t.strip() for t in args.tasks.split(",") if t.strip()], args.n, split=args.split,
                         seed=args.seed, kind=args.kind, **options)
    except UserError as e:  # a bad task name, option or count: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {len(rows)} {args.kind} rows ({args.split}) to {write_jsonl(rows, args.out)}")


if __name__ == "__main__":
    main()
