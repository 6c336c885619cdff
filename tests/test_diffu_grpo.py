"""d1's diffu-GRPO estimator (rl/diffu_grpo.py): one-pass per-token log-probs against a one-token-at-a-
time float64 reference, the per-token clipped loss against a naive loop, the REINFORCE gradient at
θ_old, prompt masks, and an RL run through the CLI with rl.estimator=diffu_grpo."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from llada_train.cli import main
from llada_train.config import ConfigError
from llada_train.model import LLaDA2MoeModelLM, block_causal_mask
from llada_train.rl.diffu_grpo import (
    DiffuGRPOConfig,
    build_diffu_grpo_batch,
    completion_token_logprobs,
    diffu_grpo_minibatch_loss,
    diffu_grpo_update,
    sample_prompt_masks,
)
from llada_train.rl.policy import PolicyConfig
from llada_train.stages.registry import load_stage_config
from tests.conftest import CONFIGS, tiny_config
from tests.test_ebpo import _setup as ebpo_setup

MASK_ID = 1  # tiny_config().mask_token_id


@pytest.fixture
def model64():
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(tiny_config()).double().eval()


def naive_logprobs(model, ids, resp, block_size, prompt_noise, pad=None):
    """d1's log π(y_i | x), one token at a time, in float64, on the block model's inference layout:
    for response token i in block b, one forward over the row cut at the end of block b with the
    block-causal mask (as the decoder runs), where the prompt tokens of the pass's mask and every
    response token of block b are masks and the earlier blocks are the clean response. With one block
    (block_size >= L) this is d1 on LLaDA 1 to the letter: one full-attention sequence, the whole
    completion masked."""
    bsz, length = ids.shape
    out = torch.zeros(bsz, prompt_noise.shape[1], length, dtype=torch.float64)
    real = torch.ones(bsz, length, dtype=torch.bool) if pad is None else pad
    for r in range(bsz):
        scored = resp[r] & real[r]
        for k in range(prompt_noise.shape[1]):
            context = torch.where(prompt_noise[r, k] & real[r] & ~scored, MASK_ID, ids[r])
            for i in scored.nonzero().flatten().tolist():
                lo, hi = i // block_size * block_size, min((i // block_size + 1) * block_size, length)
                x = context[:hi].clone()
                x[lo:hi] = torch.where(scored[lo:hi], MASK_ID, x[lo:hi])
                attn = block_causal_mask(hi, block_size, pad_mask=real[r:r + 1, :hi])
                with torch.no_grad():
                    logits = model(input_ids=x[None], attention_mask=attn,
                                   position_ids=torch.arange(hi)[None]).logits[0, i]
                out[r, k, i] = logits.double().log_softmax(-1)[ids[r, i]]
    return out


CASES = [
    # block_size, length, prompt length per row, right padding per row
    (4, 16, [8, 5], [0, 0]),  # row 0: blocks 0-1 entirely prompt; row 1: prompt and response share a block
    (8, 24, [3, 11], [0, 5]),
    (4, 14, [6, 2], [3, 0]),  # length not a multiple of the block size
    (16, 16, [5, 9], [0, 2]),  # one block: LLaDA 1's layout, d1 exactly
]


def _rows(case, gen):
    block_size, length, prompts, right = CASES[case]
    bsz = len(prompts)
    ids = torch.randint(2, 4096, (bsz, length), generator=gen)
    resp = torch.zeros(bsz, length, dtype=torch.bool)
    pad = torch.ones(bsz, length, dtype=torch.bool)
    for r, p in enumerate(prompts):
        resp[r, p:] = True
        pad[r, length - right[r]:] = False
    ids[~pad] = 0
    return block_size, ids, resp & pad, pad


@pytest.mark.parametrize("case", range(len(CASES)))
def test_one_pass_logprobs_match_one_token_at_a_time_float64(model64, case):
    gen = torch.Generator().manual_seed(case)
    block_size, ids, resp, pad = _rows(case, gen)
    noise = torch.rand(len(ids), 3, ids.shape[1], generator=gen) < 0.4  # covers response and padding: ignored
    got = completion_token_logprobs(model64, ids, resp, block_size, noise, pad_mask=pad)
    want = naive_logprobs(model64, ids, resp, block_size, noise, pad)
    assert got.shape == want.shape
    assert torch.all(got[~resp[:, None].expand_as(got)] == 0)
    assert (want[resp[:, None].expand_as(want)] < 0).all()  # the comparison is not vacuous
    torch.testing.assert_close(got.double(), want, rtol=1e-9, atol=1e-9)  # float64 throughout
    # the prompt mask matters: another mask gives other log-probs
    other = completion_token_logprobs(model64, ids, resp, block_size, ~noise, pad_mask=pad)
    assert (other - got).abs().max() > 1e-3


def _setup(model, bsz=4, beta=0.0, passes=2):
    """test_ebpo's rollout batch (G = 2 completions per prompt), scored by diffu_grpo."""
    ids, resp, rewards, policy, _, gen = ebpo_setup(model, "sequence", bsz=bsz, beta=beta)
    policy = replace(policy, estimator="diffu_grpo", updates_per_batch=passes)
    return ids, resp, rewards, policy, DiffuGRPOConfig(p_mask_prompt=0.5), gen


def test_clipped_per_token_loss_matches_a_naive_loop(tiny_model):
    """Old log-probs shifted per token so ratios fall on both sides of the clip range; the loss, the
    clip fractions and the per-token k3 KL follow d1's definition token by token."""
    model = tiny_model.train()
    ref = copy.deepcopy(model).eval()
    ids, resp, rewards, policy, options, gen = _setup(model, beta=0.05)
    batch, _ = build_diffu_grpo_batch(model, ids, resp, rewards, policy, options, block_size=4, ref_model=ref,
                                      generator=gen)
    scored = resp[:, None].expand_as(batch.old_logps)
    batch.old_logps = batch.old_logps + torch.randn(scored.shape, generator=gen) * 0.4 * scored
    batch.ref_logps = batch.ref_logps + torch.randn(scored.shape, generator=gen) * 0.3 * scored
    for k in range(2):
        loss, metrics = diffu_grpo_minibatch_loss(model, batch, policy, k)
        with torch.no_grad():
            new = completion_token_logprobs(model, ids, resp, 4, batch.prompt_noise[:, k:k + 1])[:, 0]
        total = kl_total = count = low = high = 0.0
        for r in range(len(ids)):
            a = batch.advantages[r].item()
            for i in resp[r].nonzero().flatten().tolist():
                ratio = math.exp(new[r, i].item() - batch.old_logps[r, k, i].item())
                clipped = min(max(ratio, 1 - policy.eps_low), 1 + policy.eps_high)
                log_ref = batch.ref_logps[r, k, i].item() - new[r, i].item()
                kl = math.exp(log_ref) - log_ref - 1
                total += -min(ratio * a, clipped * a)
                kl_total += kl
                count += 1
                low += ratio < 1 - policy.eps_low and a < 0
                high += ratio > 1 + policy.eps_high and a > 0
        assert loss.item() == pytest.approx((total + policy.kl_beta * kl_total) / count, rel=1e-5)
        assert metrics["kl"] == pytest.approx(kl_total / count, rel=1e-5)
        assert metrics["clip_frac_low"] == pytest.approx(low / count)
        assert metrics["clip_frac_high"] == pytest.approx(high / count)
        assert low + high > 0 and low + high < count  # both regimes occur


def _flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in pairs])


def test_ratio_one_and_per_token_reinforce_gradient_at_theta_old(tiny_model):
    model = tiny_model.train()
    ids, resp, rewards, policy, options, gen = _setup(model)
    batch, metrics = build_diffu_grpo_batch(model, ids, resp, rewards, policy, options, block_size=4, generator=gen)
    assert model.training and batch.old_logps.shape == (4, 2, 16)
    assert 0.3 < metrics["prompt_masked_frac"] < 0.7
    params = [p for p in model.parameters() if p.requires_grad]
    for k in range(2):
        loss, metrics = diffu_grpo_minibatch_loss(model, batch, policy, k)
        assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
        got = _flat_grad(loss, params)
        logp = completion_token_logprobs(model, ids, resp, 4, batch.prompt_noise[:, k:k + 1])[:, 0]
        assert torch.equal(logp.detach(), batch.old_logps[:, k])  # same mask, same θ
        objective = (batch.advantages[:, None] * logp * resp).sum() / resp.sum()
        want = _flat_grad(-objective, params)
        assert (want != 0).sum() > 10_000  # the comparison is not vacuous
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_prompt_masks_rate_per_pass_and_only_the_prompt():
    gen = torch.Generator().manual_seed(1)
    prompt = torch.zeros(3, 6000, dtype=torch.bool)
    prompt[:, :4000] = True
    masks = sample_prompt_masks(prompt, 2, 0.15, gen)
    assert masks.shape == (3, 2, 6000) and not masks[..., 4000:].any()
    rate = masks[..., :4000].double().mean(-1)
    assert torch.all((rate - 0.15).abs() < 5 * math.sqrt(0.15 * 0.85 / 4000))
    assert (masks[:, 0] != masks[:, 1]).any()  # a fresh mask each pass (d1's random_masking)
    assert not sample_prompt_masks(prompt, 1, 0.0, gen).any()


def test_update_moves_policy_towards_the_better_completion(tiny_model):
    model = tiny_model.train()
    ids, resp, _, policy, options, gen = _setup(model, bsz=6)
    policy.drop_zero_variance, policy.minibatch_size = True, 2
    rewards = torch.tensor([1.0, 0.0, 0.4, 0.4, 0.2, 0.9])  # group 1 has zero variance: dropped
    batch, info = build_diffu_grpo_batch(model, ids, resp, rewards, policy, options, block_size=4, generator=gen)
    assert len(batch) == 4 and info["kept_frac"] == pytest.approx(4 / 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = diffu_grpo_update(
        model, lambda loss: (opt.zero_grad(), loss.backward(), opt.step()), batch, policy, options, generator=gen)
    assert len(history) == 4 and all(math.isfinite(m["loss"]) for m in history)
    with torch.no_grad():
        logp = completion_token_logprobs(model, batch.input_ids, batch.response_mask, 4, batch.prompt_noise)
    gain = ((logp - batch.old_logps) * batch.response_mask[:, None]).sum((1, 2))  # (B,)
    assert gain[0] > gain[1] and gain[3] > gain[2]  # rewarded completions gained likelihood


def test_rl_cli_with_diffu_grpo_runs_and_logs(tmp_path):
    args = ["rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "model.init_from=",
            f"run.out_dir={tmp_path}", "train.steps=2", "train.batch_size=2", "rl.group_size=4",
            "rl.minibatch_size=4", "rl.updates_per_batch=2",
            "data.num_train=16", "data.num_eval=4", "train.eval_every=100", "train.save_every=100",
            "train.log_every=1", "rl.estimator=diffu_grpo", "rl.kl_beta=0.01", "rl.temperature=1.0",
            "rl.drop_zero_variance=false"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, (int, float)))
    assert all("prompt_masked_frac" in r for r in steps)
    trained = [r for r in steps if r["updates"] > 0]
    assert trained and all("kl" in r and "clip_frac_high" in r for r in trained)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_bad_estimator_names_the_key():
    with pytest.raises(ConfigError, match=r"rl.estimator"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.estimator=ppo"])
    with pytest.raises(ConfigError, match=r"rl\.diffu_grpo\.p_mask_prompt"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.diffu_grpo.p_mask_prompt=1.0"])
    with pytest.raises(ConfigError, match=r"rl\.estimator"):
        PolicyConfig(estimator="grpo")
