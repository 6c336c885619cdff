"""FP4 kernels: quantizer throughput and UFP4Linear step time vs nn.Linear (default block-scale rule).

    python benchmarks/bench_fp4.py

The loss gap of 4-bit training to fp32 is bench_fp4_loss_gap.py. Writes benchmarks/results/fp4.{json,md}.
Candidates are timed interleaved (one call each per round, median over rounds). Without CUDA only
the torch reference quantizer is timed
(the Triton kernels would run in the interpreter, which measures nothing) and the output says so.
"""

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llada_train.kernels.fp4 import quantize
from llada_train.kernels.ufp4_linear import NVFP4, UFP4, FP4Linear

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_times(fns: dict, rounds: int) -> dict[str, float]:
    """Seconds per call of each fn: one warm-up each, then `rounds` interleaved rounds, median."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_quantizer(device: str) -> list[dict]:
    shape = (4096, 4096) if device == "cuda" else (1024, 1024)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    impls = ["torch", "triton"] if device == "cuda" else ["torch"]
    configs = [("e1m2", 16, "rtne", "nearest"), ("e1m2", 16, "rtne", "up"), ("e1m2", 16, "sr", "up"),
               ("e2m1", None, "rtne", "nearest")]
    fns = {(c, impl): functools.partial(quantize, x, fmt=c[0], rht_dim=c[1], rounding=c[2], scale_rounding=c[3],
                                        seed=0, impl=impl) for c in configs for impl in impls}
    sec = _median_times(fns, rounds=5)
    rows = []
    for c in configs:
        row = {"fmt": c[0], "rht": c[1] or 0, "rounding": c[2], "scale": c[3], "shape": list(shape)}
        for impl in impls:
            # bytes moved by a fused kernel: bf16 read twice (amax pass + quantize pass), codes + scales written
            row[f"{impl}_ms"] = sec[c, impl] * 1e3
            row[f"{impl}_GBps"] = x.numel() * (2 * 2 + 0.5 + 1 / 16) / sec[c, impl] / 1e9
        rows.append(row)
    return rows


def bench_linear(device: str) -> list[dict]:
    tokens, d_in, d_out = (8192, 4096, 4096) if device == "cuda" else (1024, 512, 512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    layers = {"nn.Linear": base, "UFP4": FP4Linear.from_linear(base, UFP4), "NVFP4": FP4Linear.from_linear(base, NVFP4)}
    sec = _median_times({name: lambda layer=layer: layer(x).sum().backward() for name, layer in layers.items()},
                        rounds=5)
    return [{"layer": name, "shape": [tokens, d_in, d_out], "step_ms": sec[name] * 1e3,
             "vs_linear": sec[name] / sec["nn.Linear"]} for name in layers]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note = ("CUDA: torch reference vs fused Triton kernel." if device == "cuda" else
            "No CUDA: only the torch reference quantizer is timed (Triton would run in its interpreter).")
    note += " Median of 5 interleaved rounds."
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch_threads": torch.get_num_threads(), "note": note, "quantizer": bench_quantizer(device),
              "linear": bench_linear(device)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp4.json").write_text(json.dumps(result, indent=2))
    q_cols = [c for c in result["quantizer"][0] if c.endswith(("_ms", "_GBps"))]
    lines = [f"# FP4 benchmark ({result['device']}, {result['torch_threads']} threads)", "", note, "",
             "| fmt | RHT | rounding | block scale | shape | " + " | ".join(q_cols) + " |",
             "|---" * (5 + len(q_cols)) + "|"]
    for r in result["quantizer"]:
        lines.append(f"| {r['fmt']} | {r['rht'] or '-'} | {r['rounding']} | {r['scale']} | {r['shape']} | "
                     + " | ".join(f"{r[c]:.2f}" for c in q_cols) + " |")
    lines += ["", "| layer (fwd+bwd, default scales) | tokens×in×out | step ms | × nn.Linear |", "|---|---|---|---|"]
    for r in result["linear"]:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['step_ms']:.1f} | {r['vs_linear']:.2f} |")
    (RESULTS / "fp4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
