"""Built-in reward functions (docs/design.md §8), referenced in configs as `llada_train.rl.rewards:<name>`:
`math_answer`, `exact_match`, `format`, `code_exec` (sandboxed). The contract, resolution and
execution live in reward_calls.py, reward_pool.py and reward_scoring.py."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import partial

from llada_train.rl import sandbox

from ..errors import UserError
from .reward_calls import Scores

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?")


def extract_math_answer(text: str) -> str | None:
    """The last \\boxed{...} (balanced braces), else the text after the last `####`, else the last number."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start >= 0:
        i = text.index("{", start) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1]
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_math_answer(ans: str) -> str:
    """Canonical string form: no spaces, `$`, `\\text{}`, `\\left/\\right`; `\\frac{a}{b}` -> a/b; 1,000.0 -> 1000."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", ans)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$"):
        s = s.replace(junk, "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return re.sub(r"(\d)\.0+(?!\d)", r"\1", s)


def math_answers_equal(pred: str, ref: str) -> bool:
    """Normalised string equality, or numeric equality when both parse as numbers (fractions exact)."""
    a, b = normalize_math_answer(pred), normalize_math_answer(ref)
    if a == b:
        return True
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return False


def math_answer(prompts: list[str], completions: list[str], *, answer: Sequence, **kwargs) -> Scores:
    """1.0 if the completion's final answer equals the row's `answer` (itself `####`/\\boxed-extracted), else 0.0."""
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        if ref is None:
            out.append(None)
            continue
        ref = str(ref)
        if "####" in ref or "\\boxed" in ref:
            ref = extract_math_answer(ref) or ref
        pred = extract_math_answer(completion)
        out.append(float(pred is not None and math_answers_equal(pred, ref)))
    return out


def exact_match(prompts: list[str], completions: list[str], *, answer: Sequence, **kwargs) -> Scores:
    """1.0 if the stripped completion equals the stripped `answer`."""
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def reasoning_gym(prompts: list[str], completions: list[str], *, task: Sequence, rg_entry: Sequence,
                  rg_options: Sequence | None = None, partial_credit: bool = False, **kwargs) -> Scores:
    """The reasoning-gym dataset's own `score_answer` for `rg:` rows (None for other rows): 1.0 when
    correct; with `partial_credit` its fractional scores, else anything below 1 scores 0."""
    from llada_train.data.reasoning_gym import is_rg_task, score

    options = rg_options if rg_options is not None else ["{}"] * len(completions)
    out = []
    for completion, name, entry, opts in zip(completions, task, rg_entry, options, strict=True):
        if not is_rg_task(name) or entry is None:
            out.append(None)
            continue
        value = score(name, completion, entry, opts or "{}")
        out.append(value if partial_credit or value >= 1.0 else 0.0)
    return out


DEFAULT_FORMAT_PATTERN = r"\\boxed\{.+\}|####\s*\S+"


def format(prompts: list[str], completions: list[str], *, pattern: str = DEFAULT_FORMAT_PATTERN,
           mode: str = "search", **kwargs) -> Scores:  # shadows the builtin: the config name is `rewards:format`
    """1.0 if the completion matches `pattern` (re.DOTALL). mode: `search` (anywhere) or `fullmatch`
    (whole completion, e.g. r"<think>.*</think>\\s*<answer>.*</answer>"). Default: an answer is present."""
    if mode not in ("search", "fullmatch"):
        raise UserError(f"format reward: mode must be 'search' or 'fullmatch', got {mode!r} (the spec's kwargs)")
    match = getattr(re.compile(pattern, re.DOTALL), mode)
    return [float(match(c) is not None) for c in completions]


_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced ```python block if there is one, else the completion as is."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_exec(prompts: list[str], completions: list[str], *, tests: Sequence, entry_point: Sequence | None = None,
              prepend_prompt: bool = False, sandbox_timeout_s: float = 10.0, memory_mb: int = 512,
              workers: int | None = None, **kwargs) -> Scores:
    """1.0 if `[prompt +] code + tests [+ check(entry_point)]` exits 0 in the sandbox, else 0.0.

    `tests` holds Python test code per row (None = not applicable). With `entry_point` (HumanEval
    style) `check(<entry_point>)` is appended. `prepend_prompt` is for completions that continue a
    code prompt. Programs run concurrently in `workers` sandboxes (default: CPU count).
    """
    jobs = {}
    for i, (prompt, completion, test) in enumerate(zip(prompts, completions, tests, strict=True)):
        if test:
            program = (prompt if prepend_prompt else "") + extract_code(completion) + "\n\n" + test + "\n"
            if entry_point is not None and entry_point[i]:
                program += f"\ncheck({entry_point[i]})\n"
            jobs[i] = program
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with ThreadPoolExecutor(n_workers) as pool:
        run = partial(sandbox.run_python, timeout_s=sandbox_timeout_s, memory_mb=memory_mb)
        results = dict(zip(jobs, pool.map(run, jobs.values()), strict=True))
    return [float(results[i].ok) if i in results else None for i in range(len(completions))]
