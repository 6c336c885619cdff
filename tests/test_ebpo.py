"""EBPO math: one-pass block ELBO terms vs a per-block loop, ratio/gradient identities, clipping,
timesteps, advantages and the k3 KL against hand computations (docs/design.md §7); the config
sections' checks."""

import copy
import math
import re
import statistics

import pytest
import torch

from llada_train.errors import ConfigError
from llada_train.model import block_causal_mask
from llada_train.rl.diffu_grpo import DiffuGRPOConfig
from llada_train.rl.ebpo import (
    T_MIN,
    EBPOConfig,
    block_elbo_terms,
    block_log_ratio,
    block_token_counts,
    build_batch,
    draw_noise,
    ebpo_minibatch_loss,
    ebpo_update,
    sample_noise_masks,
    sequence_log_ratio,
    stratified_timesteps,
)
from llada_train.rl.policy import PolicyConfig, advantages, clipped_policy_loss, k3_kl, zero_variance_groups

MASK_ID = 1  # tiny_config().mask_token_id


def naive_terms(model, ids, resp, block_size, t, noise, pad=None):
    """ℓ(n, b) by definition: per row, timestep and block, a separate forward over
    [y_0 blocks < b ; y_t block b] with the block-causal mask; float64 sums."""
    bsz, length = ids.shape
    steps = t.shape[1]
    nb = math.ceil(length / block_size)
    out = torch.zeros(bsz, steps, nb, dtype=torch.float64)
    for r in range(bsz):
        for n in range(steps):
            masked = noise[r, n] & resp[r] & (pad[r] if pad is not None else True)
            noisy = torch.where(masked, MASK_ID, ids[r])
            for b in range(nb):
                lo, hi = b * block_size, min((b + 1) * block_size, length)
                if not masked[lo:hi].any():
                    continue
                x = torch.cat([ids[r, :lo], noisy[lo:hi]])[None]
                attn = block_causal_mask(hi, block_size, pad_mask=None if pad is None else pad[r:r + 1, :hi])
                with torch.no_grad():
                    logits = model(input_ids=x, attention_mask=attn, position_ids=torch.arange(hi)[None]).logits
                logp = logits[0, lo:hi].double().log_softmax(-1)
                total = sum(logp[i - lo, ids[r, i]] for i in range(lo, hi) if masked[i])
                out[r, n, b] = total / t[r, n].double()
    return out


CASES = [
    # block_size, length, prompt length per row, left pad per row, right pad per row
    (4, 16, [8, 5], None, None),  # row 0: blocks 0-1 entirely prompt
    (8, 24, [3, 11], None, None),
    (2, 10, [4, 1], None, None),
    (4, 14, [6, 2], None, None),  # length not a multiple of the block size
    (4, 16, [4, 2], [3, 0], [0, 4]),  # left-padded prompt, right-padded response
    (16, 16, [5, 9], None, None),  # one block = whole-sequence masked diffusion
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_one_pass_terms_match_per_block_loop(tiny_model, case):
    block_size, length, prompts, left, right = CASES[case]
    gen = torch.Generator().manual_seed(case)
    bsz, steps = len(prompts), 2
    ids = torch.randint(2, 4096, (bsz, length), generator=gen)
    pad = None
    resp = torch.zeros(bsz, length, dtype=torch.bool)
    for r, p in enumerate(prompts):
        start = (left[r] if left else 0) + p
        end = length - (right[r] if right else 0)
        resp[r, start:end] = True
    if left:
        pad = torch.ones(bsz, length, dtype=torch.bool)
        for r in range(bsz):
            pad[r, :left[r]] = False
            pad[r, length - right[r]:] = False
        ids[~pad] = 0
    t = stratified_timesteps(steps, bsz, gen)
    noise = torch.rand(bsz, steps, length, generator=gen) < 0.6  # covers prompt too: must be ignored
    projected = []  # rows reaching the lm_head: only the scored (masked response) positions
    hook = tiny_model.lm_head.register_forward_pre_hook(lambda m, a: projected.append(a[0].shape[0]))
    got = block_elbo_terms(tiny_model, ids, resp, block_size, t, noise, pad_mask=pad)
    hook.remove()
    scored = noise & resp[:, None] & (pad[:, None] if pad is not None else True)  # (B, N, L)
    assert projected == [int(scored.sum())]
    want = naive_terms(tiny_model, ids, resp, block_size, t, noise, pad)
    assert got.shape == (bsz, steps, math.ceil(length / block_size))
    assert (want != 0).sum() >= 4  # the comparison is not vacuous
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    prompt_only = block_token_counts(resp, block_size) == 0  # (B, nb)
    assert torch.all(got[prompt_only[:, None].expand_as(got)] == 0)


def _setup(model, level, bsz=4, length=16, beta=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 4096, (bsz, length), generator=gen)
    resp = torch.zeros(bsz, length, dtype=torch.bool)
    for r in range(bsz):  # the G = 2 completions of a prompt share it
        ids[r, :3 + r // 2] = ids[r - r % 2, :3 + r // 2]
        resp[r, 3 + r // 2:] = True
    rewards = torch.rand(bsz, generator=gen)
    policy = PolicyConfig(group_size=2, drop_zero_variance=False, kl_beta=beta)
    return ids, resp, rewards, policy, EBPOConfig(num_timesteps=2, ratio_level=level), gen


@pytest.mark.parametrize("level", ["sequence", "block"])
def test_ratio_one_and_reinforce_gradient_at_theta_old(tiny_model, level):
    model = tiny_model.train()
    ids, resp, rewards, policy, options, gen = _setup(model, level)
    batch, _ = build_batch(model, ids, resp, rewards, policy, options, block_size=4, generator=gen)
    assert model.training  # scoring restored the mode
    params = [p for p in model.parameters() if p.requires_grad]

    loss, metrics = ebpo_minibatch_loss(model, batch, policy, options)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    terms = block_elbo_terms(model, batch.input_ids, batch.response_mask, batch.block_size, batch.t,
                             batch.noise_mask)
    assert torch.equal(terms.detach(), batch.old_terms)  # same masks, same θ: log ρ is exactly 0
    elbo = terms.mean(1)  # (B, nb), w_n = 1/N
    if level == "sequence":
        objective = (batch.advantages * elbo.sum(-1) / batch.response_mask.sum(-1)).mean()
    else:
        counts = block_token_counts(batch.response_mask, batch.block_size)
        valid = counts > 0
        per_block = batch.advantages[:, None] * elbo / counts.clamp_min(1)
        objective = per_block[valid].mean()
    want = torch.autograd.grad(-objective, params, allow_unused=True)
    compared = 0
    for g, w in zip(grads, want, strict=True):
        if w is None:
            assert g is None or torch.all(g == 0)
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
        compared += int(w.abs().max() > 0)
    assert compared > 10


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipping_engages_exactly_outside_the_range(sign):
    eps_low, eps_high, d = 0.2, 0.28, 1e-3
    ratios = torch.tensor([0.3, 1 - eps_low - d, 1 - eps_low + d, 1.0, 1 + eps_high - d, 1 + eps_high + d, 3.0],
                          dtype=torch.float64)
    adv = sign * (0.5 + torch.rand(len(ratios), dtype=torch.float64))
    log_ratio = ratios.log().requires_grad_()
    loss, metrics = clipped_policy_loss(log_ratio, adv, eps_low=eps_low, eps_high=eps_high)
    (grad,) = torch.autograd.grad(loss, log_ratio)
    engaged = ratios > 1 + eps_high if sign > 0 else ratios < 1 - eps_low
    assert engaged.sum() == 2 and not engaged[[2, 3, 4]].any()
    n = len(ratios)
    want_grad = torch.where(engaged, 0.0, -adv * ratios / n)
    torch.testing.assert_close(grad, want_grad)
    clipped = ratios.clamp(1 - eps_low, 1 + eps_high)
    want_loss = -torch.where(engaged, clipped * adv, ratios * adv).mean()
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=1e-12)
    key, other = ("clip_frac_high", "clip_frac_low") if sign > 0 else ("clip_frac_low", "clip_frac_high")
    assert metrics[key] == pytest.approx(2 / n) and metrics[other] == 0
    assert metrics["ratio_min"] == pytest.approx(0.3) and metrics["ratio_max"] == pytest.approx(3.0)


def test_block_level_mask_excludes_empty_blocks():
    log_ratio = torch.tensor([[0.1, -0.4, 5.0], [0.0, 0.05, -3.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, _ = clipped_policy_loss(log_ratio, adv, mask=mask)
    (grad,) = torch.autograd.grad(loss, log_ratio)
    r = log_ratio.detach()[:, :2].exp()
    a = adv[:, None].expand(2, 2)
    want = -torch.minimum(r * a, r.clamp(0.8, 1.28) * a).mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)
    assert torch.all(grad[:, 2] == 0) and grad[0, 0] != 0


def test_log_ratio_reductions_by_hand():
    gen = torch.Generator().manual_seed(3)
    new, old = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), torch.randn(3, 4, 5, generator=gen,
                                                                                       dtype=torch.float64)
    lengths = torch.tensor([7, 1, 12])
    blocks = torch.randint(0, 4, (3, 5), generator=gen)
    seq, blk = sequence_log_ratio(new, old, lengths), block_log_ratio(new, old, blocks)
    for r in range(3):
        want = sum(sum(new[r, n, b] - old[r, n, b] for b in range(5)) / 4 for n in range(4)) / lengths[r]
        assert math.isclose(seq[r].item(), want.item(), rel_tol=1e-12)
        for b in range(5):
            want_b = sum(new[r, n, b] - old[r, n, b] for n in range(4)) / 4 / max(blocks[r, b].item(), 1)
            assert math.isclose(blk[r, b].item(), want_b.item(), rel_tol=1e-12, abs_tol=1e-15)


def test_stratified_timesteps_cover_each_stratum():
    steps, rows = 4, 4000
    t = stratified_timesteps(steps, rows, torch.Generator().manual_seed(0))
    assert t.shape == (rows, steps) and t.min() >= T_MIN and t.max() < 1
    for n in range(steps):
        lo, hi = n / steps, (n + 1) / steps
        col = t[:, n]
        assert torch.all((col >= max(lo, T_MIN)) & (col < hi))
        counts = torch.histc(col, bins=10, min=lo, max=hi)  # uniform within the stratum
        assert torch.all((counts - rows / 10).abs() < 5 * math.sqrt(rows / 10))
    offsets = t - torch.arange(steps) / steps  # one u per row, shared by its N levels
    unclamped = t[:, 0] > T_MIN
    torch.testing.assert_close(offsets[unclamped], offsets[unclamped, :1].expand(-1, steps))


def test_noise_masks_rate_and_prompt_clean():
    gen = torch.Generator().manual_seed(1)
    resp = torch.zeros(3, 5000, dtype=torch.bool)
    resp[:, 1000:] = True
    t = stratified_timesteps(2, 3, gen)
    mask = sample_noise_masks(resp, t, gen)
    assert mask.shape == (3, 2, 5000) and not mask[..., :1000].any()
    rate = mask[..., 1000:].double().mean(-1)
    tol = 5 * torch.sqrt(t * (1 - t) / 4000).double() + 1e-9
    assert torch.all((rate - t.double()).abs() < tol)


def test_complementary_noise_masks_every_response_token_once_per_pair():
    resp = torch.zeros(64, 12, dtype=torch.bool)
    resp[:, 5:] = True
    options = EBPOConfig(num_timesteps=4, complementary=True, t_min=0.1)
    t, mask = draw_noise(resp, options, torch.Generator().manual_seed(0))
    assert t.shape == (64, 4) and mask.shape == (64, 4, 12) and not mask[..., :5].any()
    torch.testing.assert_close(t[:, :2] + t[:, 2:], torch.ones(64, 2))
    assert t.min() >= 0.1 - 1e-7 and t.max() <= 0.9 + 1e-7
    assert torch.equal(mask[:, :2] ^ mask[:, 2:], resp[:, None].expand(-1, 2, -1))  # exactly one of each pair


@pytest.mark.parametrize("complementary", [False, True])
def test_elbo_weights_are_unbiased_and_complements_cut_short_answer_variance(complementary):
    """With token scores c_i independent of the context, the N-level estimate Σ_n w_n (1/t_n) Σ_i m_ni c_i
    has expectation Σ_i c_i exactly (the t_min clamp included: a clamped level also masks at its
    clamped rate). For a one-token answer the complementary pairs have the lower variance."""
    draws = 200_000
    resp = torch.zeros(draws, 4, dtype=torch.bool)
    resp[:, 2:] = True  # a 2-token response
    c = torch.tensor([0.0, 0.0, -1.5, -0.5], dtype=torch.float64)
    options = EBPOConfig(num_timesteps=2, complementary=complementary, t_min=0.1)
    t, mask = draw_noise(resp, options, torch.Generator().manual_seed(3))
    estimate = ((mask.double() * c).sum(-1) / t.double()).mean(1)  # (draws,)
    se = estimate.std() / math.sqrt(draws)
    assert abs(estimate.mean().item() - c.sum().item()) < 4 * se.item()
    one = torch.zeros(draws, 2, dtype=torch.bool)
    one[:, 1] = True
    t1, m1 = draw_noise(one, options, torch.Generator().manual_seed(4))
    var = ((m1[..., 1].double() / t1.double()).mean(1)).var().item()
    # by integration over u (t_min 0.1): independent stratified pair (1/4)E[1/t1 + 1/t2] - 1/2,
    # complementary pair (1/4)E[1/t + 1/(1 - t)] - 1 with t = clamp(u, 0.1, 0.9)
    assert var == pytest.approx(0.6542 if complementary else 1.1513, rel=0.03)


def test_complementary_needs_even_levels():
    with pytest.raises(ConfigError, match=r"rl\.ebpo\.complementary"):
        EBPOConfig(num_timesteps=3, complementary=True)


@pytest.mark.parametrize("mode", ["group", "loo", "none"])
def test_advantages_by_hand(mode):
    group = 4
    rewards = torch.rand(6 * group, generator=torch.Generator().manual_seed(2))
    rewards[group:2 * group] = 0.5  # a zero-variance group
    got = advantages(rewards, group, mode)
    for g in range(6):
        rs = [rewards[g * group + i].item() for i in range(group)]
        for i, r in enumerate(rs):
            if mode == "group":
                want = (r - statistics.mean(rs)) / (statistics.stdev(rs) + 1e-6)
            elif mode == "loo":
                want = r - (sum(rs) - r) / (group - 1)
            else:
                want = r
            assert got[g * group + i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_zero_variance_groups_and_bad_layout():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 0.3001])
    assert zero_variance_groups(rewards, 2).tolist() == [False, False, True, True, True, True, False, False]
    with pytest.raises(ValueError, match=r"rl.group_size=3"):
        advantages(rewards, 3)


def test_k3_kl_formula_and_expectation():
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)
    want = torch.tensor([math.exp(v) - v - 1 for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(k3_kl(x), want)
    assert torch.all(k3_kl(x) >= 0) and k3_kl(torch.zeros(1)).item() == 0
    # E_{x~p}[k3(log q(x) - log p(x))] = KL(p || q) exactly
    gen = torch.Generator().manual_seed(4)
    p = torch.rand(10, generator=gen, dtype=torch.float64).softmax(0)
    q = torch.rand(10, generator=gen, dtype=torch.float64).softmax(0)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    assert (p * k3_kl(q.log() - p.log())).sum().item() == pytest.approx(kl, rel=1e-10)
    loss, metrics = clipped_policy_loss(torch.zeros(3), torch.ones(3), kl=torch.tensor([0.1, 0.2, 0.6]), beta=0.5)
    assert loss.item() == pytest.approx(-1.0 + 0.5 * 0.3) and metrics["kl"] == pytest.approx(0.3)


SECTIONS = {PolicyConfig: "rl", EBPOConfig: "rl.ebpo", DiffuGRPOConfig: "rl.diffu_grpo"}


@pytest.mark.parametrize("section,key,value", [
    (PolicyConfig, "group_size", 1), (PolicyConfig, "eps_low", 1.0), (PolicyConfig, "eps_high", -0.1),
    (PolicyConfig, "updates_per_batch", 0), (PolicyConfig, "minibatch_size", 0), (PolicyConfig, "advantage", "ppo"),
    (PolicyConfig, "kl_beta", -1.0), (EBPOConfig, "num_timesteps", 0), (EBPOConfig, "ratio_level", "token"),
    (EBPOConfig, "t_min", 0.0), (EBPOConfig, "t_min", 1.0), (DiffuGRPOConfig, "p_mask_prompt", 1.0),
    (DiffuGRPOConfig, "p_mask_prompt", -0.1)])
def test_config_validation_names_the_key(section, key, value):
    """Each section checks its own keys and names them in full: the shared ones under `rl`, an
    estimator's under `rl.<estimator>`."""
    with pytest.raises(ConfigError, match=re.escape(f"bad value for '{SECTIONS[section]}.{key}'")):
        section(**{key: value})


def test_unknown_estimator_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"'rl\.estimator'.*\['diffu_grpo', 'ebpo'\]"):
        PolicyConfig(estimator="nope")


def test_update_moves_policy_towards_the_better_completion(tiny_model):
    """Two completions of one prompt, rewards 1 and 0: after μ·minibatches SGD steps the ELBO
    ratio of the rewarded one rises relative to the other; dropped groups, KL to a reference."""
    model = tiny_model.train()
    ref = copy.deepcopy(model).eval()
    ids, resp, _, _, options, gen = _setup(model, "sequence", bsz=6)
    rewards = torch.tensor([1.0, 0.0, 0.4, 0.4, 0.2, 0.9])  # group 1 has zero variance: dropped
    policy = PolicyConfig(group_size=2, updates_per_batch=2, minibatch_size=2, kl_beta=0.01)
    batch, info = build_batch(model, ids, resp, rewards, policy, options, block_size=4, ref_model=ref, generator=gen)
    assert len(batch) == 4 and info["kept_frac"] == pytest.approx(4 / 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    history = ebpo_update(model, step, batch, policy, options, generator=gen)
    assert len(history) == 4
    assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 1e-6
    assert all(math.isfinite(m["loss"]) for m in history)
    with torch.no_grad():
        terms = block_elbo_terms(model, batch.input_ids, batch.response_mask, 4, batch.t, batch.noise_mask)
    log_ratio = sequence_log_ratio(terms, batch.old_terms, batch.response_mask.sum(-1))
    assert log_ratio[0] - log_ratio[1] > 0
    torch.testing.assert_close(batch.advantages[:2], torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-6))


def test_data_parallel_passes_are_padded_to_the_same_number_of_steps(tiny_model):
    """Under data parallelism every rank must join every optimizer step: a rank with fewer (or no)
    minibatches pads each pass with step(None), after its real minibatches."""
    model = tiny_model.train()
    ids, resp, rewards, _, options, gen = _setup(model, "sequence", bsz=6)
    policy = PolicyConfig(group_size=2, updates_per_batch=2, minibatch_size=4, drop_zero_variance=False)
    batch, _ = build_batch(model, ids, resp, rewards, policy, options, block_size=4, generator=gen)
    calls = []
    history = ebpo_update(model, lambda loss: calls.append(loss is None), batch, policy, options, generator=gen,
                          steps_per_pass=3)
    assert calls == [False, False, True] * 2 and len(history) == 4  # 6 rows = minibatches of 4 and 2, + 1 pad
    empty = batch.select(torch.tensor([], dtype=torch.long))
    calls.clear()
    assert ebpo_update(model, lambda loss: calls.append(loss is None), empty, policy, options, steps_per_pass=2) == []
    assert calls == [True] * 4
    calls.clear()
    ebpo_update(model, lambda loss: calls.append(loss is None), batch, policy, options,
                generator=gen)  # one process: no pads
    assert calls == [False, False] * 2
