"""EBPO rollouts: response tokens per second, in-process vs 1 vs 2 Ray RolloutWorker actors.

Same prompts, same chunks (`prompts_per_chunk` prompts × G rows per decode call), same seeds: every
configuration produces identical rollouts (checked here), so only the wall time differs. Each actor
runs one torch thread; the in-process row uses the driver's threads. The actors are started and
given the weights before timing; a weight publication (`ray.put` + load) per step is included.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_rl.py [--quick]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_call, write_results
from llada_train.config import model_preset_values
from llada_train.data.tasks import make_rows
from llada_train.data.tokenizer import load_tokenizer
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from llada_train.rl.config import RayConfig
from llada_train.rl.rollout import LocalRollouts, RayRollouts, rollout_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--gen-length", type=int, default=32)
    args = parser.parse_args()
    import ray

    prompts_n = 8 if args.quick else args.prompts
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**model_preset_values("tiny"))).eval()
    tokenizer = load_tokenizer(None)
    prompts = [r["prompt"] for r in make_rows(["sorting", "reversal"], prompts_n, split="train", seed=0, kind="rl")]
    decode = {"mode": "S", "gen_length": args.gen_length, "block_length": 8, "temperature": 1.0,
              "editing_threshold": 0.9}

    def step(executor):
        executor.publish(model)
        return rollout_step(executor, tokenizer, prompts, group_size=args.group_size, prompts_per_chunk=2, seed=0,
                            step=0, eos_token_id=model.config.eos_token_id, block_length=8)

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    rows, reference = [], None
    try:
        for name, workers in (("in-process", 0), ("ray x1", 1), ("ray x2", 2)):
            executor = (LocalRollouts(model, decode) if workers == 0 else
                        RayRollouts(RayConfig(enabled=True, num_workers=workers), model.config, decode))
            try:
                out = step(executor)  # warm-up: actor start, weight load
                reference = reference or out
                same = torch.equal(out.input_ids, reference.input_ids) and out.completions == reference.completions
                seconds = time_call(lambda executor=executor: step(executor), warmup=0, repeats=repeats)
            finally:
                executor.close()
            tokens = int(out.lengths.sum())
            rows.append({"executor": name, "rows": len(out.lengths), "response_tokens": tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "tokens_per_forward": out.tokens_per_forward, "same_rollouts": same})
    finally:
        ray.shutdown()
    base = next(r for r in rows if r["executor"] == "ray x1")["tokens_per_s"]
    for r in rows:
        r["speedup_vs_ray_x1"] = r["tokens_per_s"] / base
    notes = (f"{prompts_n} prompts x G={args.group_size}, gen_length {args.gen_length}, block 8, S mode with "
             "temperature 1, 2 prompts per chunk; tiny model (configs/model/tiny.yaml), random weights; median of "
             f"{repeats} rollout steps (each with a weight publication). Load average during the run: "
             f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; actors compete with "
             "every other process for them, so the 2-worker speed-up is bounded by the idle cores.")
    write_results("bench_rl", rows, notes)


if __name__ == "__main__":
    main()
