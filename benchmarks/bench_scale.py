"""Scale-out on this CPU, measured: host memory of loading a released-layout checkpoint at world 2 (expert
parallelism 2 at ZeRO-2, and ZeRO-3) against world 1; bytes at every collective of three real training
steps against `llada-train plan`; the plan's per-rank memory against the measured peak; EP = 2 step time
against ZeRO-3 step time at the same shapes.

The model is LLaDA2.0-mini at its real width (hidden 2048, 256 experts of 512, top-8, 16 heads) cut to
one dense and one MoE layer, vocabulary 4096: 0.88B parameters, a 1.75 GB bf16 checkpoint in the released
per-expert layout (written once under .cache/bench_scale). The training runs halve the experts' width
(256; 0.48B parameters): at 512 a ZeRO-3 rank's optimizer step needs more than 12 GB, more than two
ranks get on this 24 GB machine. Every rank runs one thread; the runs are interleaved (repeats
alternate layouts) and step times are medians.

    python benchmarks/bench_scale.py [--repeats 2] [--steps 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("scale_worker.py")
MINI_WIDTH = {"hidden_size": 2048, "intermediate_size": 5120, "moe_intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 256,
              "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1}
GB = 1e9


def checkpoint(cache: Path, expert_width: int = 512) -> Path:
    """The bf16 released-layout checkpoint, written once (several safetensors shards and an index)."""
    path = cache / f"mini_width_2_layers_experts_{expert_width}"
    if (path / "model.safetensors.index.json").exists():
        return path
    from llada_train.config import model_preset_values
    from llada_train.data.tokenizer import load_tokenizer
    from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM

    torch.manual_seed(0)
    values = {**model_preset_values("tiny"), **MINI_WIDTH, "moe_intermediate_size": expert_width}
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**values)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    load_tokenizer().save_pretrained(path)
    return path


def run_ranks(mode: str, world: int, zero: int, ep: int, ckpt: Path, steps: int) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench_scale_{mode}_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(_free_port()), str(WORKER), "--mode", mode, "--ckpt", str(ckpt), "--zero", str(zero), "--ep", str(ep),
           "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_rows(ckpt: Path) -> list[dict]:
    """Peak resident set per rank (the most loaded rank) through load + engine init, world 2 against 1."""
    rows = []
    for zero, ep, name in ((2, 2, "EP 2, ZeRO-2"), (3, 1, "ZeRO-3")):
        alone = run_ranks("load", 1, zero, 1, ckpt, 0)[0]
        ranks = run_ranks("load", 2, zero, ep, ckpt, 0)
        worst = max(ranks, key=lambda r: r["engine"]["peak"])
        rows.append({"what": f"load + engine init, {name}", "world 1 peak RSS (GB)": alone["engine"]["peak"] / GB,
                     "world 2 peak RSS per rank (GB)": worst["engine"]["peak"] / GB,
                     "ratio": worst["engine"]["peak"] / alone["engine"]["peak"],
                     "world 1 load share (GB)": (alone["engine"]["peak"] - alone["before"]["rss"]) / GB,
                     "world 2 load share (GB)": (worst["engine"]["peak"] - worst["before"]["rss"]) / GB})
    return rows


def planned(ckpt: Path, zero: int, ep: int):
    """`llada-train plan`'s layout, inventory, CPU-attention activations and plan (AdamW as it runs on CPU) for
    the benchmark's run."""
    from benchmarks.scale_worker import overrides
    from llada_train import plan
    from llada_train.stages.registry import load_stage_config

    cfg = load_stage_config("cpt", "cpt_tiny", overrides(ckpt, zero, ep, Path(tempfile.gettempdir())))
    lay, mcfg = plan.layout_of(cfg, 1, 2), plan.model_config(cfg)
    act = plan.trace_activations(mcfg, lay, attention="as_run")
    return lay, plan.inventory(mcfg), act, plan.make_plan(cfg, 1, 2, act=act, adam="single_tensor")


TRAIN_LAYOUTS = {"EP 2, ZeRO-2": (2, 2), "ZeRO-3": (3, 1)}


def train_rows(ckpt: Path, repeats: int, steps: int, names=tuple(TRAIN_LAYOUTS)) -> list[dict]:
    """Bytes, memory and step time of the real trainer, EP 2 (ZeRO-2) and ZeRO-3 runs alternating."""
    from llada_train import plan

    layouts = {name: TRAIN_LAYOUTS[name] for name in names}
    runs = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, (zero, ep) in layouts.items():
            runs[name].append(run_ranks("train", 2, zero, ep, ckpt, steps))
    rows = []
    for name, (zero, ep) in layouts.items():
        lay, inv, act, p = planned(ckpt, zero, ep)
        predicted = sum(c.payload for c in plan.communication(inv, lay, act, steps=3)[0])
        first = runs[name][0]
        counted = statistics.mean(sum(v[1] for v in r["collectives"].values()) for r in first)
        measured = max(r["steps"]["peak"] - r["before"]["rss"] for r in first)
        in_use = max(r["heap_steps_peak"]["in_use"] - r["heap_before"]["in_use"] for r in first)
        held = max(r["heap_steps_peak"]["held"] - r["heap_before"]["held"] for r in first)
        phases = {k: max(r["heap_in_use_by_phase"].get(k, 0) - r["heap_before"]["in_use"] for r in first) / GB
                  for k in ("forward", "backward", "step")}
        times = [t for run in runs[name] for t in run[0]["step_seconds"][1:]]  # the first step warms up
        rows.append({"layout": name, "plan bytes, 3 steps (GB)": predicted / GB, "counted bytes (GB)": counted / GB,
                     "bytes ratio": counted / predicted, "plan memory per rank (GB)": p.total / GB,
                     "measured peak per rank (GB)": measured / GB, "memory ratio": measured / p.total,
                     "malloc in use, peak (GB)": in_use / GB, "malloc held, peak (GB)": held / GB,
                     "in use by phase, fwd / bwd / step (GB)": " / ".join(f"{v:.2f}" for v in phases.values()),
                     "step time (s, median)": statistics.median(times), "steps timed": len(times)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train-expert-width", type=int, default=256,
                    help="moe_intermediate_size of the training runs (mini's 512 needs > 12 GB per ZeRO-3 rank)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench_scale")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--layouts", nargs="+", choices=list(TRAIN_LAYOUTS), default=list(TRAIN_LAYOUTS),
                    help="training layouts to run (default: both)")
    ap.add_argument("--train-results", default="bench_scale_train",
                    help="results name of the training table (benchmarks/results/<name>.md/.json)")
    args = ap.parse_args()
    if not args.skip_load:
        write_results("bench_scale_load", load_rows(checkpoint(args.cache)), notes=(
            "Peak resident set (VmHWM) of the most loaded rank from start through model load and DeepSpeed "
            "engine init, a 1.75 GB bf16 released-layout checkpoint (LLaDA2.0-mini width, 2 layers); 'load "
            "share' subtracts the resident set before the model is built (Python, torch, DeepSpeed). "
            "Goal: ratio <= 0.6."))
    train = train_rows(checkpoint(args.cache, args.train_expert_width), args.repeats, args.steps, args.layouts)
    glibc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    write_results(args.train_results, train, notes=(
        (f"glibc settings {glibc}. " if glibc else "") +
        f"2 gloo ranks, one thread each, mini's width with experts of {args.train_expert_width} (mini: 512, "
        "whose ZeRO-3 optimizer step needs more than 12 GB per rank, more than two ranks have on this 24 GB "
        "machine): collective payload bytes of the first 3 steps (mean over ranks) against "
        "plan.communication(steps=3); the peak resident set of the training steps minus the resident set "
        "before the model was built against the plan's per-rank total, and glibc's own peaks over the same "
        "steps (mallinfo2 sampled every 5 ms): bytes in malloc'd blocks in use, and held from the OS; step "
        "time median over steps "
        f"2-{args.steps} of {args.repeats} interleaved runs per layout."))


if __name__ == "__main__":
    main()
