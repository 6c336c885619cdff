"""EBPO learner: one process vs torchrun data parallelism over 2 ranks, whole RL steps (rollout,
rewards, θ_old scoring, updates) through `llada-train rl`, same global batch.

Both runs use configs/rl_tiny.yaml on the tiny model from random weights with the same global
batch (prompts x G), minibatch and steps; each rank runs one torch thread. Seconds per step come
from the runs' own metrics.jsonl (`elapsed_s` between the first and the last logged step, so
process start, the first step and the step-0 evaluation are left out).

Run: OMP_NUM_THREADS=1 python benchmarks/bench_rl_dp.py [--steps 6] [--prompts 16]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, run_dir: Path, args) -> list[dict]:
    overrides = [f"run.out_dir={run_dir}", "model.init_from=", f"train.steps={args.steps}",
                 f"train.batch_size={args.prompts}", f"rl.minibatch_size={args.prompts * 8 // 2}",
                 "train.log_every=1", "train.eval_every=100000", "train.save_every=100000", "rl.ray.enabled=false"]
    cli = ["-m", "llada_train.cli", "rl", "--config", "rl_tiny", *overrides]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), *cli] if ranks > 1 else [sys.executable, *cli])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16, help="global batch of prompts (G = 8 each)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            steps = [r for r in run(ranks, Path(tmp) / f"r{ranks}", args) if "loss" in r]
            first, last = steps[0], steps[-1]
            seconds = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
            rows.append({"learner": "one process" if ranks == 1 else f"torchrun x{ranks}", "ranks": ranks,
                         "steps_timed": last["step"] - first["step"], "seconds_per_step": seconds,
                         "sequences_per_s": args.prompts * 8 / seconds})
    base = rows[0]["seconds_per_step"]
    for r in rows:
        r["speedup"] = base / r["seconds_per_step"]
    notes = (f"`OMP_NUM_THREADS=1 python benchmarks/bench_rl_dp.py --steps {args.steps} --prompts {args.prompts}`: "
             f"{args.prompts} prompts x G=8 per step over all ranks, minibatch {args.prompts * 4} sequences, "
             "configs/rl_tiny.yaml, tiny model from random weights, rollouts in-process in each rank. "
             f"{os.cpu_count()} cores; the two runs follow each other, so each has the machine to itself.")
    write_results("bench_rl_dp", rows, notes)


if __name__ == "__main__":
    main()
