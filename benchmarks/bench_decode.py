"""Threshold decoding speed: tokens/s and tokens per forward (TPF) for S, Q, threshold 0.95 and one
token per step, with the block KV cache vs recomputing the whole prefix every step, and with
draft-ahead vs a separate forward for each block's first step (side by side, same process).

Models: the tiny preset (the newest trained export under runs/*/hf or runs/*/*/hf when one exists,
else random weights; the output says which) and a mid-size random config (hidden 512, 8 layers,
16 experts top-4). Speed runs decode all `gen_length` tokens (no EOS stop) so both sides do the
same work; the tiny model's cache speedup is also measured at larger batches (`--batch-sizes`). For each
export under runs/ whose run trained on built-in task families (SFT, RL; plus
any `--task-model DIR`), TPF and exact-match accuracy are measured on held-out prompts of those
families (read from the run's config.yaml), with EOS stop, i.e. counting only the answer's tokens,
next to the TPF ceiling those answer lengths allow (see `tpf_ceiling`).

    python benchmarks/bench_decode.py [--threads 1] [--gen-length 256] [--block-length 32] [--batch-sizes 1,4,16]
                                      [--task-model DIR ...]
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
from llada_train.presets import MODEL_PRESET_DIR

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "S": DECODE_PRESETS["S"],
    "Q": DECODE_PRESETS["Q"],
    "threshold 0.95": DECODE_PRESETS["llada2.0"],
    "one token/step": {"threshold": 1.0, "editing_threshold": None},
}
MID = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
}


def exports() -> list[Path]:
    """Every hf/ export under runs/ (runs/NAME/hf and pipeline stages runs/NAME/STAGE/hf), oldest first."""
    found = [p for pattern in ("runs/*/hf", "runs/*/*/hf") for p in ROOT.glob(pattern) if (p / "config.json").exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def trained_on_tasks(export: Path) -> bool:
    """The export's run trained on built-in task families (SFT or RL), so held-out prompts exist."""
    run = export.parent / "config.yaml"
    return run.exists() and (yaml.safe_load(run.read_text()).get("data") or {}).get("train") == "tasks"


def random_model(**overrides) -> LLaDA2MoeModelLM:
    values = yaml.safe_load((MODEL_PRESET_DIR / "tiny.yaml").read_text())
    values.update(overrides)
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(LLaDA2MoeConfig(**values)).eval()


def decode(model, ids, plen, setting, args, use_cache, eos_stop, draft_ahead=True):
    """Output, wall seconds and CPU seconds. The box is shared with other jobs: with one thread the
    process's CPU time is the stable measure, wall time is kept for reference."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = generate(model, ids, prompt_lengths=plen, gen_length=args.gen_length, block_length=args.block_length,
                   eos_token_id=model.config.eos_token_id, mask_token_id=model.config.mask_token_id,
                   use_cache=use_cache, eos_early_stop=eos_stop, draft_ahead=draft_ahead, **SETTINGS[setting])
    return out, time.perf_counter() - wall, time.process_time() - cpu


def tokens_per_forward_without_draft_ahead(model, ids, plen, setting, args, out, tokens, eos_stop):
    """TPF of the same decode with a separate forward for each block's first step; the tokens must match."""
    if SETTINGS[setting]["editing_threshold"] is None:
        return None  # no check forwards to draft in: identical by construction
    plain, _, _ = decode(model, ids, plen, setting, args, True, eos_stop, draft_ahead=False)
    assert torch.equal(plain.sequences, out.sequences), "draft-ahead changed the decoded tokens"
    return round(tokens / int(plain.nfe.sum()), 3)


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
            if use_cache and weights != "random":
                rows[-1]["tokens_per_forward_no_draft_ahead"] = tokens_per_forward_without_draft_ahead(
                    model, ids, plen, setting, args, out, tokens, eos_stop=False)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def batch_rows(model, tok, family, args):
    """Cache speedup of the tiny model as the batch grows (different prompts of `family`, same decode
    as the speed rows): at batch 1 its forward is mostly fixed per-call overhead that the cache
    cannot remove; with more rows per forward the work the cache saves dominates."""
    rows = []
    for batch in args.batch_sizes:
        prompts = [r["prompt"] for r in make_rows([family], batch, split="eval", seed=0, kind="rl")]
        ids, plen = encode_prompts(tok, prompts, chat=True)
        for setting in ("S", "one token/step"):
            cpu = {use_cache: decode(model, ids, plen, setting, args, use_cache, eos_stop=False)[2]
                   for use_cache in (False, True)}
            tokens = args.gen_length * batch
            rows.append(
                {
                    "batch": batch,
                    "setting": setting,
                    "tokens": tokens,
                    "tokens_per_s_recompute": round(tokens / cpu[False], 1),
                    "tokens_per_s_cached": round(tokens / cpu[True], 1),
                    "cache_speedup": round(cpu[False] / cpu[True], 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def tpf_ceiling(plen, lengths, block_length, editing) -> float:
    """The most tokens per forward any threshold decoder can reach on these answers: every block the
    answer touches filled in one forward, plus (with editing) one forward that finds the last block
    settled, the other blocks' checks riding on the next block's draft (draft-ahead)."""
    first = plen // block_length
    last = (plen + lengths - 1) // block_length
    forwards = last - first + 1 + int(editing)
    return float(lengths.sum() / forwards.sum())


def task_rows(export, tok, args):
    """TPF and accuracy on held-out prompts of the task families the export's run trained on, EOS
    stop on, with the export's own gen_length and block_length."""
    model = LLaDA2MoeModelLM.from_pretrained(export).eval()
    run = yaml.safe_load((export.parent / "config.yaml").read_text())
    args = argparse.Namespace(**{**vars(args), **load_decode_defaults(export)})
    problems = make_rows(run["data"]["tasks"], args.task_prompts, split="eval", seed=0, kind="rl",
                         **run["data"].get("task_options", {}))
    ids, plen = encode_prompts(tok, [p["prompt"] for p in problems], chat=True)
    rows = []
    for setting in SETTINGS:
        out, _wall, cpu = decode(model, ids, plen, setting, args, use_cache=True, eos_stop=True)
        texts = [tok.decode(r[:n], skip_special_tokens=True) for r, n in
                 zip(out.sequences[:, ids.shape[1]:].tolist(), out.lengths.tolist(), strict=True)]
        correct = sum(check(p["task"], p["answer"], t) for p, t in zip(problems, texts, strict=True))
        editing = SETTINGS[setting]["editing_threshold"] is not None
        rows.append({"model": display(export), "tasks": run["data"]["tasks"], "setting": setting,
                     "prompts": len(problems), "tokens": int(out.lengths.sum()),
                     "tokens_per_forward": round(float(out.lengths.sum() / out.nfe.sum()), 3),
                     "tokens_per_forward_no_draft_ahead": tokens_per_forward_without_draft_ahead(
                         model, ids, plen, setting, args, out, int(out.lengths.sum()), eos_stop=True),
                     "tpf_ceiling": round(tpf_ceiling(plen, out.lengths, args.block_length, editing), 3),
                     "edits": int(out.edits.sum()), "accuracy": round(correct / len(problems), 3),
                     "cpu_s": round(cpu, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(result) -> str:
    lines = [
        "# Threshold decoding: KV cache vs recompute, tokens per forward",
        "",
        (f"`python benchmarks/bench_decode.py --threads {result['threads']}` on {result['cpu']} "
        f"({result['threads']} thread(s), torch {result['torch']}); gen_length {result['gen_length']}, "
        f"block {result['block_length']}, batch 1, greedy, no EOS stop, prompt: {result['prompt']!r}. tokens/s = "
        "tokens / process CPU seconds (one thread; the box is shared, wall times are in the JSON). Cache "
        "speedup = tokens/s with the block KV cache / tokens/s recomputing the whole prefix every step, measured "
        "side by side. TPF counts every decoded position (EOS fill included); 'no draft-ahead' is the same "
        "decode with a separate forward for each block's first step (same tokens, checked)."),
        "",
        ("| model | weights | setting | TPF | TPF no draft-ahead | nfe | edits | tok/s recompute | tok/s cached "
         "| cache speedup |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["setting"], r["cache"]): r for r in result["speed"]}
    for (model, setting, cache), r in by_key.items():
        if cache:
            continue
        c = by_key[(model, setting, True)]
        lines.append(
            f"| {model} | {r['weights']} | {setting} | {c['tokens_per_forward']:.2f} | "
            f"{fmt(c.get('tokens_per_forward_no_draft_ahead'))} | {c['nfe']} | {c['edits']} | "
            f"{r['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | {c['tokens_per_s'] / r['tokens_per_s']:.2f}x |"
        )
    if result.get("batch"):
        lines += ["", (f"Tiny model ({result['tiny_weights']}), same decode, a batch of different prompts "
                  "per forward:"), "", "| batch | setting | tok/s recompute | tok/s cached | cache speedup |",
                  "|---|---|---|---|---|"]
        lines += [
            f"| {r['batch']} | {r['setting']} | {r['tokens_per_s_recompute']:.1f} | {r['tokens_per_s_cached']:.1f} "
            f"| {r['cache_speedup']:.2f}x |"
            for r in result["batch"]
        ]
    if result["tasks"]:
        lines += ["", ("Held-out prompts of the families each trained model's run used, EOS stop, cached, the "
                  "export's own gen_length/block_length. TPF counts answer tokens up to and including EOS; the "
                  "ceiling is the TPF these answer lengths allow at all (`tpf_ceiling`: one forward per block "
                  "touched, plus the final check when editing)."), "",
                  ("| model | tasks | setting | prompts | TPF | TPF no draft-ahead | ceiling | of ceiling | edits "
                   "| exact match |"), "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {', '.join(r['tasks'])} | {r['setting']} | {r['prompts']} | "
                  f"{r['tokens_per_forward']:.2f} | {fmt(r['tokens_per_forward_no_draft_ahead'])} | "
                  f"{r['tpf_ceiling']:.2f} | {r['tokens_per_forward'] / r['tpf_ceiling']:.0%} | {r['edits']} | "
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
    parser.add_argument("--batch-sizes", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4, 16],
                        help="batch sizes of the tiny model's cache-speedup rows")
    parser.add_argument("--task-model", type=Path, action="append", default=[],
                        help="a trained export outside runs/ (a run's hf/ dir) to measure on its run's task families")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(None)
    found = exports()
    export = found[-1] if found else None  # the newest
    tiny = LLaDA2MoeModelLM.from_pretrained(export) if export else random_model()
    tiny_weights = f"trained ({display(export)})" if export else "random"
    trained = export is not None and trained_on_tasks(export)
    family = yaml.safe_load((export.parent / "config.yaml").read_text())["data"]["tasks"][0] if trained else "addition"
    prompt = make_rows([family], 1, split="eval", seed=0, kind="rl")[0]["prompt"]
    ids, plen = encode_prompts(tok, [prompt], chat=True)
    result = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
                  "gen_length": args.gen_length, "block_length": args.block_length, "tiny_weights": tiny_weights,
                  "prompt": prompt, "speed": [], "tasks": []}
    models = {"tiny": (tiny, tiny_weights), "mid": (random_model(**MID), "random")}
    for name in args.models.split(","):
        model, weights = models[name]
        decode(model, ids, plen, "one token/step", argparse.Namespace(gen_length=32, block_length=32), True, False)
        result["speed"] += speed_rows(name, weights, model, ids, plen, args)
    if "tiny" in args.models.split(","):
        result["batch"] = batch_rows(tiny, tok, family, args)
    for path in args.task_model:
        if not (path / "config.json").exists() or not trained_on_tasks(path):
            raise ValueError(f"--task-model {path}: expected the hf/ export of a run trained on built-in task "
                             "families (config.json inside, the run's config.yaml with data.train: tasks beside it)")
    task_models = {p.resolve(): p for p in [e for e in found if trained_on_tasks(e)] + args.task_model}
    for path in task_models.values():
        result["tasks"] += task_rows(path, tok, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_decode.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
