"""One rank of the plan checks (tests/test_plan.py runs it under torchrun, gloo): the real trainer on a small
LLaDA2-MoE for three optimizer steps, every torch.distributed collective counted with
`plan.count_collectives`, and the bytes the DeepSpeed engine holds for the model read from its tensors.
Writes OUT/rank{r}.json; the test compares it with `llada-train plan`'s prediction for the same config.
"""

import argparse
import gc
import json
import os
from pathlib import Path

import torch

STEPS = 3
WORLD = 2


def overrides(zero: int, ep: int, checkpointing: bool, mtf: float) -> list[str]:
    """The cpt_tiny overrides of the checked run: hidden 128, one dense and one MoE layer of 8 experts
    (top-2), 64-token rows in 16-token blocks (the [x_t ; x_0] layout), complementary masking,
    4 sequences per rank as 2 micro-batches, bf16."""
    model = {"hidden_size": 128, "num_hidden_layers": 2, "moe_intermediate_size": 128, "intermediate_size": 256,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
             "num_experts_per_tok": 2}
    return [*(f"model.overrides.{k}={v}" for k, v in model.items()),
            f"model.gradient_checkpointing={checkpointing}", "data.seq_len=64", "diffusion.block_size=16",
            "diffusion.block_schedule=[]", "diffusion.noise.complementary=true", f"diffusion.mtf.prob={mtf}",
            "train.batch_size=8", "train.grad_accum=2", f"engine.zero_stage={zero}", f"engine.expert_parallel={ep}",
            "engine.precision=bf16"]


def held_bytes(engine, zero: int) -> dict:
    """What the engine holds for the model on this rank, read from DeepSpeed's own tensors."""
    def size(t):
        return 0 if t is None else t.numel() * t.element_size()

    ds = engine._ds
    opt = ds.optimizer
    module_params = list(ds.module.parameters())
    if zero == 3:
        params = sum(size(p.ds_tensor) + (size(p.data) if p.ds_persist else 0) for p in module_params)
        master = opt.fp32_partitioned_groups_flat
        grads = size(opt.grad_partitions_flat_buffer)
        buckets = sum(size(b.buffer) for b in opt.ipg_buckets.values())
    else:
        params = sum(size(p) for p in module_params)
        master = opt.single_partition_of_fp32_groups
        grads = None  # ZeRO-1/2 keep them in per-group buffers that live only through the backward and step
        buckets = sum(size(t) for b in opt.ipg_buckets.values() for t in b.buffer)
    moments = sum(size(v) for state in opt.optimizer.state.values() for k, v in state.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    return {"params": params, "master": sum(size(t) for t in master), "moments": moments, "grads": grads,
            "grad_bucket": buckets, "step_grads": sum(size(t.grad) for t in master)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--mtf", type=float, default=0.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)

    from llada_train.data.text import BatchIterator
    from llada_train.engine import init_distributed
    from llada_train.plan import _Recorder, _storage, count_collectives
    from llada_train.stages.common import build_model, build_tokenizer, diffusion_loss_fn
    from llada_train.stages.registry import load_stage_config
    from llada_train.trainer import BatchSource, Trainer

    rank, world = init_distributed()
    cfg = load_stage_config("cpt", "cpt_tiny", [*overrides(args.zero, args.ep, args.checkpointing, args.mtf),
                                                f"run.out_dir={args.out}/run", "run.resume=never",
                                                "run.loggers=[jsonl]"])
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.run.seed)
    ids = torch.randint(5, len(tokenizer), (64, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    docs = torch.zeros_like(ids, dtype=torch.int32)
    rows = BatchIterator(len(ids), cfg.train.batch_size, seed=0, rank=rank, world_size=world)
    trainer = Trainer(cfg, "cpt", model, tokenizer, BatchSource({"input_ids": ids, "doc_ids": docs,
                                                                  "maskable": docs >= 0}, rows),
                      diffusion_loss_fn(cfg, model, tokenizer), rank=rank, world_size=world)
    trainer.setup()
    # what the engine holds after a backward, inside the optimizer step (the AdamW under DeepSpeed's
    # wrappers: its step sees the fp32 gradient of one parameter group at a time) and after the step
    held = {"backward": {}, "step": {}, "after": {}}
    inner, ds = trainer.engine._optimizer, trainer.engine._ds

    grads_alive = []  # per AdamW step of one group (ZeRO-1/2): bytes of gradient storage still referenced

    def step(closure=None, real=inner.step):
        now = held_bytes(trainer.engine, args.zero)
        held["step"] = {k: v if v is None else max(v, held["step"].get(k, 0)) for k, v in now.items()}
        if args.zero < 3:
            views = [t for grads in ds.optimizer.averaged_gradients.values() for t in grads or []]
            views += [p.grad for p in ds.module.parameters() if p.grad is not None]
            grads_alive.append(sum(dict(_storage(t) for t in views).values()))
        return real(closure)

    def backward(*a, real=ds.backward, **kw):
        out = real(*a, **kw)
        held["backward"] = held_bytes(trainer.engine, args.zero)
        return out

    inner.step, ds.backward = step, backward
    step_new_bytes = []  # per optimizer step: the most bytes alive in tensors the step made

    def zero_step(*a, real=ds.optimizer.step, **kw):
        existing = {_storage(t)[0] for t in gc.get_objects() if isinstance(t, torch.Tensor)}
        with _Recorder(existing) as recorder:
            out = real(*a, **kw)
        step_new_bytes.append(recorder.peak)
        return out

    ds.optimizer.step = zero_step
    with count_collectives() as counts:
        for _ in range(STEPS):
            trainer.train_step()
    held["after"] = held_bytes(trainer.engine, args.zero)
    result = {"collectives": {f"{kind}/{n}": [c.calls, c.payload, c.sent] for (kind, n), c in counts.items()},
              "held": held, "step_new_bytes": step_new_bytes,
              "grads_alive": grads_alive}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
