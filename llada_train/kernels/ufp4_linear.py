"""4-bit training linears: all three GEMMs quantized along their own reduction dim (docs/design.md §9).

    fprop  Y  = X·Wᵀ    X, W   rotated + quantized along in_features   RTNE
    dgrad  dX = dY·W    dY, W  rotated + quantized along out_features  dY stochastic, W RTNE
    wgrad  dW = dYᵀ·X   dY, X  rotated + quantized along tokens        dY stochastic, X RTNE

Both operands of a GEMM share one RHT, so it cancels in the product; only the quantization error
remains. Each GEMM runs on q·s_b (exact in bf16) and applies the two FP32 tensor scales after, as
block-scaled 4-bit tensor cores do. `UFP4` (uniform E1M2 grid, RHT everywhere, SR on dY only) is the
paper's recipe; `NVFP4` (E2M1, RHT on wgrad only, 16×16 weight blocks) is the baseline.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fp4 import FORMATS, SCALE_ROUNDINGS, block_scaled
from .hadamard import RHT_DIMS, rht


@dataclass(frozen=True)
class FP4Recipe:
    """How a linear layer's three GEMMs are quantized. fmt="none" is the identity quantizer."""

    fmt: str = "e1m2"
    block_size: int = 16
    rht_dim: int = 16
    rht_fprop: bool = True
    rht_dgrad: bool = True
    rht_wgrad: bool = True
    sr_grad: bool = True  # stochastic rounding on dY (dgrad and wgrad); X and W are always RTNE
    weight_block_2d: bool = False  # block_size² weight tiles: W and Wᵀ quantize identically (NVFP4)
    rht_seed: int = 0  # random signs of H, shared by both operands of each GEMM
    scale_rounding: str = "nearest"  # E4M3 block scales of X and W (fp4.py); SR'd dY always rounds up

    def __post_init__(self):
        if self.fmt != "none" and self.fmt not in FORMATS:
            raise ValueError(f"FP4Recipe.fmt must be 'none' or one of {sorted(FORMATS)}, got {self.fmt!r}")
        if self.rht_dim not in RHT_DIMS:
            raise ValueError(f"precision.rht_dim must be one of {RHT_DIMS}, got {self.rht_dim!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"precision.fp4_block must be a power of two in 8..128, got {self.block_size!r}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"precision.scale_rounding must be one of {SCALE_ROUNDINGS}, "
                             f"got {self.scale_rounding!r}")

    @classmethod
    def from_config(cls, fp4: str, fp4_block: int = 16, rht_dim: int = 16,
                    scale_rounding: str = "nearest") -> "FP4Recipe | None":
        """The recipe for config `precision.fp4` (none | ufp4 | nvfp4); None means full precision."""
        if fp4 == "none":
            return None
        if fp4 == "ufp4":
            return cls("e1m2", fp4_block, rht_dim, scale_rounding=scale_rounding)
        if fp4 == "nvfp4":
            return cls("e2m1", fp4_block, rht_dim, rht_fprop=False, rht_dgrad=False, weight_block_2d=True,
                       scale_rounding=scale_rounding)
        raise ValueError(f"precision.fp4 must be one of none, ufp4, nvfp4; got {fp4!r}")


UFP4 = FP4Recipe.from_config("ufp4")
NVFP4 = FP4Recipe.from_config("nvfp4")


def _qmm(a: torch.Tensor, b: torch.Tensor, recipe: FP4Recipe, *, use_rht: bool, sr_seed: int | None = None,
         b_block_2d: bool = False) -> torch.Tensor:
    """a: (M, K), b: (N, K) -> a·bᵀ (M, N) fp32 with both operands quantized along K.

    `a` is stochastic-rounded with `sr_seed` when given; `b` is always RTNE.
    """
    d = recipe.rht_dim if use_rht else None
    if recipe.fmt == "none":
        if d:
            a, b = rht(a.float(), d, seed=recipe.rht_seed), rht(b.float(), d, seed=recipe.rht_seed)
        return a.float() @ b.float().t()
    kw = {"fmt": recipe.fmt, "block_size": recipe.block_size, "rht_dim": d, "rht_seed": recipe.rht_seed,
          "scale_rounding": recipe.scale_rounding}
    qa, sa = block_scaled(a, rounding="sr" if sr_seed is not None else "rtne", seed=sr_seed, **kw)
    qb, sb = block_scaled(b, block_2d=b_block_2d and b.dim() == 2, **kw)
    # q·s_b is exact in bf16/fp16, so low-precision inputs run the GEMM there (fp32 accumulation).
    dt = a.dtype if a.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return (qa.to(dt) @ qb.to(dt).t()).float() * (sa * sb)


class UFP4Linear(torch.autograd.Function):
    """y = x·Wᵀ + b with the fprop, dgrad and wgrad GEMMs quantized per `recipe` (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: FP4Recipe, seed: int):
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.seed, ctx.has_bias = recipe, seed, bias is not None
        if recipe.fmt == "none" and not recipe.rht_fprop:
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        y = _qmm(x2, weight, recipe, use_rht=recipe.rht_fprop, b_block_2d=recipe.weight_block_2d)  # (T, out)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        recipe, seed = ctx.recipe, ctx.seed
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        exact = recipe.fmt == "none"
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if exact and not recipe.rht_dgrad:
                dx = dy2.mm(weight)
            else:
                dx = _qmm(dy2, weight.t(), recipe, use_rht=recipe.rht_dgrad, b_block_2d=recipe.weight_block_2d,
                          sr_seed=seed if recipe.sr_grad else None)  # (T, in)
            dx = dx.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            if exact and not recipe.rht_wgrad:
                dw = dy2.t().mm(x2)
            else:
                dw = _qmm(dy2.t(), x2.t(), recipe, use_rht=recipe.rht_wgrad,
                          sr_seed=seed + 1 if recipe.sr_grad else None)  # (out, in)
            dw = dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None


def ufp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: FP4Recipe,
                seed: int | None = None) -> torch.Tensor:
    """x: (..., in), weight: (out, in) -> (..., out). `seed` seeds the SR of dY (seed for dgrad,
    seed + 1 for wgrad); None draws one from torch's CPU generator, so runs replay under torch.manual_seed."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return UFP4Linear.apply(x, weight, bias, recipe, seed)


def fp4_grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, recipe: FP4Recipe) -> torch.Tensor:
    """Routed experts in 4-bit: x (T, in) sorted by expert, w (E, out, in), counts (E,) -> (T, out).

    One quantized linear per expert with tokens (a loop over experts, never over tokens); each
    expert's GEMMs get their own block scales, as a grouped 4-bit GEMM would.
    """
    chunks = x.split(counts.tolist())
    outs = [ufp4_linear(chunk, w[e], None, recipe) if chunk.shape[0] else chunk.new_zeros(0, w.shape[1])
            for e, chunk in enumerate(chunks)]
    return torch.cat(outs, dim=0)


class FP4Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in 4-bit per `recipe` (same parameters)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: FP4Recipe,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP4Recipe) -> "FP4Linear":
        """Wrap an existing layer, sharing its Parameter objects (optimizers and hooks stay valid)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ufp4_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp4={self.recipe.fmt}"


def apply_fp4(model: nn.Module, fmt: str, *, block: int = 16, rht_dim: int = 16, bf16_first_layers: int = 0,
              bf16_last_layers: int = 0, scale_rounding: str = "nearest") -> list[str]:
    """Swap the eligible GEMMs of `model.model.layers[i]` to 4-bit (`fmt` = precision.fp4); returns their names.

    Eligible: every nn.Linear under `.attention` and `.mlp` (dense MLPs and shared experts) and the
    fused routed experts' `matmul`. Kept in high precision: the router (`mlp.gate`), embeddings,
    lm_head, norms, and the first `bf16_first_layers` / last `bf16_last_layers` layers.
    """
    recipe = FP4Recipe.from_config(fmt, block, rht_dim, scale_rounding)
    if recipe is None:
        return []
    for key, n in (
        ("precision.bf16_first_layers", bf16_first_layers),
        ("precision.bf16_last_layers", bf16_last_layers),
    ):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{key} must be a non-negative int, got {n!r}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"apply_fp4 needs a model with .model.layers (LLaDA2MoeModelLM), got {type(model).__name__}")
    swapped = []
    for i, layer in enumerate(layers):
        if i < bf16_first_layers or i >= len(layers) - bf16_last_layers:
            continue
        for part in ("attention", "mlp"):
            root = getattr(layer, part, None)
            if root is None:
                continue
            for name, mod in list(root.named_modules()):
                if part == "mlp" and (name == "gate" or name.startswith("gate.")):
                    continue  # the router: its logits pick experts, keep them exact
                full = f"model.layers.{i}.{part}.{name}"
                if type(mod) is nn.Linear:
                    parent, _, child = name.rpartition(".")
                    setattr(root.get_submodule(parent), child, FP4Linear.from_linear(mod, recipe))
                    swapped.append(full)
                elif callable(getattr(mod, "matmul", None)) and getattr(mod, "gate_proj", None) is not None:
                    mod.matmul = functools.partial(fp4_grouped_linear, recipe=recipe)
                    swapped.append(full)
    return swapped
