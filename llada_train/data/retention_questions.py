"""The knowledge-retention question set (docs/smollm2.md): short questions with checkable answers,
asked to an AR source and to the diffusion models made from it (`llada_train.retention`).

`llada_train/data/retention/questions.jsonl` is built by this module from sources that can be
named, and committed so that every run asks the same questions:

- capitals (`retention/capitals.tsv`, from the CIA World Factbook) -- kind `fact`;
- chemical elements (`retention/elements.tsv`, from the IUPAC periodic table), the name from the
  symbol (kind `fact`) and the symbol from the name (kind `symbol`);
- arithmetic (+, -, ×) on small numbers, drawn with `random.Random(ARITHMETIC_SEED)` -- kind `number`;
- five reasoning-gym families with small options, drawn from their eval split
  (`data.reasoning_gym.draw_entries`, so no training run of this project ever sees them) -- kind `rg`,
  scored by the family's own `score_answer`.

Rows are shuffled once (seeded), so any prefix (`--limit N`) mixes the families. Rebuild with
`python -m llada_train.data.retention_questions` (the test checks the committed file is what this
module builds).

Checkers, one per kind (`is_correct`), all on the response text:
- `fact`: case-insensitive whole-word containment of any accepted spelling, after folding accents,
  dropping apostrophes and reading other punctuation as spaces ("The capital is Bogota." passes
  for Bogotá; "Parisian" does not pass for Paris). Lenient on wording; a response that names
  several candidates passes if one is right.
- `symbol`: the same but case-sensitive, so "Fe" must be written as a symbol ("fe" and "Fear" fail).
- `number`: the first number in the response that is not an operand of the question must equal the
  answer ("12 + 7 = 19" and "The answer is 19." pass, "12 + 7 = 14" fails; commas and a ".0" are read).
- `rg`: reasoning-gym's `score_answer` on the text before any template markup, full score only.
  Strict: most families want the bare answer ("-4", not "The answer is -4").
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "retention"
QUESTIONS = DATA_DIR / "questions.jsonl"
KINDS = ("fact", "symbol", "number", "rg")
ARITHMETIC_SEED = 20250207
SHUFFLE_SEED = 7
ARITHMETIC = {"+": 40, "-": 30, "×": 30}
RG_FAMILIES = {  # reasoning-gym dataset -> generator options (small problems)
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                         "operators": ["+", "-", "*"], "allow_parentheses": False, "allow_negation": False},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "spell_backward": {"min_word_len": 3, "max_word_len": 5},
    "letter_counting": {"min_words": 3, "max_words": 5},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3},
}
RG_PER_FAMILY = 20
RG_SEED = 0

# ---- checkers ------------------------------------------------------------------------------------

_APOSTROPHES = "'\u2019\u02bb\u02bc`"
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def normalize(text: str, *, lower: bool = True) -> str:
    """Accents folded, apostrophes dropped, other non-alphanumerics as spaces, single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = "".join("" if c in _APOSTROPHES else (c if c.isalnum() else " ") for c in text)
    text = " ".join(text.split())
    return text.lower() if lower else text


def contains_answer(response: str, answers: list[str], *, case_sensitive: bool = False) -> bool:
    """Some accepted spelling occurs in the response as whole words (see `normalize`)."""
    text = f" {normalize(response, lower=not case_sensitive)} "
    return any(f" {normalize(a, lower=not case_sensitive)} " in text for a in answers if normalize(a))


def numbers_in(text: str) -> list[float]:
    """The numbers written in `text`, in order ("1,234" is one number; "-3" is negative only when
    the minus touches the digits)."""
    return [float(m.group(0).replace(",", "")) for m in _NUMBER.finditer(text)]


def number_answer(response: str, operands: list[float]) -> float | None:
    """The first number in the response that is not (in absolute value) an operand of the question."""
    skip = {abs(float(o)) for o in operands}
    return next((n for n in numbers_in(response) if abs(n) not in skip), None)


def is_correct(row: dict, response: str) -> bool:
    """The row's checker (module docstring) on a response text."""
    kind = row["kind"]
    if kind == "fact":
        return contains_answer(response, row["answers"])
    if kind == "symbol":
        return contains_answer(response, row["answers"], case_sensitive=True)
    if kind == "number":
        got = number_answer(response, row["operands"])
        return got is not None and got == float(row["answers"][0])
    if kind == "rg":
        from .reasoning_gym import is_correct as rg_correct

        return rg_correct(row, response)
    raise ValueError(f"question {row.get('id')!r}: unknown kind {kind!r}; known: {KINDS}")


# ---- building the set ----------------------------------------------------------------------------


def _table(name: str) -> list[dict]:
    lines = [line for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def _aliases(row: dict) -> list[str]:
    return [a for a in (row.get("aliases") or "").split("|") if a]


def capital_rows() -> list[dict]:
    return [{"id": f"capital-{normalize(r['country']).replace(' ', '-')}", "family": "capitals", "kind": "fact",
             "question": f"What is the capital of {r['country']}?", "answers": [r["capital"], *_aliases(r)]}
            for r in _table("capitals.tsv")]


def element_rows() -> list[dict]:
    rows = []
    for r in _table("elements.tsv"):
        rows.append({"id": f"element-name-{r['symbol']}", "family": "element_names", "kind": "fact",
                     "question": f"Which chemical element has the symbol {r['symbol']}?",
                     "answers": [r["name"], *_aliases(r)]})
        if r["ask_symbol"] == "1":
            rows.append({"id": f"element-symbol-{r['name']}", "family": "element_symbols", "kind": "symbol",
                         "question": f"What is the chemical symbol for {r['name']}?", "answers": [r["symbol"]]})
    return rows


def arithmetic_rows(seed: int = ARITHMETIC_SEED) -> list[dict]:
    """Sums of a two-digit and a one- or two-digit number, differences with a positive result,
    products of the times tables 2-12; no answer equals an operand, no question repeats."""
    rng, rows, seen = random.Random(seed), [], set()
    for op, count in ARITHMETIC.items():
        made = 0
        while made < count:
            if op == "+":
                a, b = rng.randint(10, 99), rng.randint(2, 99)
                value = a + b
            elif op == "-":
                a = rng.randint(20, 99)
                b = rng.randint(2, a - 2)
                value = a - b
            else:
                a, b = rng.randint(2, 12), rng.randint(2, 12)
                value = a * b
            if (a, op, b) in seen or value in (a, b):
                continue
            seen.add((a, op, b))
            made += 1
            name = {"+": "add", "-": "sub", "×": "mul"}[op]
            rows.append({"id": f"arith-{name}-{a}-{b}", "family": "arithmetic", "kind": "number",
                         "question": f"What is {a} {op} {b}?", "answers": [str(value)], "operands": [a, b]})
    return rows


def rg_rows() -> list[dict]:
    from .reasoning_gym import draw_entries, entry_row

    rows = []
    for name, options in RG_FAMILIES.items():
        task = f"rg:{name}"
        for i, entry in enumerate(draw_entries(task, RG_PER_FAMILY, "eval", RG_SEED, options)):
            row = entry_row(task, entry, options, "rl")
            rows.append({"id": f"rg-{name}-{i}", "family": task, "kind": "rg", "question": row.pop("prompt"),
                         "answers": [row.pop("answer")], **row})
    return rows


def build_questions() -> list[dict]:
    rows = capital_rows() + element_rows() + arithmetic_rows() + rg_rows()
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate question ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    for r in rows:  # an echo of the question must not pass its checker
        if r["kind"] != "rg" and is_correct(r, r["question"]):
            raise ValueError(f"question {r['id']}: its own text passes the checker ({r['answers']})")
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def write_questions(path: Path = QUESTIONS) -> int:
    rows = build_questions()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def load_questions(path=QUESTIONS, limit: int | None = None) -> list[dict]:
    """The committed question set (its first `limit` rows: the order is a seeded shuffle)."""
    rows = [dict(r) for r in _load(str(path))]
    return rows[:limit] if limit else rows


if __name__ == "__main__":
    n = write_questions(Path(sys.argv[1]) if len(sys.argv) > 1 else QUESTIONS)
    print(f"wrote {n} questions")
