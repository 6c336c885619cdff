"""One rank of the expert-parallel checks (tests/test_expert_parallel.py runs it under torchrun, gloo).

Every rank builds the same small LLaDA2-MoE (seeded), keeps a plain copy as the EP = 1 reference,
and trains a DeepSpeed engine at `--ep N` on its share of one global batch. It writes what it
measured to OUT/rank{r}.json; the test asserts on those numbers.
"""

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from llada_train.engine import build_engine, init_distributed  # noqa: E402
from llada_train.model import LLaDA2MoeConfig, LLaDA2MoeModelLM  # noqa: E402
from llada_train.stages.registry import load_stage_config  # noqa: E402

GLOBAL_BATCH, SEQ, VOCAB = 8, 24, 96


def small_model(seed: int) -> LLaDA2MoeModelLM:
    cfg = LLaDA2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          num_experts=8, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                          n_group=2, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                          pad_token_id=0, eos_token_id=0, mask_token_id=1)
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts." in name or "gate.weight" in name:
                p.normal_(0, 0.2)  # spread the routing: every expert gets tokens, choices are not near-ties
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.copy_(torch.randn(8) * 0.05)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    targets = torch.randint(2, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, targets


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def local_rows(rank: int, world: int) -> slice:
    per = GLOBAL_BATCH // world
    return slice(rank * per, (rank + 1) * per)


def engine_for(model, ep: int, zero: int, lr: float):
    cfg = load_stage_config("cpt", "cpt_tiny", [f"engine.expert_parallel={ep}", f"engine.zero_stage={zero}",
                                                f"optim.lr={lr}", "optim.warmup_steps=1", "optim.schedule=constant",
                                                "optim.grad_clip=0.0", "moe.bias_update_rate=0.01"])
    return build_engine(model, cfg, micro_batch=1)


def counted_all_to_all(counter: dict, rank: int):
    """`all_to_all_single` as it is, counting the rows this rank sends to other ranks."""
    real = torch.distributed.all_to_all_single

    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input_split_sizes is not None:
            peers = torch.distributed.get_process_group_ranks(group) if group is not None else None
            for i, n in enumerate(input_split_sizes):
                if peers is None or peers[i] != rank:
                    counter["rows_to_other_ranks"] += int(n)
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    return wrapper


def expert_tensors(engine) -> dict:
    """AutoEP layer name -> its local (E/N, ...) expert weights and the expert IDs it holds."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, layer in engine.module.named_modules():
        if layer in engine.expert_layers:
            ids = autoep_experts_for_rank(layer.expert_placement_descriptor, layer.ep_rank)
            out[name] = (ids, {w: safe_get_full_fp32_param(getattr(layer.experts, w)) for w in ("w1", "w2", "w3")})
    return out


def layers_by_prefix(engine) -> dict:
    return {name: m for name, m in engine.module.named_modules() if m in engine.expert_layers}


def check_forward_and_grads(engine, reference, rank, world) -> dict:
    """One forward/backward at EP = N against the plain model on the same rows: logits, loss, and
    every parameter's gradient (experts gathered from all EP ranks into the model's layout)."""
    from deepspeed.utils import safe_get_full_grad

    from llada_train.expert_parallel import to_model_layout

    ids, targets = batch(0)
    rows = local_rows(rank, world)
    ref_logits = reference(input_ids=ids).logits
    loss_of(ref_logits, targets).backward()
    logits = engine(input_ids=ids[rows]).logits
    loss = loss_of(logits, targets[rows])
    engine._ds.backward(loss)
    grads = to_model_layout({n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()},
                            layers_by_prefix(engine))
    worst = {}
    for name, p in reference.named_parameters():
        worst[name] = ((grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
    ref_rows = ref_logits[rows].detach()
    return {"logits_rel": ((logits - ref_rows).abs().max() / ref_rows.abs().max()).item(),
            "loss": loss.item(), "ref_loss": loss_of(ref_rows, targets[rows]).item(),
            "grad_rel": worst, "grad_names": sorted(grads)}


def train_losses(engine, rank, world, steps: int) -> list[float]:
    losses = []
    for step in range(1, steps + 1):
        ids, targets = batch(step)
        rows = local_rows(rank, world)
        loss = loss_of(engine(input_ids=ids[rows]).logits, targets[rows])
        engine.step(loss)
        engine.run_step_hooks()
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, loss.item())
        losses.append(sum(gathered) / world)  # the global batch's mean loss
    return losses


def routing_extremes(engine, reference, rank, world) -> dict:
    """Every token to experts 0 and 1 (the others get none), through EP and through the reference;
    the biases are put back afterwards."""
    from llada_train.model.moe import LLaDA2MoeSparseMoeBlock

    biases = [layer.router.e_score_correction_bias for layer in engine.expert_layers]
    biases += [m.gate.expert_bias for m in reference.modules() if isinstance(m, LLaDA2MoeSparseMoeBlock)]
    saved = [b.clone() for b in biases]
    with torch.no_grad():
        for b in biases:
            b.copy_(torch.tensor([50.0, 50.0] + [0.0] * 6))
        ids, _ = batch(99)
        rows = local_rows(rank, world)
        got, want = engine(input_ids=ids[rows]).logits, reference(input_ids=ids).logits[rows]
        for b, old in zip(biases, saved, strict=True):
            b.copy_(old)
    return {"extreme_logits_rel": ((got - want).abs().max() / want.abs().max()).item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rank, world = init_distributed()
    model = small_model(seed=0)
    reference = copy.deepcopy(model).train()
    baseline = engine_for(copy.deepcopy(model), 1, args.zero, lr=3e-3)  # EP = 1, same world and ZeRO stage
    base_losses = train_losses(baseline, rank, world, steps=5)
    base_export = baseline.full_state_dict()

    counter = {"rows_to_other_ranks": 0}
    torch.distributed.all_to_all_single = counted_all_to_all(counter, rank)
    engine = engine_for(model, args.ep, args.zero, lr=3e-3)
    held = expert_tensors(engine)
    ref_experts = {n: p.detach() for n, p in reference.named_parameters() if ".experts." in n}
    holds_right_experts = all(
        torch.equal(tensors[w], ref_experts[f"{name}.experts.{proj}"][ids])
        for name, (ids, tensors) in held.items() for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"),
                                                                 ("w2", "down_proj")))
    result = {"rank": rank, "world": world, "ep_rank": engine.expert_layers[0].ep_rank,
              "held_experts": {n: ids for n, (ids, _) in held.items()},
              "holds_right_experts": holds_right_experts, **check_forward_and_grads(engine, reference, rank, world)}
    result.update(routing_extremes(engine, reference, rank, world))
    reference.zero_grad(set_to_none=True)
    engine = engine_for(copy.deepcopy(reference), args.ep, args.zero, lr=3e-3)  # fresh: no gradient left over
    start_biases = [layer.router.e_score_correction_bias.clone() for layer in engine.expert_layers]
    result["losses"] = train_losses(engine, rank, world, steps=5)
    result["base_losses"] = base_losses
    result["rows_to_other_ranks"] = counter["rows_to_other_ranks"]
    biases = [layer.router.e_score_correction_bias.clone() for layer in engine.expert_layers]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, [b.tolist() for b in biases])
    result["bias_same_on_all_ranks"] = all(g == gathered[0] for g in gathered)
    result["bias_moved"] = any(not torch.equal(b, s) for b, s in zip(biases, start_biases, strict=True))
    export = engine.full_state_dict()
    result["export_keys_equal"] = sorted(export) == sorted(base_export)
    result["export_rel"] = max(((export[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                               for k, v in base_export.items() if v.is_floating_point() and k in export)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
