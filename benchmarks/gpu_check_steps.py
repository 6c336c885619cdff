"""The measuring steps of benchmarks/gpu_check.sh that have no benchmark script of their own.

  train        CPT step tokens/s and MFU (bf16 on CUDA) at the mid size and ~0.5B, sdpa vs flex
  decode       tokens/s of the block decoder, KV cache on vs off, at batch 1 and 16 (mid-size model)
  fp4          FP4 quantizer (Triton: RHT + amax + scale + round + pack) GB/s vs device-to-device copy
  ufp4-linear  UFP4Linear vs bf16 nn.Linear, forward + backward step time
  merge        one gpu_check.json from every step's status and result files

Each step writes <name>.json + .md under $LLADA_BENCH_RESULTS (benchmarks/results/ when unset),
times interleaved repeats and reports the median, and records the peak memory it used.
`--dry` runs the same code at tiny sizes (on CPU when there is no GPU; Triton in interpreter mode).
Run: python benchmarks/gpu_check_steps.py {train,decode,fp4,ufp4-linear,merge} [--dry]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import interleaved_medians
from benchmarks.bench_train import MID
from benchmarks.common import RESULTS, machine, write_results
from llada_train.config import DiffusionConfig
from llada_train.decoding import generate
from llada_train.diffusion import (
    NoisedBatch,
    corrupt_t2t,
    diffusion_loss,
    model_inputs,
    noise_batch,
    ordinary_token_ids,
    supervised_positions,
)
from llada_train.kernels.fp4 import quantize
from llada_train.kernels.ufp4_linear import UFP4, FP4Linear
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


HALF_B = {**MID, "vocab_size": 32768, "hidden_size": 1024, "intermediate_size": 2816,
          "moe_intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 16,
          "num_key_value_heads": 4, "head_dim": 64, "num_experts": 24, "num_experts_per_tok": 4,
          "n_group": 4, "topk_group": 2}  # ~0.5B parameters


def shrunk(values: dict) -> dict:
    """The dry run's stand-in for a model preset: same structure, tiny widths."""
    return {**values, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
            "vocab_size": 4096}


def matmul_peak(device, dry: bool) -> float:
    """Measured dense matmul FLOP/s: bf16 on CUDA (8192^3), fp32 on CPU."""
    n, dtype = (256, torch.float32) if dry or device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    med = interleaved_medians({"mm": lambda: a @ b}, device, warmup=3, repeats=10)
    return 2 * n**3 / med["mm"]


class TrainStep:
    """One CPT step of the objective (M2T + T2T over `[x_t ; x_0]`, chunked CE) + AdamW on `device`.
    Noising runs on CPU with the objective's own functions and the model inputs are moved over."""

    def __init__(self, values, batch, seq_len, backend, device, dtype):
        torch.manual_seed(0)
        config = LLaDA2MoeConfig(**{**values, "attn_backend": backend})
        self.model = LLaDA2MoeModelLM(config).to(device, dtype).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.cfg = DiffusionConfig(block_size=32)
        self.cfg.t2t.max_ratio = 0.1
        self.device, self.vocab = device, ordinary_token_ids(values["vocab_size"], range(5))
        self.x0 = torch.randint(5, values["vocab_size"], (batch, seq_len))

    def loss(self):
        gen = torch.Generator().manual_seed(0)
        ones = torch.ones_like(self.x0, dtype=torch.bool)
        batch = noise_batch(self.x0, ones, torch.zeros_like(self.x0), ones, 32, self.cfg, 1, gen)
        batch = corrupt_t2t(batch, self.cfg.t2t.max_ratio, self.vocab, gen)
        supervised = supervised_positions(batch, self.cfg)  # (B, L)
        inputs = model_inputs(batch, 32)
        ids = inputs.pop("input_ids")
        positions = F.pad(supervised, (0, ids.shape[1] - supervised.shape[1]))  # (B, 2L)
        out = self.model(input_ids=ids.to(self.device), position_ids=inputs["position_ids"].to(self.device),
                         attention_mask=inputs["attention_mask"], output_positions=positions.to(self.device),
                         targets=batch.x0[supervised].to(self.device))
        on_device = NoisedBatch(**{k: v.to(self.device) for k, v in batch.__dict__.items()})
        return diffusion_loss(out, on_device, supervised.to(self.device), self.cfg)[0]

    def __call__(self):
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def with_peak(fn, device, peaks: dict, key: str):
    """`fn` that records its peak GPU memory under `peaks[key]`."""
    def run():
        reset_peak(device)
        fn()
        peaks[key] = peak_gib(device)
    return run


def train_step(device, dry: bool) -> list[dict]:
    """mid and ~0.5B CPT steps, sdpa vs flex, tokens/s and MFU against the measured matmul peak.
    FLOPs: torch.utils.flop_counter on one sdpa step (dense attention as sdpa runs it), used for both
    arms, so flex's MFU is sdpa-equivalent work per second."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dry)
    sizes = {"mid": (shrunk(MID), 2, 64), "0.5b": (shrunk(HALF_B), 1, 64)} if dry else \
        {"mid": (MID, 8, 1024), "0.5b": (HALF_B, 4, 1024)}
    rows = []
    for name, (values, batch, seq_len) in sizes.items():
        arms = {b: TrainStep(values, batch, seq_len, b, device, dtype) for b in ("sdpa", "flex")}
        with FlopCounterMode(display=False) as counter:
            arms["sdpa"]()
        peaks = {}
        calls = {b: with_peak(arm, device, peaks, b) for b, arm in arms.items()}
        med = interleaved_medians(calls, device, warmup=1, repeats=1 if dry else 5)
        params = sum(p.numel() for p in arms["sdpa"].model.parameters())
        for backend, seconds in med.items():
            rows.append({"model": name, "params_M": params / 1e6, "backend": backend, "batch": batch,
                         "L": seq_len, "step_ms": seconds * 1e3, "tokens_per_s": batch * seq_len / seconds,
                         "MFU": counter.get_total_flops() / seconds / peak, "matmul_peak_TFLOPs": peak / 1e12,
                         "peak_GiB": peaks[backend]})
        del arms
    return rows


def decode_step(device, dry: bool) -> list[dict]:
    """Random-init mid model in bf16 (fp32 on CPU); `steps` fixes the denoising steps per block so
    both arms decode the same number of tokens per forward whatever the model's confidence."""
    values = shrunk(MID) if dry else MID
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**values)).to(device, dtype).eval()
    gen, block, prompt = (16, 8, 8) if dry else (256, 32, 64)
    kw = {"gen_length": gen, "block_length": block, "threshold": 0.9, "steps": block // 4,
          "eos_token_id": values["eos_token_id"], "mask_token_id": values["mask_token_id"],
          "eos_early_stop": False}
    rows = []
    for batch in (1, 16):
        ids = torch.randint(2, values["vocab_size"], (batch, prompt), device=device)
        reset_peak(device)
        calls = {"cached": lambda ids=ids: generate(model, ids, use_cache=True, **kw),
                 "uncached": lambda ids=ids: generate(model, ids, use_cache=False, **kw)}
        med = interleaved_medians(calls, device, warmup=1, repeats=1 if dry else 3)
        rows.append({"batch": batch, "gen_length": gen, "block": block,
                     "cached_tok_s": batch * gen / med["cached"],
                     "uncached_tok_s": batch * gen / med["uncached"],
                     "cache_speedup": med["uncached"] / med["cached"], "peak_GiB": peak_gib(device)})
    return rows


def fp4_step(device, dry: bool) -> list[dict]:
    """Bytes the quantizer must move (read bf16 X, write packed codes and E4M3 scales) per second,
    against a plain copy of X (read + write) on the same device."""
    rows_n, cols = (64, 256) if dry else (16384, 8192)
    x = torch.randn(rows_n, cols, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    impl = "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    rows = []
    for rounding, rht_dim in (("rtne", None), ("rtne", 16), ("sr", 16)):
        reset_peak(device)
        calls = {"copy": lambda: out.copy_(x),
                 "quantize": lambda r=rounding, d=rht_dim: quantize(x, fmt="e1m2", rht_dim=d, rounding=r,
                                                                    seed=1, impl=impl)}
        med = interleaved_medians(calls, device, warmup=2, repeats=1 if dry else 10)
        moved = x.numel() * (2 + 0.5 + 1 / 16)  # bf16 in, 4-bit codes + one E4M3 scale per 16 out
        copy_gbs = 2 * x.numel() * 2 / med["copy"] / 1e9
        quant_gbs = moved / med["quantize"] / 1e9
        rows.append({"shape": f"{rows_n}x{cols}", "rounding": rounding, "rht_dim": rht_dim or "-",
                     "impl": impl, "quantize_GB_s": quant_gbs, "copy_GB_s": copy_gbs,
                     "fraction_of_copy": quant_gbs / copy_gbs, "target": ">= 0.6",
                     "peak_GiB": peak_gib(device)})
    return rows


def ufp4_linear_step(device, dry: bool) -> list[dict]:
    """One forward + backward of a Linear layer: bf16 nn.Linear vs UFP4Linear (same parameters)."""
    tokens, dim = (32, 64) if dry else (8192, 4096)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    linear = torch.nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
    fp4 = FP4Linear.from_linear(linear, UFP4)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, dim, device=device, dtype=dtype)
    peaks = {}

    def step(layer):
        layer(x).backward(grad)
        x.grad = linear.weight.grad = None

    calls = {name: with_peak(lambda m=layer: step(m), device, peaks, name)
             for name, layer in (("bf16", linear), ("ufp4", fp4))}
    med = interleaved_medians(calls, device, warmup=2, repeats=1 if dry else 10)
    return [{"tokens": tokens, "in=out": dim, "bf16_ms": med["bf16"] * 1e3, "ufp4_ms": med["ufp4"] * 1e3,
             "ufp4_over_bf16": med["ufp4"] / med["bf16"], "target": "<= 1.3",
             "bf16_peak_GiB": peaks["bf16"], "ufp4_peak_GiB": peaks["ufp4"]}]


def merge(status_file: Path) -> Path:
    """gpu_check.json: each step's status line (rc, seconds, timed out, log tail) and its results."""
    steps = [json.loads(line) for line in status_file.read_text().splitlines() if line.strip()]
    for step in steps:
        result = RESULTS / f"{step['result']}.json"
        step["results"] = json.loads(result.read_text()) if step["result"] and result.exists() else None
    payload = {"machine": machine(), "dry": os.environ.get("GPU_CHECK_DRY") == "1", "steps": steps,
               "failed": [s["name"] for s in steps if s["rc"] != 0]}
    path = RESULTS / "gpu_check.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"{path}: {len(steps)} steps, failed: {payload['failed'] or 'none'}")
    return path


STEPS = {"train": train_step, "decode": decode_step, "fp4": fp4_step, "ufp4-linear": ufp4_linear_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=[*STEPS, "merge"])
    parser.add_argument("--dry", action="store_true", help="tiny sizes; CPU when no GPU")
    parser.add_argument("--status", type=Path, help="merge: the status lines gpu_check.sh wrote")
    args = parser.parse_args()
    if args.step == "merge":
        merge(args.status)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = STEPS[args.step](device, args.dry)
    name = f"gpu_check_{args.step.replace('-', '_')}"
    write_results(name, rows, notes=f"`python benchmarks/gpu_check_steps.py {args.step}"
                  f"{' --dry' if args.dry else ''}` on {device}; median of interleaved repeats.")


if __name__ == "__main__":
    main()
