"""FP4 kernels: quantizer throughput, UFP4Linear step time vs nn.Linear, tiny-model loss gap to fp32.

    python benchmarks/bench_fp4.py [--steps 30]

Writes benchmarks/results/fp4.{json,md}. Without CUDA only the torch reference quantizer is timed
(the Triton kernels would run in the interpreter, which measures nothing) and the output says so.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from llada_train.kernels.fp4 import quantize
from llada_train.kernels.ufp4_linear import NVFP4, UFP4, FP4Linear, apply_fp4

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _time(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def bench_quantizer(device: str) -> list[dict]:
    shape = (4096, 4096) if device == "cuda" else (1024, 1024)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    impls = ["torch", "triton"] if device == "cuda" else ["torch"]
    rows = []
    for fmt, rht_dim, rounding in [("e1m2", 16, "rtne"), ("e1m2", 16, "sr"), ("e2m1", None, "rtne")]:
        row = {"fmt": fmt, "rht": rht_dim or 0, "rounding": rounding, "shape": list(shape)}
        for impl in impls:
            sec = _time(lambda impl=impl: quantize(x, fmt=fmt, rht_dim=rht_dim, rounding=rounding, seed=0, impl=impl), 5)  # noqa: B023
            # bytes moved by a fused kernel: bf16 read twice (amax pass + quantize pass), codes + scales written
            row[f"{impl}_ms"] = sec * 1e3
            row[f"{impl}_GBps"] = x.numel() * (2 * 2 + 0.5 + 1 / 16) / sec / 1e9
        rows.append(row)
    return rows


def bench_linear(device: str) -> list[dict]:
    tokens, d_in, d_out = (8192, 4096, 4096) if device == "cuda" else (1024, 512, 512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    rows = []
    ref = None
    for name, layer in [("nn.Linear", base), ("UFP4", FP4Linear.from_linear(base, UFP4)),
                        ("NVFP4", FP4Linear.from_linear(base, NVFP4))]:
        sec = _time(lambda layer=layer: layer(x).sum().backward(), 3)
        ref = ref or sec
        rows.append({"layer": name, "shape": [tokens, d_in, d_out], "step_ms": sec * 1e3, "vs_linear": sec / ref})
    return rows


def train_gap(steps: int) -> list[dict]:
    """Masked-diffusion training of the tiny model on a fixed synthetic corpus: fp32 vs ufp4 vs nvfp4."""
    from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

    cfg = LLaDA2MoeConfig(**yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text()))
    gen = torch.Generator().manual_seed(0)
    text = (Path(json.__file__).read_bytes() * 4)[: 8 * 64 * 8]  # real code bytes as token ids
    corpus = torch.tensor(list(text)).view(-1, 64) + 2
    rows = []
    for fp4 in ("none", "ufp4", "nvfp4"):
        torch.manual_seed(0)
        model = LLaDA2MoeModelLM(cfg).train()
        apply_fp4(model, fp4)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        gen.manual_seed(1)
        losses = []
        start = time.perf_counter()
        for step in range(steps):
            ids = corpus[(step * 8) % len(corpus):][:8]
            masked = torch.rand(ids.shape, generator=gen) < torch.rand(ids.shape[0], 1, generator=gen)
            labels = ids.masked_fill(~masked, -100)
            loss = model(ids.masked_fill(masked, cfg.mask_token_id), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tail = sum(losses[-5:]) / 5
        rows.append({"fp4": fp4, "first_loss": losses[0], "final_loss_avg5": tail,
                     "sec_per_step": (time.perf_counter() - start) / steps})
    for r in rows:
        r["gap_to_fp32"] = r["final_loss_avg5"] - rows[0]["final_loss_avg5"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="tiny-model training steps per recipe")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note = ("CUDA: torch reference vs fused Triton kernel." if device == "cuda" else
            "No CUDA: only the torch reference quantizer is timed (Triton would run in its interpreter).")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch_threads": torch.get_num_threads(), "note": note, "quantizer": bench_quantizer(device),
              "linear": bench_linear(device), "train": train_gap(args.steps)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp4.json").write_text(json.dumps(result, indent=2))
    q_cols = [c for c in result["quantizer"][0] if c.endswith(("_ms", "_GBps"))]
    lines = [f"# FP4 benchmark ({result['device']}, {result['torch_threads']} threads)", "", note, "",
             "| fmt | RHT | rounding | shape | " + " | ".join(q_cols) + " |", "|---" * (4 + len(q_cols)) + "|"]
    for r in result["quantizer"]:
        lines.append(f"| {r['fmt']} | {r['rht'] or '-'} | {r['rounding']} | {r['shape']} | "
                     + " | ".join(f"{r[c]:.2f}" for c in q_cols) + " |")
    lines += ["", "| layer (fwd+bwd) | tokens×in×out | step ms | × nn.Linear |", "|---|---|---|---|"]
    for r in result["linear"]:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['step_ms']:.1f} | {r['vs_linear']:.2f} |")
    lines += ["", f"Tiny model, {args.steps} masked-diffusion steps on code bytes (AdamW 2e-3):", "",
              "| precision.fp4 | first loss | final loss (avg 5) | gap to fp32 | s/step |", "|---|---|---|---|---|"]
    for r in result["train"]:
        lines.append(f"| {r['fp4']} | {r['first_loss']:.3f} | {r['final_loss_avg5']:.3f} | {r['gap_to_fp32']:+.3f} "
                     f"| {r['sec_per_step']:.2f} |")
    (RESULTS / "fp4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
