"""CUDA-only checks (skipped without a GPU): the paths CPU tests cannot reach.

Grouped expert GEMMs in bf16 vs float64 (and the loop fallback), flex vs sdpa with torch's
compiled flex kernels in both directions, the Triton RHT/FP4 kernels compiled for the GPU
bit-exact vs their torch reference on the same device, cached == uncached decoding, and a 5-step
bf16 CPT run (ZeRO-0, one GPU) whose export reloads. `benchmarks/gpu_check.sh` runs this file.
"""

import random

import pytest
import torch

from llada_train.decoding import generate
from llada_train.kernels.fp4 import quantize, quantize_dequantize
from llada_train.kernels.hadamard import rht
from llada_train.model import LLaDA2MoeModelLM
from llada_train.model.attention import FLEX, attend
from llada_train.model.masks import AttentionLayout
from llada_train.model.moe import grouped_linear
from tests.conftest import tiny_config
from tests.test_cpt import cli, losses, tiny_args
from tests.test_flex import assert_same_grads, packed_layout, twin_models
from tests.test_fp4 import CASES, _bits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = "cuda"


def grouped_reference(x, w, counts):
    """float64 per-expert loop: token slice e times w[e]^T."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x[start:start + n].double() @ w[e].double().t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype,in_dim", [(torch.bfloat16, 128), (torch.float16, 128), (torch.bfloat16, 60)])
def test_grouped_gemm_matches_float64(dtype, in_dim):
    """bf16 at aligned sizes takes torch._grouped_mm; fp16 and a 120-byte row take the loop fallback."""
    torch.manual_seed(0)
    experts, out_dim = 8, 96
    counts = torch.tensor([5, 0, 17, 1, 33, 0, 8, 64])  # empty experts included
    x = torch.randn(int(counts.sum()), in_dim, device=CUDA, dtype=dtype, requires_grad=True)
    w = (torch.randn(experts, out_dim, in_dim, device=CUDA) / in_dim**0.5).to(dtype).requires_grad_()
    y = grouped_linear(x, w, counts.to(CUDA))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = grouped_reference(x64, w64, counts)
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=5e-2, rtol=2e-2)


def test_flex_equals_sdpa_on_cuda_logits_and_gradients():
    sdpa, flex = (m.to(CUDA) for m in twin_models())
    rng = random.Random(7)
    seq_len, block, batch = 256, 32, 2
    layout = packed_layout(seq_len, block, batch, rng)
    x = torch.randint(2, 4096, (batch, 2 * seq_len), device=CUDA)
    pos = torch.arange(seq_len, device=CUDA).repeat(2)[None].expand(batch, -1)
    weight = torch.randn(batch, 2 * seq_len, sdpa.config.vocab_size, device=CUDA)
    logits = {}
    for name, model in (("sdpa", sdpa), ("flex", flex)):
        lay = AttentionLayout("diffusion", seq_len, block, doc_ids=layout.doc_ids.to(CUDA),
                              pad_mask=layout.pad_mask.to(CUDA))
        logits[name] = model(x, attention_mask=lay, position_ids=pos).logits
        (logits[name] * weight).sum().backward()
    assert FLEX.mode("cuda") == "compiled"
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=2e-3, rtol=2e-3)
    assert_same_grads(sdpa, flex, rtol=5e-3)


def test_flex_bf16_attention_close_to_float64():
    torch.manual_seed(1)
    seq_len, block = 512, 32
    layout = AttentionLayout("diffusion", seq_len, block)
    q = torch.randn(2, 8, 2 * seq_len, 64, device=CUDA)
    k, v = torch.randn(2, 2, 2 * seq_len, 64, device=CUDA), torch.randn(2, 2, 2 * seq_len, 64, device=CUDA)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, 0.125, "flex")
    ref = attend(q.double(), k.double(), v.double(), layout, 0.125, "sdpa")
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fmt,rounding,rht_dim,shape,dim", CASES)
def test_triton_fp4_kernels_bit_exact_on_gpu(fmt, rounding, rht_dim, shape, dim):
    torch.manual_seed(shape[0])
    x = torch.randn(shape, device=CUDA) * 3
    x.view(-1)[::7] *= 1e-5  # E4M3 subnormal block scales
    kw = {"fmt": fmt, "rounding": rounding, "rht_dim": rht_dim, "seed": 123, "offset": 77, "rht_seed": 4,
          "dim": dim}
    fake_quant = [quantize_dequantize(x, impl=impl, **kw) for impl in ("torch", "triton")]
    assert torch.equal(*fake_quant)
    for a, b in zip(quantize(x, impl="torch", **kw), quantize(x, impl="triton", **kw), strict=True):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    if rht_dim is not None:
        rotated = [rht(x, rht_dim, dim=dim, seed=5, impl=impl) for impl in ("torch", "triton")]
        assert torch.equal(*rotated)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_decoding_equals_uncached_on_gpu(backend):
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config(attn_backend=backend)).to(CUDA).eval()
    cfg = model.config
    prompts = torch.randint(2, cfg.vocab_size, (3, 12), device=CUDA)
    plen = torch.tensor([12, 9, 5])
    kw = {"gen_length": 32, "block_length": 8, "threshold": 0.9, "editing_threshold": 0.8,
          "eos_token_id": cfg.eos_token_id, "mask_token_id": cfg.mask_token_id, "prompt_lengths": plen}
    cached = generate(model, prompts, use_cache=True, **kw)
    uncached = generate(model, prompts, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.nfe, uncached.nfe)


def test_bf16_cpt_steps_fall_and_export_reloads(tmp_path):
    run = tmp_path / "run"
    res = cli(*tiny_args(run, tmp_path / "cache", "train.steps=5", "train.eval_every=1000", "optim.lr=5e-3",
                         "train.save_every=1000", "engine.precision=bf16", "engine.zero_stage=0",
                         "model.attn_backend=flex"))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(run)
    assert len(curve) == 5 and all(torch.isfinite(torch.tensor(v)) for v in curve.values()), curve
    assert curve[max(curve)] < curve[min(curve)], curve
    model = LLaDA2MoeModelLM.from_pretrained(run / "hf").to(CUDA)
    ids = torch.randint(2, model.config.vocab_size, (1, 16), device=CUDA)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
