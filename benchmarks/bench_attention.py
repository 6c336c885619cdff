"""Training-layout attention, sdpa with the dense §3 mask vs flex with the block-sparse BlockMask.

One call = attention over `[x_t ; x_0]` (2L positions, blocks of 32, GQA), forward and backward,
as the trainer runs it; forward alone is timed too. Both backends take the same `AttentionLayout`.
Repeats are interleaved (sdpa, flex, sdpa, flex, ...) and the median is reported. On CPU torch
has no flex backward: flex's backward there is this project's tiled softmax backward over the
kept tiles (llada_train/model/attention.py); on CUDA both directions are torch's compiled kernels.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_attention.py [--sizes 1024,2048,4096] [--device auto]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results
from llada_train.model.attention import FLEX, attend
from llada_train.model.masks import AttentionLayout


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(calls: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds of each call, timing them in turn within every repeat."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_calls(layout, q, k, v, scale):
    """Forward and forward+backward closures per backend, plus the outputs to compare."""
    grad = torch.randn_like(q)

    def forward(backend):
        def run():
            with torch.no_grad():
                return attend(q.detach(), k.detach(), v.detach(), layout, scale, backend)
        return run

    def step(backend):
        def run():
            out = attend(q, k, v, layout, scale, backend)  # (B, H, 2L, D)
            out.backward(grad)
            q.grad = k.grad = v.grad = None
        return run

    calls = {f"{b}_{kind}": make(b) for b in ("sdpa", "flex")
             for kind, make in (("fwd", forward), ("step", step))}
    return calls, forward("sdpa")(), forward("flex")()


def bench_size(two_l: int, args, device) -> dict:
    seq_len = two_l // 2
    layout = AttentionLayout("diffusion", seq_len, args.block)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, two_l, args.head_dim)
    kv_shape = (args.batch, args.kv_heads, two_l, args.head_dim)
    q = torch.randn(shape, device=device, dtype=args.dtype, requires_grad=True)
    k, v = (torch.randn(kv_shape, device=device, dtype=args.dtype, requires_grad=True) for _ in range(2))
    calls, ref, out = attention_calls(layout, q, k, v, args.head_dim**-0.5)
    med = interleaved_medians(calls, device, args.warmup, args.repeats)
    tiles = layout.block_mask(device).to_dense().float().mean().item()
    return {
        "2L": two_l, "block": args.block,
        "sdpa_fwd_ms": med["sdpa_fwd"] * 1e3, "flex_fwd_ms": med["flex_fwd"] * 1e3,
        "fwd_speedup": med["sdpa_fwd"] / med["flex_fwd"], "sdpa_fwd_bwd_ms": med["sdpa_step"] * 1e3,
        "flex_fwd_bwd_ms": med["flex_step"] * 1e3, "fwd_bwd_speedup": med["sdpa_step"] / med["flex_step"],
        "kept_pairs": layout.dense(device).float().mean().item(), "kept_tiles": tiles,
        "max_abs_diff": (ref.float() - out.float()).abs().max().item(),
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096", help="2L values, comma-separated")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    parser.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 4 on CUDA")
    parser.add_argument("--heads", type=int, default=None, help="query heads; default 4 on CPU, 16 on CUDA")
    parser.add_argument("--kv-heads", type=int, default=None, help="default heads / 4 (at least 1)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="bench_attention", help="results file stem")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.batch = args.batch or (4 if cuda else 1)
    args.heads = args.heads or (16 if cuda else 4)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    rows = []
    for two_l in (int(s) for s in args.sizes.split(",")):
        rows.append(bench_size(two_l, args, device))
        print(f"2L={two_l}: {rows[-1]}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    notes = (
        f"`{' '.join(['python', *sys.argv])}` on {args.device}, {args.dtype}, batch {args.batch}, "
        f"{args.heads} query / {args.kv_heads} KV heads of {args.head_dim}; median of {args.repeats} "
        f"interleaved repeats. flex ran {FLEX.mode(device.type)}"
        + (" (CPU: compiled forward, tiled torch backward)" if device.type == "cpu" else "")
        + ". kept_pairs: share of query-key pairs the §3 mask allows; kept_tiles: share of 128x128 tiles "
        "flex computes." + (f" Peak GPU memory {peak:.2f} GiB." if peak is not None else "")
    )
    write_results(args.name, rows, notes)


if __name__ == "__main__":
    main()
