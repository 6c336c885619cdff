"""d1's diffu-GRPO likelihood estimate (Zhao et al. 2025, arXiv 2504.12216), next to EBPO (docs/design.md §14).

d1 scores a completion with ONE forward: every completion token masked, each prompt token masked
with probability `p_mask_prompt`, and log π(y_i | x) ≈ log p(y_i | that input) per token. Each of the
μ update passes draws a fresh prompt mask (d1's `random_masking`); the θ_old log-probs of every pass
are computed once per rollout batch with the same masks, so the per-token ratio exp(log p_θ − log
p_θold) is exactly 1 before the first update. The ratio is clipped per token (PPO, with rl.eps_low /
rl.eps_high) and the loss is the mean over every completion token of the minibatch, as d1 (and TRL's
GRPO it builds on) defines it: Σ_{i,t} loss_{i,t} / Σ_i |y_i|. Rollouts, rewards, advantages, the
optional k3 KL (per token here) and the optimizer steps are the shared ones (`rl/policy.py`); only
the likelihood differs.

Layout on a block-diffusion model. d1 runs LLaDA 1: one sequence, full attention, the completion a
single block. Our model is trained on `[x_t ; x_0]` (docs/design.md §3), where a noisy block reads itself and
the clean blocks before it, and it decodes the same way: block b against the decoded earlier blocks.
So its likelihood factorises over blocks, log π(y|x) = Σ_b log π(y_b | x, y_<b), and d1's one-step
estimate is applied to each block's conditional: block b fully masked, read against the clean
earlier blocks. That is what "the whole completion masked" is when the completion is one block
(LLaDA 1), and it keeps the model on inputs it was trained on. The alternatives are not: one
bidirectional sequence lets prompt blocks read the completion and blocks read later blocks; masking
the earlier completion blocks in the clean half shows masks where training and decoding never do.
The prompt mask is applied to both halves, since the completion reads the prompt from the clean half
(masking it in x_t only would reach just a block the prompt shares with the response). Read this
way, the estimate is EBPO's ℓ at t = 1 kept per token, plus d1's prompt perturbation.

Scored tokens are the rollout's response slots (`response_mask`: up to the end of the block holding
the first EOS), the same tokens EBPO scores; d1 stops at the first EOS.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_value
from ..model.masks import AttentionLayout
from ..random_draws import uniform
from . import policy as shared  # the pieces every estimator shares


@dataclass
class DiffuGRPOConfig:
    """d1's own keys (config section `rl.diffu_grpo`); the shared ones are `PolicyConfig`'s (`rl`)."""

    p_mask_prompt: float = 0.15  # probability of masking each prompt token (d1's recipe)

    def __post_init__(self):
        check_value(0.0 <= self.p_mask_prompt < 1.0, "rl.diffu_grpo.p_mask_prompt",
                    f"must be in [0, 1) (got {self.p_mask_prompt})")


@dataclass
class DiffuGRPOBatch(shared.RowBatch):
    """One rollout batch, fixed before the updates: pass k's prompt mask scores θ_old, θ and π_ref."""

    input_ids: torch.Tensor  # (B, L) prompt + response
    response_mask: torch.Tensor  # (B, L) bool, scored tokens (response ∩ real)
    prompt_noise: torch.Tensor  # (B, μ, L) bool, prompt tokens masked in update pass k
    old_logps: torch.Tensor  # (B, μ, L) log p_θold per scored token, 0 elsewhere; no grad
    advantages: torch.Tensor  # (B,)
    block_size: int  # the model's diffusion block
    pad_mask: torch.Tensor | None = None  # (B, L) True = real token
    ref_logps: torch.Tensor | None = None  # (B, μ, L) log p_ref, only when beta > 0


def sample_prompt_masks(prompt_mask: torch.Tensor, passes: int, p_mask: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, passes, L) bool: each prompt token masked with probability p_mask, independently per pass."""
    bsz, length = prompt_mask.shape
    u = uniform((bsz, passes, length), generator, prompt_mask.device)  # (B, K, L)
    return (u < p_mask) & prompt_mask.bool()[:, None]


def completion_token_logprobs(model, input_ids: torch.Tensor, response_mask: torch.Tensor, block_size: int,
                              prompt_noise: torch.Tensor, *, pad_mask: torch.Tensor | None = None,
                              mask_token_id: int | None = None) -> torch.Tensor:
    """log p(y_i | z_k) at every scored response token, 0 elsewhere: (B, K, L), float32 or wider.

    z_k = [x_k ; c_k] (2L) with the block-diffusion mask: c_k is the row with the prompt tokens of
    prompt_noise[:, k] masked, x_k is c_k with every response token masked too. One model call of
    batch B·K. L need not be a multiple of block_size: the tail is padded internally."""
    bsz, length = input_ids.shape
    passes = prompt_noise.shape[1]
    if response_mask.shape != input_ids.shape or prompt_noise.shape != (bsz, passes, length):
        raise ValueError(f"completion_token_logprobs: shapes disagree: input_ids {tuple(input_ids.shape)}, "
                         f"response_mask {tuple(response_mask.shape)}, prompt_noise "
                         f"{tuple(prompt_noise.shape)} (expected (B, L), (B, L), (B, K, L))")
    mask_id = shared.mask_token_id(model) if mask_token_id is None else mask_token_id
    real = torch.ones_like(response_mask, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
    scored = response_mask.bool() & real  # (B, L)
    perturbed = prompt_noise & (real & ~scored)[:, None]  # (B, K, L) only prompt tokens
    pad = (-length) % block_size
    input_ids = F.pad(input_ids, (0, pad), value=mask_id)
    scored, real, perturbed = (F.pad(x, (0, pad), value=False) for x in (scored, real, perturbed))
    padded = length + pad
    clean = input_ids[:, None].expand(bsz, passes, padded).reshape(bsz * passes, padded)  # (BK, L)
    scored = scored.repeat_interleave(passes, dim=0)  # (BK, L)
    context = torch.where(perturbed.reshape(bsz * passes, padded), mask_id, clean)
    z = torch.cat([torch.where(scored, mask_id, context), context], dim=1)  # (BK, 2L)
    position_ids = torch.arange(padded, device=z.device).repeat(2)[None].expand(bsz * passes, -1)  # (BK, 2L)
    attn = AttentionLayout("diffusion", padded, block_size, pad_mask=real.repeat_interleave(passes, dim=0))
    logp = shared.masked_logprobs(model, z, attn, position_ids, clean, scored)  # (BK, L)
    return logp.view(bsz, passes, padded)[..., :length]


def _logps_in_chunks(model, batch: DiffuGRPOBatch, chunk: int | None, mask_token_id: int | None) -> torch.Tensor:
    """Every pass's per-token log-probs (B, μ, L) for the whole batch without grad: one forward per pass
    and `chunk` rows, the shapes of the update's forwards (so θ = θ_old gives ratios of exactly 1)."""
    def score(part):
        return torch.cat([completion_token_logprobs(model, part.input_ids, part.response_mask, part.block_size,
                                                    part.prompt_noise[:, k:k + 1], pad_mask=part.pad_mask,
                                                    mask_token_id=mask_token_id)
                          for k in range(part.prompt_noise.shape[1])], dim=1)

    return shared.score_in_chunks(model, batch, chunk, score, tuple(batch.prompt_noise.shape))


def build_diffu_grpo_batch(model, input_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor,
                           policy: shared.PolicyConfig, options: DiffuGRPOConfig, *, block_size: int,
                           pad_mask: torch.Tensor | None = None, ref_model=None,
                           generator: torch.Generator | None = None,
                           mask_token_id: int | None = None) -> tuple[DiffuGRPOBatch, dict]:
    """Advantages, zero-variance filtering, one prompt mask per update pass and the θ_old (and π_ref)
    per-token log-probs of one rollout batch; `model` is θ_old. Same contract as `ebpo.build_batch`."""
    shared.check_reference(policy, ref_model)
    input_ids, scored, pad_mask, adv, metrics = shared.kept_rows(input_ids, response_mask, rewards, policy, pad_mask)
    prompt = ~scored if pad_mask is None else pad_mask & ~scored  # (B, L)
    noise = sample_prompt_masks(prompt, policy.updates_per_batch, options.p_mask_prompt, generator)  # (B, μ, L)
    batch = DiffuGRPOBatch(input_ids, scored, noise, old_logps=torch.empty(0), advantages=adv,
                           block_size=block_size, pad_mask=pad_mask)
    batch.old_logps = _logps_in_chunks(model, batch, policy.minibatch_size, mask_token_id)
    if policy.kl_beta > 0:
        batch.ref_logps = _logps_in_chunks(ref_model, batch, policy.minibatch_size, mask_token_id)
    metrics["prompt_masked_frac"] = (noise.sum() / (prompt.sum() * noise.shape[1]).clamp_min(1)).item()
    return batch, metrics


def diffu_grpo_minibatch_loss(model, batch: DiffuGRPOBatch, policy: shared.PolicyConfig, update_pass: int = 0, *,
                              mask_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token clipped surrogate of one minibatch under the current θ, with pass `update_pass`'s
    prompt mask and θ_old log-probs; mean over the minibatch's scored tokens (+ β·mean per-token k3)."""
    k = update_pass % batch.prompt_noise.shape[1]
    logp = completion_token_logprobs(model, batch.input_ids, batch.response_mask, batch.block_size,
                                     batch.prompt_noise[:, k:k + 1], pad_mask=batch.pad_mask,
                                     mask_token_id=mask_token_id)[:, 0]  # (B, L)
    log_ratio = logp - batch.old_logps[:, k]  # (B, L), 0 at unscored positions
    kl = None if batch.ref_logps is None or policy.kl_beta == 0 else shared.k3_kl(batch.ref_logps[:, k] - logp)
    return shared.clipped_policy_loss(log_ratio, batch.advantages, eps_low=policy.eps_low, eps_high=policy.eps_high,
                               mask=batch.response_mask, kl=kl, beta=policy.kl_beta)


def diffu_grpo_update(model, step_fn: Callable[[torch.Tensor | None], None], batch: DiffuGRPOBatch,
                      policy: shared.PolicyConfig, options: DiffuGRPOConfig, *,
                      generator: torch.Generator | None = None, mask_token_id: int | None = None,
                      steps_per_pass: int | None = None) -> list[dict]:
    """`policy_update` with the diffu-GRPO loss: pass k scores with prompt mask k. The masks were drawn
    with the batch, so `options` (kept for the registry's one signature) has nothing left to set here."""
    def loss_fn(part, update_pass):
        return diffu_grpo_minibatch_loss(model, part, policy, update_pass, mask_token_id=mask_token_id)

    return shared.policy_update(step_fn, batch, policy, loss_fn, generator=generator, steps_per_pass=steps_per_pass)


__all__ = [
    "DiffuGRPOBatch",
    "DiffuGRPOConfig",
    "build_diffu_grpo_batch",
    "completion_token_logprobs",
    "diffu_grpo_minibatch_loss",
    "diffu_grpo_update",
    "sample_prompt_masks",
]
