"""Expert parallelism (`engine.expert_parallel: N`) through DeepSpeed's AutoEP, with LLaDA2's router kept exact.

AutoEP (deepspeed/module_inject/auto_ep*.py) replaces each MoE block inside `deepspeed.initialize`
by a layer that holds E/N experts per rank, sends tokens to their experts' ranks and back with
`all_to_all_single` (uneven splits, forward and backward; gloo does it on CPU), runs grouped GEMMs
over the local experts, keeps the router and shared experts data-parallel, and reduces expert
gradients over the expert-data-parallel group only. What it does not do the LLaDA2 way is fixed
here rather than re-implemented:

- its router computes the gate logits in the activations' dtype (bf16) and reads a selection bias
  only under DeepSeek-V3's name: `LLaDA2Router` computes in fp32 with `moe.group_limited_topk`, the
  same function the model's own gate calls, so expert choice and weights are those of EP = 1;
- its token counts are never reduced or reset: `update_expert_bias` sums them over all ranks and
  moves every replica's bias the same way (the model's aux-loss-free balancing, docs/design.md §2);
- its parameter names differ (`router.gate.weight`, `experts.w1/w3/w2` with E/N experts):
  `full_state_dict` gathers the experts of all EP ranks back into the model's fused layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .model.moe import LLaDA2MoeSparseMoeBlock, balance_expert_bias, group_limited_topk

# AutoEP's names for the fused expert weights, and the model's
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_AUTOEP_KEY = re.compile(
    r"^(.*\.mlp)\.(router\.gate\.weight|router\.e_score_correction_bias|experts\.w[123]|tokens_per_expert)$")


def autoep_config(ep_size: int) -> dict:
    """The DeepSpeed config's `expert_parallel` block for this model's module layout."""
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_proj",
        "expert_w3": "up_proj",
        "expert_w2": "down_proj",
        "num_experts_attr": "num_experts",
        "top_k_attr": "num_experts_per_tok",
        "score_func": "sigmoid",
        "has_shared_experts": True,
        "shared_experts_pattern": "shared_experts",
    }


def prepare_for_autoep(model: nn.Module) -> None:
    """Before `deepspeed.initialize`: expose each gate's selection bias under the name AutoEP carries
    over (the same tensor, not a copy)."""
    for module in model.modules():
        if isinstance(module, LLaDA2MoeSparseMoeBlock):
            module.gate.register_buffer("e_score_correction_bias", module.gate.expert_bias)


class _Fp32Linear(nn.Linear):
    """The router's gate projection in fp32 whatever the activations' dtype, as `LLaDA2MoeGate` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.weight.to(dtype))


def _llada2_route(router, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
    """`LLaDA2MoeGate.forward` in AutoEP's router contract: x (T, H) -> weights (T, k), experts (T, k),
    tokens per expert (E,). The gate module is called (not its weight read), so ZeRO-3 gathers it."""
    from deepspeed.moe.ep_count import count_tokens_per_expert

    scores = torch.sigmoid(router.gate(x))  # (T, E) fp32
    biased = scores + router.e_score_correction_bias.to(scores.dtype)
    idx = group_limited_topk(biased, router.num_expert_groups, router.num_limited_groups, router.top_k)
    weights = scores.gather(1, idx)
    if router.route_norm and router.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * router.route_scale, idx, count_tokens_per_expert(idx, router.num_experts)


def adopt_router(router) -> None:
    """An AutoEP `TokenChoiceTopKRouter` routes as `LLaDA2MoeGate` (class swap in place)."""
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    class LLaDA2Router(TokenChoiceTopKRouter):
        forward = _llada2_route

    router.__class__ = LLaDA2Router
    router.gate.__class__ = _Fp32Linear


def adopt_autoep_layers(model: nn.Module) -> list:
    """After `deepspeed.initialize`: every AutoEP layer routes as LLaDA2's gate does. The router's
    classes are swapped in place, so the ZeRO-3 hooks registered on them stay."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    for layer in layers:
        assert layer.router.e_score_correction_bias is not None, "prepare_for_autoep was not called"
        adopt_router(layer.router)
        layer.register_forward_pre_hook(_save_counts_outside_training)
        layer.register_forward_hook(_restore_counts_outside_training)
    return layers


def _save_counts_outside_training(layer, _args):
    """AutoEP counts every forward's tokens; the bias update counts training forwards only, as the
    model's own MoE block does, so evaluation and decoding leave the counts as they were."""
    layer._counts_before = None if layer.training else layer.tokens_per_expert.clone()


def _restore_counts_outside_training(layer, _args, _output):
    if layer._counts_before is not None:
        layer.tokens_per_expert.copy_(layer._counts_before)


def update_expert_bias(layers: list, rate: float) -> None:
    """After an optimizer step: the model's balancing step on each AutoEP layer's token counts
    (AutoEP itself never reduces or resets them)."""
    for layer in layers:
        balance_expert_bias(layer.router.e_score_correction_bias, layer.tokens_per_expert, rate)


def to_model_layout(state: dict, layers_by_prefix: dict | None) -> dict:
    """AutoEP names -> the model's (`mlp.gate.weight`, `mlp.gate.expert_bias`, fused
    `mlp.experts.{gate,up,down}_proj`); each expert tensor gathered over its layer's EP group
    (`layers_by_prefix` None: the expert tensors hold every expert already, as read from a checkpoint)."""
    out = {}
    for key, value in state.items():
        match = _AUTOEP_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, name = match.groups()
        if name == "tokens_per_expert":
            continue
        if name == "router.gate.weight":
            out[f"{prefix}.gate.weight"] = value
        elif name == "router.e_score_correction_bias":
            out[f"{prefix}.gate.expert_bias"] = value
        else:
            fused = f"{prefix}.experts.{_EXPERT_NAMES[name.split('.')[1]]}"
            out[fused] = value if layers_by_prefix is None else _gather_experts(value, layers_by_prefix[prefix])
    return out


_EXPERT_FILE = "layer_*_expert_*_mp_rank_00_model_states.pt"  # DeepSpeed's one file per (MoE layer, expert)


def saved_state_dict(engine_dir: Path) -> dict:
    """Full model weights of a checkpoint written under expert parallelism at ZeRO 1 or 2: the
    non-expert weights from `mp_rank_00_model_states.pt`, every expert from its own file
    (`...experts.w1.<global id>`), stacked in expert order and renamed to the model's layout."""
    module = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    if any(v.numel() == 0 for v in module.values()):
        raise UserError(f"{engine_dir.parent} was written under engine.expert_parallel with ZeRO-3 (its weights are "
                        "partitioned over the ranks); reading it back outside the run is not built. Resume the run "
                        "(same ranks and expert_parallel) to its end, which writes hf/")
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for path in sorted(engine_dir.glob(_EXPERT_FILE)):
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            name, expert = key.rsplit(".", 1)  # model.layers.2.mlp.experts.w1, 5
            experts.setdefault(name, {})[int(expert)] = value
    for name, parts in experts.items():
        assert sorted(parts) == list(range(len(parts))), f"{name}: experts {sorted(parts)} in the checkpoint"
        module[name] = torch.stack([parts[e] for e in range(len(parts))])  # (E, out, in)
    return to_model_layout(module, None)


def _gather_experts(local: torch.Tensor, layer) -> torch.Tensor:
    """(E/N, out, in) on each EP rank -> (E, out, in) in global expert order (AutoEP's placement
    descriptor says which experts each rank holds, in its local order)."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    if layer.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=layer.ep_group)
    full = torch.empty((layer.num_experts, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        full[autoep_experts_for_rank(layer.expert_placement_descriptor, rank)] = part
    return full
