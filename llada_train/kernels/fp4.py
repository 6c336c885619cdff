"""4-bit quantizers for training GEMMs: uniform E1M2/INT4 (UFP4) and E2M1 (NVFP4), docs/design.md §9.

A tensor is quantized along one dim (the GEMM's reduction dim) in blocks of `block_size` elements
(or `block_size`² tiles for 2-D weight blocks) with two-level scales, as NVFP4:

    tensor scale  s_t = 2^ceil(log2(amax(x) / (grid_max · 448)))         FP32, a power of two
    block scale   s_b = round_E4M3(block_amax / (grid_max · s_t))        E4M3, ≤ 448
    element       q   = round(x / (s_b · s_t)) on the grid, clamped      4-bit code
    value             = (q · s_b) · s_t

How the block scale is rounded to E4M3 (`scale_rounding`) is a choice with a measurable bias:

    nearest  RTNE to E4M3 (default). The block amax lands within a factor 1 ± 1/16 of the grid
             max; above it the value saturates at the grid max, which RTNE would pick anyway (the
             overshoot stays under half the grid's last step: 1/14 of the max for E1M2, 1/6 for
             E2M1), so only blocks with E4M3 subnormal scales (~2^-15 below the tensor amax) clip.
             Unbiased on Gaussian blocks (E1M2 ⟨q,x⟩/⟨x,x⟩ = 1.0001, docs/fp4.md).
    up       the smallest E4M3 ≥ the exact scale: nothing ever clips, but every block is squeezed
             into [grid_max/1.125, grid_max], which expands RTNE values by ~0.5% on both grids.

Stochastic rounding always uses `up`, whatever `scale_rounding` says: SR is unbiased only for
values inside the grid, and a block scale rounded down could push the amax past the grid max,
where SR would clip. (The smallest scale that never clips is exactly `up`, the lowest-variance
unbiased choice.) The tensor scale is a power of two
(NVFP4 uses amax/2688 itself; the E4M3 range is wide enough to give up that one binade), so scale
products are exact and values on the grid survive quantization unchanged. q · s_b is exact in bf16
(≤ 7 significant bits), so a GEMM can run on it and apply the tensor scales in its epilogue.

Rounding is RTNE or unbiased stochastic (Philox from an explicit seed and counter offset, the
same stream as Triton's `tl.rand`). An optional RHT (hadamard.py) rotates blocks of `rht_dim`
along the quantized dim first; the result then lives in the rotated basis.

One fused Triton kernel does RHT + block amax + scale + round + pack (a first pass computes the
global amax of the rotated tensor); the torch reference performs the same fp32 operations in the
same order, so both agree bit for bit.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .hadamard import as_rows, check_rht_dim, resolve_impl, rht_blocks_torch, rht_scale, rht_signs, triton

if triton is not None:
    import triton.language as tl

    from .hadamard import load_rotated_tile

E4M3_MAX = 448.0
ROUNDINGS = ("rtne", "sr")
SCALE_ROUNDINGS = ("nearest", "up")


@dataclass(frozen=True)
class Grid:
    """A signed 4-bit grid: magnitudes index 0..7 (bit 3 = sign); `step` = spacing if uniform, else 0."""

    code: int  # kernel constexpr
    grid_max: float
    step: float
    twos_complement: bool  # int4 codes are two's complement; the float formats are sign-magnitude

    @property
    def magnitudes(self) -> torch.Tensor:
        if self.step:
            return torch.arange(8, dtype=torch.float32) * self.step
        return torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


FORMATS = {
    "e1m2": Grid(0, 3.5, 0.5, False),  # 0.5·{0..7}: uniform
    "int4": Grid(1, 7.0, 1.0, True),  # {-7..7}: the same grid up to scale
    "e2m1": Grid(2, 6.0, 0.0, False),  # {0, .5, 1, 1.5, 2, 3, 4, 6}: NVFP4's element
}


def get_grid(fmt: str) -> Grid:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


class QuantizedFP4(NamedTuple):
    codes: torch.Tensor  # (..., Kp // 2) uint8, two codes per byte, even element in the low nibble
    block_scales: torch.Tensor  # (..., Kp // B) float8_e4m3fn; 2-D blocks: (ceil(M / B), Kp // B)
    tensor_scale: torch.Tensor  # () float32


# ---------------------------------------------------------------------------------------------
# torch reference


def philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """(..., 4) fp32 uniforms in [0, 1): the four Philox-4x32-10 words of each int64 counter.

    Word 0 equals Triton's `tl.rand(seed, counters)`; using all four quarters the cost per element.
    uint32 arithmetic is emulated in int64 (products split into 16-bit halves so nothing overflows).
    """
    m32 = 0xFFFFFFFF
    c0, c1 = counters & m32, (counters >> 32) & m32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & m32, (seed >> 32) & m32

    def mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo16, hi16 = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
        return (hi16 + (lo16 >> 16)) >> 16, (((hi16 & 0xFFFF) << 16) + lo16) & m32

    for _ in range(10):
        hi_b, lo_b = mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = mul_hi_lo(0xD2511F53, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    words = torch.stack((c0, c1, c2, c3), dim=-1)
    signed = torch.where(words >= 2**31, words - 2**32, words)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.int32).to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def sr_uniforms(seed: int, offset: int, m: int, kp: int, device=None) -> torch.Tensor:
    """(m, kp) uniforms for SR: element i of the row-major (m, kp) layout uses word i % 4 of counter
    offset + i // 4."""
    counters = torch.arange(m * kp // 4, device=device, dtype=torch.int64) + offset
    return philox_uniform(seed, counters).reshape(m, kp)


def rtne_rounds_up(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even, of f + r (f an integer, 0 ≤ r < 1): whether it goes up to f + 1."""
    return (r > 0.5) | ((r == 0.5) & ((f.to(torch.int32) & 1) == 1))


def e4m3_round(v: torch.Tensor, up: bool) -> torch.Tensor:
    """v: fp32 ≥ 0 -> E4M3 value, saturating at 448: the smallest ≥ v if `up`, else the nearest
    (ties to even mantissa)."""
    exp = ((v.view(torch.int32) >> 23) & 0xFF) - 127
    exp = exp.clamp(min=-6)  # below 2^-6 the E4M3 step is the subnormal 2^-9
    step = ((exp - 3 + 127) << 23).view(torch.float32)
    inv_step = ((127 - (exp - 3)) << 23).view(torch.float32)
    y = v * inv_step  # exact: mantissa steps of 2^(exp-3)
    if up:
        k = torch.ceil(y)
    else:
        f = torch.floor(y)
        k = f + rtne_rounds_up(f, y - f).float()
    return torch.clamp(k * step, max=E4M3_MAX)


def round_to_grid(v: torch.Tensor, grid: Grid, rounding: str, u: torch.Tensor | None):
    """v: fp32 in [-grid_max, grid_max] -> (signed grid value, magnitude index 0..7 int32)."""
    a = v.abs()
    step = torch.full_like(a, grid.step) if grid.step else torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    y = a * (1.0 / step)  # exact: step is a power of two
    f = torch.floor(y)
    r = y - f
    up = rtne_rounds_up(f, r) if rounding == "rtne" else u < r
    q = torch.clamp((f + up.float()) * step, max=grid.grid_max)
    if grid.step:
        idx = (q * (1.0 / grid.step)).to(torch.int32)
    else:
        idx = torch.where(q <= 2.0, q * 2.0, torch.where(q == 3.0, 5.0, torch.where(q == 4.0, 6.0, 7.0)))
        idx = idx.to(torch.int32)
    return torch.where(v < 0, -q, q), idx


def encode(idx: torch.Tensor, negative: torch.Tensor, grid: Grid) -> torch.Tensor:
    """4-bit codes (uint8 0..15); a zero magnitude always gets code 0."""
    neg = negative & (idx > 0)
    if grid.twos_complement:
        return torch.where(neg, 16 - idx, idx).to(torch.uint8)
    return (idx | (neg.to(torch.int32) << 3)).to(torch.uint8)


def decode(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """uint8 codes 0..15 -> signed grid values, fp32."""
    c = codes.to(torch.int64)
    if grid.twos_complement:
        return torch.where(c >= 8, c - 16, c).float() * grid.step
    mag = grid.magnitudes.to(codes.device)[c & 7]
    return torch.where(c >= 8, -mag, mag)


def tensor_scale(amax: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Smallest power of two s_t with amax / s_t ≤ grid_max · 448 (E4M3's max); 1 for all-zero x."""
    ratio = amax.float() / torch.tensor(grid.grid_max * E4M3_MAX, dtype=torch.float32)
    mant, exp = torch.frexp(ratio)  # ratio = mant · 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(ratio), exp), 1.0)


def _quantize_torch(x2, k, kp, grid, block_size, signs, rounding, seed, offset, block_2d, scale_up):
    """x2: (M, K) -> (signed grid values (M, Kp), block scales fp32 (Mb, Kp/B), s_t, codes (M, Kp) uint8)."""
    m = x2.shape[0]
    x = F.pad(x2.float(), (0, kp - k))
    if signs is not None:
        x = rht_blocks_torch(x, signs)
    s_t = tensor_scale(x.abs().max() if x.numel() else torch.zeros(()), grid).to(x.device)
    nb = kp // block_size
    if block_2d:
        mp = -(-m // block_size) * block_size
        tiles = F.pad(x, (0, 0, 0, mp - m)).abs().reshape(mp // block_size, block_size, nb, block_size)
        bamax = tiles.amax(dim=(1, 3))  # (Mb, nb)
        s_b = e4m3_round(bamax / (grid.grid_max * s_t), scale_up)
        elem_scale = s_b.repeat_interleave(block_size, 0)[:m]  # (M, nb)
    else:
        bamax = x.abs().reshape(m, nb, block_size).amax(-1)
        s_b = e4m3_round(bamax / (grid.grid_max * s_t), scale_up)
        elem_scale = s_b
    scale = (elem_scale * s_t)[:, :, None]  # (M, nb, 1)
    xb = x.reshape(m, nb, block_size)
    v = torch.where(scale > 0, xb / torch.where(scale > 0, scale, 1.0), 0.0)
    u = None
    if rounding == "sr":
        u = sr_uniforms(seed, offset, m, kp, x.device).reshape(m, nb, block_size)
    q, idx = round_to_grid(v, grid, rounding, u)
    codes = encode(idx, v < 0, grid)
    return q.reshape(m, kp), s_b, s_t, codes.reshape(m, kp)


# ---------------------------------------------------------------------------------------------
# public API


def _check(fmt, block_size, rht_dim, rounding, seed, offset, block_2d, x, scale_rounding):
    grid = get_grid(fmt)
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, got {scale_rounding!r}")
    if block_size not in (8, 16, 32, 64, 128):
        raise ValueError(f"block_size must be a power of two in 8..128, got {block_size!r}")
    if rht_dim is not None:
        check_rht_dim(rht_dim)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "sr" and (seed is None or not 0 <= seed < 2**63 or offset < 0):
        raise ValueError("rounding='sr' needs an explicit seed in [0, 2^63) and offset >= 0")
    if block_2d and x.dim() != 2:
        raise ValueError(f"block_2d needs a 2-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    return grid


def _run(x, fmt, block_size, rht_dim, rounding, seed, offset, rht_seed, dim, block_2d, impl, pack, scale_rounding):
    """Shared driver. pack=False -> (q·s_b (M, Kp) fp32, s_t); pack=True -> (codes, scale bits, s_t)."""
    grid = _check(fmt, block_size, rht_dim, rounding, seed, offset, block_2d, x, scale_rounding)
    scale_up = rounding == "sr" or scale_rounding == "up"  # SR never clips (module docstring)
    impl = resolve_impl(impl, x)
    if block_2d:
        dim = dim % 2
    width = max(block_size, rht_dim or 1)
    x2, k, kp = as_rows(x, dim, width)
    signs = rht_signs(rht_dim, rht_seed, x.device) if rht_dim else None
    m = x2.shape[0]
    if impl == "torch":
        q, s_b, s_t, codes = _quantize_torch(x2, k, kp, grid, block_size, signs, rounding, seed, offset, block_2d,
                                             scale_up)
        if pack:
            packed = codes.reshape(m, kp // 2, 2)
            packed = packed[..., 0] | (packed[..., 1] << 4)
            return packed, s_b.to(torch.float8_e4m3fn), s_t
        nb = kp // block_size
        elem_scale = s_b.repeat_interleave(block_size, 0)[:m] if block_2d else s_b
        return (q.reshape(m, nb, block_size) * elem_scale[:, :, None]).reshape(m, kp), s_t
    return _quantize_triton(x2, k, kp, grid, block_size, rht_dim, signs, rounding, seed, offset, block_2d, pack,
                            scale_up)


def quantize_dequantize(x: torch.Tensor, *, fmt: str, block_size: int = 16, rht_dim: int | None = None,
                        rounding: str = "rtne", seed: int | None = None, offset: int = 0, rht_seed: int = 0,
                        dim: int = -1, block_2d: bool = False, impl: str = "auto",
                        scale_rounding: str = "nearest") -> torch.Tensor:
    """Fake-quantize x along `dim`: the value each element takes after 4-bit quantization, x.dtype.

    Without RHT the shape is x's; with `rht_dim` the result is in the rotated basis and `dim` is
    zero-padded to a multiple of max(block_size, rht_dim). SR element i of the (rows, padded dim)
    layout uses Philox counter `offset + i`. `scale_rounding` (nearest | up) rounds the E4M3 block
    scales of RTNE operands; SR always rounds them up (module docstring).
    """
    v, s_t = block_scaled(x, fmt=fmt, block_size=block_size, rht_dim=rht_dim, rounding=rounding, seed=seed,
                          offset=offset, rht_seed=rht_seed, dim=dim, block_2d=block_2d, impl=impl,
                          scale_rounding=scale_rounding)
    return (v * s_t).to(x.dtype)


def block_scaled(x: torch.Tensor, *, fmt: str, block_size: int = 16, rht_dim: int | None = None,
                 rounding: str = "rtne", seed: int | None = None, offset: int = 0, rht_seed: int = 0,
                 dim: int = -1, block_2d: bool = False, impl: str = "auto",
                 scale_rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """As quantize_dequantize but split: (q·s_b fp32, exact in bf16; tensor scale s_t) with value = q·s_b·s_t."""
    v, s_t = _run(x, fmt, block_size, rht_dim, rounding, seed, offset, rht_seed, dim, block_2d, impl, False,
                  scale_rounding)
    if block_2d:
        dim = dim % 2
    lead = x.movedim(dim, -1).shape[:-1]
    if rht_dim is None:
        v = v[:, : x.shape[dim]]
    return v.reshape(*lead, v.shape[-1]).movedim(-1, dim), s_t


def quantize(x: torch.Tensor, *, fmt: str, block_size: int = 16, rht_dim: int | None = None,
             rounding: str = "rtne", seed: int | None = None, offset: int = 0, rht_seed: int = 0,
             dim: int = -1, block_2d: bool = False, impl: str = "auto",
             scale_rounding: str = "nearest") -> QuantizedFP4:
    """Packed 4-bit codes + E4M3 block scales + FP32 tensor scale; `dim` is moved last and padded."""
    codes, s_b, s_t = _run(x, fmt, block_size, rht_dim, rounding, seed, offset, rht_seed, dim, block_2d, impl, True,
                           scale_rounding)
    lead = x.movedim(dim % x.dim() if block_2d else dim, -1).shape[:-1]
    if not block_2d:
        s_b = s_b.reshape(*lead, s_b.shape[-1])
    return QuantizedFP4(codes.reshape(*lead, codes.shape[-1]), s_b, s_t)


def dequantize(q: QuantizedFP4, *, fmt: str, block_size: int = 16, block_2d: bool = False) -> torch.Tensor:
    """Values (..., Kp) fp32 of a `quantize` result, in its layout (quantized dim last, padded)."""
    grid = get_grid(fmt)
    codes, s_b, s_t = q
    vals = torch.stack((decode(codes & 0xF, grid), decode(codes >> 4, grid)), dim=-1)
    vals = vals.reshape(*codes.shape[:-1], -1)  # (..., Kp)
    scales = s_b.float()
    if block_2d:
        scales = scales.repeat_interleave(block_size, 0)[: vals.shape[0]]
    vals = vals.reshape(*vals.shape[:-1], -1, block_size) * scales[..., None]
    return vals.reshape(*codes.shape[:-1], -1) * s_t


# ---------------------------------------------------------------------------------------------
# Triton


def _quantize_triton(x2, k, kp, grid, block_size, rht_dim, signs, rounding, seed, offset, block_2d, pack, scale_up):
    m = x2.shape[0]
    dev = x2.device
    bk = max(block_size, rht_dim or 1)
    bm = block_size if block_2d else max(16, 2048 // bk)
    d = rht_dim or 0
    if signs is None:
        signs = torch.ones(1, device=dev)
    rscale = float(rht_scale(d)) if d else 1.0
    grid_shape = (triton.cdiv(m, bm), kp // bk)
    common = {"BM": bm, "BK": bk, "D": d, "LOG2D": int(math.log2(d)) if d else 0}
    partial = torch.zeros(grid_shape[0] * grid_shape[1], device=dev, dtype=torch.float32)
    if m:
        _amax_kernel[grid_shape](x2, signs, rscale, partial, m, k, x2.stride(0), x2.stride(1), **common)
    s_t = tensor_scale(partial.max() if partial.numel() else torch.zeros((), device=dev), grid)
    nb = kp // block_size
    mb = triton.cdiv(m, block_size) if block_2d else m
    if pack:
        out = torch.empty(m, kp // 2, device=dev, dtype=torch.uint8)
        scales = torch.empty(mb, nb, device=dev, dtype=torch.uint8)
    else:
        out = torch.empty(m, kp, device=dev, dtype=torch.float32)
        scales = out  # unused
    if m:
        _quantize_kernel[grid_shape](
            x2, signs, rscale, s_t, out, scales, m, k, kp, x2.stride(0), x2.stride(1), seed or 0, offset,
            B=block_size, BLOCK_2D=block_2d, FMT=grid.code, GRID_MAX=grid.grid_max, SR=rounding == "sr",
            PACK=pack, SCALE_UP=scale_up, **common)
    if pack:
        return out, scales.view(torch.float8_e4m3fn), s_t
    return out, s_t


if triton is not None:

    # Reductions and the RNG below avoid calling triton's own @jit helpers (tl.max, tl.rand): those
    # are compiled-mode objects when triton was imported before TRITON_INTERPRET was set
    # (transformers imports it early) and then fail in the CPU interpreter. tl.reduce with
    # _elementwise_max is what tl.max does, and the interpreter maps it to numpy's max.
    _max2 = tl.standard._elementwise_max

    @triton.jit
    def _philox_uniform4(seed, counters):
        """The four words of philox_uniform above as an (*counters.shape, 4) fp32 tensor."""
        seed = seed.to(tl.uint64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c0 = (counters & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((counters >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c2 = c0 * 0
        c3 = c0 * 0
        for _ in tl.static_range(10):
            b_c2, a_c0 = c2, c0
            c0 = tl.math.umulhi(b_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.math.umulhi(a_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = b_c2 * 0xCD9E8D57
            c3 = a_c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        # [..., j, i] holds word 2j + i: c0, c1, c2, c3 once the last two axes are flattened.
        r = tl.join(tl.join(c0, c2), tl.join(c1, c3)).to(tl.int32, bitcast=True)
        r = tl.where(r < 0, -r - 1, r)
        return r.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _amax_kernel(x_ptr, signs_ptr, rscale, partial_ptr, M, K, stride_m, stride_k,
                     BM: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_k * BK + tl.arange(0, BK)
        x = load_rotated_tile(x_ptr, signs_ptr, rscale, rows, cols, M, K, stride_m, stride_k, BM, BK, D, LOG2D)
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_k, tl.reduce(tl.reduce(tl.abs(x), 1, _max2), 0, _max2))

    @triton.jit
    def _rtne_rounds_up(f, r):
        """rtne_rounds_up above."""
        return (r > 0.5) | ((r == 0.5) & ((f.to(tl.int32) & 1) == 1))

    @triton.jit
    def _e4m3_round(v, UP: tl.constexpr):
        """(e4m3_round(v, UP), its 8-bit encoding) for fp32 v ≥ 0."""
        exp = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - (exp - 3)) << 23).to(tl.float32, bitcast=True)
        y = v * inv_step
        if UP:
            k = tl.ceil(y)  # 0..16: mantissa steps of 2^(exp-3)
        else:
            f = tl.floor(y)
            k = f + _rtne_rounds_up(f, y - f).to(tl.float32)
        ki = k.to(tl.int32)
        bits = tl.where(ki >= 16, (exp + 8) << 3, tl.where(ki >= 8, ((exp + 7) << 3) | (ki - 8), ki))
        val = k * step
        sat = val > 448.0
        return tl.where(sat, 448.0, val), tl.where(sat, 0x7E, bits).to(tl.uint8)

    @triton.jit
    def _quantize_kernel(x_ptr, signs_ptr, rscale, st_ptr, out_ptr, scales_ptr, M, K, Kp, stride_m, stride_k,
                         seed, offset, BM: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
                         B: tl.constexpr, BLOCK_2D: tl.constexpr, FMT: tl.constexpr, GRID_MAX: tl.constexpr,
                         SR: tl.constexpr, PACK: tl.constexpr, SCALE_UP: tl.constexpr):
        NB: tl.constexpr = BK // B
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_k * BK + tl.arange(0, BK)
        x = load_rotated_tile(x_ptr, signs_ptr, rscale, rows, cols, M, K, stride_m, stride_k, BM, BK, D, LOG2D)
        x = tl.reshape(x, (BM, NB, B))
        s_t = tl.load(st_ptr)

        bamax = tl.reduce(tl.abs(x), 2, _max2)  # (BM, NB)
        if BLOCK_2D:
            bamax = tl.broadcast_to(tl.reduce(bamax, 0, _max2)[None, :], (BM, NB))
        s_b, s_bits = _e4m3_round(tl.math.div_rn(bamax, GRID_MAX * s_t), SCALE_UP)
        scale = (s_b * s_t)[:, :, None]
        v = tl.where(scale > 0, tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)), 0.0)  # (BM, NB, B)

        a = tl.abs(v)
        if FMT == 2:
            step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
        elif FMT == 1:
            step = tl.full(a.shape, 1.0, tl.float32)
        else:
            step = tl.full(a.shape, 0.5, tl.float32)
        y = a * (1.0 / step)
        f = tl.floor(y)
        r = y - f
        if SR:
            ccols = pid_k * (BK // 4) + tl.arange(0, BK // 4)
            counters = rows[:, None].to(tl.int64) * (Kp // 4) + ccols[None, :].to(tl.int64) + offset
            u = tl.reshape(_philox_uniform4(seed, counters), (BM, NB, B))
            up = u < r
        else:
            up = _rtne_rounds_up(f, r)
        q = tl.minimum((f + up.to(tl.float32)) * step, GRID_MAX)
        if FMT == 2:
            idx = tl.where(q <= 2.0, q * 2.0, tl.where(q == 3.0, 5.0, tl.where(q == 4.0, 6.0, 7.0))).to(tl.int32)
        elif FMT == 1:
            idx = q.to(tl.int32)
        else:
            idx = (q * 2.0).to(tl.int32)
        row_ok = rows < M
        if PACK:
            neg = (v < 0) & (idx > 0)
            code = tl.where(neg, 16 - idx, idx) if FMT == 1 else idx | neg.to(tl.int32) << 3
            lo, hi = tl.split(tl.reshape(code, (BM, BK // 2, 2)))
            packed = (lo | (hi << 4)).to(tl.uint8)
            pcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * (Kp // 2) + pcols[None, :], packed,
                     mask=row_ok[:, None])
            scols = pid_k * NB + tl.arange(0, NB)
            if BLOCK_2D:
                s_row = tl.reduce(s_bits.to(tl.int32), 0, _max2).to(tl.uint8)  # all rows of a tile are equal
                tl.store(scales_ptr + pid_m * (Kp // B) + scols, s_row)
            else:
                tl.store(scales_ptr + rows[:, None].to(tl.int64) * (Kp // B) + scols[None, :], s_bits,
                         mask=row_ok[:, None])
        else:
            val = tl.reshape(tl.where(v < 0, -q, q) * s_b[:, :, None], (BM, BK))
            tl.store(out_ptr + rows[:, None].to(tl.int64) * Kp + cols[None, :], val, mask=row_ok[:, None])
