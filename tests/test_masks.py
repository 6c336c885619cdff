"""Block-diffusion masks against a brute-force evaluation of the four rules, and sdpa vs flex."""

import random

import pytest
import torch

from llada_train.model import LLaDA2MoeModelLM, block_causal_mask, block_diffusion_mask
from llada_train.model.masks import AttentionLayout, block_causal_mask_mod, block_diffusion_mask_mod
from tests.conftest import tiny_config


def brute_force_mask(seq_len, block_size, docs=None, valid=None):
    """Per-pair evaluation of docs/design.md §3 for one row: noisy positions 0..L-1, clean L..2L-1."""
    two_l = 2 * seq_len
    mask = torch.zeros(two_l, two_l, dtype=torch.bool)
    for q in range(two_l):
        for k in range(two_l):
            qc, kc = q >= seq_len, k >= seq_len
            qp, kp = q % seq_len, k % seq_len
            bq, bk = qp // block_size, kp // block_size
            if not qc and not kc:
                ok = bq == bk
            elif not qc and kc:
                ok = bk < bq
            elif qc and kc:
                ok = bk <= bq
            else:
                ok = False
            if docs is not None:
                ok = ok and docs[qp] == docs[kp]
            if valid is not None:
                # padding queries attend to themselves only
                ok = ok and bool(valid[kp]) if valid[qp] else q == k
            mask[q, k] = ok
    return mask


def random_docs(seq_len, rng):
    cuts = sorted(rng.sample(range(1, seq_len), min(seq_len - 1, rng.randint(0, 3))))
    docs, d = [], 0
    for i in range(seq_len):
        if i in cuts:
            d += 1
        docs.append(d)
    return docs


@pytest.mark.parametrize("seed", range(6))
def test_block_diffusion_mask_matches_brute_force(seed):
    rng = random.Random(seed)
    block = rng.choice([1, 2, 3, 4, 8])
    seq_len = block * rng.randint(1, 6)
    batch = 2
    docs = torch.tensor([random_docs(seq_len, rng) for _ in range(batch)])
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    valid[1, seq_len - rng.randint(0, seq_len - 1):] = False
    plain = block_diffusion_mask(seq_len, block)
    assert plain.shape == (1, 1, 2 * seq_len, 2 * seq_len)
    assert torch.equal(plain[0, 0], brute_force_mask(seq_len, block))
    full = block_diffusion_mask(seq_len, block, doc_ids=docs, pad_mask=valid)
    for b in range(batch):
        expected = brute_force_mask(seq_len, block, docs[b].tolist(), valid[b].tolist())
        assert torch.equal(full[b, 0], expected)
    # The flex mask_mod encodes the same rules.
    mod = block_diffusion_mask_mod(seq_len, block, docs, valid)
    q = torch.arange(2 * seq_len)[:, None].expand(-1, 2 * seq_len)
    k = torch.arange(2 * seq_len)[None, :].expand(2 * seq_len, -1)
    for b in range(batch):
        assert torch.equal(mod(torch.tensor(b), 0, q, k), full[b, 0])


def test_block_causal_mask_rules_and_offset():
    seq_len, block = 12, 4
    mask = block_causal_mask(seq_len, block)[0, 0]
    for q in range(seq_len):
        for k in range(seq_len):
            assert mask[q, k] == (k // block <= q // block)
    tail = block_causal_mask(seq_len, block, q_start=8)
    assert torch.equal(tail[0, 0], mask[8:])


@pytest.mark.parametrize("seed", range(4))
def test_block_causal_mask_mod_matches_brute_force_with_offset(seed):
    """The decoder's mask_mod (queries q_start.., left padding, documents) against a per-pair loop."""
    rng = random.Random(seed)
    block = rng.choice([1, 2, 4, 8])
    seq_len = block * rng.randint(2, 6)
    q_start = rng.randrange(seq_len)
    docs = torch.tensor([random_docs(seq_len, rng) for _ in range(2)])
    valid = torch.ones(2, seq_len, dtype=torch.bool)
    valid[1, :rng.randint(1, seq_len - 1)] = False
    mod = block_causal_mask_mod(seq_len, block, docs, valid, q_start)
    q = torch.arange(seq_len - q_start)[:, None].expand(-1, seq_len)
    k = torch.arange(seq_len)[None, :].expand(seq_len - q_start, -1)
    dense = AttentionLayout("block_causal", seq_len, block, docs, valid, q_start).dense()
    for b in range(2):
        want = torch.zeros(seq_len - q_start, seq_len, dtype=torch.bool)
        for i in range(seq_len - q_start):
            qp = q_start + i
            for kp in range(seq_len):
                ok = kp // block <= qp // block and docs[b, qp] == docs[b, kp] and bool(valid[b, kp])
                want[i, kp] = ok if valid[b, qp] else kp == qp
        assert torch.equal(mod(torch.tensor(b), 0, q, k), want)
        assert torch.equal(dense[b, 0], want)


def test_mask_rejects_bad_block_size():
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_diffusion_mask(10, 4)


def test_sdpa_and_flex_backends_agree():
    torch.manual_seed(0)
    sdpa = LLaDA2MoeModelLM(tiny_config()).eval()
    flex = LLaDA2MoeModelLM(tiny_config(attn_backend="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    seq_len, block = 16, 4
    x = torch.randint(2, 4096, (2, 2 * seq_len))
    pos = torch.arange(seq_len).repeat(2)[None].expand(2, -1)
    docs = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    mask = block_diffusion_mask(seq_len, block, doc_ids=docs)
    with torch.no_grad():
        a = sdpa(x, attention_mask=mask, position_ids=pos).logits
        b = flex(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
