"""The shared M2T+T2T objective (diffusion.py) against its definition (docs/design.md §3-§4): noising
replayed with naive loops, the loss re-computed in float64 position by position, complementary
coverage, T2T sampling only ordinary tokens, one model forward end to end, and the whole objective
(lm_head only at supervised positions, chunked linear CE) against the full-logit computation it
replaced: value and every parameter's gradient in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from llada_train.config import DiffusionConfig, LossConfig, MTFConfig, NoiseConfig, T2TConfig
from llada_train.data.tokenizer import load_tokenizer, special_token_ids
from llada_train.diffusion import (
    NoisedBatch,
    block_size_at,
    corrupt_t2t,
    diffusion_loss,
    model_inputs,
    noise_batch,
    ordinary_token_ids,
    supervised_positions,
    training_loss,
)
from llada_train.model.linear_ce import linear_cross_entropy
from llada_train.model.modeling_llada2_moe import LLaDA2MoeOutput

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


def full_logit_loss(logits, batch: NoisedBatch, cfg: DiffusionConfig) -> torch.Tensor:
    """The objective as computed before the chunked head: CE and softmax at every position of the
    (B, L, V) logits, terms picked by masks afterwards (dtype kept: float64 here)."""
    ce = F.cross_entropy(logits.flatten(0, 1), batch.x0.flatten(), reduction="none").view_as(batch.x0)
    n_maskable = batch.maskable.sum().clamp_min(1)
    kept = batch.maskable & ~batch.masked & ~batch.replaced
    loss = ((ce * batch.weight * batch.masked).sum() + cfg.t2t.weight * (ce * batch.replaced).sum()
            + cfg.t2t.keep_weight * (ce * kept).sum()) / n_maskable
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, L)
    right = batch.masked & (logits.argmax(-1) == batch.x0)
    return loss + cfg.loss.confidence_weight * (entropy * right).sum() / n_maskable


def chunked_output(hidden, weight, batch, cfg) -> tuple:
    """What the model returns for the objective: chunked linear CE at the supervised positions."""
    supervised = supervised_positions(batch, cfg)
    ce, entropy, pred = linear_cross_entropy(hidden[supervised], weight, batch.x0[supervised],
                                             with_entropy=True, chunk_size=5)
    return LLaDA2MoeOutput(token_ce=ce, token_entropy=entropy, token_pred=pred), supervised


@pytest.mark.parametrize("weighting,complementary,keep", [("elbo", True, 0.1), ("uniform", False, 0.0)])
def test_loss_equals_float64_definition(weighting, complementary, keep):
    """diffusion_loss on the chunked head's output equals the position-by-position float64 definition
    and the full-logit computation, value and d/d(hidden, lm_head weight)."""
    x0, maskable, doc_ids, pad = random_rows(7)
    cfg = dcfg(weighting=weighting, complementary=complementary, t2t=0.5, keep=keep, conf=0.3)
    g = torch.Generator().manual_seed(2)
    batch = corrupt_t2t(noise_batch(x0, maskable, doc_ids, pad, 8, cfg, MASK_ID, g), 0.5,
                        torch.arange(10, VOCAB), g)
    weight = torch.randn(VOCAB, 64, generator=g, dtype=torch.float64)
    hidden = torch.randn(*batch.x0.shape, 64, generator=g, dtype=torch.float64)  # (B, L, H)
    hit = batch.masked & (torch.rand(batch.x0.shape, generator=g) < 0.5)  # argmax right at some masks
    hidden[hit] = 0.3 * weight[batch.x0[hit]]
    hidden.requires_grad_(), weight.requires_grad_()
    out, supervised = chunked_output(hidden, weight, batch, cfg)
    loss, metrics = diffusion_loss(out, batch, supervised, cfg)
    logits = hidden @ weight.T  # (B, L, V)
    want = full_logit_loss(logits, batch, cfg)
    ref = reference_loss(logits, batch.x0, batch.maskable, batch.masked, batch.replaced, batch.weight, cfg)
    assert batch.replaced.any() and (hit & (logits.argmax(-1) == batch.x0)).any()
    assert math.isclose(loss.item(), ref, rel_tol=1e-9) and math.isclose(want.item(), ref, rel_tol=1e-9)
    got_grads = torch.autograd.grad(loss, (hidden, weight))
    for got, expected in zip(got_grads, torch.autograd.grad(want, (hidden, weight)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    mask_ratio = float(batch.masked.sum() / batch.maskable.sum())
    assert math.isclose(float(metrics["mask_ratio"]), mask_ratio, rel_tol=1e-6)
    assert ("keep" in metrics) == (keep > 0)
    want_supervised = batch.masked | batch.replaced | (batch.maskable if keep else False)
    assert int(supervised.sum()) == int(want_supervised.sum())


def packed_rows(seed: int, bsz=2, seq_len=32):
    """Rows packing 2-3 documents, each with a 1-3 token unmaskable prefix, some rows padded."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(10, VOCAB, (bsz, seq_len), generator=g)
    doc_ids = torch.full((bsz, seq_len), -1, dtype=torch.int32)
    maskable = torch.zeros(bsz, seq_len, dtype=torch.bool)
    for b in range(bsz):
        end = seq_len - (6 if b % 2 else 0)
        cuts = sorted(torch.randperm(end - 8, generator=g)[: 1 + b % 2].add(4).tolist())
        for d, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end], strict=True)):
            doc_ids[b, lo:hi] = d
            maskable[b, lo + 1 + int(torch.randint(3, (1,), generator=g)):hi] = True
    return x0, maskable, doc_ids, doc_ids >= 0


def full_noisy_logits(model, batch, block, embed_noise_std, generator):
    """The lm_head over all (2)L positions, then the noisy half sliced off (the replaced code path)."""
    inputs = model_inputs(batch, block)
    ids = inputs.pop("input_ids")
    if embed_noise_std > 0:
        embeds = model.get_input_embeddings()(ids)  # (B, 2L, H)
        noise = torch.randn(embeds.shape, generator=generator).to(embeds) * embed_noise_std
        out = model(inputs_embeds=embeds + noise * (ids == MASK_ID)[..., None], **inputs)
    else:
        out = model(input_ids=ids, **inputs)
    return out.logits[:, : batch.xt.shape[1]]  # (B, L, V)


def full_logit_training_loss(model, x0, maskable, doc_ids, pad, cfg, *, vocab_ids, generator):
    """training_loss as it was: same noising draws, MTF drafts from full logits, full_logit_loss."""
    block = block_size_at(0, cfg, x0.shape[1])
    batch = noise_batch(x0, maskable, doc_ids, pad, block, cfg, MASK_ID, generator)
    batch = corrupt_t2t(batch, cfg.t2t.max_ratio, vocab_ids, generator)
    if cfg.mtf.prob > 0 and torch.rand(1, generator=generator).item() < cfg.mtf.prob:
        for _ in range(cfg.mtf.turns - 1):
            with torch.no_grad():
                model.eval()
                draft = full_noisy_logits(model, batch, block, 0.0, None).argmax(-1)
                model.train()
            share = cfg.mtf.draft_ratio * torch.rand(batch.xt.shape[0], 1, generator=generator)
            fill = batch.masked & (torch.rand(batch.xt.shape, generator=generator) < share)
            batch = NoisedBatch(**{**batch.__dict__, "xt": torch.where(fill, draft, batch.xt),
                                   "masked": batch.masked & ~fill, "replaced": batch.replaced | fill})
    logits = full_noisy_logits(model, batch, block, cfg.mask_embed_noise_std, generator)
    return full_logit_loss(logits, batch, cfg), batch


@pytest.mark.parametrize("keep,turns", [(0.1, 3), (0.0, 2)])
def test_objective_equals_full_logit_computation_value_and_gradient(tiny_model, keep, turns):
    """float64 tiny model, every term on (M2T, T2T, keep, CAP, MTF, complementary, packed documents,
    mask-embedding noise): training_loss (lm_head only at supervised positions, chunked CE) equals
    the full-logit objective it replaced, loss and every parameter's gradient; the lm_head sees
    exactly the supervised noisy-half positions and the drafting turns only the masked ones."""
    model = tiny_model.double().train()
    x0, maskable, doc_ids, pad = packed_rows(13)
    cfg = dcfg(complementary=True, t2t=0.4, keep=keep, conf=0.3)
    cfg.mtf = MTFConfig(prob=1.0, turns=turns, draft_ratio=0.6)
    cfg.mask_embed_noise_std, cfg.mask_embed_noise_steps = 0.05, 10
    vocab_ids, seen = torch.arange(10, VOCAB), []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["output_positions"]),
                                           with_kwargs=True)
    loss, metrics = training_loss(model, x0, maskable, doc_ids, pad, cfg, step=0, mask_id=MASK_ID,
                                  vocab_ids=vocab_ids, generator=torch.Generator().manual_seed(5))
    hook.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want, batch = full_logit_training_loss(model, x0, maskable, doc_ids, pad, cfg, vocab_ids=vocab_ids,
                                           generator=torch.Generator().manual_seed(5))
    expected = torch.autograd.grad(want, params, allow_unused=True)
    assert batch.replaced.any() and batch.masked.any() and metrics["mtf"] == 1 and len(seen) == turns
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-10)
    for p, a, b in zip(params, got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=lambda m, p=p: f"{p.shape}: {m}")
    seq_len = x0.shape[1]
    assert not torch.cat(seen)[:, seq_len:].any()  # never the clean half
    supervised = batch.masked | batch.replaced | (batch.maskable if keep else torch.zeros_like(batch.masked))
    assert torch.equal(seen[-1][:, :seq_len], supervised)
    assert all(not (s[:, :seq_len] & ~batch.maskable).any() for s in seen[:-1])  # drafts: masked only


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_training_loss_end_to_end_matches_float64(tiny_model, weighting):
    """One forward of the real model over [x_t ; x_0]: the returned loss equals Σ_masked w·CE /
    #maskable computed in float64 from the logits the model produced, with t replayed from the
    seed (first draw: one t per block) and masks read off the model's input."""
    x0, maskable, doc_ids, pad = random_rows(9, bsz=2, seq_len=32)
    cfg = dcfg(weighting=weighting, complementary=True)
    seen = {}
    hook = tiny_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    loss, _ = training_loss(tiny_model, x0, maskable, doc_ids, pad, cfg, step=0, mask_id=MASK_ID,
                            vocab_ids=torch.arange(10, VOCAB), generator=torch.Generator().manual_seed(4))
    hook.remove()
    ids = seen["input_ids"]
    with torch.no_grad():  # the full logits of the same call (eval mode: deterministic)
        logits = tiny_model(input_ids=ids, attention_mask=seen["attention_mask"],
                            position_ids=seen["position_ids"]).logits  # (2B, 2L, V)
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
