"""Mixture of Experts: sigmoid group-limited router with expert bias, fused experts, grouped dispatch."""

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_ROUTING = threading.local()  # .balanced: set only inside `balanced_routing()`


@contextmanager
def balanced_routing():
    """Inside: every expert counts T*k/E tokens (remainder to the first experts) instead of the
    tokens routed to it. Only the memory planner (`llada_train/plan.py`) enters this: its FakeTensor
    trace has shapes but no values, and the real counts (a bincount, data-dependent) cannot run
    there. Saved activations depend on the total T*k only, which is the same either way."""
    before = getattr(_ROUTING, "balanced", False)
    _ROUTING.balanced = True
    try:
        yield
    finally:
        _ROUTING.balanced = before


def expert_counts(flat_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert (E,) int64 of the flat (T*k,) expert indices; balanced under `balanced_routing`."""
    if not getattr(_ROUTING, "balanced", False):
        return torch.bincount(flat_expert, minlength=num_experts)
    base, extra = divmod(flat_expert.numel(), num_experts)
    return torch.tensor([base + (e < extra) for e in range(num_experts)], dtype=torch.long,
                        device=flat_expert.device)


def group_limited_topk(scores: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Indices (T, top_k) of the chosen experts: keep the `topk_group` groups whose top-2 scores sum
    highest, then the top-k experts inside them."""
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, n_group, num_experts // n_group)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (T, G)
    keep_groups = group_scores.topk(topk_group, dim=-1).indices  # (T, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
    masked = scores.masked_fill(~expert_mask, float("-inf"))
    return masked.topk(top_k, dim=-1).indices


class LLaDA2MoeGate(nn.Module):
    """Router. `expert_bias` shifts selection only (aux-loss-free balancing); weights use raw scores."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor):
        """x: (T, H) -> expert indices (T, k), weights (T, k), router logits (T, E), both fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # router in fp32 (or fp64 in tests)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (T, E)
        scores = torch.sigmoid(logits)
        idx = group_limited_topk(scores + self.expert_bias.to(dtype), self.n_group, self.topk_group, self.top_k)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * self.routed_scaling_factor, logits


class _GroupedLinear(torch.autograd.Function):
    """y_g = x_g @ w_gᵀ for contiguous token groups, with `torch._grouped_mm` in all three GEMMs
    (its built-in backward fails on CPU for empty groups, so the backward is written out here)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offsets) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _loop_grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fallback: one GEMM per expert over its contiguous token slice (a loop over experts, not tokens)."""
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w[e].t() for e, chunk in enumerate(chunks)], dim=0)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x: (T, in) sorted by expert, w: (E, out, in), counts: (E,) -> (T, out)."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (w.shape[1], w.shape[2]))  # _grouped_mm strides
    if hasattr(torch, "_grouped_mm") and aligned and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == w.dtype:
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _GroupedLinear.apply(x.contiguous(), w, offsets)
    return _loop_grouped_linear(x, w, counts)


class LLaDA2MoeExperts(nn.Module):
    """All routed experts as three fused (E, out, in) weights; per-expert names exist only on disk."""

    def __init__(self, config):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.matmul = grouped_linear  # swapped by kernels.ufp4_linear.apply_fp4

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H), expert_idx/expert_weights: (T, k) -> (T, H)."""
        _num_tokens, top_k = expert_idx.shape
        flat_expert = expert_idx.reshape(-1)  # (T*k,)
        order = flat_expert.argsort(stable=True)
        token_of = order // top_k  # (T*k,) source token of each sorted slot
        counts = expert_counts(flat_expert, self.num_experts)
        xs = x[token_of]  # (T*k, H) grouped by expert
        hidden = F.silu(self.matmul(xs, self.gate_proj, counts)) * self.matmul(xs, self.up_proj, counts)
        out = self.matmul(hidden, self.down_proj, counts)  # (T*k, H)
        out = out * expert_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = LLaDA2MoeExperts(config)
        self.shared_experts = (
            LLaDA2MoeMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )
        # Tokens routed to each expert since the last bias update (aux-loss-free balancing).
        self.register_buffer("expert_load", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        idx, weights, _ = self.gate(flat)
        if self.training:
            self.expert_load += expert_counts(idx.reshape(-1), self.expert_load.numel()).to(self.expert_load.dtype)
        out = self.experts(flat, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


@torch.no_grad()
def balance_expert_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """`bias += rate * sign(mean_load - load_e)`, then the counts reset. Under data parallelism the
    loads are summed over ranks first, so every rank moves the same way."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(load)
    counts = load if load.is_floating_point() else load.double()
    if counts.sum() > 0:
        bias += (rate * torch.sign(counts.mean() - counts)).to(bias.dtype)
    load.zero_()


def update_expert_bias(model: nn.Module, rate: float) -> None:
    """After an optimizer step, every MoE block's balancing step (`balance_expert_bias`)."""
    for module in model.modules():
        if isinstance(module, LLaDA2MoeSparseMoeBlock):
            balance_expert_bias(module.gate.expert_bias, module.expert_load, rate)
