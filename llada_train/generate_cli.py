"""`llada-train generate`: threshold decoding (S/Q modes) from an exported model directory.

Decoding settings, weakest first: built-in defaults (Q mode, 256 tokens, blocks of 32) < the
model's saved `generation_config.json` < `--mode` < individual flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .decoding import (
    DECODE_PRESETS,
    check_sampling,
    encode_prompts,
    generate,
    saved_decode_settings,
)
from .errors import UserError


def _threshold_or_off(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-train generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (an export of cpt/sft/rl)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the answer streams to the terminal block by block")
    src.add_argument("--prompts", type=Path, help="jsonl file, one {'prompt' or 'question': str} or {'messages': "
                                                  "[...]} per line; decoded exactly as the RL held-out eval")
    p.add_argument("--out", type=Path, help="jsonl output for --prompts (default: stdout)")
    p.add_argument("--mode", choices=sorted(DECODE_PRESETS), help="decoding preset (default: saved, else Q)")
    p.add_argument("--threshold", type=float, help="M2T unmasking threshold")
    p.add_argument("--editing-threshold", type=_threshold_or_off, default=argparse.SUPPRESS,
                   help="T2T editing threshold, or 'off'")
    p.add_argument("--gen-length", type=int)
    p.add_argument("--block-length", type=int)
    p.add_argument("--max-post-steps", type=int)
    p.add_argument("--steps", type=int, help="cap on denoising steps per block")
    p.add_argument("--mbe-window", type=int, help="Multiple Block Editing: finished blocks kept editable")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="render prompts with the chat template (default: on)")
    p.add_argument("--no-eos-stop", action="store_true", help="decode all gen-length tokens even after EOS")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="tokenizer dir or name (default: the model dir if it has one, else the "
                                       "project tokenizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _settings(args) -> dict:
    """Decoding settings, weakest first: built-in defaults < the saved generation_config.json < --mode < flags."""
    params = saved_decode_settings(args.model, args.mode)
    del params["mode"]  # complete() takes it apart from the settings
    flags = {"threshold": args.threshold, "gen_length": args.gen_length, "block_length": args.block_length,
                 "max_post_steps": args.max_post_steps, "mbe_window": args.mbe_window}
    params.update({k: v for k, v in flags.items() if v is not None})
    if hasattr(args, "editing_threshold"):  # given on the command line (None = off)
        params["editing_threshold"] = args.editing_threshold
    params.update(steps=args.steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  use_cache=not args.no_cache, eos_early_stop=not args.no_eos_stop)
    return params


def _check_settings(args, params: dict) -> None:
    """The merged settings as `generate` will check them, before the model loads: each comes from a
    flag or the model's saved generation_config.json, so a bad one is the user's to fix."""
    where = f"(a flag, or {Path(args.model) / 'generation_config.json'})"
    if params["threshold"] is None:
        raise UserError(f"threshold is unset {where}; pass --threshold or --mode")
    try:
        check_sampling(params["threshold"], params["editing_threshold"], params["temperature"], params["top_k"],
                       params["top_p"])
    except UserError as e:
        raise UserError(f"{e} {where}") from e
    for key, low in (("gen_length", 1), ("block_length", 1), ("max_post_steps", 0), ("mbe_window", 0)):
        if not isinstance(params[key], int) or params[key] < low:
            raise UserError(f"{key} must be an integer >= {low}, got {params[key]!r} {where}")
    if params["steps"] is not None and params["steps"] < 1:
        raise UserError(f"--steps must be >= 1, got {params['steps']}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")


def _decode_params(args, model) -> dict:
    """`generate` keywords: the settings plus the model's token ids and the seeded generator."""
    params = _settings(args)
    for key in ("eos_token_id", "mask_token_id"):
        if getattr(model.config, key, None) is None:
            raise UserError(f"--model {args.model}: its config.json sets no {key}")
    params.update(eos_token_id=model.config.eos_token_id, mask_token_id=model.config.mask_token_id,
                  generator=torch.Generator(args.device).manual_seed(args.seed))
    return params


def _read_prompts(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"--prompts {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not any(isinstance(row.get(k), (str, list)) for k in PROMPT_FIELDS):
            raise UserError(f"{path}:{n}: each line needs a 'prompt' or 'question' string or a 'messages' list")
        rows.append(row)
    return rows


def model_type_of(config: Path) -> str | None:
    """The `model_type` of a model directory's config.json, or a UserError naming the file."""
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{config}: not a JSON object ({e})") from e


def _check_model_dir(model_dir: str) -> None:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise UserError(f"--model {model_dir}: not a model directory (no config.json); pass an export such as "
                        "runs/demo/rl/hf or a downloaded LLaDA2.x checkpoint")
    model_type = model_type_of(config)
    if model_type != "llada2_moe":
        raise UserError(f"--model {model_dir}: model_type {model_type!r} is not an LLaDA2-MoE model ('llada2_moe'); "
                        "convert an autoregressive checkpoint with `llada-train convert` first")


def _load(args):
    from .data.tokenizer import load_tokenizer
    from .model import LLaDA2MoeModelLM

    model = LLaDA2MoeModelLM.from_pretrained(args.model).to(args.device).eval()
    name = args.tokenizer or (args.model if (Path(args.model) / "tokenizer.json").exists() else None)
    return model, load_tokenizer(name)


def _stream_one(args, model, tok, params):
    input_ids, lengths = encode_prompts(tok, [args.prompt], chat=args.chat)
    width, eos, mask = input_ids.shape[1], params["eos_token_id"], params["mask_token_id"]
    shown = ""

    def on_block(_, sequences):
        nonlocal shown
        ids = sequences[0, width:].tolist()
        ids = ids[:ids.index(mask)] if mask in ids else ids
        ids = ids[:ids.index(eos)] if eos in ids else ids
        text = tok.decode(ids, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)  # MBE may rewrite
        sys.stdout.flush()
        shown = text

    start = time.perf_counter()
    out = generate(model, input_ids.to(args.device), prompt_lengths=lengths.to(args.device), on_block=on_block,
                   **params)
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{int(out.lengths[0])} tokens, nfe {int(out.nfe[0])}, {float(out.tokens_per_forward[0]):.2f} "
          f"tokens/forward, {int(out.edits[0])} edits, {out.lengths[0] / seconds:.1f} tokens/s]", file=sys.stderr)


PROMPT_FIELDS = ("prompt", "question", "messages")  # the first one a --prompts row has is decoded


def _run_file(args, model, tok, params):
    """Every row's completion through `decoding.complete`, the loop of the SFT/RL held-out eval:
    with the export's saved settings and --mode, a prompt decodes to the tokens the RL eval got."""
    from .decoding import complete
    from .progress import progress

    rows = _read_prompts(args.prompts)
    sink = args.out.open("w") if args.out else sys.stdout
    overrides = {k: v for k, v in params.items() if k not in ("gen_length", "block_length")}
    bar = progress(len(rows), desc="generate", unit="prompt")
    try:
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i:i + args.batch_size]
            prompts = [next(r[k] for k in PROMPT_FIELDS if k in r) for r in batch]
            if not args.chat and not all(isinstance(p, str) for p in prompts):
                raise UserError(f"{args.prompts}: 'messages' rows need the chat template; drop --no-chat")
            with torch.no_grad():
                done = complete(model, tok, prompts, mode=args.mode or "Q", gen_length=params["gen_length"],
                                block_length=params["block_length"], chat=args.chat, batch_size=len(batch),
                                **overrides)
            for r, row in enumerate(batch):
                sink.write(json.dumps({**row, "completion": done.texts[r], "completion_ids": done.token_ids[r],
                                       "length": len(done.token_ids[r]), "nfe": int(done.nfe[r]),
                                       "edits": int(done.edits[r]),
                                       "tokens_per_forward": round(done.tokens_per_forward[r], 4)}) + "\n")
            sink.flush()
            bar.update(len(batch))
    finally:
        bar.close()
        if args.out:
            sink.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_model_dir(args.model)
    _check_settings(args, _settings(args))  # before the (possibly slow) model load
    model, tok = _load(args)
    params = _decode_params(args, model)
    if args.prompt is not None:
        _stream_one(args, model, tok, params)
    else:
        _run_file(args, model, tok, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
