"""Block-wise randomized Hadamard transform (RHT), docs/design.md §9.

`rht` maps every run of d consecutive elements along one dim to x·H with
H = diag(s)·Hadamard(d)/√d and random signs s drawn from a seed. H is orthogonal, so rotating both
operands of a GEMM along its reduction dim leaves the product unchanged in exact arithmetic, while
each block's mass is spread over all of its d elements (outliers shrink, 4-bit grids use more levels).

Both implementations run the same radix-2 butterfly (Sylvester order) with the same fp32 operations
in the same order, so the Triton kernel and the torch reference agree bit for bit; the dense matrix
`hadamard_matrix` is the independent specification the butterfly is tested against.
"""

import math
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # No GPU: Triton has no compiler backend here, so its interpreter is the only way to run the
    # kernels (tests use it). Must be set before the @triton.jit decorators below run.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch reference path covers everything else
    triton = None

RHT_DIMS = (16, 32, 64, 128)


def check_rht_dim(d: int) -> None:
    if d not in RHT_DIMS:
        raise ValueError(f"rht_dim must be one of {RHT_DIMS}, got {d!r}")


def rht_signs(d: int, seed: int = 0, device=None) -> torch.Tensor:
    """The random diagonal s of H as fp32 ±1, (d,); a fixed function of (d, seed) on every device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device=device, dtype=torch.float32)


def hadamard_matrix(d: int, seed: int | None = 0, dtype=torch.float64) -> torch.Tensor:
    """Dense H = diag(s)·Hadamard(d)/√d, (d, d); Sylvester entries (-1)^popcount(i & j). s = 1 if seed is None."""
    check_rht_dim(d)
    i = torch.arange(d)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros(d, d, dtype=torch.long)
    for b in range(int(math.log2(d))):
        parity ^= (bits >> b) & 1
    h = (1 - 2 * parity).to(dtype) / math.sqrt(d)
    if seed is not None:
        h = rht_signs(d, seed).to(dtype)[:, None] * h
    return h


def rht_scale(d: int) -> torch.Tensor:
    """1/√d rounded once to fp32: the exact constant both implementations multiply by."""
    return torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32)


def fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of the last dim (a power of two), butterfly order."""
    lead, d = x.shape[:-1], x.shape[-1]
    h = 1
    while h < d:
        pairs = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x


def rht_blocks_torch(x: torch.Tensor, signs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x: (M, Kp) fp32 with Kp a multiple of d = len(signs) -> x·H (or x·Hᵀ), (M, Kp) fp32."""
    m, kp = x.shape
    d = signs.numel()
    blocks = x.reshape(m, kp // d, d)
    if not inverse:
        blocks = blocks * signs
    blocks = fwht_torch(blocks) * rht_scale(d).to(x.device)
    if inverse:
        blocks = blocks * signs
    return blocks.reshape(m, kp)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'auto' -> Triton for CUDA tensors, torch otherwise (the interpreter is far slower than torch)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton is not None else "torch"
    if impl == "triton":
        if triton is None:
            raise ValueError("impl='triton' needs the triton package (Linux); use impl='torch'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before importing triton")
    return impl


def as_rows(x: torch.Tensor, dim: int, multiple: int) -> tuple[torch.Tensor, int, int]:
    """View x as (M, K) rows along `dim` (moved last); returns it with K and K padded to `multiple`."""
    x2 = x.movedim(dim, -1)
    k = x2.shape[-1]
    return x2.reshape(-1, k), k, -(-k // multiple) * multiple


def rht(x: torch.Tensor, d: int, *, dim: int = -1, seed: int = 0, inverse: bool = False,
        impl: str = "auto") -> torch.Tensor:
    """Rotate consecutive blocks of d elements along `dim` by H (Hᵀ if inverse).

    `dim` is zero-padded to a multiple of d first (the padded tail rotates into non-zeros, so the
    result keeps the padded length; pad both GEMM operands alike and the product is unchanged).
    Returns x.dtype; computed in fp32.
    """
    check_rht_dim(d)
    impl = resolve_impl(impl, x)
    x2, k, kp = as_rows(x, dim, d)
    signs = rht_signs(d, seed, x.device)
    if impl == "torch":
        y = rht_blocks_torch(F.pad(x2.float(), (0, kp - k)), signs, inverse)
    else:
        y = torch.empty(x2.shape[0], kp, device=x.device, dtype=torch.float32)
        bm = 32
        grid = (triton.cdiv(x2.shape[0], bm), kp // d)
        _rht_kernel[grid](x2, y, signs, float(rht_scale(d)), x2.shape[0], k, kp, x2.stride(0), x2.stride(1),
                          BM=bm, D=d, LOG2D=int(math.log2(d)), INVERSE=inverse)
    lead = x.movedim(dim, -1).shape[:-1]
    return y.to(x.dtype).reshape(*lead, kp).movedim(-1, dim)


if triton is not None:

    @triton.jit
    def fwht_tile(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
        """Unnormalised Walsh-Hadamard transform of each row of an (R, D) tile; same order as fwht_torch."""
        for i in tl.static_range(LOG2D):
            H: tl.constexpr = 1 << i
            pairs = tl.permute(tl.reshape(x, (R, D // (2 * H), 2, H)), (0, 1, 3, 2))  # (R, D/2H, H, 2)
            a, b = tl.split(pairs)
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, D))
        return x

    @triton.jit
    def load_rotated_tile(x_ptr, signs_ptr, scale, rows, cols, M, K, stride_m, stride_k,
                          BM: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
        """Load x[rows, cols] as fp32 (zeros outside (M, K)) and rotate each run of D columns (D=0: none)."""
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_k
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (BM, BK)
        if D > 0:
            signs = tl.load(signs_ptr + tl.arange(0, D))
            x = tl.reshape(x, (BM * BK // D, D)) * signs[None, :]
            x = fwht_tile(x, BM * BK // D, D, LOG2D) * scale
            x = tl.reshape(x, (BM, BK))
        return x

    @triton.jit
    def _rht_kernel(x_ptr, y_ptr, signs_ptr, scale, M, K, Kp, stride_m, stride_k,
                    BM: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr, INVERSE: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * D + tl.arange(0, D)
        if INVERSE:
            y = fwht_tile(load_rotated_tile(x_ptr, signs_ptr, scale, rows, cols, M, K, stride_m, stride_k,
                                            BM, D, 0, 0), BM, D, LOG2D) * scale
            y = y * tl.load(signs_ptr + tl.arange(0, D))[None, :]
        else:
            y = load_rotated_tile(x_ptr, signs_ptr, scale, rows, cols, M, K, stride_m, stride_k, BM, D, D, LOG2D)
        out = y_ptr + rows[:, None].to(tl.int64) * Kp + cols[None, :]
        tl.store(out, y, mask=rows[:, None] < M)
