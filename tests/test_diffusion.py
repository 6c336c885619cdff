"""The shared M2T+T2T objective (diffusion.py) against its definition (DESIGN §3-§4): noising
replayed with naive loops, the loss re-computed in float64 position by position, complementary
coverage, T2T sampling only ordinary tokens, and one model forward end to end."""

import math

import pytest
import torch

from llada_train.config import DiffusionConfig, LossConfig, MTFConfig, NoiseConfig, T2TConfig
from llada_train.data.tokenizer import load_tokenizer, special_token_ids
from llada_train.diffusion import (
    corrupt_t2t,
    diffusion_loss,
    noise_batch,
    ordinary_token_ids,
    training_loss,
)

MASK_ID = 1
VOCAB = 4096


def dcfg(*, weighting="elbo", complementary=False, per="block", t2t=0.0, keep=0.0, conf=0.0, block=8,
         t_min=0.001, t_max=1.0) -> DiffusionConfig:
    return DiffusionConfig(block_size=block, noise=NoiseConfig(t_min=t_min, t_max=t_max, per=per,
                                                               complementary=complementary),
                           loss=LossConfig(weighting=weighting, confidence_weight=conf),
                           t2t=T2TConfig(max_ratio=t2t, weight=0.7, keep_weight=keep), mtf=MTFConfig(prob=0.0))


def random_rows(seed: int, bsz=4, seq_len=32):
    """Token rows with a random-length prompt (not maskable), a response, and trailing padding
    (doc id -1) on some rows."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(10, VOCAB, (bsz, seq_len), generator=g)
    maskable = torch.zeros(bsz, seq_len, dtype=torch.bool)
    doc_ids = torch.zeros(bsz, seq_len, dtype=torch.int32)
    for b in range(bsz):
        start = int(torch.randint(1, seq_len // 2, (1,), generator=g))
        end = seq_len - (8 if b % 2 else 0)
        maskable[b, start:end] = True
        doc_ids[b, end:] = -1
    return x0, maskable, doc_ids, doc_ids >= 0


@pytest.mark.parametrize("per", ["block", "sequence"])
@pytest.mark.parametrize("complementary", [False, True])
@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_noising_replays_definition(per, complementary, weighting):
    """t ~ U[t_min, t_max] per block (or sequence), mask with prob t; weights 1/t (elbo) or 1;
    the complement has weights 1/(1-t). Replayed from the same seed with naive loops."""
    x0, maskable, doc_ids, pad = random_rows(3)
    cfg, bsz, seq_len, block = dcfg(weighting=weighting, complementary=complementary, per=per), *x0.shape, 8
    batch = noise_batch(x0, maskable, doc_ids, pad, block, cfg, MASK_ID, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    groups = seq_len // block if per == "block" else 1
    t = 0.001 + 0.999 * torch.rand(bsz, groups, generator=g)  # float32, as drawn
    u = torch.rand(bsz, seq_len, generator=g)
    rows = 2 * bsz if complementary else bsz
    assert batch.x0.shape == (rows, seq_len)
    for r in range(rows):
        b, second = r % bsz, r >= bsz
        for i in range(seq_len):
            ti = t[b, i // (seq_len // groups)]
            first_masked = bool(maskable[b, i]) and bool(u[b, i] < ti)
            masked = (bool(maskable[b, i]) and not first_masked) if second else first_masked
            assert bool(batch.masked[r, i]) == masked
            assert int(batch.xt[r, i]) == (MASK_ID if masked else int(x0[b, i]))
            expected_w = 1.0 if weighting == "uniform" else 1.0 / float((1.0 - ti) if second else ti)
            assert math.isclose(float(batch.weight[r, i]), expected_w, rel_tol=1e-5)
    assert torch.equal(batch.x0, torch.cat([x0, x0]) if complementary else x0)
    assert not batch.replaced.any()


@pytest.mark.parametrize("seed", range(4))
def test_complementary_pairs_cover_every_maskable_token_exactly_once(seed):
    x0, maskable, doc_ids, pad = random_rows(seed, bsz=6, seq_len=64)
    for per in ("block", "sequence"):
        batch = noise_batch(x0, maskable, doc_ids, pad, 16, dcfg(complementary=True, per=per), MASK_ID,
                            torch.Generator().manual_seed(seed))
        first, second = batch.masked[:6], batch.masked[6:]
        assert torch.equal(first.int() + second.int(), maskable.int())  # each maskable token once, others never
        assert torch.equal(batch.maskable, torch.cat([maskable, maskable]))


def test_t2t_replaces_only_visible_response_tokens_with_ordinary_tokens():
    tok = load_tokenizer(None)
    special = special_token_ids(tok)
    vocab_ids = ordinary_token_ids(len(tok), special)
    assert not set(vocab_ids.tolist()) & special and len(vocab_ids) == len(tok) - len(special)
    x0, maskable, doc_ids, pad = random_rows(5, bsz=8, seq_len=64)
    total = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        noised = noise_batch(x0, maskable, doc_ids, pad, 8, dcfg(complementary=True), MASK_ID, g)
        batch = corrupt_t2t(noised, 1.0, vocab_ids, g)
        replaced = batch.replaced
        assert not (replaced & ~(noised.maskable & ~noised.masked)).any()  # visible response tokens only
        assert not set(batch.xt[replaced].tolist()) & special
        assert torch.equal(batch.xt[~replaced], noised.xt[~replaced])
        assert torch.equal(batch.masked, noised.masked) and torch.equal(batch.x0, noised.x0)
        total += int(replaced.sum())
    assert total > 500


def reference_loss(logits, x0, maskable, masked, replaced, weight, cfg) -> float:
    """Σ_masked w·CE + t2t.weight·Σ_replaced CE + keep·Σ_kept CE + conf·Σ_(masked, argmax right)
    entropy, over the number of maskable tokens: float64, one position at a time."""
    total, n_maskable = 0.0, int(maskable.sum())
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if not maskable[b, i]:
                continue
            logp = logits[b, i].detach().double().log_softmax(-1)
            ce = -float(logp[x0[b, i]])
            if masked[b, i]:
                total += float(weight[b, i]) * ce
                if int(logp.argmax()) == int(x0[b, i]):
                    total += cfg.loss.confidence_weight * -float((logp.exp() * logp).sum())
            elif replaced[b, i]:
                total += cfg.t2t.weight * ce
            else:
                total += cfg.t2t.keep_weight * ce
    return total / n_maskable


@pytest.mark.parametrize("weighting,complementary", [("elbo", True), ("uniform", False)])
def test_loss_equals_float64_definition(weighting, complementary):
    x0, maskable, doc_ids, pad = random_rows(7)
    cfg = dcfg(weighting=weighting, complementary=complementary, t2t=0.5, keep=0.1, conf=0.3)
    g = torch.Generator().manual_seed(2)
    batch = corrupt_t2t(noise_batch(x0, maskable, doc_ids, pad, 8, cfg, MASK_ID, g), 0.5,
                        torch.arange(10, VOCAB), g)
    logits = torch.randn(*batch.x0.shape, VOCAB, generator=g)
    hit = batch.masked & (torch.rand(batch.x0.shape, generator=g) < 0.5)  # argmax right at some masks
    logits[hit] = logits[hit].scatter(-1, batch.x0[hit][:, None], 20.0)
    loss, metrics = diffusion_loss(logits, batch, cfg)
    ref = reference_loss(logits, batch.x0, batch.maskable, batch.masked, batch.replaced, batch.weight, cfg)
    assert batch.replaced.any() and hit.any()
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)
    assert math.isclose(float(metrics["mask_ratio"]), float(batch.masked.sum() / batch.maskable.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_training_loss_end_to_end_matches_float64(tiny_model, weighting):
    """One forward of the real model over [x_t ; x_0]: the returned loss equals Σ_masked w·CE /
    #maskable computed in float64 from the logits the model produced, with t replayed from the
    seed (first draw: one t per block) and masks read off the model's input."""
    x0, maskable, doc_ids, pad = random_rows(9, bsz=2, seq_len=32)
    cfg = dcfg(weighting=weighting, complementary=True)
    seen = {}
    h1 = tiny_model.register_forward_pre_hook(lambda m, a, kw: seen.update(ids=kw["input_ids"]), with_kwargs=True)
    h2 = tiny_model.lm_head.register_forward_hook(lambda m, a, out: seen.update(logits=out))
    loss, _ = training_loss(tiny_model, x0, maskable, doc_ids, pad, cfg, step=0, mask_id=MASK_ID,
                            vocab_ids=torch.arange(10, VOCAB), generator=torch.Generator().manual_seed(4))
    h1.remove(), h2.remove()
    ids, logits = seen["ids"], seen["logits"]
    assert ids.shape == (4, 64) and torch.equal(ids[:, 32:], torch.cat([x0, x0]))  # [x_t ; x_0]
    xt = ids[:, :32]
    masked = xt == MASK_ID
    assert torch.equal(xt[~masked], torch.cat([x0, x0])[~masked])
    t = 0.001 + 0.999 * torch.rand(2, 4, generator=torch.Generator().manual_seed(4))  # (B, blocks)
    t = torch.cat([t, 1 - t]).repeat_interleave(8, dim=1).double()  # (2B, L)
    weight = 1 / t if weighting == "elbo" else torch.ones_like(t)
    both = torch.cat([maskable, maskable])
    ref = reference_loss(logits[:, :32], torch.cat([x0, x0]), both, masked, torch.zeros_like(masked), weight, cfg)
    assert masked.any()
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)
