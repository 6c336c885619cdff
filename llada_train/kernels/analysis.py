"""`llada-train fp4-analysis`: shrinkage bias, error and bucket use of the 4-bit grids (UFP4 paper).

For each tensor source (Gaussian; activations, weights and output gradients captured from the
model's linear layers) and each grid × RHT × rounding it measures, in the basis the GEMM sees:

    shrinkage   <q, x> / <x, x>          < 1: values pulled toward zero (the paper's Shrinkage Bias)
    rel_mse     |q - x|² / |x|²
    bucket_use  exp(entropy of the 4-bit code histogram) / 15   (1 = all levels used evenly)

int4 is the e1m2 grid up to scale (identical results), so only e1m2 and e2m1 are listed.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from .fp4 import FORMATS, dequantize, quantize
from .hadamard import rht

CONFIGS = [(fmt, rht_dim, rounding) for fmt in ("e1m2", "e2m1") for rht_dim in (None, 16) for rounding in ("rtne", "sr")]
GAUSSIAN_SHAPE = (512, 1024)
CAPTURE_SHAPE = (4, 128)  # (batch, seq) of the captured forward/backward
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def _load_model(model_dir: str | None, seed: int):
    from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ValueError(f"--model-dir {model_dir!r} is not a directory holding an HF export")
        return LLaDA2MoeModelLM.from_pretrained(model_dir, dtype=torch.float32), "model at " + model_dir
    import yaml

    torch.manual_seed(seed)
    config = LLaDA2MoeConfig(**yaml.safe_load(TINY_CONFIG.read_text()))
    return LLaDA2MoeModelLM(config), "random-init tiny model (configs/model/tiny.yaml)"


def capture_tensors(model, *, seed: int = 0, batch: int = 4, seq: int = 128) -> dict[str, list[torch.Tensor]]:
    """Inputs, weights and output gradients of every nn.Linear in model.model.layers, from one
    masked-diffusion forward/backward on random tokens (half of them masked)."""
    acts, grads = [], []
    hooks = []
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    for lin in linears:
        hooks.append(lin.register_forward_hook(lambda m, i, o: acts.append(i[0].detach().reshape(-1, i[0].shape[-1]))))
        hooks.append(lin.register_full_backward_hook(
            lambda m, gi, go: grads.append(go[0].detach().reshape(-1, go[0].shape[-1]))))
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(2, cfg.vocab_size, (batch, seq), generator=gen)
    masked = torch.rand(ids.shape, generator=gen) < 0.5
    labels = ids.masked_fill(~masked, -100)
    model.train()
    model(ids.masked_fill(masked, cfg.mask_token_id), labels=labels).loss.backward()
    for h in hooks:
        h.remove()
    weights = [lin.weight.detach().float() for lin in linears]
    return {"activations": [a.float() for a in acts], "weights": weights, "gradients": [g.float() for g in grads]}


def measure(tensors: list[torch.Tensor], fmt: str, rht_dim: int | None, rounding: str, seed: int) -> dict:
    """Mean shrinkage and relative MSE over the tensors, and bucket use of all their codes together."""
    shrink, mse = [], []
    hist = torch.zeros(16, dtype=torch.float64)
    for i, x in enumerate(tensors):
        kw = {"fmt": fmt, "rht_dim": rht_dim, "rounding": rounding, "seed": seed + i}
        ref = rht(x, rht_dim) if rht_dim else x  # the basis the quantizer works in
        packed = quantize(x, **kw)
        q = dequantize(packed, fmt=fmt)[..., : ref.shape[-1]].double()
        ref = ref.double()
        shrink.append(((q * ref).sum() / (ref * ref).sum()).item())
        mse.append((((q - ref) ** 2).sum() / (ref * ref).sum()).item())
        codes = packed.codes
        hist += torch.bincount(torch.cat((codes & 0xF, codes >> 4)).flatten().long(), minlength=16).double()
    p = hist / hist.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"shrinkage": sum(shrink) / len(shrink), "rel_mse": sum(mse) / len(mse),
            "bucket_use": math.exp(entropy) / 15}


def exact_scale_reference(x: torch.Tensor, fmt: str) -> dict:
    """Shrinkage and rel. MSE with ideal FP32 block scales (block amax -> grid max exactly) and
    brute-force nearest rounding in float64: isolates the grid geometry from E4M3 scale rounding."""
    grid = FORMATS[fmt].magnitudes.double()
    grid = torch.cat((-grid.flip(0)[:-1], grid))
    blocks = x.double().reshape(-1, 16)
    scale = (blocks.abs().amax(1, keepdim=True) / grid.max()).clamp(min=1e-30)
    q = grid[(blocks[..., None] / scale[..., None] - grid).abs().argmin(-1)] * scale
    return {"shrinkage": ((q * blocks).sum() / (blocks * blocks).sum()).item(),
            "rel_mse": (((q - blocks) ** 2).sum() / (blocks * blocks).sum()).item()}


def run_fp4_analysis(out_dir, *, model_dir: str | None = None, seed: int = 0) -> dict:
    """Measure every (source, grid, RHT, rounding); write fp4_analysis.{md,json} and PNG plots to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    sources = {"gaussian": [torch.randn(*GAUSSIAN_SHAPE, generator=gen)]}
    model, model_desc = _load_model(model_dir, seed)
    sources.update(capture_tensors(model, seed=seed, batch=CAPTURE_SHAPE[0], seq=CAPTURE_SHAPE[1]))
    rows = []
    for source, tensors in sources.items():
        for fmt, rht_dim, rounding in CONFIGS:
            rows.append({"source": source, "fmt": fmt, "rht": rht_dim or 0, "rounding": rounding,
                         **measure(tensors, fmt, rht_dim, rounding, seed)})
    exact = {fmt: exact_scale_reference(sources["gaussian"][0], fmt) for fmt in ("e1m2", "e2m1")}
    result = {"model": model_desc, "seed": seed, "rows": rows, "gaussian_exact_scale_rtne": exact}
    (out / "fp4_analysis.json").write_text(json.dumps(result, indent=2))
    _write_markdown(out / "fp4_analysis.md", result)
    _plot(out, rows, list(sources))
    return result


def _write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# FP4 quantization analysis",
        "",
        (f"Tensors: Gaussian N(0,1) {GAUSSIAN_SHAPE[0]}×{GAUSSIAN_SHAPE[1]} and the linear layers' activations, weights and output "
        f"gradients of the {result['model']} (seed {result['seed']}). Blocks of 16 along the last dim, "
        "two-level scales; RHT = 16-point randomized Hadamard. shrinkage = <q,x>/<x,x> "
        "(1 = unbiased), rel_mse = |q-x|²/|x|², bucket_use = exp(code entropy)/15."),
        "",
        "| source | grid | RHT | rounding | shrinkage | rel_mse | bucket_use |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['source']} | {r['fmt']} | {r['rht'] or '-'} | {r['rounding']} | {r['shrinkage']:.5f} "
                     f"| {r['rel_mse']:.5f} | {r['bucket_use']:.3f} |")
    lines += ["", ("Reference without E4M3 scale rounding (Gaussian, FP32 block scale = block amax / grid max, "
              "nearest rounding in float64):"), "", "| grid | shrinkage | rel_mse |", "|---|---|---|"]
    for fmt, r in result["gaussian_exact_scale_rtne"].items():
        lines.append(f"| {fmt} | {r['shrinkage']:.5f} | {r['rel_mse']:.5f} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict], sources: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{f}{'+rht' if d else ''}\n{r}" for f, d, r in CONFIGS]
    for metric, title in (("shrinkage", "<q,x>/<x,x> - 1"), ("rel_mse", "relative MSE"),
                          ("bucket_use", "bucket use")):
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(sources)
        for k, source in enumerate(sources):
            vals = [r[metric] - (1 if metric == "shrinkage" else 0) for r in rows if r["source"] == source]
            ax.bar([i + k * width for i in range(len(CONFIGS))], vals, width, label=source)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(CONFIGS))], labels, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"fp4_{metric}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="llada-train fp4-analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/fp4_analysis", help="where the table, JSON and plots go")
    parser.add_argument("--model-dir", default=None, help="HF export to capture tensors from (default: random tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_fp4_analysis(args.out_dir, model_dir=args.model_dir, seed=args.seed)
    print(Path(args.out_dir) / "fp4_analysis.md")
    return result
