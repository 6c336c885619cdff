"""`llada-train plan`: per-rank memory, bytes communicated and step time of a training config on N nodes of
G GPUs, before any GPU is booked (docs/scaling.md explains how to read it and every assumption).

It reads top to bottom: the hardware table and DeepSpeed's defaults; the run's shape (`Layout`); the
parameters of the real model built on the meta device (`Inventory`); what ZeRO keeps per rank
(`ModelStates`); the activations, from tracing the real model at the real shapes under FakeTensor
(`Activations`); the collectives per optimizer step, one function per kind, ZeRO-3's parameter gathers
from a simulation of DeepSpeed's fetch/release rules (`Collective`); the step time (`StepTime`); the fit
check that names the knob to turn; the table and the CLI; last, `count_collectives`, which counts a
real run's collectives in the same units, so a plan can be checked against a run (tests/test_plan.py).

Units: bytes and seconds; "payload" S is the collective's whole buffer as one rank passes it (the
gathered tensor, the tensor reduced or scattered, the rows an all-to-all sends), "sent" is what one
rank puts on the wire in a ring: (n-1)/n S for all-gather, reduce-scatter, reduce and broadcast,
2(n-1)/n S for all-reduce, the rows addressed to other ranks for an all-to-all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import random
import sys
import threading
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import UserError

# ---- hardware and DeepSpeed's defaults ----------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """One accelerator and its links. Sources and caveats: docs/scaling.md §Assumptions."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    memory: float  # bytes of device memory
    nvlink: float  # bytes/s one GPU sends to its node's peers (NVLink, one direction)
    fabric: float  # bytes/s one GPU sends across nodes (one 400 Gb/s InfiniBand NIC per GPU)


GPUS = {
    "h100": GPU("H100 SXM 80GB", 989e12, 80e9, 450e9, 50e9),
    "h200": GPU("H200 SXM 141GB", 989e12, 141e9, 450e9, 50e9),
    "b200": GPU("B200 192GB", 2250e12, 192e9, 900e9, 50e9),
}
USABLE_MEMORY = 0.90  # share of device memory a plan may fill: CUDA context, NCCL buffers, fragmentation
GEMM_EFFICIENCY = 0.45  # share of peak FLOP/s the compute reaches at best (an assumption, not a measurement)

# DeepSpeed 0.19.8's defaults (runtime/zero/config.py), which engine.deepspeed_config leaves as they are
REDUCE_BUCKET = 500_000_000  # elements: one contiguous gradient bucket (stages 2 and 3), reduced when full
PERSISTENCE_THRESHOLD = 100_000  # elements: ZeRO-3 keeps smaller parameters whole on every rank
MAX_REUSE_DISTANCE = 1_000_000_000  # elements: ZeRO-3 keeps a gathered parameter used again this soon
PREFETCH_BUCKET = 50_000_000  # elements: ZeRO-3 gathers this far ahead of use
OPTIMIZER_SUB_GROUP = 1_000_000_000  # elements: ZeRO-3 steps the optimizer this many at a time


# ---- the run's shape ----------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Ranks, groups and the shapes of one micro-batch, from a stage config and the cluster."""

    name: str
    nodes: int
    gpus_per_node: int
    world: int
    ep: int  # expert-parallel group size: E/ep experts per rank
    zero: int
    dtype_bytes: int  # 2 in bf16, 4 in fp32 (parameters, gradients, communication)
    micro_batch: int  # sequences per rank per micro-batch
    grad_accum: int
    rows: int  # rows per forward: micro_batch, twice that with complementary masking
    seq_len: int  # L
    positions: int  # per row: 2L for [x_t ; x_0], L when one block covers the row
    block: int  # the smallest diffusion block shorter than the row (the 2L layout's attention tiles)
    supervised: int  # rows x positions that reach the lm_head per forward (expected)
    drafts: float  # expected MTF drafting forwards per micro-batch: mtf.prob x (mtf.turns - 1)
    mtf_prob: float
    mtf_turns: int
    masked_share: float  # expected share of a row that is masked (what a drafting forward projects)
    checkpointing: bool
    attention: str  # flex | sdpa
    offload_optimizer: bool
    offload_params: bool
    with_entropy: bool  # the CAP term needs the entropy from the chunked CE
    adam: str = "foreach"  # AdamW's code path, ADAM_TEMPORARIES: foreach on GPUs, single_tensor on CPU

    @property
    def edp(self) -> int:
        """Expert-data-parallel group size: ranks holding the same experts."""
        return self.world // self.ep

    @property
    def tokens(self) -> int:
        """Positions per forward on one rank."""
        return self.rows * self.positions


def stage_of(path: str) -> str:
    """cpt, sft or rl: the config's `stage:` key, else what its sections say (rl:, chat data keys)."""
    import yaml

    from .presets import resolve_config

    text = yaml.safe_load(resolve_config(path).read_text()) or {}
    if not isinstance(text, dict):
        return "cpt"
    if "stages" in text:
        raise UserError(f"{path} is a pipeline; plan one of its stages' configs")
    if text.get("stage") in ("cpt", "sft", "rl"):
        return text["stage"]
    data = text.get("data", {})
    if "rl" in text:
        return "rl"
    return "sft" if isinstance(data, dict) and ({"max_len", "train"} & set(data)) else "cpt"


def layout_of(cfg, nodes: int, gpus_per_node: int) -> Layout:
    """The run's shape; a batch that does not split over the ranks is the user's to fix."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    world, t, d, e = nodes * gpus_per_node, cfg.train, cfg.diffusion, cfg.engine
    if t.batch_size % (world * t.grad_accum):
        raise UserError(f"train.batch_size {t.batch_size} does not split over {world} ranks x train.grad_accum "
                        f"{t.grad_accum} micro-batches; make it a multiple of {world * t.grad_accum}")
    if world % e.expert_parallel:
        raise UserError(f"engine.expert_parallel={e.expert_parallel} must divide the {world} ranks")
    if getattr(getattr(cfg, "lora", None), "enabled", False):
        raise UserError("lora.enabled: the plan covers full training only; plan with lora.enabled=false")
    seq_len = cfg.data.seq_len if hasattr(cfg.data, "seq_len") else cfg.data.max_len
    blocks = [size for size in [d.block_size] + [size for _, size in d.block_schedule] if 0 < size < seq_len]
    positions = 2 * seq_len if blocks else seq_len
    micro = t.batch_size // world // t.grad_accum
    rows = micro * (2 if d.noise.complementary else 1)
    masked = 0.5 if d.noise.complementary else (d.noise.t_min + d.noise.t_max) / 2
    share = 1.0 if d.t2t.keep_weight > 0 else masked + (1 - masked) * d.t2t.max_ratio / 2
    return Layout(cfg.run.name, nodes, gpus_per_node, world, e.expert_parallel, e.zero_stage,
                  2 if e.precision == "bf16" else 4, micro, t.grad_accum, rows, seq_len, positions,
                  min(blocks, default=seq_len),
                  round(rows * seq_len * share), d.mtf.prob * (d.mtf.turns - 1), d.mtf.prob, d.mtf.turns, masked,
                  cfg.model.gradient_checkpointing, cfg.model.attn_backend, e.offload_optimizer,
                  e.offload_params and e.zero_stage == 3, d.loss.confidence_weight > 0)


# ---- parameters ---------------------------------------------------------------------------------------------


@dataclass
class Param:
    name: str
    numel: int
    expert: bool  # a routed expert's weight: E/ep of it per rank, reduced over the expert-data-parallel group
    module: str  # the module that owns it (ZeRO-3 gathers per module)
    decay: bool  # in the weight-decay parameter group (engine.param_groups): ZeRO-1/2 flatten per group


@dataclass
class Inventory:
    """Every parameter of the real model (built on the meta device: shapes, no memory)."""

    config: object  # LLaDA2MoeConfig
    params: list[Param]

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def experts(self) -> int:
        return sum(p.numel for p in self.params if p.expert)

    @property
    def active(self) -> int:
        """Parameters one token passes through: all but the routed experts it is not sent to."""
        c = self.config
        return self.total - self.experts + self.experts * c.num_experts_per_tok // c.num_experts


def model_config(cfg):
    """The LLaDA2MoeConfig a stage config trains: `model.init_from`'s config.json when it exists, else
    `model.preset` with `model.overrides`."""
    from .config import model_preset_values
    from .model import LLaDA2MoeConfig

    m = cfg.model
    if m.init_from and (Path(m.init_from) / "config.json").is_file():
        return LLaDA2MoeConfig.from_pretrained(m.init_from, attn_backend=m.attn_backend, **m.overrides)
    return LLaDA2MoeConfig(**{**model_preset_values(m.preset), **m.overrides, "attn_backend": m.attn_backend})


def inventory(mcfg) -> Inventory:
    from .model import LLaDA2MoeModelLM

    with torch.device("meta"):
        model = LLaDA2MoeModelLM(mcfg)
    params = [Param(name, p.numel(), ".mlp.experts." in name, name.rpartition(".")[0],
                    p.ndim >= 2 and "embeddings" not in name)
              for name, p in model.named_parameters()]  # tied weights appear once
    return Inventory(mcfg, params)


def group_of(p: Param, lay: Layout) -> str:
    """edp for the routed experts under expert parallelism, dp (all ranks) for everything else."""
    return "edp" if p.expert and lay.ep > 1 else "dp"


def group_size(p: Param, lay: Layout) -> int:
    """Ranks over which ZeRO partitions (and reduces) this parameter."""
    return lay.edp if group_of(p, lay) == "edp" else lay.world


def local_numel(p: Param, lay: Layout) -> int:
    """Elements of the parameter this rank's model holds (E/ep experts under expert parallelism)."""
    return p.numel // lay.ep if p.expert else p.numel


def persistent(p: Param, lay: Layout) -> bool:
    """ZeRO-3 keeps parameters of at most PERSISTENCE_THRESHOLD elements whole on every rank."""
    return local_numel(p, lay) <= PERSISTENCE_THRESHOLD


def shard(p: Param, lay: Layout) -> int:
    """Elements of one rank's ZeRO partition of the parameter (padded to a multiple of the group)."""
    return math.ceil(local_numel(p, lay) / group_size(p, lay))


# ---- model states per rank ----------------------------------------------------------------------------------


@dataclass
class ModelStates:
    """Bytes one rank holds for the model, by ZeRO stage (DeepSpeed 0.19.8, bf16 or fp32, AdamW)."""

    params: int  # the model's weights as trained (bf16): whole, or the ZeRO-3 shard + persistent ones
    grads: int  # accumulated gradients: whole (ZeRO 0-1) or the rank's partition (2-3)
    grad_buckets: int  # the contiguous REDUCE_BUCKET-element bucket, and the flat copy its reduction makes
    optimizer: int  # fp32 master weights + AdamW m and v (the rank's partition at ZeRO >= 1)
    step_transient: int  # fp32 gradient the optimizer step creates for the largest group's partition
    adam_temporaries: int  # AdamW's sqrt(v) for that group (and its quotient, per tensor on CPU)
    step_peak: int  # the most bytes alive while the optimizer steps, group by group (see `_step_peak`)
    cpu: int  # bytes moved to host memory by offloading

    @property
    def resident(self) -> int:
        return self.params + self.grads + self.grad_buckets + self.optimizer


def optimizer_groups(inv: Inventory, lay: Layout) -> dict[tuple[bool, str], list[Param]]:
    """engine.param_groups: weight decay or not, each split into expert and other parameters under expert
    parallelism (DeepSpeed's MoE groups), keyed (decay, dp | edp)."""
    groups: dict[tuple[bool, str], list[Param]] = {}
    for p in inv.params:
        groups.setdefault((p.decay, group_of(p, lay)), []).append(p)
    return groups


# sqrt(v) tensors AdamW's step allocates per element of the group it steps: torch's foreach path (CUDA) divides
# and adds in place; the per-tensor path (CPU) keeps sqrt(v) while it makes the quotient
ADAM_TEMPORARIES = {"foreach": 1, "single_tensor": 2}


def _step_peak(states: ModelStates, inv: Inventory, lay: Layout) -> int:
    """What is alive while AdamW steps each group in DeepSpeed's order (the expert groups last, appended by
    `split_params_into_different_moe_groups_for_optimizer`), the most of it. ZeRO-1/2 release the bucket when
    the backward ends, and a group's gradients once its fp32 copy exists: at ZeRO-1 its own, at ZeRO-2 all of
    them with the last group's (one buffer); ZeRO-3 keeps its gradient partition and its flat bucket."""
    b = lay.dtype_bytes
    base = states.params + states.optimizer
    if lay.offload_optimizer or lay.zero == 0:
        return base + states.grads + states.grad_buckets + states.step_transient + states.adam_temporaries
    if lay.zero == 3:
        return base + states.grads + b * REDUCE_BUCKET + states.step_transient + states.adam_temporaries
    per_element = 4 * (1 + ADAM_TEMPORARIES[lay.adam])  # the fp32 gradient and AdamW's temporaries
    groups = optimizer_groups(inv, lay)
    order = sorted(groups, key=lambda key: (key[1] == "edp", not key[0]))
    # ZeRO-2: the partition's buffer, and the gradients outside it that later groups have not freed yet
    peak, grads_left = 0, b * sum(local_numel(p, lay) for p in inv.params)
    for i, key in enumerate(order):
        size = sum(shard(p, lay) for p in groups[key])
        flattening = grads_left + (b + 4) * size  # the group's gradients flattened, then cast to fp32
        if lay.zero == 1:
            grads_left -= b * sum(local_numel(p, lay) for p in groups[key])
        elif i == len(order) - 1:
            grads_left = 0
        peak = max(peak, flattening, grads_left + per_element * size)
    return base + peak


def model_states(inv: Inventory, lay: Layout) -> ModelStates:
    b = lay.dtype_bytes
    local = sum(local_numel(p, lay) for p in inv.params)
    part = sum(shard(p, lay) for p in inv.params)  # this rank's partition of everything
    # the optimizer steps one parameter group (ZeRO-3: sub-group) at a time, with its fp32 gradient
    largest = max(min(sum(shard(p, lay) for p in group), OPTIMIZER_SUB_GROUP)
                  for group in optimizer_groups(inv, lay).values())
    master = 4 if b == 2 else 0  # bf16 keeps an fp32 master copy; fp32 updates its weights in place
    # the bucket, and what its reduction copies: the bucket flattened, or a larger gradient held alone
    bucket = b * (REDUCE_BUCKET + max(min(REDUCE_BUCKET, local), max(local_numel(p, lay) for p in inv.params)))
    temporaries = 4 * ADAM_TEMPORARIES[lay.adam] * largest
    if lay.zero == 0:
        states = ModelStates(b * local, b * local, 0, (master + 8) * local, 4 * local if b == 2 else 0, temporaries,
                             0, 0)
    elif lay.zero in (1, 2):
        grads = b * local if lay.zero == 1 else b * part
        states = ModelStates(b * local, grads, bucket, (master + 8) * part, 4 * largest, temporaries, 0, 0)
    else:
        whole = sum(local_numel(p, lay) for p in inv.params if persistent(p, lay))
        states = ModelStates(b * (part + whole), b * part, bucket, (master + 8) * part, 4 * largest, temporaries,
                             0, 0)
    if lay.offload_optimizer:  # master, moments, the fp32 step gradient and AdamW's temporaries live in host memory
        cpu_adam = 4 * ADAM_TEMPORARIES["single_tensor"] * largest
        states = replace(states, cpu=states.optimizer + states.step_transient + cpu_adam
                         + (b * part if lay.zero >= 2 else 0), optimizer=0, step_transient=0, adam_temporaries=0)
    if lay.offload_params:
        states = replace(states, cpu=states.cpu + b * part, params=states.params - b * part)
    return replace(states, step_peak=_step_peak(states, inv, lay))


# ---- activations: the real model traced under FakeTensor ---------------------------------------------------


@dataclass
class Activations:
    """One micro-batch's activations on one rank, from FakeTensor traces of the real model (one dense and
    one MoE decoder layer at the real width, the embedding and the chunked CE head; routed experts see
    balanced counts, T*k/E rows each), one pass without and one with gradient checkpointing, extended
    to the model's depth: the layers the trace lacks add their saved bytes (their inputs, when
    checkpointed) to what is alive at the peak, which comes at the start of the backward or in the last
    layer's backward, when every layer's share is still held."""

    dense_layer: int  # saved only by one dense decoder layer
    moe_layer: int  # saved only by one MoE decoder layer
    shared: int  # saved by every layer once: rotary cos/sin, the attention mask
    outside: int  # embedding, final norm, the positions that reach the lm_head, the chunked CE
    layer_input: int  # the residual a checkpointed layer keeps (rows, positions, H)
    traced_peak: int  # most bytes alive in the traced pass without checkpointing (saved + transient)
    traced_peak_checkpointed: int  # ... and with gradient checkpointing
    draft_peak: int  # most bytes alive in an MTF drafting forward (no grad: hidden states, logits)
    n_dense: int
    n_moe: int
    modules: list[str] = field(default_factory=list)  # the traced model's parameter owners in forward order

    @property
    def _extra(self) -> tuple[int, int]:
        """(dense, MoE) layers the model has beyond the two traced."""
        traced = _layer_kinds_counts(self.n_dense, self.n_moe)
        return self.n_dense - traced[0], self.n_moe - traced[1]

    def saved(self, checkpointing: bool) -> int:
        """Bytes left for the backward when the forward ends: every layer's saved tensors, or with
        checkpointing each layer's input (the recompute happens one layer at a time, in the backward)."""
        base = self.outside + self.shared
        if checkpointing:
            return base + (self.n_dense + self.n_moe) * self.layer_input
        return base + self.n_dense * self.dense_layer + self.n_moe * self.moe_layer

    def peak(self, checkpointing: bool) -> int:
        """Most bytes alive over the training pass (the working memory is this minus `saved`)."""
        dense, moe = self._extra
        if checkpointing:
            return self.traced_peak_checkpointed + (dense + moe) * self.layer_input
        return self.traced_peak + dense * self.dense_layer + moe * self.moe_layer

    def scaled(self, factor: float) -> Activations:
        """The same model at `factor` times the rows per forward: activations are linear in the rows."""
        def scale(n):
            return round(n * factor)
        sizes = ("dense_layer", "moe_layer", "shared", "outside", "layer_input", "traced_peak",
                 "traced_peak_checkpointed", "draft_peak")
        return replace(self, **{name: scale(getattr(self, name)) for name in sizes})


def _layer_kinds_counts(n_dense: int, n_moe: int) -> tuple[int, int]:
    """(dense, MoE) layers in the trace: one of each where the model has both, else two of its kind."""
    if n_dense and n_moe:
        return 1, 1
    return (2, 0) if n_dense else (0, 2)


class _KernelAttention(torch.autograd.Function):
    """The fused attention kernels (flash, flex) as the trace sees them: out (B, H, Q, D) and the fp32
    log-sum-exp (B, H, Q) are new; q, k, v, out and the log-sum-exp are saved for the backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (B, H, Q, D)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, Q)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, _out, _lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _traced_attend(q, k, v, mask, scale, backend):
    """`attention.attend` on the GPU: flex as a fused kernel; sdpa with an explicit mask and GQA as
    torch's math path (no fused kernel takes both), which saves the attention probabilities."""
    if backend == "flex":
        return _KernelAttention.apply(q, k, v)
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask.dense(q.device), scale=scale,
                                                            enable_gqa=True)[0]


class _TracedGrouped(torch.autograd.Function):
    """`_GroupedLinear` for the trace outside bf16 (FakeTensor's grouped GEMM takes bf16 only): it saves
    the same x, w and offsets."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return x.new_empty(x.shape[0], w.shape[1])  # (T*k, out)

    @staticmethod
    def backward(ctx, dy):
        x, w, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), None


def _traced_grouped_linear(x, w, counts):
    return _TracedGrouped.apply(x, w, torch.cumsum(counts, 0).to(torch.int32))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Storages saved for backward (by the layer that saved them) and the most bytes alive, over one traced
    pass. A storage lives while any tensor an op returned on it lives: each such tensor carries a finalizer
    that counts it out. Storages are keyed by address (reused once freed)."""

    def __init__(self, excluded: set):
        super().__init__()
        self.excluded = excluded  # parameters and buffers: model states, not activations
        self.refs: dict[int, int] = {}  # address -> live tensors on it
        self.size: dict[int, int] = {}  # address -> bytes, for live storages
        self.saved: dict[int, set] = {}  # address -> layers that saved it (-1: outside the layers)
        self.layer = -1
        self.live_bytes = self.saved_bytes = self.peak = 0
        self.at_backward: list[tuple[int, set]] = []

    def _track(self, t: torch.Tensor) -> int:
        key, size = _storage(t)
        if key in self.excluded:
            return key
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, size
            self.live_bytes += size
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)
        return key

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            size = self.size.pop(key)
            del self.refs[key]
            self.live_bytes -= size
            if self.saved.pop(key, None) is not None:
                self.saved_bytes -= size

    def pack(self, t: torch.Tensor):
        key = _storage(t)[0]
        if key not in self.excluded:
            if key not in self.refs:  # made outside an op this mode saw (an input): count it from here
                self._track(t)
            if key not in self.saved:
                self.saved[key] = set()
                self.saved_bytes += self.size[key]
            self.saved[key].add(self.layer)
        return t

    def saved_now(self) -> list[tuple[int, set]]:
        """(bytes, layers) of every saved storage still alive."""
        return [(self.size[key], layers) for key, layers in self.saved.items()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.live_bytes)
        return out


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the tensor's storage: views share it, and it lives as long as any of them."""
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


def _layer_kinds(mcfg) -> list[str]:
    """The two decoder layers to trace: one dense and one MoE where the model has both."""
    n_dense = min(mcfg.first_k_dense_replace, mcfg.num_hidden_layers)
    dense, moe = _layer_kinds_counts(n_dense, mcfg.num_hidden_layers - n_dense)
    return ["dense"] * dense + ["moe"] * moe


@contextlib.contextmanager
def _traced_kernels(attention: str):
    """attention 'as_run': the model's own `attend` (what runs on this CPU); else the GPU's kernels."""
    from .model import attention as attention_module

    real = attention_module.attend
    if attention != "as_run":
        attention_module.attend = _traced_attend
    try:
        yield
    finally:
        attention_module.attend = real


def trace_activations(mcfg, lay: Layout, attention: str | None = None) -> Activations:
    """One micro-batch through [dense, MoE] layers + head under FakeTensorMode: a drafting forward (no
    grad), then the training forward and backward without and with gradient checkpointing; saved
    storages and live bytes are recorded. `attention` 'as_run' keeps this machine's attention."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import LLaDA2MoeModelLM
    from .model.moe import LLaDA2MoeExperts, balanced_routing

    kinds = _layer_kinds(mcfg)
    traced = type(mcfg)(**{**mcfg.to_dict(), "num_hidden_layers": 2, "first_k_dense_replace": kinds.count("dense")})
    dtype = torch.bfloat16 if lay.dtype_bytes == 2 else torch.float32
    before = torch.get_default_dtype()
    with FakeTensorMode(), balanced_routing(), _traced_kernels(attention or lay.attention):
        torch.set_default_dtype(dtype)
        try:
            model = LLaDA2MoeModelLM(traced).train()
        finally:
            torch.set_default_dtype(before)
        for module in model.modules():
            if isinstance(module, LLaDA2MoeExperts):
                _local_experts(module, lay.ep)
                if dtype != torch.bfloat16:
                    module.matmul = _traced_grouped_linear
        excluded = {_storage(t)[0] for t in [*model.parameters(), *model.buffers()]}
        order = _forward_order(model)
        inputs, targets, rows_idx, pos_idx = _fake_batch(lay, traced)
        draft_peak = _draft_peak(model, inputs, lay, excluded)
        plain, checkpointed = _Recorder(excluded), _Recorder(excluded)
        layer_input = _run_training_pass(model, plain, inputs, targets, rows_idx, pos_idx, lay)
        model.model.gradient_checkpointing = True
        _run_training_pass(model, checkpointed, inputs, targets, rows_idx, pos_idx, lay)
    return replace(_attribute(plain, layer_input, checkpointed.peak, draft_peak, mcfg), modules=order)


def _local_experts(experts, ep: int) -> None:
    """Under expert parallelism a rank holds E/ep experts and, with balanced routing, runs T*k rows through
    them, as AutoEP's layer does after its all-to-all (its dispatch buffers are not traced)."""
    if ep <= 1:
        return
    experts.num_experts //= ep
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight = getattr(experts, name)
        setattr(experts, name, torch.nn.Parameter(weight.new_empty(experts.num_experts, *weight.shape[1:])))


def _forward_order(model) -> list[str]:
    """Filled in forward order by hooks on every module that owns parameters (ZeRO-3 gathers per such
    module, in this order)."""
    order: list[str] = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(lambda _m, _a, name=name: None if name in order else order.append(name))
    return order


def _fake_batch(lay: Layout, mcfg):
    """Model inputs of one forward: ids (rows, P), positions, the §3 attention layout; targets (N,) and
    the (row, position) indices of the N supervised positions in the noisy half."""
    from .diffusion import NoisedBatch, model_inputs

    rows, seq = lay.rows, lay.seq_len
    x = torch.zeros(rows, seq, dtype=torch.long)  # (rows, L)
    ones = torch.ones(rows, seq, dtype=torch.bool)
    batch = NoisedBatch(x, x, ones, ones, ones.float(), ones, x, ones)
    inputs = model_inputs(batch, lay.block)
    n = lay.supervised
    flat = torch.arange(n) % (rows * seq)  # (N,) positions of the noisy half, row-major
    return inputs, torch.zeros(n, dtype=torch.long), flat // seq, flat % seq


def _draft_peak(model, inputs: dict, lay: Layout, excluded: set) -> int:
    """Peak bytes of one MTF drafting forward: no grad, eval mode, logits at the masked positions."""
    if lay.mtf_prob <= 0:
        return 0
    recorder = _Recorder(excluded)
    masked = max(1, round(lay.rows * lay.seq_len * lay.masked_share))
    model.eval()
    with torch.no_grad(), recorder:
        hidden = model.model(**inputs)  # (rows, P, H)
        picked = hidden.flatten(0, 1)[torch.arange(masked) % (hidden.shape[0] * hidden.shape[1])]  # (M, H)
        model.lm_head(picked).argmax(-1)  # logits (M, V), then the drafts
    model.train()
    return recorder.peak


def _run_training_pass(model, recorder: _Recorder, inputs, targets, rows_idx, pos_idx, lay: Layout) -> int:
    """Forward with saved-tensor hooks (attributed to the layer running), then backward; returns the
    bytes of a layer's input (what a checkpointed layer keeps)."""
    layer_input = []

    def enter(index):
        def hook(_module, args):
            recorder.layer = index
            layer_input.append(_storage(args[0])[1])
        return hook

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(model.model.layers)]
    handles += [layer.register_forward_hook(lambda *_: setattr(recorder, "layer", -1)) for layer in model.model.layers]
    for p in model.parameters():  # DeepSpeed moves each gradient into its bucket as it is produced
        handles.append(p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))
    with recorder, torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
        hidden = model.model(**inputs)  # (rows, P, H)
        picked = hidden[rows_idx, pos_idx]  # (N, H): what `hidden[output_positions]` gathers
        ce, entropy, _ = model.lm_head(picked, targets, lay.with_entropy)
        loss = ce.sum() + (entropy.sum() if entropy is not None else 0)
    recorder.at_backward = recorder.saved_now()  # what the forward leaves for the backward
    with recorder:
        loss.backward()
    for handle in handles:
        handle.remove()
    return layer_input[-1]


def _attribute(recorder: _Recorder, layer_input: int, peak_checkpointed: int, draft_peak: int, mcfg) -> Activations:
    """Saved storages of the pass without checkpointing -> per-layer, shared and outside bytes."""
    kinds = _layer_kinds(mcfg)
    per_layer = [0, 0]
    shared = outside = 0
    for size, layers in recorder.at_backward:
        if layers == {-1}:
            outside += size
        elif len(layers - {-1}) > 1:
            shared += size
        else:
            per_layer[max(layers)] += size
    n_dense = min(mcfg.first_k_dense_replace, mcfg.num_hidden_layers)
    by_kind = dict(zip(kinds, per_layer, strict=True))
    return Activations(by_kind.get("dense", 0), by_kind.get("moe", 0), shared, outside, layer_input,
                       recorder.peak, peak_checkpointed, draft_peak, n_dense, mcfg.num_hidden_layers - n_dense)


# ---- communication per optimizer step ---------------------------------------------------------------------


@dataclass
class Collective:
    """One kind of collective, summed over an optimizer step, on one rank (units: module docstring)."""

    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all
    what: str
    group: str  # dp (all ranks) | edp (ranks holding the same experts) | ep (ranks sharing the experts)
    group_size: int
    calls: float  # per optimizer step: how often it runs
    payload: float  # bytes per step
    sent: float  # bytes per step this rank sends
    overlapped: bool  # runs on a side stream beside compute (ZeRO-3's prefetch and reduce streams)


def _ring(kind: str, n: int) -> float:
    """Bytes one rank sends per byte of payload in a ring (NCCL's algorithm at these sizes)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n


def _collective(kind, what, group, n, calls, payload, overlapped=False) -> Collective:
    return Collective(kind, what, group, n, calls, payload, payload * _ring(kind, n), overlapped)


def _by_group(inv: Inventory, lay: Layout, elements) -> dict[str, int]:
    """{dp: ..., edp: ...}: `elements(param)` summed over the dense and the expert parameters."""
    out = {"dp": 0, "edp": 0}
    for p in inv.params:
        out[group_of(p, lay)] += elements(p)
    return out


def _group_sizes(lay: Layout) -> dict[str, int]:
    return {"dp": lay.world, "edp": lay.edp, "ep": lay.ep}


def zero3_gradient_reduce_scatter(inv: Inventory, lay: Layout) -> list[Collective]:
    """ZeRO-3 reduce-scatters every micro-batch's gradients as they are produced (stage3.py
    `__avg_scatter_grads` -> `reduce_scatter_coalesced`): each parameter padded to a multiple of its
    group, in the communication dtype, experts over the expert-data-parallel group."""
    sizes = _group_sizes(lay)
    padded = _by_group(inv, lay, lambda p: shard(p, lay) * group_size(p, lay))
    return [_collective("reduce_scatter", "ZeRO-3 gradient reduce-scatter", g, sizes[g], lay.grad_accum,
                        lay.grad_accum * lay.dtype_bytes * padded[g], overlapped=True)
            for g in ("dp", "edp") if padded[g]]


def zero12_gradient_all_reduce(inv: Inventory, lay: Layout) -> list[Collective]:
    """ZeRO 0-2 all-reduce gradient buckets in the communication dtype (stage_1_and_2.py
    `average_tensor`: with `use_multi_rank_bucket_allreduce` each bucket is one all-reduce). ZeRO-2
    reduces every micro-batch as gradients are produced; ZeRO-1 and 0 only at the accumulation boundary."""
    times = lay.grad_accum if lay.zero == 2 else 1
    sizes = _group_sizes(lay)
    local = _by_group(inv, lay, lambda p: local_numel(p, lay))
    return [_collective("all_reduce", "gradient all-reduce", g, sizes[g], times, times * lay.dtype_bytes * local[g])
            for g in ("dp", "edp") if local[g]]


def zero12_parameter_all_gather(inv: Inventory, lay: Layout) -> list[Collective]:
    """After the step ZeRO-1/2 all-gather the updated weights from the partitions (`all_gather_dp_groups`):
    each flat parameter group padded to a multiple of 2 x its group size."""
    sizes, out = _group_sizes(lay), []
    for g in ("dp", "edp"):
        groups: dict[bool, int] = {}
        for p in inv.params:
            if group_of(p, lay) == g:
                groups[p.decay] = groups.get(p.decay, 0) + local_numel(p, lay)
        align = 2 * sizes[g]
        numel = sum(math.ceil(n / align) * align for n in groups.values())
        if numel and sizes[g] > 1:  # a group of one rank gathers nothing
            out.append(_collective("all_gather", "updated-parameter all-gather", g, sizes[g], 1,
                                   lay.dtype_bytes * numel))
    return out


def ep_all_to_all(inv: Inventory, lay: Layout) -> list[Collective]:
    """AutoEP per MoE layer and forward: the token counts (E int32), then the routed rows (T*k, H) to their
    experts' ranks and the expert outputs back; the backward sends both again, a checkpointed layer's
    recompute and every MTF drafting forward repeat the forward's three. Balanced routing: each rank
    receives as many rows as it sends."""
    c = inv.config
    if lay.ep <= 1:
        return []
    n_moe = c.num_hidden_layers - min(c.first_k_dense_replace, c.num_hidden_layers)
    rows = lay.tokens * c.num_experts_per_tok * c.hidden_size * lay.dtype_bytes  # (T*k, H)
    forward = 4 * c.num_experts + 2 * rows
    forwards = 1 + lay.checkpointing + lay.drafts  # training forward, recompute, drafting forwards
    per_micro = n_moe * (forwards * forward + 2 * rows)
    calls = n_moe * (3 * forwards + 2)
    return [_collective("all_to_all", "expert-parallel token all-to-all", "ep", lay.ep,
                        lay.grad_accum * calls, lay.grad_accum * per_micro)]


def small_all_reduces(inv: Inventory, lay: Layout) -> list[Collective]:
    """Scalars: every micro-batch's non-finite check (trainer) and MTF draw (diffusion), per step
    DeepSpeed's gradient norm and overflow flag and the expert-bias token counts (E fp32 per MoE layer)."""
    c = inv.config
    n_moe = c.num_hidden_layers - min(c.first_k_dense_replace, c.num_hidden_layers)
    per_micro = 8 + (8 if lay.mtf_prob > 0 else 0)
    calls = lay.grad_accum * (1 + (lay.mtf_prob > 0)) + 2 + n_moe
    payload = lay.grad_accum * per_micro + 16 + n_moe * 4 * c.num_experts
    return [_collective("all_reduce", "scalars (loss check, MTF draw, norms, loads)", "dp", lay.world,
                        calls, payload)] if lay.world > 1 else []



def module_order(inv: Inventory, act: Activations) -> tuple[list[str], list[list[str]], list[str]]:
    """The full model's parameter-owning modules in forward order, as (before the layers, each layer's,
    after the layers): the traced model's order, its two layers repeated to the model's depth (layer i
    takes the traced layer of its kind)."""
    kinds = _layer_kinds(inv.config)
    template: dict[str, list[str]] = {}
    before, after = [], []
    for name in act.modules:
        if name.startswith("model.layers."):
            index, _, rest = name[len("model.layers."):].partition(".")
            template.setdefault(kinds[int(index)], []).append(rest)
        else:
            (after if template else before).append(name)
    n_dense = min(inv.config.first_k_dense_replace, inv.config.num_hidden_layers)
    layers = [[f"model.layers.{i}.{rest}" for rest in template["dense" if i < n_dense else "moe"]]
              for i in range(inv.config.num_hidden_layers)]
    return before, layers, after


class Zero3Gathers:
    """DeepSpeed 0.19.8's ZeRO-3 parameter coordinator (partitioned_param_coordinator.py), reduced to what
    decides the bytes: a module's parameters are all-gathered when it runs and they are not there. The
    first pass, and any pass after the module sequence changed, records a trace and releases every
    parameter after use; once a trace is complete, a module's parameters stay gathered if they are used
    again within MAX_REUSE_DISTANCE elements of trace (persistent ones always stay). Every top-level
    forward starts a new pass, so an MTF drafting forward (forward only) and a training pass (forward +
    backward) replace each other's trace. A checkpointed layer's recompute stops early, inside its last
    module (torch.utils.checkpoint's early stop), whose release hook therefore never runs. The optimizer
    step releases everything and gathers the persistent parameters again."""

    def __init__(self, inv: Inventory, lay: Layout, act: Activations):
        self.lay = lay
        owners: dict[str, list[int]] = {}
        for i, p in enumerate(inv.params):
            owners.setdefault(p.module, []).append(i)
        self.numel = [local_numel(p, lay) for p in inv.params]
        self.persist = [persistent(p, lay) for p in inv.params]
        self.group = [group_of(p, lay) for p in inv.params]
        self.solo = {i for i, p in enumerate(inv.params) if group_size(p, lay) == 1}  # never partitioned
        self.padded = [shard(p, lay) * group_size(p, lay) for p in inv.params]
        before, layers, after = module_order(inv, act)
        use = [tuple(owners[m]) for m in before], [[tuple(owners[m]) for m in layer] for layer in layers], \
            [tuple(owners[m]) for m in after]
        forward = [*use[0], *(m for layer in use[1] for m in layer), *use[2]]
        backward = list(reversed(use[2]))
        self.unreleased = set()  # (pass position): the recompute's last module
        for layer in reversed(use[1]):
            if lay.checkpointing:
                self.unreleased.add(len(forward) + len(backward) + len(layer) - 1)
                backward += layer
            backward += list(reversed(layer))
        backward += list(reversed(use[0]))
        self.passes = {"draft": tuple(forward), "train": tuple(forward + backward)}
        self.available = set(self.solo)
        self.mode, self.trace, self.recording, self.traces = "invalid", None, [], 0
        self.bytes = {"dp": 0, "edp": 0}
        self.calls = {"dp": 0, "edp": 0}
        self.peak = 0
        self._keep: dict = {}

    def _gather(self, params) -> None:
        missing = [i for i in params if i not in self.available]
        for i in missing:
            self.bytes[self.group[i]] += self.padded[i] * self.lay.dtype_bytes
        for group in {self.group[i] for i in missing}:
            self.calls[group] += 1  # one coalesced all-gather per module and group (prefetching merges more)
        self.available.update(missing)
        gathered = (i for i in self.available if not self.persist[i] and i not in self.solo)
        self.peak = max(self.peak, sum(self.numel[i] for i in gathered))

    def _kept(self, index: int) -> set:
        """Parameters used again within MAX_REUSE_DISTANCE elements after trace position `index`."""
        key = (self.traces, index)
        if key not in self._keep:
            keep, seen = set(), 0
            for module in self.trace[index + 1:]:
                if seen >= MAX_REUSE_DISTANCE:
                    break
                keep.update(module)
                seen += sum(self.numel[i] for i in module)
            self._keep[key] = keep
        return self._keep[key]

    def run(self, kind: str) -> None:
        """One top-level forward (and its backward for a training pass)."""
        if self.mode == "record":
            self.mode, self.trace, self.traces = "complete", tuple(self.recording), self.traces + 1
        elif self.mode == "invalid":
            self.mode, self.recording = "record", []
        for index, module in enumerate(self.passes[kind]):
            if self.mode == "complete" and (index >= len(self.trace) or self.trace[index] != module):
                self.mode, self.trace = "invalid", None
            if self.mode == "record":
                self.recording.append(module)
            self._gather(module)
            if kind == "train" and index in self.unreleased:
                continue
            if self.mode == "complete":
                drop = {i for i in module if not self.persist[i]} - self._kept(index)
            else:
                drop = set(module)
            self.available -= drop - self.solo

    def optimizer_step(self) -> None:
        self.available = set(self.solo)
        self._gather([i for i, keep in enumerate(self.persist) if keep])

    def simulate(self, steps: int, seed: int = 0) -> list[dict]:
        """Bytes gathered per group in each of `steps` optimizer steps; MTF draws from a seeded RNG."""
        draws, out = random.Random(seed), []
        for _ in range(steps):
            before, calls = dict(self.bytes), dict(self.calls)
            for _ in range(self.lay.grad_accum):
                if self.lay.mtf_prob > 0 and draws.random() < self.lay.mtf_prob:
                    for _ in range(self.lay.mtf_turns - 1):
                        self.run("draft")
                self.run("train")
            self.optimizer_step()
            out.append({g: (self.bytes[g] - before[g], self.calls[g] - calls[g]) for g in self.bytes})
        return out


def zero3_parameter_gathers(inv: Inventory, lay: Layout, act: Activations, steps: int | None = None):
    """ZeRO-3's all-gathers of bf16 parameters (forward, backward or recompute, drafting forwards, the
    persistent refresh after the step) from `Zero3Gathers`: the mean over steady-state steps (after two
    warm-up steps; 64 steps averaged when MTF draws vary), or the sum over the first `steps` steps of a run.
    Returns (collectives, peak gathered bytes)."""
    sim = Zero3Gathers(inv, lay, act)
    varying = 0 < lay.mtf_prob < 1
    per_step = sim.simulate(steps if steps else 2 + (64 if varying else 1))
    counted = per_step if steps else per_step[2:]
    scale = 1 if steps else 1 / len(counted)
    sizes = _group_sizes(lay)
    out = [_collective("all_gather", "ZeRO-3 parameter all-gather", g, sizes[g],
                       scale * sum(step[g][1] for step in counted), scale * sum(step[g][0] for step in counted),
                       overlapped=True)
           for g in ("dp", "edp") if sizes[g] > 1 and any(step[g][0] for step in counted)]
    return out, sim.peak * lay.dtype_bytes


def communication(inv: Inventory, lay: Layout, act: Activations, steps: int | None = None):
    """Every collective of an optimizer step (or of the first `steps` steps, summed), and the peak bytes
    of gathered ZeRO-3 parameters."""
    gathered = 0
    if lay.zero == 3:
        out, gathered = zero3_parameter_gathers(inv, lay, act, steps)
        out += zero3_gradient_reduce_scatter(inv, lay)
    else:
        out = zero12_gradient_all_reduce(inv, lay) + (zero12_parameter_all_gather(inv, lay) if lay.zero else [])
    out += ep_all_to_all(inv, lay) + small_all_reduces(inv, lay)
    if steps and steps > 1:  # the per-step collectives, `steps` times (ZeRO-3's gathers were simulated)
        out = [c if c.what.startswith("ZeRO-3 parameter") else
               replace(c, calls=c.calls * steps, payload=c.payload * steps, sent=c.sent * steps) for c in out]
    return out, gathered



# ---- step time ----------------------------------------------------------------------------------------------


@dataclass
class StepTime:
    """One optimizer step on one rank: FLOPs, compute time at GEMM_EFFICIENCY of peak, communication time
    at the link's bandwidth; ZeRO-3's gathers and reduce-scatters hide behind compute (side streams),
    everything else waits on the critical path."""

    model_flops: float  # what the objective needs: training forward + backward, MTF drafting forwards
    hardware_flops: float  # + the recompute of checkpointed layers + attention pairs sdpa computes in vain
    compute_s: float
    overlapped_comm_s: float
    exposed_comm_s: float
    step_s: float
    mfu: float


def _pairs(lay: Layout, dense: bool) -> float:
    """Query-key pairs per row: all of them (sdpa), else the visible tiles of the §3 layout (flex):
    (1 + 1/B)/4 of (2L)^2 with B blocks; one block per row is plain bidirectional attention."""
    if dense or lay.positions == lay.seq_len:
        return lay.positions ** 2
    blocks = lay.seq_len // lay.block
    return (1 + 1 / blocks) / 4 * lay.positions ** 2


def forward_flops(inv: Inventory, lay: Layout, head_rows: int, dense: bool = False) -> float:
    """One forward on one rank: 2 FLOPs per weight a token passes (the routed experts: k of E), the
    attention scores (QK^T and PV: 4 x heads x head_dim per pair), the head on `head_rows` positions."""
    c = inv.config
    body = sum(p.numel * (c.num_experts_per_tok / c.num_experts if p.expert else 1)
               for p in inv.params if p.module.startswith("model.layers."))
    attention = 4 * c.num_attention_heads * c.head_dim * _pairs(lay, dense) * lay.rows * c.num_hidden_layers
    return 2 * body * lay.tokens + attention + 2 * c.hidden_size * c.vocab_size * head_rows


def step_time(inv: Inventory, lay: Layout, collectives: list[Collective], gpu: GPU) -> StepTime:
    masked = round(lay.rows * lay.seq_len * lay.masked_share)
    train = forward_flops(inv, lay, lay.supervised)
    model = lay.grad_accum * (3 * train + lay.drafts * forward_flops(inv, lay, masked))
    extra = 0.0
    if lay.checkpointing:
        extra += forward_flops(inv, lay, 0)  # each layer's forward again in the backward
    if lay.attention == "sdpa":
        extra += 3 * (forward_flops(inv, lay, 0, dense=True) - forward_flops(inv, lay, 0))
    hardware = model + lay.grad_accum * extra
    compute = hardware / (gpu.peak_flops * GEMM_EFFICIENCY)
    overlapped = sum(transfer_time(c, lay, gpu) for c in collectives if c.overlapped)
    exposed = sum(transfer_time(c, lay, gpu) for c in collectives if not c.overlapped)
    step = max(compute, overlapped) + exposed
    return StepTime(model, hardware, compute, overlapped, exposed, step, model / (step * gpu.peak_flops))


def spans_nodes(c: Collective, lay: Layout) -> bool:
    """DeepSpeed's groups (utils/groups.py): expert-parallel groups are consecutive ranks, expert-data-
    parallel groups strided by the EP size, the data-parallel group all ranks; ranks fill nodes in order."""
    if c.group == "ep":
        return c.group_size > lay.gpus_per_node
    return lay.nodes > 1 and c.group_size > 1


def transfer_time(c: Collective, lay: Layout, gpu: GPU) -> float:
    """Seconds for what this rank sends: over the inter-node fabric when the group spans nodes (the ring's
    slowest hop, one NIC per GPU), else over NVLink."""
    return c.sent / (gpu.fabric if spans_nodes(c, lay) else gpu.nvlink)


# ---- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything `llada-train plan` reports for one config on one cluster."""

    layout: Layout
    gpu: GPU
    gpu_key: str
    params_total: int
    params_active: int
    params_experts: int
    states: ModelStates
    activations: Activations
    gathered: int  # ZeRO-3 parameters gathered at the peak, + the prefetch bucket
    collectives: list[Collective]
    time: StepTime

    @property
    def memory(self) -> dict[str, int]:
        """Per-rank bytes at the peak of a training step, by item."""
        s, a, lay = self.states, self.activations, self.layout
        saved = a.saved(lay.checkpointing)
        return {"parameters": s.params, "gradients": s.grads, "gradient buckets": s.grad_buckets,
                "optimizer states": s.optimizer, "gathered parameters": self.gathered, "activations": saved,
                "working memory": max(a.peak(lay.checkpointing), a.draft_peak) - saved}

    @property
    def total(self) -> int:
        """The larger of the backward's peak and the optimizer step's (fp32 gradient and AdamW's temporaries)."""
        return max(sum(self.memory.values()), self.states.step_peak)

    @property
    def usable(self) -> float:
        return self.gpu.memory * USABLE_MEMORY

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def make_plan(cfg, nodes: int, gpus_per_node: int, gpu: str = "h100", act: Activations | None = None,
              adam: str = "foreach") -> Plan:
    """The plan of a stage config; `act` reuses a trace of the same model and micro-batch shape; `adam`
    "single_tensor" plans AdamW as it runs on CPU."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown; use one of {', '.join(GPUS)}")
    lay = replace(layout_of(cfg, nodes, gpus_per_node), adam=adam)
    mcfg = model_config(cfg)
    inv = inventory(mcfg)
    if lay.ep > 1 and mcfg.num_experts % lay.ep:
        raise UserError(f"engine.expert_parallel={lay.ep} must divide model.num_experts ({mcfg.num_experts})")
    if lay.ep > 1 and lay.zero == 0:
        raise UserError(f"engine.expert_parallel={lay.ep} needs engine.zero_stage 1, 2 or 3")
    act = act or trace_activations(mcfg, lay)
    return _assemble(inv, lay, act, GPUS[gpu], gpu)


def _assemble(inv: Inventory, lay: Layout, act: Activations, gpu: GPU, key: str) -> Plan:
    collectives, gathered = communication(inv, lay, act)
    if lay.zero == 3:
        movable = sum(local_numel(p, lay) for p in inv.params if not persistent(p, lay) and group_size(p, lay) > 1)
        gathered = min(gathered + PREFETCH_BUCKET * lay.dtype_bytes, movable * lay.dtype_bytes)
    return Plan(lay, gpu, key, inv.total, inv.active, inv.experts, model_states(inv, lay), act, gathered,
                collectives, step_time(inv, lay, collectives, gpu))


# ---- not fitting: the knob to turn ----------------------------------------------------------------------------


def _variants(plan: Plan, inv: Inventory):
    """(knob, layout, activations) for each single change that lowers memory, cheapest first."""
    lay, act, experts = plan.layout, plan.activations, inv.config.num_experts
    if not lay.checkpointing:
        yield "model.gradient_checkpointing=true", replace(lay, checkpointing=True), act
    if lay.zero >= 1 and experts > 1:
        for n in range(lay.ep + 1, lay.world + 1):
            if lay.world % n == 0 and experts % n == 0:
                yield f"engine.expert_parallel={n}", replace(lay, ep=n), act
    if lay.zero < 3:
        yield "engine.zero_stage=3", replace(lay, zero=3), act
    accum, micro = lay.grad_accum, lay.micro_batch
    while micro % 2 == 0:
        accum, micro = accum * 2, micro // 2
        factor = micro / lay.micro_batch
        yield (f"train.grad_accum={accum} (micro-batch {micro})",
               replace(lay, grad_accum=accum, micro_batch=micro, rows=round(lay.rows * factor),
                       supervised=round(lay.supervised * factor)), act.scaled(factor))
    if not lay.offload_optimizer and lay.zero >= 1:
        yield "engine.offload_optimizer=true", replace(lay, offload_optimizer=True), act
    if lay.zero == 3 and not lay.offload_params:
        yield "engine.offload_params=true", replace(lay, offload_params=True), act


def knob_to_turn(plan: Plan, inv: Inventory) -> tuple[str, Plan] | None:
    """Of the single changes after which the plan fits, the one with the shortest estimated step; None
    when none fits. (Activations are those of the traced micro-batch, scaled by rows; a different EP
    size keeps the traced layer's experts: a slight overestimate.)"""
    fitting = []
    for knob, lay, act in _variants(plan, inv):
        candidate = _assemble(inv, lay, act, plan.gpu, plan.gpu_key)
        if candidate.fits:
            fitting.append((candidate.time.step_s, len(fitting), knob, candidate))
    return min(fitting)[2:] if fitting else None



# ---- output and the command ------------------------------------------------------------------------------------

GB = 1e9


def format_plan(plan: Plan) -> str:
    """The table `llada-train plan` prints."""
    lay, t, a = plan.layout, plan.time, plan.activations
    lines = [f"plan: {lay.name} on {lay.nodes} x {lay.gpus_per_node} {plan.gpu.name} ({lay.world} ranks), "
             f"ZeRO-{lay.zero} {'bf16' if lay.dtype_bytes == 2 else 'fp32'}, EP {lay.ep}",
             f"  model {plan.params_total / 1e9:.2f}B parameters ({plan.params_experts / 1e9:.2f}B in routed experts), "
             f"{plan.params_active / 1e9:.2f}B active per token",
             f"  per rank: micro-batch {lay.micro_batch} x grad_accum {lay.grad_accum} = {lay.rows} rows of "
             f"{lay.positions} positions per forward, {lay.supervised} to the lm_head; "
             f"gradient checkpointing {'on' if lay.checkpointing else 'off'}, attention {lay.attention}",
             "", f"{'memory per rank':<34}{'GB':>9}"]
    for item, size in plan.memory.items():
        note = {"activations": f"   (checkpointing {'off' if lay.checkpointing else 'on'}: "
                               f"{a.saved(not lay.checkpointing) / GB:.1f} + working "
                               f"{(a.peak(not lay.checkpointing) - a.saved(not lay.checkpointing)) / GB:.1f})"
                }.get(item, "")
        lines.append(f"  {item:<32}{size / GB:>9.2f}{note}")
    if plan.states.step_transient or plan.states.adam_temporaries:
        lines.append(f"  {'(optimizer step peak)':<32}{plan.states.step_peak / GB:>9.2f}   (fp32 gradient "
                     f"{plan.states.step_transient / GB:.2f} + AdamW sqrt(v) {plan.states.adam_temporaries / GB:.2f})")
    if plan.states.cpu:
        lines.append(f"  {'(offloaded to host memory)':<32}{plan.states.cpu / GB:>9.2f}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<32}{plan.total / GB:>9.2f}   of {plan.usable / GB:.1f} usable "
                 f"({USABLE_MEMORY:.0%} of {plan.gpu.memory / GB:.0f}): {verdict}")
    lines += ["", f"{'bytes per optimizer step per rank':<48}{'group':>8}{'calls':>7}{'payload GB':>12}"
                  f"{'sent GB':>10}{'link':>8}{'time s':>9}"]
    for c in plan.collectives:
        link = ("fabric" if spans_nodes(c, lay) else "nvlink") + ("" if c.overlapped else "*")
        lines.append(f"  {c.what[:46]:<46}{c.group:>4} {c.group_size:>3}{c.calls:>7.0f}{c.payload / GB:>12.3f}"
                     f"{c.sent / GB:>10.3f}{link:>8}{transfer_time(c, lay, plan.gpu):>9.3f}")
    lines += ["  (* on the critical path; the rest overlaps compute)", "",
              f"step time: compute {t.compute_s:.2f} s ({t.hardware_flops / 1e12:.0f} TFLOP per rank at "
              f"{GEMM_EFFICIENCY:.0%} of {plan.gpu.peak_flops / 1e12:.0f} TFLOP/s), communication "
              f"{t.overlapped_comm_s:.2f} s overlapped + {t.exposed_comm_s:.2f} s exposed",
              f"  = {t.step_s:.2f} s per optimizer step, MFU {t.mfu:.1%} "
              f"({t.model_flops / 1e12:.0f} model TFLOP per rank per step)"]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    return {"layout": asdict(plan.layout), "gpu": asdict(plan.gpu), "params_total": plan.params_total,
            "params_active": plan.params_active, "params_experts": plan.params_experts,
            "memory_bytes": plan.memory, "total_bytes": plan.total, "usable_bytes": plan.usable, "fits": plan.fits,
            "model_states": asdict(plan.states),
            "activations": {**{k: v for k, v in asdict(plan.activations).items() if k != "modules"},
                            **{f"{name}_{kind}": getattr(plan.activations, kind)(on)
                               for name, on in (("plain", False), ("checkpointed", True))
                               for kind in ("saved", "peak")}},
            "collectives": [asdict(c) | {"spans_nodes": spans_nodes(c, plan.layout),
                                         "seconds": transfer_time(c, plan.layout, plan.gpu)}
                            for c in plan.collectives],
            "step_time": asdict(plan.time)}


def main(argv: list[str] | None = None) -> int:
    """`llada-train plan`: prints the table; exit 2 with the knob to turn when the plan does not fit."""
    from .stages.registry import load_stage_config

    ap = argparse.ArgumentParser(prog="llada-train plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a CPT or SFT config (path or preset name)")
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the cluster")
    ap.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU (docs/scaling.md: assumptions)")
    ap.add_argument("--stage", choices=("cpt", "sft"), help="the config's stage (default: read from the file)")
    ap.add_argument("--json", type=Path, help="also write the plan as JSON here")
    ap.add_argument("overrides", nargs="*", help="dot.key=value overrides, e.g. engine.expert_parallel=8")
    args = ap.parse_args(argv)
    stage = args.stage or stage_of(args.config)
    if stage not in ("cpt", "sft"):
        raise UserError(f"{args.config}: an {stage.upper()} config; plan covers the cpt and sft stages")
    cfg = load_stage_config(stage, args.config, args.overrides)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu)
    print(format_plan(plan))
    if args.json:
        args.json.write_text(json.dumps(plan_json(plan), indent=1))
    if not plan.fits:
        raise UserError(refusal(plan, cfg))
    return 0


def refusal(plan: Plan, cfg) -> str:
    """One line: how far over, the largest items, and the knob that makes it fit."""
    items = sorted(plan.memory.items(), key=lambda kv: -kv[1])[:2]
    largest = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in items)
    head = (f"plan does not fit: {plan.total / GB:.1f} GB per rank > {plan.usable / GB:.1f} GB usable on "
            f"{plan.gpu.name} ({largest})")
    found = knob_to_turn(plan, inventory(model_config(cfg)))
    if found is None:
        return f"{head}; no single knob makes it fit: add nodes (--nodes) or use a larger GPU (--gpu)"
    knob, fixed = found
    return f"{head}; set {knob} ({fixed.total / GB:.1f} GB per rank)"



# ---- checking a plan against a real run ------------------------------------------------------------------------
def measured_activations(model, lay: Layout) -> tuple[int, int]:
    """(bytes saved for backward when the forward ends, most bytes alive) of one real training pass of
    `model` as it is (real tensors and routing; checkpointed if its `gradient_checkpointing` is on)
    through the recorder the trace uses: what `Activations.saved` and `.peak` predict at its depth."""
    recorder = _Recorder({_storage(t)[0] for t in [*model.parameters(), *model.buffers()]})
    inputs, targets, rows_idx, pos_idx = _fake_batch(lay, model.config)
    inputs["input_ids"] = torch.randint(0, model.config.vocab_size, inputs["input_ids"].shape)
    targets = torch.randint(0, model.config.vocab_size, targets.shape)
    _run_training_pass(model, recorder, inputs, targets, rows_idx, pos_idx, lay)
    return sum(size for size, _ in recorder.at_backward), recorder.peak


@dataclass
class CountedCollective:
    """What one rank passed to one kind of collective over groups of one size (a real run's count)."""

    kind: str  # all_gather | reduce_scatter | all_reduce | reduce | broadcast | all_to_all
    group_size: int
    calls: int = 0
    payload: int = 0  # bytes of the collective's whole buffer S, as `Collective.payload`
    sent: float = 0  # bytes this rank sends: the ring formulas, all-to-all rows addressed to other ranks


_KINDS = {"all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "reduce": "reduce",
          "broadcast": "broadcast", "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
          "_all_gather_base": "all_gather", "reduce_scatter": "reduce_scatter",
          "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
          "all_to_all_single": "all_to_all", "all_to_all": "all_to_all"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _payload(name: str, a: dict, n: int) -> tuple[int, float]:
    """(S, bytes this rank sends) of one call; `a`: its arguments by name (torch.distributed's names)."""
    ring = (n - 1) / n
    if name in ("all_reduce", "reduce", "broadcast"):
        s = _nbytes(a["tensor"])
        return s, (2 * ring if name == "all_reduce" else ring) * s
    if name == "all_reduce_coalesced":
        s = sum(_nbytes(t) for t in a["tensors"])
        return s, 2 * ring * s
    if name == "all_to_all_single":
        s, splits = _nbytes(a["input"]), a.get("input_split_sizes")
        if not splits:
            return s, ring * s
        me = torch.distributed.get_rank(a.get("group"))
        row = s / max(1, a["input"].shape[0])
        return s, row * sum(k for i, k in enumerate(splits) if i != me)
    s = {"all_gather": lambda: sum(_nbytes(t) for t in a["tensor_list"]),
         "all_gather_into_tensor": lambda: _nbytes(a["output_tensor"]),
         "_all_gather_base": lambda: _nbytes(a["output_tensor"]),
         "reduce_scatter": lambda: sum(_nbytes(t) for t in a["input_list"]),
         "reduce_scatter_tensor": lambda: _nbytes(a["input"]),
         "_reduce_scatter_base": lambda: _nbytes(a["input"]),
         "all_to_all": lambda: sum(_nbytes(t) for t in a["input_tensor_list"])}[name]()
    return s, ring * s


@contextlib.contextmanager
def count_collectives():
    """Every tensor collective of torch.distributed called inside, counted per (kind, group size):
    yields a dict {(kind, group_size): CountedCollective}. Nested calls (a deprecated alias calling its
    successor) count once."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    counts: dict = {}
    depth = threading.local()
    originals = {}

    def wrap(name, real):
        signature = inspect.signature(real)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            if getattr(depth, "n", 0) == 0:
                named = signature.bind_partial(*args, **kwargs).arguments
                n = dist.get_world_size(named.get("group"))
                s, sent = _payload(name, named, n)
                entry = counts.setdefault((_KINDS[name], n), CountedCollective(_KINDS[name], n))
                entry.calls, entry.payload, entry.sent = entry.calls + 1, entry.payload + s, entry.sent + sent
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return real(*args, **kwargs)
            finally:
                depth.n -= 1

        return counted

    for name in _KINDS:
        for module in (dist, c10d):
            real = getattr(module, name, None)
            if real is not None:
                originals[(module, name)] = real
                setattr(module, name, wrap(name, real))
    backend = _deepspeed_backend()  # DeepSpeed's TorchBackend keeps its own references to two of them
    for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                       ("reduce_scatter_function", "reduce_scatter_tensor")):
        if backend is not None and getattr(backend, attr, None) is not None:
            originals[(backend, attr)] = getattr(backend, attr)
            setattr(backend, attr, wrap(name, getattr(backend, attr)))
    try:
        yield counts
    finally:
        for (owner, name), real in originals.items():
            setattr(owner, name, real)


def _deepspeed_backend():
    """deepspeed.comm's backend object when DeepSpeed is loaded and initialised, else None."""

    comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(comm, "cdb", None) if comm is not None else None
