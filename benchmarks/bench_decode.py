"""Threshold decoding speed: tokens/s and tokens per forward (TPF) for S, Q, threshold 0.95 and one
token per step, with the block KV cache vs recomputing the whole prefix every step (side by side,
same process, same prompt).

Models: the tiny preset (the newest trained export under runs/*/hf or runs/*/*/hf when one exists,
else random weights; the output says which) and a mid-size random config (hidden 512, 8 layers,
16 experts top-4). Speed runs decode all `gen_length` tokens (no EOS stop) so both sides do the
same work. With a trained model, TPF and exact-match accuracy on held-out task prompts are also
measured with EOS stop, i.e. counting only the answer's tokens.

    python benchmarks/bench_decode.py [--threads 1] [--gen-length 256] [--block-length 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

import llada_train.model  # noqa: F401  (registers the Auto classes)
from llada_train.data.tasks import check, make_rows
from llada_train.data.tokenizer import load_tokenizer
from llada_train.decoding import DECODE_PRESETS, encode_prompts, generate, load_decode_defaults
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "S": DECODE_PRESETS["S"],
    "Q": DECODE_PRESETS["Q"],
    "threshold 0.95": DECODE_PRESETS["llada2.0"],
    "one token/step": {"threshold": 1.0, "editing_threshold": None},
}
MID = {"hidden_size": 512, "intermediate_size": 1536, "moe_intermediate_size": 256, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 4,
           "n_group": 4, "topk_group": 2}


def newest_export() -> Path | None:
    found = [p for pattern in ("runs/*/hf", "runs/*/*/hf") for p in ROOT.glob(pattern) if (p / "config.json").exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def random_model(**overrides) -> LLaDA2MoeModelLM:
    values = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    values.update(overrides)
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(LLaDA2MoeConfig(**values)).eval()


def decode(model, ids, plen, setting, args, use_cache, eos_stop):
    """Output, wall seconds and CPU seconds. The box is shared with other jobs: with one thread the
    process's CPU time is the stable measure, wall time is kept for reference."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = generate(model, ids, prompt_lengths=plen, gen_length=args.gen_length, block_length=args.block_length,
                   eos_token_id=model.config.eos_token_id, mask_token_id=model.config.mask_token_id,
                   use_cache=use_cache, eos_early_stop=eos_stop, **SETTINGS[setting])
    return out, time.perf_counter() - wall, time.process_time() - cpu


def speed_rows(name, weights, model, ids, plen, args):
    rows = []
    for setting in SETTINGS:
        for use_cache in (False, True):
            out, wall, cpu = decode(model, ids, plen, setting, args, use_cache, eos_stop=False)
            tokens = args.gen_length * len(ids)  # every position is decoded (no EOS stop), EOS fill included
            rows.append({"model": name, "weights": weights, "setting": setting, "cache": use_cache, "tokens": tokens,
                             "nfe": int(out.nfe.sum()), "tokens_per_forward": round(tokens / int(out.nfe.sum()), 3),
                             "edits": int(out.edits.sum()), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                             "tokens_per_s": round(tokens / cpu, 2), "tokens_per_wall_s": round(tokens / wall, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def task_rows(model, tok, export, args):
    """TPF and accuracy on held-out prompts of the task families the demo trains, EOS stop on
    (trained model only), with the export's own gen_length and block_length."""
    args = argparse.Namespace(**{**vars(args), **load_decode_defaults(export)})
    problems = make_rows(["max", "sorting"], args.task_prompts, split="eval", seed=0, kind="rl")
    ids, plen = encode_prompts(tok, [p["prompt"] for p in problems], chat=True)
    rows = []
    for setting in SETTINGS:
        out, _wall, cpu = decode(model, ids, plen, setting, args, use_cache=True, eos_stop=True)
        texts = [tok.decode(r[:n], skip_special_tokens=True) for r, n in
                 zip(out.sequences[:, ids.shape[1]:].tolist(), out.lengths.tolist())]
        correct = sum(check(p["task"], p["answer"], t) for p, t in zip(problems, texts))
        rows.append({"setting": setting, "prompts": len(problems), "tokens": int(out.lengths.sum()),
                         "tokens_per_forward": round(float(out.lengths.sum() / out.nfe.sum()), 3),
                         "edits": int(out.edits.sum()), "accuracy": round(correct / len(problems), 3),
                         "cpu_s": round(cpu, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result) -> str:
    lines = [
        "# Threshold decoding: KV cache vs recompute, tokens per forward",
        "",
        (f"`python benchmarks/bench_decode.py --threads {result['threads']}` on {result['cpu']} "
        f"({result['threads']} thread(s), torch {result['torch']}); gen_length {result['gen_length']}, "
        f"block {result['block_length']}, batch 1, greedy, no EOS stop. tokens/s = tokens / process CPU "
        "seconds (one thread; the box is shared, wall times are in the JSON). Cache speedup = tokens/s with "
        "the block KV cache / tokens/s recomputing the whole prefix every step, measured side by side."),
        "",
        "| model | weights | setting | TPF | nfe | edits | tok/s recompute | tok/s cached | cache speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["setting"], r["cache"]): r for r in result["speed"]}
    for (model, setting, cache), r in by_key.items():
        if cache:
            continue
        c = by_key[(model, setting, True)]
        lines.append(f"| {model} | {r['weights']} | {setting} | {c['tokens_per_forward']:.2f} | {c['nfe']} | "
                     f"{c['edits']} | {r['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | "
                     f"{c['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
    if result["tasks"]:
        lines += ["", (f"Held-out task prompts, trained tiny model ({result['tiny_weights']}), EOS stop, cached; "
                  "TPF counts answer tokens up to and including EOS:"), "",
                  "| setting | prompts | TPF | edits | exact match |", "|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['prompts']} | {r['tokens_per_forward']:.2f} | {r['edits']} | "
                  f"{r['accuracy']:.2f} |" for r in result["tasks"]]
    else:
        lines += ["", ("No trained export under runs/ (run `make demo`): TPF on real prompts not measured. With "
                  "random weights the model is never confident, so every setting decodes about one token per "
                  "forward, and S mode (editing threshold 0) spends its post-edit steps on a model that "
                  "disagrees with itself.")]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--task-prompts", type=int, default=128)
    parser.add_argument("--models", default="tiny,mid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(None)
    export = newest_export()
    tiny = LLaDA2MoeModelLM.from_pretrained(export) if export else random_model()
    tiny_weights = f"trained ({export.relative_to(ROOT)})" if export else "random"
    prompt = make_rows(["addition"], 1, split="eval", seed=0, kind="rl")[0]["prompt"]
    ids, plen = encode_prompts(tok, [prompt], chat=True)
    result = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
                  "gen_length": args.gen_length, "block_length": args.block_length, "tiny_weights": tiny_weights,
                  "speed": [], "tasks": []}
    models = {"tiny": (tiny, tiny_weights), "mid": (random_model(**MID), "random")}
    for name in args.models.split(","):
        model, weights = models[name]
        decode(model, ids, plen, "one token/step", argparse.Namespace(gen_length=32, block_length=32), True, False)
        result["speed"] += speed_rows(name, weights, model, ids, plen, args)
    if export:
        result["tasks"] = task_rows(tiny, tok, export, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_decode.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
