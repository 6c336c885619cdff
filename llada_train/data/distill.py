"""Distillation rows from an AR source (docs/smollm2.md): general chat prompts answered greedily by the
source itself, as SFT rows for the diffusion model converted from it. What the diffusion model learns
from them is to say what the source says, in parallel blocks; the prompts stay away from the
retention evaluation's topics and templates, so what that evaluation measures is knowledge kept.

Prompts: eight everyday templates ("In one sentence, what does the word ... mean?") over English words (the
4- and 5-letter columns of reasoning-gym's `data/words.csv`), minus every word that names, or is part
of, a country, capital or element of the retention set. Rows whose answer does not end within
`max_new_tokens` are dropped (a cut answer would teach the model not to stop).

    python -m llada_train.data.distill --source OUT/source --out OUT/distill.jsonl [--n 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from importlib import resources
from pathlib import Path

from ..errors import UserError

TEMPLATES = (
    "In one sentence, what does the word \"{w}\" mean?",
    "Write one short sentence that uses the word \"{w}\".",
    "Give two words that are related to \"{w}\".",
    "Is \"{w}\" a noun, a verb or an adjective? Answer in one sentence.",
    "Write a short, friendly greeting that mentions the word \"{w}\".",
    "Name one word that rhymes with \"{w}\".",
    "Write a question that uses the word \"{w}\".",
    "How would you explain the word \"{w}\" to a child, in one sentence?",
)


def _retention_words() -> set[str]:
    """Lower-case words of every question and answer of the retention set (countries, capitals, elements,
    the reasoning-gym rows' words)."""
    from .retention_questions import load_questions

    words = set()
    for row in load_questions():
        for text in (row["question"], *row["answers"]):
            words.update(re.findall(r"[a-z]+", text.lower()))
    return words


def common_words() -> list[str]:
    """reasoning-gym's 4- and 5-letter common words, lower case, without the retention set's words."""
    text = resources.files("reasoning_gym").joinpath("data/words.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    words = {r[col].strip().lower() for r in rows for col in ("4_letter", "5_letter") if r.get(col)}
    return sorted(words - _retention_words())


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts, template x word, drawn with `random.Random(seed)`."""
    words = common_words()
    pairs = [(t, w) for t in TEMPLATES for w in words]
    if n > len(pairs):
        raise ValueError(f"n = {n}: there are {len(pairs)} distinct prompts")
    return [t.format(w=w) for t, w in random.Random(seed).sample(pairs, n)]


def distill(source: Path, out: Path, *, n: int = 1500, seed: int = 0, max_new_tokens: int = 64,
            batch_size: int = 32, log=print) -> dict:
    """Answer `n` general prompts greedily with the AR `source` and write the finished answers to `out` as
    chat rows ({"messages": [user, assistant]}), atomically. Returns counts."""
    from ..retention import source_completions

    prompts = general_prompts(n, seed)
    texts, finished = source_completions(Path(source), prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a, ended in zip(prompts, texts, finished, strict=True) if ended and a.strip()]
    if not rows:
        raise UserError(f"distill: none of the {n} answers of {source} ended within max_new_tokens = "
                        f"{max_new_tokens}; raise distill.max_new_tokens")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    partial.replace(out)
    counts = {"prompts": n, "rows": len(rows), "dropped_unfinished": n - len(rows), "seed": seed,
              "max_new_tokens": max_new_tokens}
    log(f"[distill] {len(rows)} of {n} answers of {source} ended within {max_new_tokens} tokens -> {out}")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llada_train.data.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, type=Path, help="the AR source as a Hugging Face folder")
    ap.add_argument("--out", required=True, type=Path, help="the jsonl file to write")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    distill(args.source, args.out, n=args.n, seed=args.seed, max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
