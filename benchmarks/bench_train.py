"""CPT step throughput: tokens/s, model FLOPs utilisation, and where the step time goes.

One step = the trainer's objective (`diffusion.training_loss`: noising, one forward over [x_t ; x_0],
backward) + AdamW, sdpa backend, fp32. FLOPs are counted by `torch.utils.flop_counter` on a real
step (so the doubled 2L sequence and the dense-mask attention are counted as executed), and MFU is
that over the measured fp32 matmul peak of this CPU at the same thread count. Time shares come
from module hooks (forward and backward of every attention and MoE block) on separate steps, so
the headline step time is measured without hooks.

Run: python benchmarks/bench_train.py [--quick]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_call, write_results
from llada_train.config import DiffusionConfig
from llada_train.diffusion import ordinary_token_ids, training_loss
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from llada_train.model.attention import LLaDA2MoeAttention
from llada_train.model.moe import LLaDA2MoeSparseMoeBlock

REPO = Path(__file__).resolve().parents[1]
MID = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "pad_token_id": 0,
    "eos_token_id": 0,
    "mask_token_id": 1,
}


def matmul_peak_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / time_call(lambda: a @ b, warmup=3, repeats=10)


class SectionTimer:
    """Wall time inside forward and backward of the hooked modules, per category."""

    def __init__(self, model):
        self.total = {"attention": 0.0, "moe": 0.0}
        self.handles = []
        for module in model.modules():
            kind = (
                "attention"
                if isinstance(module, LLaDA2MoeAttention)
                else "moe"
                if isinstance(module, LLaDA2MoeSparseMoeBlock)
                else None
            )
            if kind is None:
                continue
            start = {}
            def begin(*_, s=start):
                return s.__setitem__("t", time.perf_counter())
            def end(*_, s=start, k=kind):
                return self._add(k, s)
            self.handles += [
                module.register_forward_pre_hook(begin),
                module.register_forward_hook(end),
                module.register_full_backward_pre_hook(begin),
                module.register_full_backward_hook(end),
            ]

    def _add(self, kind, start):
        self.total[kind] += time.perf_counter() - start["t"]

    def remove(self):
        for h in self.handles:
            h.remove()


def bench(name: str, values: dict, batch: int, seq_len: int, block: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**{**values, "attn_backend": "sdpa"})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = DiffusionConfig(block_size=block)
    cfg.t2t.max_ratio = 0.1
    vocab_ids = ordinary_token_ids(values["vocab_size"], [0, 1, 2, 3, 4])
    x0 = torch.randint(5, values["vocab_size"], (batch, seq_len))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    doc_ids = torch.zeros_like(x0)
    gen = torch.Generator().manual_seed(0)

    def forward_backward():
        loss, _ = training_loss(
            model,
            x0,
            maskable,
            doc_ids,
            doc_ids >= 0,
            cfg,
            step=0,
            mask_id=1,
            vocab_ids=vocab_ids,
            generator=gen,
        )
        loss.backward()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        forward_backward()
        optimizer_step()

    step_time = time_call(step, warmup=1, repeats=steps)
    forward_backward()
    opt_time = time_call(opt.step, warmup=0, repeats=steps)  # AdamW on real gradients
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    timer = SectionTimer(model)
    hooked = time_call(forward_backward, warmup=0, repeats=steps)
    timer.remove()
    share = {k: v / steps / hooked for k, v in timer.total.items()}
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = sum(p.numel() for p in model.parameters()) - routed * (
        1 - values["num_experts_per_tok"] / values["num_experts"]
    )
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "active_M": active / 1e6,
        "batch x seq": f"{batch}x{seq_len}",
        "block": block,
        "step_s": step_time,
        "tokens_per_s": batch * seq_len / step_time,
        "GFLOP_per_step": flops / 1e9,
        "achieved_GFLOPs": flops / step_time / 1e9,
        "attention_share": share["attention"] * (1 - opt_time / step_time),
        "moe_share": share["moe"] * (1 - opt_time / step_time),
        "optimizer_share": opt_time / step_time,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller mid batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    tiny = yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())
    steps = 2 if args.quick else 4
    peak = matmul_peak_flops()
    rows = [
        bench("tiny", tiny, 16, 128, 32, steps),
        bench("mid", MID, 4 if args.quick else 8, 256, 32, steps),
    ]
    for row in rows:
        row["MFU"] = row["achieved_GFLOPs"] * 1e9 / peak
    notes = (
        f"`python benchmarks/bench_train.py --threads {args.threads}`. Measured fp32 matmul peak "
        f"(1024^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s. tokens/s counts input tokens (L per row); "
        "the objective runs the model over 2L (noisy + clean copy), and FLOPs count that real work. Shares "
        "are of the whole step (forward + backward + AdamW); the rest is embeddings, norms, lm_head, loss "
        "and noising."
    )
    write_results("bench_train", rows, notes)


if __name__ == "__main__":
    main()
