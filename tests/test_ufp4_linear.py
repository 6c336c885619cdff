import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter on CPU

import pytest
import torch
from torch import nn

from llada_train.kernels.fp4 import quantize_dequantize
from llada_train.kernels.ufp4_linear import (
    NVFP4,
    UFP4,
    FP4Linear,
    FP4Recipe,
    apply_fp4,
    fp4_grouped_linear,
    ufp4_linear,
)
from llada_train.model import LLaDA2MoeModelLM
from llada_train.model.moe import grouped_linear
from tests.conftest import tiny_config


def _run(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def _inputs(seed=0, shape=(3, 21, 48), out=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out, shape[-1], generator=g) * 0.2
    b = torch.randn(out, generator=g)
    dy = torch.randn(*shape[:-1], out, generator=g)
    return x, w, b, dy


def test_quantization_disabled_equals_nn_linear_exactly():
    x, w, b, dy = _inputs()
    off = FP4Recipe("none", rht_fprop=False, rht_dgrad=False, rht_wgrad=False)
    ref = _run(lambda x, w, b: nn.functional.linear(x, w, b), x, w, b, dy)
    got = _run(lambda x, w, b: ufp4_linear(x, w, b, off), x, w, b, dy)
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g)


def test_rht_cancels_with_identity_quantizer():
    x, w, b, dy = _inputs(1, shape=(2, 19, 40), out=24)  # token and feature dims need padding
    ref = _run(lambda x, w, b: nn.functional.linear(x, w, b), x, w, b, dy)
    for d in (16, 64):
        got = _run(lambda x, w, b, d=d: ufp4_linear(x, w, b, FP4Recipe("none", rht_dim=d)), x, w, b, dy)
        for r, g in zip(ref, got, strict=True):
            assert torch.allclose(r, g, atol=1e-4, rtol=1e-5)


def _emulate(recipe, x, w, b, dy, seed):
    """float64 GEMMs on the reference quantizer's values, wired per docs/design.md §9 independently of UFP4Linear."""
    def q(t, use_rht, sr_seed=None, block_2d=False):
        return quantize_dequantize(t, fmt=recipe.fmt, block_size=recipe.block_size, impl="torch",
                                   rht_dim=recipe.rht_dim if use_rht else None, rht_seed=recipe.rht_seed,
                                   rounding="rtne" if sr_seed is None else "sr", seed=sr_seed,
                                   block_2d=block_2d, scale_rounding=recipe.scale_rounding).double()

    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    sr = recipe.sr_grad
    y = q(x2, recipe.rht_fprop) @ q(w, recipe.rht_fprop, block_2d=recipe.weight_block_2d).t() + b.double()
    dx = q(dy2, recipe.rht_dgrad, seed if sr else None) @ q(w.t(), recipe.rht_dgrad,
                                                              block_2d=recipe.weight_block_2d).t()
    dw = q(dy2.t(), recipe.rht_wgrad, seed + 1 if sr else None) @ q(x2.t(), recipe.rht_wgrad).t()
    return y.reshape(*x.shape[:-1], -1), dx.reshape(x.shape), dw, dy2.double().sum(0)


@pytest.mark.parametrize("recipe", [UFP4, NVFP4, FP4Recipe("int4", rht_dim=32, block_size=32),
                                    FP4Recipe.from_config("nvfp4", scale_rounding="up")],
                         ids=["ufp4", "nvfp4", "int4-32", "nvfp4-scale-up"])
def test_forward_backward_equal_float64_emulation(recipe):
    x, w, b, dy = _inputs(2, shape=(2, 37, 48), out=40)
    got = _run(lambda x, w, b: ufp4_linear(x, w, b, recipe, seed=99), x, w, b, dy)
    ref = _emulate(recipe, x, w, b, dy, 99)
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(g.double(), r, atol=1e-5 * r.abs().max().item(), rtol=1e-5)
    exact = _run(lambda x, w, b: nn.functional.linear(x, w, b), x, w, b, dy)
    for e, g in zip(exact[:3], got[:3], strict=True):
        rel = ((g - e).norm() / e.norm()).item()
        assert 0.01 < rel < 0.4  # really quantized, and still close


def test_sr_seed_changes_only_the_gradients():
    x, w, b, dy = _inputs(3)
    a = _run(lambda x, w, b: ufp4_linear(x, w, b, UFP4, seed=1), x, w, b, dy)
    c = _run(lambda x, w, b: ufp4_linear(x, w, b, UFP4, seed=2), x, w, b, dy)
    assert torch.equal(a[0], c[0]) and torch.equal(a[3], c[3])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])


def test_fp4_linear_module_shares_parameters():
    lin = nn.Linear(32, 16)
    fp4 = FP4Linear.from_linear(lin, UFP4)
    assert fp4.weight is lin.weight and fp4.bias is lin.bias
    x = torch.randn(5, 32)
    torch.manual_seed(0)
    y = fp4(x)
    torch.manual_seed(0)
    assert torch.equal(y, ufp4_linear(x, lin.weight, lin.bias, UFP4))


def test_grouped_linear_is_a_per_expert_linear():
    torch.manual_seed(4)
    counts = torch.tensor([5, 0, 17, 3])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    w = (torch.randn(4, 24, 32) * 0.3).requires_grad_()
    off = FP4Recipe("none", rht_fprop=False, rht_dgrad=False, rht_wgrad=False)
    y = fp4_grouped_linear(x, w, counts, off)
    ref = grouped_linear(x, w, counts)
    assert torch.allclose(y, ref, atol=1e-6)
    torch.manual_seed(7)
    yq = fp4_grouped_linear(x, w, counts, UFP4)
    yq.sum().backward()
    assert w.grad[1].abs().max() == 0 and w.grad[0].abs().max() > 0
    torch.manual_seed(7)
    parts = [ufp4_linear(c, w[e], None, UFP4) for e, c in enumerate(x.split(counts.tolist())) if len(c)]
    assert torch.equal(yq, torch.cat(parts))


def _fp4_modules(model):
    return {n for n, m in model.named_modules() if isinstance(m, FP4Linear)}


def test_apply_fp4_swaps_only_eligible_gemms(tiny_model):
    model = tiny_model
    params = dict(model.named_parameters())
    swapped = apply_fp4(model, "ufp4", bf16_first_layers=1, bf16_last_layers=1)
    n = len(model.model.layers)
    kept = {0, n - 1}
    assert {int(s.split(".")[2]) for s in swapped} == set(range(n)) - kept
    for i in set(range(n)) - kept:
        layer = model.model.layers[i]
        assert isinstance(layer.attention.query_key_value, FP4Linear) and isinstance(layer.attention.dense, FP4Linear)
        assert layer.mlp.experts.matmul.func is fp4_grouped_linear
        assert isinstance(layer.mlp.shared_experts.down_proj, FP4Linear)
        assert not isinstance(layer.mlp.gate, FP4Linear) and not hasattr(layer.mlp.gate, "recipe")
    for i in kept:
        assert not any(s.startswith(f"model.layers.{i}.") for s in _fp4_modules(model))
    assert model.model.layers[n - 1].mlp.experts.matmul is grouped_linear
    assert not isinstance(model.lm_head, FP4Linear)  # stays high precision (whatever head class the model uses)
    assert all(s.startswith("model.layers.") for s in _fp4_modules(model))
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())  # optimizer references stay valid

    fresh = type(model)(model.config)
    everything = apply_fp4(fresh, "nvfp4", scale_rounding="up")
    assert any(s.startswith("model.layers.0.mlp.gate_proj") for s in everything)  # dense first layer
    assert fresh.model.layers[1].attention.dense.recipe.scale_rounding == "up"
    assert model.model.layers[1].attention.dense.recipe.scale_rounding == "nearest"  # the default
    assert apply_fp4(model, "none") == []
    with pytest.raises(ValueError, match=r"precision.fp4"):
        apply_fp4(model, "fp4")
    with pytest.raises(ValueError, match=r"precision.scale_rounding"):
        apply_fp4(model, "ufp4", scale_rounding="down")


def test_tiny_model_trains_in_ufp4():
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config(num_hidden_layers=2)).train()  # one dense, one MoE layer
    assert len(apply_fp4(model, "ufp4")) == 11  # 5 in the dense layer, 6 in the MoE one
    ids = torch.randint(2, 200, (2, 32))
    ids[:, 1::2] = ids[:, ::2]  # learnable structure: every odd token repeats the previous one
    masked = torch.rand(ids.shape) < 0.5
    inp = ids.masked_fill(masked, model.config.mask_token_id)
    labels = ids.masked_fill(~masked, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(inp, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def test_precision_scale_rounding_config_key():
    from llada_train.config import ConfigError
    from llada_train.stages.registry import load_stage_config

    assert load_stage_config("cpt", None, []).precision.scale_rounding == "nearest"
    assert load_stage_config("cpt", None, ["precision.scale_rounding=up"]).precision.scale_rounding == "up"
    with pytest.raises(ConfigError, match=r"precision.scale_rounding.*nearest or up"):
        load_stage_config("cpt", None, ["precision.scale_rounding=down"])
