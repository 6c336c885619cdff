import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter on CPU

import pytest
import torch

from llada_train.kernels.fp4 import FORMATS, dequantize, quantize, quantize_dequantize


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _signed_grid(fmt):
    mags = FORMATS[fmt].magnitudes.double()
    return torch.cat((-mags.flip(0)[:-1], mags))  # 15 values


CASES = [  # every format x rounding, with RHT sizes, dims and odd shapes spread over them
    ("e1m2", "rtne", None, (37, 83), -1),
    ("e1m2", "sr", 32, (5, 29, 7), 1),
    ("int4", "rtne", 16, (19, 50), 0),
    ("int4", "sr", None, (3, 11, 45), -1),
    ("e2m1", "rtne", 128, (9, 133), -1),
    ("e2m1", "sr", 64, (70, 21), 0),
]


@pytest.mark.parametrize("fmt,rounding,rht_dim,shape,dim", CASES)
def test_triton_equals_torch_bitwise(fmt, rounding, rht_dim, shape, dim):
    torch.manual_seed(len(shape) * 1000 + shape[0])
    x = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 5
    kw = {"fmt": fmt, "rounding": rounding, "rht_dim": rht_dim, "seed": 123, "offset": 77, "rht_seed": 4, "dim": dim}
    a = quantize_dequantize(x, impl="torch", **kw)
    b = quantize_dequantize(x, impl="triton", **kw)
    assert torch.equal(a, b)
    qa, qb = quantize(x, impl="torch", **kw), quantize(x, impl="triton", **kw)
    for ta, tb in zip(qa, qb):
        assert ta.dtype == tb.dtype and torch.equal(_bits(ta), _bits(tb))
    assert qa.codes.dtype == torch.uint8 and qa.block_scales.dtype == torch.float8_e4m3fn
    deq = dequantize(qa, fmt=fmt)  # packed round trip gives the fake-quant values
    assert torch.equal(deq[..., : a.movedim(dim, -1).shape[-1]], a.movedim(dim, -1))


@pytest.mark.parametrize("fmt,rounding,rht_dim", [("e2m1", "rtne", None), ("e1m2", "sr", 16)])
def test_triton_equals_torch_bitwise_2d_blocks(fmt, rounding, rht_dim):
    torch.manual_seed(1)
    x = torch.randn(45, 37) * torch.rand(45, 1) * 3
    kw = {"fmt": fmt, "rounding": rounding, "rht_dim": rht_dim, "seed": 9, "block_2d": True}
    assert torch.equal(quantize_dequantize(x, impl="torch", **kw), quantize_dequantize(x, impl="triton", **kw))
    qa, qb = quantize(x, impl="torch", **kw), quantize(x, impl="triton", **kw)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(qa, qb))
    assert qa.block_scales.shape == (3, 48 // 16)


def test_2d_blocks_make_w_and_wt_quantize_alike():
    torch.manual_seed(2)
    w = torch.randn(40, 56)
    a = quantize_dequantize(w, fmt="e2m1", block_2d=True, dim=-1)
    b = quantize_dequantize(w, fmt="e2m1", block_2d=True, dim=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rounding", ["rtne", "sr"])
def test_grid_points_are_exact(fmt, rounding):
    torch.manual_seed(3)
    grid = _signed_grid(fmt).float()
    vals = grid[torch.randint(0, 15, (12, 64))]
    vals[:, ::16] = FORMATS[fmt].grid_max  # every block reaches the grid max
    x = vals * 2.0 ** torch.randint(-6, 6, (12, 4)).repeat_interleave(16, 1)  # power-of-two block scales
    for impl in ("torch", "triton"):
        assert torch.equal(quantize_dequantize(x, fmt=fmt, rounding=rounding, seed=0, impl=impl), x)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_rtne_is_deterministic_nearest_with_ties_to_even(fmt):
    torch.manual_seed(4)
    x = torch.randn(33, 48) * 2
    out = quantize_dequantize(x, fmt=fmt)
    assert torch.equal(out, quantize_dequantize(x, fmt=fmt))
    q = quantize(x, fmt=fmt)
    scale = q.block_scales.float().repeat_interleave(16, 1).double() * q.tensor_scale.double()  # (33, 48)
    v = x.double() / scale
    assert v.abs().max() <= FORMATS[fmt].grid_max  # no clipping
    grid = _signed_grid(fmt)
    dist = (v[..., None] - grid).abs()
    best = dist.min(-1, keepdim=True).values
    mag_idx = (torch.arange(15) - 7).abs()  # codes with an even magnitude index have an even mantissa
    cand = (dist == best) * 100 - (mag_idx % 2)  # among the nearest, prefer the even one
    ref = grid[cand.argmax(-1)] * scale
    assert torch.equal(out.double(), ref)


def test_block_amax_maps_near_the_grid_max():
    torch.manual_seed(5)
    x = torch.randn(64, 128) * torch.logspace(-2, 1.5, 64)[:, None]
    for fmt, g in FORMATS.items():
        q = quantize(x, fmt=fmt)
        scale = q.block_scales.float() * q.tensor_scale  # (64, 8)
        top = x.abs().reshape(64, 8, 16).amax(-1) / scale
        assert top.max() <= g.grid_max and top.min() >= g.grid_max / 1.125  # E4M3 ceil loses < 1 step


def test_int4_and_e1m2_are_the_same_grid():
    x = torch.randn(20, 64)
    assert torch.equal(quantize_dequantize(x, fmt="int4"), quantize_dequantize(x, fmt="e1m2"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_stochastic_rounding_is_unbiased(fmt):
    torch.manual_seed(6)
    x = torch.randn(1, 32)
    n = 2048
    samples = quantize_dequantize(x.expand(n, 32), fmt=fmt, rounding="sr", seed=17).double()  # (n, 32)
    err_small = (samples[:32].mean(0) - x.double()).abs().mean()
    err_big = (samples.mean(0) - x.double()).abs().mean()
    std = samples.std(0).mean()
    assert err_big < err_small / 3  # shrinks ~ 1/sqrt(n): 8x expected
    assert err_big < 3 * std / n**0.5
    rtne_bias = (quantize_dequantize(x, fmt=fmt).double() - x.double()).abs().mean()
    assert err_big < rtne_bias / 4
    other = quantize_dequantize(x.expand(n, 32), fmt=fmt, rounding="sr", seed=18)
    assert not torch.equal(other, samples.float())


def test_user_errors_name_the_argument():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="fmt"):
        quantize_dequantize(x, fmt="e3m0")
    with pytest.raises(ValueError, match="seed"):
        quantize_dequantize(x, fmt="e1m2", rounding="sr")
    with pytest.raises(ValueError, match="rounding"):
        quantize_dequantize(x, fmt="e1m2", rounding="floor")
    with pytest.raises(ValueError, match="block_2d"):
        quantize_dequantize(x[None], fmt="e1m2", block_2d=True)


def test_fp4_analysis_writes_table_plots_and_json(tmp_path, monkeypatch):
    from llada_train.kernels import analysis

    monkeypatch.setattr(analysis, "CONFIGS", [("e1m2", 16, "sr"), ("e2m1", None, "rtne")])
    monkeypatch.setattr(analysis, "GAUSSIAN_SHAPE", (256, 512))
    monkeypatch.setattr(analysis, "CAPTURE_SHAPE", (2, 64))
    result = analysis.main(["--out-dir", str(tmp_path), "--seed", "1"])
    assert {p.name for p in tmp_path.iterdir()} >= {"fp4_analysis.md", "fp4_analysis.json", "fp4_shrinkage.png"}
    rows = result["rows"]
    assert {r["source"] for r in rows} == {"gaussian", "activations", "weights", "gradients"}
    for r in rows:
        assert 0.9 < r["shrinkage"] < 1.1 and 0 < r["rel_mse"] < 0.1 and 0 < r["bucket_use"] <= 1
    sr = [r for r in rows if r["rounding"] == "sr"]
    assert all(abs(r["shrinkage"] - 1) < 0.01 for r in sr)  # SR is unbiased on real tensors too
    assert result["gaussian_exact_scale_rtne"]["e2m1"]["shrinkage"] < 1  # the paper's shrinkage bias
