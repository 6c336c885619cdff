"""The flex backend: a block-sparse BlockMask from the §3 rules, equal to sdpa and to a float64 reference.

On CPU the forward runs compiled `flex_attention` (eager only if compiling failed: `FLEX.mode` says
which) and gradients come from the tiled softmax backward paired with it (torch has no CPU flex
backward); both are compared with sdpa's autograd and with a float64 brute-force attention.
"""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from llada_train.model import LLaDA2MoeModelLM
from llada_train.model.attention import FLEX, BlockKVCache, attend
from llada_train.model.masks import AttentionLayout
from tests.conftest import tiny_config
from tests.test_masks import brute_force_mask, random_docs

TILE = 128  # flex's default BlockMask tile


def packed_layout(seq_len, block, batch, rng):
    """Training layout of `batch` packed rows with random document cuts and a padded tail on the last row."""
    docs = torch.tensor([random_docs(seq_len, rng) for _ in range(batch)])
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    valid[-1, seq_len - rng.randint(1, seq_len // 2):] = False
    return AttentionLayout("diffusion", seq_len, block, doc_ids=docs, pad_mask=valid)


def reference_attention(q, k, v, allowed, scale):
    """float64 softmax attention with an explicit (B, Q, K) mask; GQA by repeating KV heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


def twin_models():
    torch.manual_seed(0)
    sdpa = LLaDA2MoeModelLM(tiny_config()).train()
    flex = LLaDA2MoeModelLM(tiny_config(attn_backend="flex")).train()
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def assert_same_grads(a, b, rtol=1e-4):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        scale = pa.grad.abs().max().clamp_min(1e-12)
        err = (pa.grad - pb.grad).abs().max() / scale
        assert err < rtol, f"{name}: relative gradient error {err:.2e} (flex {FLEX.mode(pa.device.type)})"


@pytest.mark.parametrize("seed", range(2))
def test_flex_attention_matches_float64_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_len, block, batch = (96, 160)[seed], rng.choice([4, 8, 32]), 2  # 2L = 320: a partial last tile
    layout = packed_layout(seq_len, block, batch, rng)
    q = torch.randn(batch, 4, 2 * seq_len, 16, requires_grad=True)
    k, v = (torch.randn(batch, 2, 2 * seq_len, 16, requires_grad=True) for _ in range(2))
    out = attend(q, k, v, layout, 0.25, "flex")
    allowed = torch.stack([brute_force_mask(seq_len, block, layout.doc_ids[b].tolist(),
                                            layout.pad_mask[b].tolist()) for b in range(batch)])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, allowed, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(ref)
    (out * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    for got, want in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)


def test_block_mask_skips_exactly_the_masked_tiles():
    """The BlockMask keeps a tile iff the dense §3 mask has a True in it; most tiles are skipped."""
    rng = random.Random(3)
    seq_len, block = 512, 32
    layout = packed_layout(seq_len, block, 2, rng)
    block_mask = layout.block_mask("cpu")
    assert isinstance(block_mask, BlockMask)
    n = 2 * seq_len // TILE
    dense = layout.dense()[:, 0]  # (B, 2L, 2L)
    tiles = dense.view(2, n, TILE, n, TILE).any(4).any(2)  # (B, n, n)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), tiles)
    # without documents: (noisy diagonal + noisy->clean lower + clean causal) of the n x n tiles
    plain = AttentionLayout("diffusion", seq_len, block).block_mask("cpu")
    kept = plain.to_dense().bool().sum().item()
    half = n // 2
    assert kept == half + 2 * half * (half + 1) // 2 < n * n / 2


def test_block_mask_cache_per_shape_and_ids():
    docs = torch.tensor([[0] * 40 + [1] * 24])
    first = AttentionLayout("diffusion", 64, 8, doc_ids=docs).block_mask("cpu")
    again = AttentionLayout("diffusion", 64, 8, doc_ids=docs.clone()).block_mask("cpu")
    other = AttentionLayout("diffusion", 64, 8, doc_ids=torch.tensor([[0] * 8 + [1] * 56])).block_mask("cpu")
    assert again is first and other is not first
    assert AttentionLayout("diffusion", 64, 16, doc_ids=docs).block_mask("cpu") is not first


def test_flex_equals_sdpa_on_the_training_layout_logits_and_gradients():
    sdpa, flex = twin_models()
    rng = random.Random(5)
    seq_len, block, batch = 64, 8, 2
    layout = packed_layout(seq_len, block, batch, rng)
    x = torch.randint(2, 4096, (batch, 2 * seq_len))
    pos = torch.arange(seq_len).repeat(2)[None].expand(batch, -1)
    weight = torch.randn(batch, 2 * seq_len, sdpa.config.vocab_size)
    logits = {}
    for name, model in (("sdpa", sdpa), ("flex", flex)):
        lay = AttentionLayout("diffusion", seq_len, block, doc_ids=layout.doc_ids, pad_mask=layout.pad_mask)
        logits[name] = model(x, attention_mask=lay, position_ids=pos).logits
        (logits[name] * weight).sum().backward()
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=1e-4, rtol=1e-4)
    assert_same_grads(sdpa, flex)
    # the structured layout and the dense mask give sdpa the same answer
    with torch.no_grad():
        dense = sdpa(x, attention_mask=layout.dense(), position_ids=pos).logits
    torch.testing.assert_close(dense, logits["sdpa"].detach(), atol=0, rtol=0)


def test_flex_equals_sdpa_in_cached_decoding_logits_and_gradients():
    """Block decoding with a KV prefix, as the decoder calls the model (left-padded prompts)."""
    sdpa, flex = twin_models()
    block, prompt, total = 8, 16, 40
    x = torch.randint(2, 4096, (2, total))
    valid = torch.ones(2, total, dtype=torch.bool)
    valid[1, :5] = False  # left padding of the shorter prompt
    weight = torch.randn(2, block, sdpa.config.vocab_size)
    steps = {}
    for name, model in (("sdpa", sdpa), ("flex", flex)):
        cache = BlockKVCache()
        layout = AttentionLayout("block_causal", prompt, block, pad_mask=valid[:, :prompt])
        out = [model(x[:, :prompt], attention_mask=layout, past_key_values=cache, use_cache=True).logits]
        for lo in range(prompt, total, block):
            hi = lo + block
            layout = AttentionLayout("block_causal", hi, block, pad_mask=valid[:, :hi], q_start=lo)
            out.append(model(x[:, lo:hi], attention_mask=layout, past_key_values=cache,
                             use_cache=True).logits)
        steps[name] = out
        (out[-1] * weight).sum().backward()
    for got, want in zip(steps["flex"], steps["sdpa"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert_same_grads(sdpa, flex)
    # every shape above ran the compiled kernel: a silent fall-back to eager would hide here
    assert FLEX.mode("cpu") == "compiled", "flex_attention failed to compile on CPU (see the logged warning)"


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of block_size"):
        AttentionLayout("diffusion", 10, 4)
    with pytest.raises(ValueError, match="kind"):
        AttentionLayout("causal", 8, 4)
    with pytest.raises(ValueError, match=r"doc_ids must be \(B, 8\)"):
        AttentionLayout("diffusion", 8, 4, doc_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="q_start"):
        AttentionLayout("block_causal", 8, 4, q_start=8)
    layout = AttentionLayout("block_causal", 16, 4, q_start=8)
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="8 queries x 16 keys"):
        attend(q, k, k, layout, 1.0, "flex")
