"""`llada-train eval-retention`: how much of an AR source's knowledge a diffusion model made from it
keeps (docs/smollm2.md).

Every question of the fixed set (`data/retention_questions.py`) is one user turn rendered with the
chat template, answered greedily by
  (a) the AR source through transformers `generate` (`max_new_tokens`), and
  (b) each LLaDA2 model (converted, CPT'd, SFT'd, ...) through the project's threshold decoder
      (`decoding.complete`) in each mode (Q, S), with `block_length` and `gen_length`,
and checked by its kind's checker. Reported: accuracy with a 95% Wilson interval and n; retention
= the share of the questions the source answers right that the model also answers right (with its
interval, n = the source's right answers); tokens per forward of each diffusion run; wall time.

    llada-train eval-retention --source SRC_HF --model DIR [DIR2 ...] --out FILE [--modes Q,S] [--limit N]

`evaluate_retention(...)` is the same as a function (the pipeline report can call it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .errors import UserError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
DEFAULT_MODES = ("Q", "S")
DEFAULT_GEN_LENGTH = 32
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_NEW_TOKENS = 32


# ---- statistics ----------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n ((0, 1) when n = 0): unlike the
    normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends, not 1 - 1e-16


def accuracy(right: list[bool]) -> dict:
    """{"n", "correct", "accuracy", "ci95"}; accuracy None when n = 0."""
    n, k = len(right), sum(bool(r) for r in right)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": list(wilson(k, n))}


def retention(source_right: list[bool], model_right: list[bool]) -> dict:
    """Of the questions the source gets right, the share the model also gets right:
    {"n" (the source's right answers), "kept", "retention", "ci95"}."""
    if len(source_right) != len(model_right):
        raise ValueError(f"{len(source_right)} source results, {len(model_right)} model results")
    kept = [bool(m) for s, m in zip(source_right, model_right, strict=True) if s]
    stats = accuracy(kept)
    return {"n": stats["n"], "kept": stats["correct"], "retention": stats["accuracy"], "ci95": stats["ci95"]}


def by_family(rows: list[dict], right: list[bool]) -> dict:
    """Accuracy per question family: {family: [correct, n]}."""
    n, k = Counter(r["family"] for r in rows), Counter(r["family"] for r, ok in zip(rows, right, strict=True) if ok)
    return {f: [k[f], n[f]] for f in sorted(n)}


# ---- answering -----------------------------------------------------------------------------------


def _length_order(lengths: list[int]) -> list[int]:
    """Indices by prompt length: batches of similar lengths pad little."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def answer_with_source(source: Path, questions: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       batch_size: int = 16, device: str = "cpu") -> list[str]:
    """Greedy chat answers of the AR source (transformers `generate`, left-padded batches, stops at
    the tokenizer's eos); special tokens dropped from the text."""
    return source_completions(source, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              device=device)[0]


def source_completions(source: Path, questions: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       batch_size: int = 16, device: str = "cpu") -> tuple[list[str], list[bool]]:
    """`answer_with_source`'s texts, and whether each answer ended (eos) within `max_new_tokens`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.chat import render_prompt
    from .progress import progress

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = tok([render_prompt(q, tok) for q in questions], add_special_tokens=False)["input_ids"]
    texts: list[str] = [""] * len(questions)
    finished = [False] * len(questions)
    order = _length_order([len(i) for i in ids])
    bar = progress(len(questions), desc="source answers", unit="question")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, width - len(ids[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=pad)
        for r, i in enumerate(batch):
            new = out[r, width:].tolist()
            finished[i] = tok.eos_token_id in new
            new = new[:new.index(tok.eos_token_id)] if finished[i] else new
            texts[i] = tok.decode(new, skip_special_tokens=True)
        bar.update(len(batch))
    bar.close()
    return texts, finished


def answer_with_diffusion(model_dir: Path, questions: list[str], mode: str, *, gen_length: int = DEFAULT_GEN_LENGTH,
                          block_length: int = DEFAULT_BLOCK_LENGTH, batch_size: int = 16, device: str = "cpu",
                          model=None, tokenizer=None) -> dict:
    """Greedy threshold decoding (`decoding.complete`) of every question in `mode`:
    {"texts", "nfe", "tokens_per_forward"} per question."""
    from .data.tokenizer import load_tokenizer
    from .decoding import complete
    from .model import LLaDA2MoeModelLM
    from .progress import progress

    if model is None:
        model = LLaDA2MoeModelLM.from_pretrained(model_dir).to(device).eval()
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir if (Path(model_dir) / "tokenizer.json").is_file() else None)
    order = _length_order([len(q) for q in questions])
    result = {"texts": [""] * len(questions), "nfe": [0] * len(questions), "tokens_per_forward": [0.0] * len(questions)}
    bar = progress(len(questions), desc=f"retention {mode}", unit="question")
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            with torch.no_grad():
                done = complete(model, tokenizer, [questions[i] for i in batch], mode=mode, gen_length=gen_length,
                                block_length=block_length, batch_size=len(batch))
            for j, i in enumerate(batch):
                result["texts"][i] = done.texts[j]
                result["nfe"][i] = int(done.nfe[j])
                result["tokens_per_forward"][i] = float(done.tokens_per_forward[j])
            bar.update(len(batch))
    finally:
        bar.close()
    return result


# ---- the evaluation ------------------------------------------------------------------------------


def _check_inputs(source, models, modes, limit, gen_length, block_length, max_new_tokens, batch_size) -> None:
    """User mistakes, before anything is loaded."""
    from .decoding import DECODE_PRESETS
    from .generate_cli import _check_model_dir, model_type_of

    config = Path(source) / "config.json"
    if not config.is_file():
        raise UserError(f"--source {source}: not a Hugging Face model directory (no config.json); pass the AR "
                        "source, e.g. `llada-train convert --from FILE.gguf --source-out DIR`'s DIR")
    if model_type_of(config) == "llada2_moe":
        raise UserError(f"--source {source}: an LLaDA2-MoE model; --source takes the autoregressive model it "
                        "was converted from")
    if not models:
        raise UserError("--model: name at least one LLaDA2 model directory")
    for m in models:
        _check_model_dir(m)
    unknown = [m for m in modes if m not in DECODE_PRESETS]
    if unknown or not modes:
        raise UserError(f"--modes {','.join(modes)}: unknown mode(s) {unknown}; choose from {sorted(DECODE_PRESETS)}")
    for flag, value in (("--limit", limit), ("--gen-length", gen_length), ("--block-length", block_length),
                        ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{flag} {value}: must be an integer >= 1")


def evaluate_retention(source, models, *, modes=DEFAULT_MODES, limit: int | None = None,
                       gen_length: int = DEFAULT_GEN_LENGTH, block_length: int = DEFAULT_BLOCK_LENGTH,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16, device: str = "cpu",
                       questions_path=None, log=print) -> dict:
    """The retention evaluation (module docstring) as a dict: "source" and one "models" entry per
    (model, mode), each with accuracy, ci95, n, per-family counts and seconds; diffusion entries
    add retention and tokens per forward; "rows" hold every answer."""
    from .data.retention_questions import QUESTIONS, is_correct, load_questions

    models, modes = [str(m) for m in models], list(modes)
    _check_inputs(source, models, modes, limit, gen_length, block_length, max_new_tokens, batch_size)
    rows = load_questions(questions_path or QUESTIONS, limit)
    questions = [r["question"] for r in rows]
    log(f"[retention] {len(rows)} questions; source {source}")
    start = time.perf_counter()
    texts = answer_with_source(Path(source), questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=device)
    src_right = [is_correct(r, t) for r, t in zip(rows, texts, strict=True)]
    result = {
        "questions": len(rows), "families": dict(Counter(r["family"] for r in rows)),
        "settings": {"modes": modes, "gen_length": gen_length, "block_length": block_length,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device,
                     "limit": limit, "greedy": True, "chat_template": True},
        "source": {"path": str(source), **accuracy(src_right), "by_family": by_family(rows, src_right),
                   "seconds": round(time.perf_counter() - start, 1)},
        "models": [],
        "rows": [{"id": r["id"], "family": r["family"], "question": r["question"], "answers": r["answers"],
                  "source": {"text": t, "correct": ok}} for r, t, ok in zip(rows, texts, src_right, strict=True)],
    }
    log(f"[retention] source: {_fmt(result['source'])} ({result['source']['seconds']} s)")
    from .model import LLaDA2MoeModelLM

    for model_dir in models:
        model = LLaDA2MoeModelLM.from_pretrained(model_dir).to(device).eval()
        for mode in modes:
            start = time.perf_counter()
            done = answer_with_diffusion(Path(model_dir), questions, mode, gen_length=gen_length,
                                         block_length=block_length, batch_size=batch_size, device=device, model=model)
            right = [is_correct(r, t) for r, t in zip(rows, done["texts"], strict=True)]
            nfe, tpf = done["nfe"], done["tokens_per_forward"]
            entry = {"path": model_dir, "mode": mode, **accuracy(right), "retention": retention(src_right, right),
                     # all generated tokens (up to and including EOS) over all forwards, and the per-question mean
                     "tokens_per_forward": round(sum(t * f for t, f in zip(tpf, nfe, strict=True)) / max(1, sum(nfe)),
                                                 4),
                     "tokens_per_forward_mean": round(sum(tpf) / max(1, len(tpf)), 4),
                     "by_family": by_family(rows, right), "seconds": round(time.perf_counter() - start, 1)}
            result["models"].append(entry)
            key = f"{model_dir}:{mode}"
            for row, text, ok, n, t in zip(result["rows"], done["texts"], right, nfe, tpf, strict=True):
                row[key] = {"text": text, "correct": ok, "nfe": n, "tokens_per_forward": round(t, 4)}
            log(f"[retention] {model_dir} {mode}: {_fmt(entry)}, retention {_fmt_ret(entry['retention'])}, "
                f"{entry['tokens_per_forward']} tokens/forward ({entry['seconds']} s)")
        del model
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return f"{_pct(stats['accuracy'])} [{_pct(lo)}, {_pct(hi)}] ({stats['correct']}/{stats['n']})"


def _fmt_ret(ret: dict) -> str:
    lo, hi = ret["ci95"]
    return f"{_pct(ret['retention'])} [{_pct(lo)}, {_pct(hi)}] ({ret['kept']}/{ret['n']})"


def markdown(result: dict) -> str:
    """The summary table: accuracy [95% Wilson], retention [95% Wilson], tokens per forward, seconds."""
    s = result["settings"]
    lines = [f"Knowledge retention on {result['questions']} questions (greedy; source max_new_tokens "
             f"{s['max_new_tokens']}; diffusion gen_length {s['gen_length']}, block_length {s['block_length']})", "",
             "| model | mode | accuracy [95% CI] (k/n) | retention [95% CI] (kept/source right) | tokens/forward | s |",
             "|---|---|---|---|---|---|",
             f"| {result['source']['path']} (source, AR) | generate | {_fmt(result['source'])} | | 1 | "
             f"{result['source']['seconds']} |"]
    lines += [f"| {m['path']} | {m['mode']} | {_fmt(m)} | {_fmt_ret(m['retention'])} | {m['tokens_per_forward']} | "
              f"{m['seconds']} |" for m in result["models"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llada-train eval-retention",
                                description="Ask the fixed question set to an AR source and to LLaDA2 models made "
                                            "from it; accuracy, retention, tokens per forward (docs/smollm2.md).")
    p.add_argument("--source", required=True, help="the AR source as a Hugging Face folder (transformers loads it)")
    p.add_argument("--model", required=True, nargs="+", help="LLaDA2-MoE model directories (converted, CPT, SFT...)")
    p.add_argument("--out", required=True, type=Path, help="JSON file: summary and every answer")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="decoding presets, comma-separated (default Q,S)")
    p.add_argument("--limit", type=int, help="ask only the first N questions (the order is a seeded shuffle)")
    p.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH)
    p.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_LENGTH)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="the source's answer length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    result = evaluate_retention(args.source, args.model, modes=modes, limit=args.limit, gen_length=args.gen_length,
                                block_length=args.block_length, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, device=args.device,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(markdown(result), end="")  # the table on stdout, progress on stderr
    print(f"[retention] wrote {args.out}", file=sys.stderr)
    return 0
