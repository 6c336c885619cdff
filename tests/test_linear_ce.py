"""Chunked linear cross-entropy (model/linear_ce.py) against the full-logit computation: values,
entropies, argmax and gradients in float64 over chunk sizes that split the rows unevenly; float32
and bfloat16 weights; the model's `output_positions` / `targets` path against its full logits."""

import pytest
import torch
import torch.nn.functional as F

from llada_train.model.linear_ce import linear_cross_entropy


def full_logit_terms(logits, targets):
    """Reference: CE and entropy of the full (N, V) logits from a float64 log-softmax, and argmax."""
    logits = logits.double()
    logp = logits.log_softmax(-1)
    ce = F.cross_entropy(logits, targets, reduction="none")
    return ce, -(logp.exp() * logp).sum(-1), logits.argmax(-1)


def random_problem(seed, n=37, hidden_size=24, vocab=301, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(n, hidden_size, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (n,), generator=g)
    coef = torch.randn(2, n, generator=g, dtype=torch.float64)  # arbitrary upstream gradients
    return hidden, weight, targets, coef


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_value_and_gradient_equal_full_logits_float64(chunk, with_entropy):
    hidden, weight, targets, coef = random_problem(chunk)
    ce, entropy, pred = linear_cross_entropy(hidden, weight, targets, with_entropy=with_entropy,
                                             chunk_size=chunk)
    ref_ce, ref_entropy, ref_pred = full_logit_terms(F.linear(hidden, weight), targets)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    assert torch.equal(pred, ref_pred) and not pred.requires_grad
    objective, ref_objective = (coef[0] * ce).sum(), (coef[0] * ref_ce).sum()
    if with_entropy:
        torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12)
        objective = objective + (coef[1] * entropy).sum()
        ref_objective = ref_objective + (coef[1] * ref_entropy).sum()
    else:
        assert entropy is None
    got = torch.autograd.grad(objective, (hidden, weight))
    want = torch.autograd.grad(ref_objective, (hidden, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_low_precision_weights_reduce_in_float32(dtype, tol):
    """bf16/fp32 weights: the logits are upcast per chunk, results are float32, gradients keep the
    parameters' dtype and match the float64 full-logit gradient to the input precision."""
    hidden, weight, targets, coef = random_problem(3, dtype=dtype)
    ce, entropy, _ = linear_cross_entropy(hidden, weight, targets, with_entropy=True, chunk_size=8)
    assert ce.dtype == entropy.dtype == torch.float32
    got = torch.autograd.grad((coef[0] * ce + coef[1] * entropy).sum(), (hidden, weight))
    assert got[0].dtype == got[1].dtype == dtype
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref_ce, ref_entropy, _ = full_logit_terms(F.linear(h64, w64), targets)
    want = torch.autograd.grad((coef[0] * ref_ce + coef[1] * ref_entropy).sum(), (h64, w64))
    torch.testing.assert_close(ce.double(), ref_ce, rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max()
        assert (a.double() - b).abs().max() <= 4 * tol * scale


def test_default_chunk_covers_rows_and_shape_errors_name_the_shapes():
    hidden, weight, targets, _ = random_problem(1, n=5)
    ce, _, _ = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(ce, full_logit_terms(F.linear(hidden, weight), targets)[0])
    with pytest.raises(ValueError, match=r"hidden \(5, 24\).*targets \(4,\)"):
        linear_cross_entropy(hidden, weight, targets[:4])


def test_model_output_positions_and_targets_match_its_full_logits(tiny_model):
    """The model projects only `output_positions` (row-major order); with `targets` its chunked CE,
    entropy and argmax and the gradient of every parameter match the same call's full logits."""
    model = tiny_model.double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 24), generator=g)
    positions = torch.rand(2, 24, generator=g) < 0.4  # (B, S)
    targets = torch.randint(5, model.config.vocab_size, (int(positions.sum()),), generator=g)
    logits = model(ids, output_positions=positions).logits  # (N, V)
    full = model(ids).logits  # (B, S, V)
    torch.testing.assert_close(logits, full[positions], rtol=1e-10, atol=1e-10)
    out = model(ids, output_positions=positions, targets=targets, with_entropy=True)
    assert out.logits is None
    ref_ce, ref_entropy, ref_pred = full_logit_terms(full[positions], targets)
    torch.testing.assert_close(out.token_ce, ref_ce, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.token_entropy, ref_entropy, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.token_pred, ref_pred)
    params = list(model.parameters())
    got = torch.autograd.grad((out.token_ce + 0.5 * out.token_entropy).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref_ce + 0.5 * ref_entropy).sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_float64_and_never_holds_the_full_float32_logits():
    """bf16 on the GPU at the released vocabulary: CE/entropy/gradients match the float64 full-logit
    reference to bf16 precision, and the peak extra memory stays below one (N, V) float32 tensor."""
    n, hidden_size, vocab = 2048, 256, 157184
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=g).cuda().bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(vocab, hidden_size, generator=g)).cuda().bfloat16().requires_grad_()
    targets = torch.randint(vocab, (n,), generator=g).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ce, entropy, _ = linear_cross_entropy(hidden, weight, targets, with_entropy=True)
    got = torch.autograd.grad((ce + 0.3 * entropy).sum(), (hidden, weight))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < n * vocab * 4  # the full float32 logits alone would be this
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref_ce, ref_entropy, _ = full_logit_terms(F.linear(h64, w64), targets)
    want = torch.autograd.grad((ref_ce + 0.3 * ref_entropy).sum(), (h64, w64))
    torch.testing.assert_close(ce.double(), ref_ce, rtol=2e-2, atol=5e-2)
    for a, b in zip(got, want, strict=True):
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()
