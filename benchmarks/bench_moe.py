"""Grouped MoE dispatch vs the naive per-expert loop (forward + backward), tokens/s.

The naive loop is the dispatch most HF MoE ports ship: for every expert, find its tokens with
`torch.where`, run the expert MLP on them, and `index_add_` the weighted result back.
Run: python benchmarks/bench_moe.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_call, write_results
from llada_train.model import LLaDA2MoeConfig
from llada_train.model.moe import LLaDA2MoeExperts


def naive_experts(experts: LLaDA2MoeExperts, x, idx, weights):
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        xe = x[token]
        h = F.silu(xe @ experts.gate_proj[e].t()) * (xe @ experts.up_proj[e].t())
        out.index_add_(0, token, (h @ experts.down_proj[e].t()) * weights[token, slot, None])
    return out


def bench(name, hidden, inter, experts, top_k, tokens):
    cfg = LLaDA2MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                          num_experts_per_tok=top_k, n_group=1, topk_group=1, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4, vocab_size=16)
    torch.manual_seed(0)
    mod = LLaDA2MoeExperts(cfg)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, hidden, requires_grad=True)
    idx = torch.rand(tokens, experts).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k)

    def step(fn):
        def run():
            fn(mod, x, idx, weights).square().mean().backward()
        return run

    grouped = time_call(step(lambda m, *a: m(*a)))
    naive = time_call(step(naive_experts))
    with torch.no_grad():
        err = (mod(x, idx, weights) - naive_experts(mod, x, idx, weights)).abs().max().item()
    return {"config": name, "hidden": hidden, "experts": f"{experts} top-{top_k}", "tokens": tokens,
            "grouped_tok_s": tokens / grouped, "naive_tok_s": tokens / naive, "speedup": naive / grouped,
            "max_abs_diff": err}


def main():
    rows = [
        bench("tiny", 128, 96, 8, 2, 4096),
        bench("mid", 512, 256, 16, 4, 4096),
        bench("mid-64e", 512, 256, 64, 4, 4096),
    ]
    write_results("bench_moe", rows, notes="Forward + backward of the routed experts; target >= 3x at 'mid'.")


if __name__ == "__main__":
    main()
