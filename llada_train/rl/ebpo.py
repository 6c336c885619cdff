"""EBPO: ELBO-based Block-level Policy Optimization for block-diffusion LMs (LLaDA2.1, docs/design.md §7).

A dLLM has no tractable log π(y|x), so EBPO puts its block-diffusion ELBO in the PPO ratio:
for N stratified noise levels t_n, mask response tokens with probability t_n and score every block
b by ℓ(n, b) = (1/t_n) Σ_{i ∈ b, masked} log p(y_i | z_n). With the `[y_t ; y_0]` layout and the
block-diffusion mask (§3), ONE forward per t_n yields ℓ(n, b) for all blocks at once: noisy block b
sees only itself and the clean blocks before it, exactly the block's conditional. The same masks
score θ and θ_old, so their noise cancels in the ratio.

The stage loop (`stages/rl.py`) owns rollouts and optimizer steps; this module gives it
`build_batch` (advantages, masks, θ_old terms), `ebpo_minibatch_loss` and `ebpo_update`. What
every estimator shares (advantages, batches, the clipped loss, the update passes) is `rl/policy.py`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_value
from ..model.masks import AttentionLayout
from ..random_draws import uniform
from .policy import (
    PolicyConfig,
    RowBatch,
    check_reference,
    clipped_policy_loss,
    k3_kl,
    kept_rows,
    masked_logprobs,
    policy_update,
    score_in_chunks,
)
from .policy import mask_token_id as model_mask_token_id

RATIO_LEVELS = ("sequence", "block")
T_MIN = 1e-3  # smallest noise level: keeps the 1/t weight finite


@dataclass
class EBPOConfig:
    """EBPO's own keys (config section `rl.ebpo`); the shared ones are `PolicyConfig`'s (`rl`).
    Defaults follow LLaDA2.1 (docs/design.md §7)."""

    num_timesteps: int = 2  # N stratified noise levels per sequence
    ratio_level: str = "sequence"  # "sequence" (length-normalised) | "block" (clipped per block)
    t_min: float = T_MIN  # smallest noise level; caps the 1/t weight of short responses' few masked tokens
    complementary: bool = False  # levels in pairs (t, 1 - t) with complementary masks (N even)

    def __post_init__(self):
        check_value(self.num_timesteps >= 1, "rl.ebpo.num_timesteps", f"must be >= 1 (got {self.num_timesteps})")
        check_value(self.ratio_level in RATIO_LEVELS, "rl.ebpo.ratio_level",
                    f"must be one of {RATIO_LEVELS} (got {self.ratio_level!r})")
        check_value(0.0 < self.t_min < 1.0, "rl.ebpo.t_min", f"must be in (0, 1) (got {self.t_min})")
        check_value(not self.complementary or (self.num_timesteps % 2 == 0 and self.t_min < 0.5),
                    "rl.ebpo.complementary", "pairs each level t with 1 - t: needs an even rl.ebpo.num_timesteps "
                    f"(got {self.num_timesteps}) and rl.ebpo.t_min < 0.5 (got {self.t_min})")


# ----------------------------------------------------------------------------- noise


def stratified_timesteps(n: int, batch: int, generator: torch.Generator | None = None, *,
                         device=None, t_min: float = T_MIN) -> torch.Tensor:
    """t_n = (n - 1 + u) / N, one u ~ U(0,1) per row: (B, N), one level in each stratum.

    Stratifying lowers the variance of the N-sample ELBO estimate at no cost.
    """
    u = uniform((batch, 1), generator, device)  # (B, 1)
    t = (torch.arange(n, device=u.device) + u) / n  # (B, N)
    return t.clamp_min(t_min)


def sample_noise_masks(response_mask: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, L) bool: each response token masked with probability t_n; the prompt never is."""
    bsz, length = response_mask.shape
    u = uniform((bsz, t.shape[1], length), generator, response_mask.device)  # (B, N, L)
    return (u < t[..., None]) & response_mask.bool()[:, None]


def complementary_noise(response_mask: torch.Tensor, t: torch.Tensor, noise_mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, m) of K draws -> levels [t, 1 - t] (B, 2K) and masks [m, response & ~m] (B, 2K, L): every response token
    is masked exactly once per pair. Each draw is still an ELBO sample at its level (1 - t ~ U on the
    mirrored stratum, ~m ~ Bernoulli(1 - t)), so the estimate stays unbiased; a short answer's tokens
    always reach the gradient, where independent draws leave each one unmasked in every level with
    probability Π(1 - t_n)."""
    complement = response_mask.bool()[:, None] & ~noise_mask  # (B, K, L)
    return torch.cat([t, 1 - t], dim=1), torch.cat([noise_mask, complement], dim=1)


def draw_noise(response_mask: torch.Tensor, options: EBPOConfig, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's levels (B, N) and masks (B, N, L): N stratified independent draws, or N/2 stratified
    draws and their complements (`rl.ebpo.complementary`)."""
    draws = options.num_timesteps // 2 if options.complementary else options.num_timesteps
    t = stratified_timesteps(draws, response_mask.shape[0], generator, device=response_mask.device,
                             t_min=options.t_min)  # (B, draws)
    if options.complementary:
        t = t.clamp_max(1 - options.t_min)  # so the complement 1 - t keeps the same 1/t cap
    noise = sample_noise_masks(response_mask, t, generator)  # (B, draws, L)
    return complementary_noise(response_mask, t, noise) if options.complementary else (t, noise)


# ----------------------------------------------------------------------------- ELBO terms


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def block_token_counts(response_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Response tokens per block: (B, num_blocks)."""
    pad = (-response_mask.shape[-1]) % block_size
    counts = F.pad(response_mask.long(), (0, pad))
    return counts.view(response_mask.shape[0], -1, block_size).sum(-1)


def block_elbo_terms(model, input_ids: torch.Tensor, response_mask: torch.Tensor, block_size: int,
                     t: torch.Tensor, noise_mask: torch.Tensor, *, pad_mask: torch.Tensor | None = None,
                     mask_token_id: int | None = None) -> torch.Tensor:
    """ℓ(n, b) = (1/t_n) Σ_{i ∈ block b, masked} log p(y_i | z_n): (B, N, num_blocks), float32.

    input_ids (B, L): prompt + response; response_mask (B, L): scored tokens; t (B, N);
    noise_mask (B, N, L) (restricted to the response here); pad_mask (B, L) True = real token.
    One model call of batch B·N over z_n = [y_tn ; y_0] (2L) with the block-diffusion mask.
    L need not be a multiple of block_size: the tail is padded internally.
    """
    bsz, length = input_ids.shape
    steps = t.shape[1]
    if response_mask.shape != input_ids.shape or noise_mask.shape != (bsz, steps, length):
        raise ValueError(
            f"block_elbo_terms: shapes disagree: input_ids {tuple(input_ids.shape)}, response_mask "
            f"{tuple(response_mask.shape)}, t {tuple(t.shape)}, noise_mask {tuple(noise_mask.shape)} "
            "(expected (B, L), (B, L), (B, N), (B, N, L))"
        )
    mask_id = model_mask_token_id(model) if mask_token_id is None else mask_token_id
    scored = response_mask.bool() if pad_mask is None else response_mask.bool() & pad_mask.bool()
    noise = noise_mask & scored[:, None]  # (B, N, L)
    pad = (-length) % block_size
    if pad:
        input_ids = F.pad(input_ids, (0, pad), value=mask_id)
        noise = F.pad(noise, (0, pad), value=False)
        pad_mask = F.pad(torch.ones_like(scored) if pad_mask is None else pad_mask.bool(), (0, pad), value=False)
    padded = length + pad
    clean = input_ids[:, None].expand(bsz, steps, padded).reshape(bsz * steps, padded)  # (BN, L)
    noise = noise.reshape(bsz * steps, padded)
    noisy = torch.where(noise, torch.full_like(clean, mask_id), clean)
    z = torch.cat([noisy, clean], dim=1)  # (BN, 2L)
    position_ids = torch.arange(padded, device=z.device).repeat(2)[None].expand(bsz * steps, -1)  # (BN, 2L)
    rows_pad = None if pad_mask is None else pad_mask.bool().repeat_interleave(steps, dim=0)  # (BN, L)
    attn = AttentionLayout("diffusion", padded, block_size, pad_mask=rows_pad)  # (BN|1, 1, 2L, 2L) when dense
    logp = masked_logprobs(model, z, attn, position_ids, clean, noise)  # (BN, L)
    per_block = logp.view(bsz, steps, padded // block_size, block_size).sum(-1)  # (B, N, nb)
    return per_block / t[..., None].to(per_block.dtype)


# ----------------------------------------------------------------------------- ratios, loss


def sequence_log_ratio(terms_new: torch.Tensor, terms_old: torch.Tensor,
                       response_lengths: torch.Tensor) -> torch.Tensor:
    """log ρ = Σ_n w_n Σ_b (ℓ_new - ℓ_old) / |y|, w_n = 1/N: (B,). Length-normalised, so long and
    short responses clip on the same scale."""
    return (terms_new - terms_old).mean(1).sum(-1) / response_lengths.clamp_min(1)


def block_log_ratio(terms_new: torch.Tensor, terms_old: torch.Tensor,
                    block_lengths: torch.Tensor) -> torch.Tensor:
    """One log ratio per block, Σ_n w_n (ℓ_new - ℓ_old) / |y ∩ block|: (B, num_blocks)."""
    return (terms_new - terms_old).mean(1) / block_lengths.clamp_min(1)


# ----------------------------------------------------------------------------- batches, updates


@dataclass
class EBPOBatch(RowBatch):
    """One rollout batch, fixed before the updates: the same t and masks score θ_old, θ and π_ref."""

    input_ids: torch.Tensor  # (B, L) prompt + response
    response_mask: torch.Tensor  # (B, L) bool, tokens the policy generated
    t: torch.Tensor  # (B, N)
    noise_mask: torch.Tensor  # (B, N, L) bool
    old_terms: torch.Tensor  # (B, N, nb) ℓ_θold, no grad
    advantages: torch.Tensor  # (B,)
    block_size: int  # the model's diffusion block, which the ELBO's blocks follow
    pad_mask: torch.Tensor | None = None  # (B, L) True = real token
    ref_terms: torch.Tensor | None = None  # (B, N, nb) ℓ_ref, only when beta > 0


def _terms_in_chunks(model, batch: EBPOBatch, chunk: int | None, mask_token_id: int | None) -> torch.Tensor:
    """ℓ (B, N, nb) for the whole batch without grad, `chunk` rows per forward."""
    def score(part):
        return block_elbo_terms(model, part.input_ids, part.response_mask, part.block_size, part.t,
                                part.noise_mask, pad_mask=part.pad_mask, mask_token_id=mask_token_id)

    empty = (0, batch.t.shape[1], num_blocks(batch.input_ids.shape[1], batch.block_size))
    return score_in_chunks(model, batch, chunk, score, empty)


def build_batch(model, input_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor,
                policy: PolicyConfig, options: EBPOConfig, *, block_size: int, pad_mask: torch.Tensor | None = None,
                ref_model=None, generator: torch.Generator | None = None,
                mask_token_id: int | None = None) -> tuple[EBPOBatch, dict]:
    """Advantages, zero-variance filtering, noise draws and θ_old (and π_ref) terms for one rollout batch.

    Rows are prompts × G with each prompt's completions adjacent. `model` is θ_old (the policy
    before this batch's updates). Returns the batch (possibly empty) and its metrics.
    """
    check_reference(policy, ref_model)
    input_ids, scored, pad_mask, adv, metrics = kept_rows(input_ids, response_mask, rewards, policy, pad_mask)
    t, noise = draw_noise(scored, options, generator)  # (K, N), (K, N, L)
    batch = EBPOBatch(input_ids, scored, t, noise,
                      old_terms=torch.empty(0), advantages=adv, block_size=block_size, pad_mask=pad_mask)
    batch.old_terms = _terms_in_chunks(model, batch, policy.minibatch_size, mask_token_id)
    if policy.kl_beta > 0:
        batch.ref_terms = _terms_in_chunks(ref_model, batch, policy.minibatch_size, mask_token_id)
    return batch, metrics


def ebpo_minibatch_loss(model, batch: EBPOBatch, policy: PolicyConfig, options: EBPOConfig, *,
                        mask_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """EBPO loss of one minibatch under the current θ, from the batch's stored masks and θ_old terms."""
    terms = block_elbo_terms(model, batch.input_ids, batch.response_mask, batch.block_size, batch.t,
                             batch.noise_mask, pad_mask=batch.pad_mask, mask_token_id=mask_token_id)  # (B, N, nb)
    if options.ratio_level == "sequence":
        counts, mask = batch.response_mask.sum(-1), None  # (B,)
        log_ratio = sequence_log_ratio(terms, batch.old_terms, counts)
        ref_log_ratio = None if batch.ref_terms is None else sequence_log_ratio(batch.ref_terms, terms, counts)
    else:
        counts = block_token_counts(batch.response_mask, batch.block_size)  # (B, nb)
        mask = counts > 0  # blocks with no response token carry no ratio
        log_ratio = block_log_ratio(terms, batch.old_terms, counts)
        ref_log_ratio = None if batch.ref_terms is None else block_log_ratio(batch.ref_terms, terms, counts)
    kl = None if ref_log_ratio is None or policy.kl_beta == 0 else k3_kl(ref_log_ratio)
    return clipped_policy_loss(log_ratio, batch.advantages, eps_low=policy.eps_low, eps_high=policy.eps_high,
                               mask=mask, kl=kl, beta=policy.kl_beta)


def ebpo_update(model, step_fn: Callable[[torch.Tensor | None], None], batch: EBPOBatch, policy: PolicyConfig,
                options: EBPOConfig, *, generator: torch.Generator | None = None, mask_token_id: int | None = None,
                steps_per_pass: int | None = None) -> list[dict]:
    """`policy_update` with the EBPO loss (the batch's masks are the same in every pass)."""
    def loss_fn(part, _update_pass):
        return ebpo_minibatch_loss(model, part, policy, options, mask_token_id=mask_token_id)

    return policy_update(step_fn, batch, policy, loss_fn, generator=generator, steps_per_pass=steps_per_pass)
