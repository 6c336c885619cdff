"""Loss gap of 4-bit training to fp32: tiny-model CPT with precision.fp4 = none | ufp4 | nvfp4, several seeds.

    nice -n 5 python benchmarks/bench_fp4_loss_gap.py [--steps 120] [--seeds 0 1 2] > /tmp/fp4_gap.log

The claim tested (UFP4 paper): UFP4's loss gap to high precision is smaller than the E2M1 (NVFP4)
baseline's. Each seed fixes the initial weights, the batch order and the masks, shared by the three
recipes, so the gap of a recipe to fp32 is measured *paired* (same seed) as well as from the means.
The loss is the masked-diffusion cross-entropy on held-out stdlib text (files the training never
sees) with fixed masks at mask ratios spread over (0, 1), evaluated with each model's own forward
(4-bit GEMMs for the 4-bit recipes). 95% intervals: mean ± t(0.975, n-1)·sd/√n over seeds.
Writes benchmarks/results/fp4_loss_gap.{json,md}.
"""

import argparse
import functools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from llada_train.data.text import stdlib_files
from llada_train.kernels.ufp4_linear import apply_fp4
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from llada_train.presets import MODEL_PRESET_DIR

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("none", "ufp4", "nvfp4")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def token_windows(n_files: int, seq: int, offset: int) -> torch.Tensor:
    """(N, seq) token ids: `n_files` stdlib files from `offset` on (every 7th file) as UTF-8 bytes + 2
    (past pad and mask). Bytes, not the 4096-token BPE: in the ~100 steps CPU time allows, a BPE run
    stays at the unigram plateau, where precision has nothing to show; on bytes the loss keeps falling."""
    data = b"".join(f.read_bytes() for f in stdlib_files()[offset::7][:n_files])
    n = len(data) // seq
    return (torch.frombuffer(bytearray(data[: n * seq]), dtype=torch.uint8).long() + 2).view(n, seq)


def mask_batch(ids: torch.Tensor, ratios: torch.Tensor, gen: torch.Generator, mask_id: int):
    """Masked-diffusion inputs: each row masked with its own ratio (at least one token)."""
    masked = torch.rand(ids.shape, generator=gen) < ratios[:, None]
    masked[:, 0] |= ~masked.any(1)
    return ids.masked_fill(masked, mask_id), ids.masked_fill(~masked, -100)


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    model.eval()
    losses = [model(inp, labels=lab).loss.item() for inp, lab in batches]
    model.train()
    return sum(losses) / len(losses)


def lr_factor(step: int, args) -> float:
    """Linear warm-up, then cosine decay to args.min_lr_ratio (1.0 = constant): a decayed learning rate
    ends every run at a settled loss, so the paired gaps measure the precision, not where an oscillation
    happened to stop."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def tiny_config() -> LLaDA2MoeConfig:
    return LLaDA2MoeConfig(**yaml.safe_load((MODEL_PRESET_DIR / "tiny.yaml").read_text()))


def train_one(fp4: str, seed: int, args, train_ids, heldout) -> dict:
    """One CPT run; the init, batch order and masks depend on `seed` only (not on the recipe)."""
    cfg = tiny_config()
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(cfg).train()
    apply_fp4(model, fp4, scale_rounding=args.scale_rounding)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, args=args))
    gen = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(train_ids), generator=gen)
    torch.manual_seed(seed)  # the SR seeds of dY: same stream for both 4-bit recipes
    curve, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{fp4} seed {seed}", mininterval=30):
        idx = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        inp, lab = mask_batch(train_ids[idx], torch.rand(args.batch, generator=gen), gen, cfg.mask_token_id)
        loss = model(inp, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": loss.item(), "heldout_loss": heldout_loss(model, heldout)})
            print(f"{fp4} seed {seed} step {step + 1}: train {loss.item():.4f} heldout {curve[-1]['heldout_loss']:.4f}",
                  flush=True)
    return {"fp4": fp4, "seed": seed, "curve": curve, "final": curve[-1]["heldout_loss"],
            "sec_per_step": (time.perf_counter() - start) / args.steps}


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval half-width over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    half = T_975[n - 1] * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "sd": statistics.stdev(values) if n > 1 else float("nan"), "n": n}


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    """Per recipe: final held-out loss and its paired gap to fp32 (same seed), mean ± 95% interval."""
    final = {(r["fp4"], r["seed"]): r["final"] for r in runs}
    out = {}
    for fp4 in RECIPES:
        row = {"loss": mean_ci([final[fp4, s] for s in seeds])}
        if fp4 != "none":
            row["gap"] = mean_ci([final[fp4, s] - final["none", s] for s in seeds])
        out[fp4] = row
    out["ufp4_minus_nvfp4"] = mean_ci([final["ufp4", s] - final["nvfp4", s] for s in seeds])
    return out


def write_markdown(result: dict, path: Path) -> None:
    a, s = result["args"], result["summary"]
    lines = [f"# FP4 loss gap to fp32 ({result['device']}, {result['torch_threads']} threads)", "",
             f"Tiny LLaDA2-MoE (configs/model/tiny.yaml), {a['steps']} AdamW steps (lr {a['lr']}, warm-up "
             f"{a['warmup']}, cosine to {a['min_lr_ratio']}×), batch {a['batch']}×{a['seq']} stdlib bytes, "
             f"seeds {a['seeds']}; "
             f"precision.scale_rounding = {a['scale_rounding']}. Held-out masked-diffusion loss on "
             f"{result['heldout_tokens']} bytes of unseen files, fixed masks; mean ± 95% t-interval over seeds; "
             "gap = recipe − fp32 with the same seed (init, data order, masks).", "",
             "| precision.fp4 | held-out loss | seed sd | paired gap to fp32 | gap sd | s/step |",
             "|---|---|---|---|---|---|"]
    for fp4 in RECIPES:
        r = s[fp4]
        gap = f"{r['gap']['mean']:+.4f} ± {r['gap']['ci95']:.4f} | {r['gap']['sd']:.4f}" if "gap" in r else "- | -"
        sec = statistics.fmean(x["sec_per_step"] for x in result["runs"] if x["fp4"] == fp4)
        lines.append(f"| {fp4} | {r['loss']['mean']:.4f} ± {r['loss']['ci95']:.4f} | {r['loss']['sd']:.4f} | {gap} "
                     f"| {sec:.2f} |")
    d = s["ufp4_minus_nvfp4"]
    lines += ["", f"ufp4 − nvfp4 (paired): {d['mean']:+.4f} ± {d['ci95']:.4f} (sd {d['sd']:.4f}, n = {d['n']}).", "",
              "Per seed (final held-out loss):", "", "| seed | " + " | ".join(RECIPES) + " |",
              "|---" * (len(RECIPES) + 1) + "|"]
    final = {(r["fp4"], r["seed"]): r["final"] for r in result["runs"]}
    for seed in a["seeds"]:
        lines.append(f"| {seed} | " + " | ".join(f"{final[f, seed]:.4f}" for f in RECIPES) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor (1 = constant lr)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=45)
    parser.add_argument("--scale-rounding", default="nearest", choices=["nearest", "up"])
    parser.add_argument("--out", default=str(RESULTS / "fp4_loss_gap"), help="output path without suffix")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        raise ValueError("--seeds: give at least two seeds (the intervals need a spread)")
    train_ids = token_windows(40, args.seq, offset=0)  # (N, seq)
    gen = torch.Generator().manual_seed(12345)
    held = token_windows(12, args.seq, offset=3)
    held = held[:: len(held) // 64][:64]  # 64 windows spread over the held-out files
    ratios = torch.linspace(0.05, 0.95, len(held))
    mask_id = tiny_config().mask_token_id
    heldout = [mask_batch(chunk, r, gen, mask_id) for chunk, r in zip(held.split(16), ratios.split(16), strict=True)]
    runs = [train_one(fp4, seed, args, train_ids, heldout) for seed in args.seeds for fp4 in RECIPES]
    result = {"device": platform.processor() or "cpu", "torch_threads": torch.get_num_threads(),
              "args": vars(args), "train_windows": len(train_ids), "heldout_tokens": held.numel(),
              "runs": runs, "summary": summarize(runs, args.seeds)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
