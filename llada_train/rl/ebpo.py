"""EBPO: ELBO-based Block-level Policy Optimization for block-diffusion LMs (LLaDA2.1, DESIGN §7).

A dLLM has no tractable log π(y|x), so EBPO puts its block-diffusion ELBO in the PPO ratio:
for N stratified noise levels t_n, mask response tokens with probability t_n and score every block
b by ℓ(n, b) = (1/t_n) Σ_{i ∈ b, masked} log p(y_i | z_n). With the `[y_t ; y_0]` layout and the
block-diffusion mask (§3), ONE forward per t_n yields ℓ(n, b) for all blocks at once: noisy block b
sees only itself and the clean blocks before it, exactly the block's conditional. The same masks
score θ and θ_old, so their noise cancels in the ratio.

The stage loop (`stages/rl.py`) owns rollouts and optimizer steps; this module gives it
`build_batch` (advantages, masks, θ_old terms), `ebpo_minibatch_loss` and `ebpo_update`. The parts
every likelihood estimator shares (`kept_rows`, `RowBatch`, `score_in_chunks`, `policy_update`) also
serve d1's estimator (`rl/diffu_grpo.py`, `rl.estimator: diffu_grpo`).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from llada_train.model.masks import AttentionLayout

RATIO_LEVELS = ("sequence", "block")
ESTIMATORS = ("ebpo", "diffu_grpo")  # likelihood estimate in the ratio: EBPO's block ELBO | d1's one-step
ADVANTAGES = ("group", "loo", "none")
T_MIN = 1e-3  # smallest noise level: keeps the 1/t weight finite
LOG_RATIO_CLAMP = 20.0  # exp() guard; |log ρ| beyond it is a diverged update anyway


@dataclass
class EBPOConfig:
    """EBPO hyper-parameters (config section `rl`). Defaults follow LLaDA2.1 / DESIGN §7."""

    group_size: int = 8  # G completions per prompt
    num_timesteps: int = 2  # N stratified noise levels per sequence
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high (clip-higher)
    updates_per_batch: int = 1  # μ passes over each rollout batch
    minibatch_size: int | None = None  # sequences per optimizer step (over all ranks); null = the whole batch
    ratio_level: str = "sequence"  # "sequence" (length-normalised) | "block" (clipped per block)
    advantage: str = "group"  # "group" (r - mean)/(std + eps) | "loo" leave-one-out | "none" raw
    drop_zero_variance: bool = True  # drop groups whose rewards are all equal (they carry no signal)
    kl_beta: float = 0.0  # weight of the k3 KL to the frozen initial model (0 = no reference model)
    t_min: float = T_MIN  # smallest noise level; caps the 1/t weight of short responses' few masked tokens
    estimator: str = "ebpo"  # "ebpo" | "diffu_grpo" (d1; num_timesteps, ratio_level and t_min unused)
    p_mask_prompt: float = 0.15  # diffu_grpo: probability of masking each prompt token (d1's recipe)
    complementary: bool = False  # ebpo: levels in pairs (t, 1 - t) with complementary masks (N even)

    def __post_init__(self):
        def bad(key, must):
            raise ValueError(f"rl.{key} = {getattr(self, key)!r}: {must}")

        if self.advantage not in ADVANTAGES:
            bad("advantage", f"must be one of {ADVANTAGES}")
        if self.estimator not in ESTIMATORS:
            bad("estimator", f"must be one of {ESTIMATORS}")
        if not 0.0 <= self.p_mask_prompt < 1.0:
            bad("p_mask_prompt", "must be in [0, 1)")
        if self.ratio_level not in RATIO_LEVELS:
            bad("ratio_level", f"must be one of {RATIO_LEVELS}")
        min_group = 1 if self.advantage == "none" else 2
        if self.group_size < min_group:
            bad("group_size", f"must be >= {min_group} with rl.advantage={self.advantage!r}")
        for key in ("num_timesteps", "updates_per_batch"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            bad("minibatch_size", "must be >= 1, or null for the whole rollout batch")
        if not 0.0 <= self.eps_low < 1.0:
            bad("eps_low", "must be in [0, 1)")
        if not self.eps_high >= 0.0:
            bad("eps_high", "must be >= 0")
        if not 0.0 < self.t_min < 1.0:
            bad("t_min", "must be in (0, 1)")
        if self.complementary and (self.num_timesteps % 2 or self.t_min >= 0.5):
            bad("complementary", f"pairs each level t with 1 - t: needs an even rl.num_timesteps (got "
                f"{self.num_timesteps}) and rl.t_min < 0.5 (got {self.t_min})")
        if not self.kl_beta >= 0.0:
            bad("kl_beta", "must be >= 0 (0 disables the KL term)")


# ----------------------------------------------------------------------------- noise


def _rand(shape, generator, device) -> torch.Tensor:
    """U(0,1) drawn on the generator's device (so a CPU generator works for GPU batches)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def stratified_timesteps(n: int, batch: int, generator: torch.Generator | None = None, *,
                         device=None, t_min: float = T_MIN) -> torch.Tensor:
    """t_n = (n - 1 + u) / N, one u ~ U(0,1) per row: (B, N), one level in each stratum.

    Stratifying lowers the variance of the N-sample ELBO estimate at no cost.
    """
    u = _rand((batch, 1), generator, device)  # (B, 1)
    t = (torch.arange(n, device=u.device) + u) / n  # (B, N)
    return t.clamp_min(t_min)


def sample_noise_masks(response_mask: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, L) bool: each response token masked with probability t_n; the prompt never is."""
    bsz, length = response_mask.shape
    u = _rand((bsz, t.shape[1], length), generator, response_mask.device)  # (B, N, L)
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


def draw_noise(response_mask: torch.Tensor, cfg: EBPOConfig, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's levels (B, N) and masks (B, N, L): N stratified independent draws, or N/2 stratified
    draws and their complements (`rl.complementary`)."""
    draws = cfg.num_timesteps // 2 if cfg.complementary else cfg.num_timesteps
    t = stratified_timesteps(draws, response_mask.shape[0], generator, device=response_mask.device, t_min=cfg.t_min)
    if cfg.complementary:
        t = t.clamp_max(1 - cfg.t_min)  # so the complement 1 - t keeps the same 1/t cap
    noise = sample_noise_masks(response_mask, t, generator)
    return complementary_noise(response_mask, t, noise) if cfg.complementary else (t, noise)


# ----------------------------------------------------------------------------- ELBO terms


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def block_token_counts(response_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Response tokens per block: (B, num_blocks)."""
    pad = (-response_mask.shape[-1]) % block_size
    counts = F.pad(response_mask.long(), (0, pad))
    return counts.view(response_mask.shape[0], -1, block_size).sum(-1)


def _mask_token_id(model) -> int:
    core = getattr(model, "module", model)  # DeepSpeed engine / DDP wrap the model as `.module`
    return core.config.mask_token_id


def _masked_logprobs(model, z: torch.Tensor, attn, position_ids: torch.Tensor, targets: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """log p(target) where mask, 0 elsewhere: (R, L) float32, from one model call over z (R, 2L).
    Only the masked noisy-half positions reach the lm_head (chunked CE: no (positions x vocab) tensor)."""
    select = F.pad(mask, (0, z.shape[1] - mask.shape[1]))  # (R, 2L)
    out = model(input_ids=z, attention_mask=attn, position_ids=position_ids, output_positions=select,
                targets=targets[mask])
    picked = -out.token_ce  # (M,)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


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
    if mask_token_id is None:
        mask_token_id = _mask_token_id(model)
    scored = response_mask.bool() if pad_mask is None else response_mask.bool() & pad_mask.bool()
    noise = noise_mask & scored[:, None]  # (B, N, L)
    pad = (-length) % block_size
    if pad:
        input_ids = F.pad(input_ids, (0, pad), value=mask_token_id)
        noise = F.pad(noise, (0, pad), value=False)
        pad_mask = F.pad(torch.ones_like(scored) if pad_mask is None else pad_mask.bool(), (0, pad), value=False)
    padded = length + pad
    clean = input_ids[:, None].expand(bsz, steps, padded).reshape(bsz * steps, padded)  # (BN, L)
    noise = noise.reshape(bsz * steps, padded)
    noisy = torch.where(noise, torch.full_like(clean, mask_token_id), clean)
    z = torch.cat([noisy, clean], dim=1)  # (BN, 2L)
    position_ids = torch.arange(padded, device=z.device).repeat(2)[None].expand(bsz * steps, -1)  # (BN, 2L)
    rows_pad = None if pad_mask is None else pad_mask.bool().repeat_interleave(steps, dim=0)  # (BN, L)
    attn = AttentionLayout("diffusion", padded, block_size, pad_mask=rows_pad)  # (BN|1, 1, 2L, 2L) when dense
    logp = _masked_logprobs(model, z, attn, position_ids, clean, noise)  # (BN, L)
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


def k3_kl(log_ratio_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ || π_ref) from log r = log π_ref - log π_θ: r - log r - 1 (≥ 0, unbiased
    under samples of π_θ, low variance)."""
    log_r = log_ratio_ref.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_r.exp() - log_r - 1


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum() / weight.sum().clamp_min(1)


def ebpo_loss(log_ratio: torch.Tensor, adv: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.28,
              mask: torch.Tensor | None = None, kl: torch.Tensor | None = None,
              beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate -mean(min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â)) + β·mean(KL).

    log_ratio: (B,) or (B, nb); adv: (B,) broadcast over blocks; mask: valid entries of log_ratio;
    kl: per-entry KL estimate (same shape). Metrics: clip_frac_low/high = share of entries whose
    gradient the clip cuts (ρ < 1-ε_low with Â < 0 / ρ > 1+ε_high with Â > 0), ratio stats, KL.
    """
    while adv.dim() < log_ratio.dim():
        adv = adv.unsqueeze(-1)
    adv = adv.to(log_ratio.dtype)
    weight = torch.ones_like(log_ratio) if mask is None else mask.to(log_ratio.dtype)
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    pg_loss = -_masked_mean(surrogate, weight)
    loss = pg_loss
    with torch.no_grad():
        valid = weight > 0
        r = ratio[valid] if valid.any() else ratio.new_ones(1)
        metrics = {
            "pg_loss": pg_loss.item(),
            "clip_frac_low": _masked_mean(((ratio < 1 - eps_low) & (adv < 0)).to(weight.dtype), weight).item(),
            "clip_frac_high": _masked_mean(((ratio > 1 + eps_high) & (adv > 0)).to(weight.dtype), weight).item(),
            "ratio_mean": r.mean().item(),
            "ratio_min": r.min().item(),
            "ratio_max": r.max().item(),
        }
    if kl is not None:
        kl_mean = _masked_mean(kl, weight)
        loss = loss + beta * kl_mean
        metrics["kl"] = kl_mean.item()
    metrics["loss"] = loss.item()
    return loss, metrics


# ----------------------------------------------------------------------------- advantages


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of rl.group_size={group_size}: "
            "expected (prompts * group_size,) with each prompt's completions adjacent"
        )
    return rewards.view(-1, group_size)  # (P, G)


def advantages(rewards: torch.Tensor, group_size: int, mode: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Per-completion advantages (B,) from rewards (B,) laid out as prompts × G.

    group: (r - mean_g) / (std_g + eps), std with Bessel's correction (as GRPO);
    loo: r - mean of the other G-1 rewards of the group (RLOO); none: r.
    """
    r = _grouped(rewards.double(), group_size)
    if mode == "none":
        out = r
    elif mode == "group":
        if group_size < 2:
            raise ValueError(f"rl.group_size={group_size}: group advantages need at least 2 completions")
        out = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    elif mode == "loo":
        if group_size < 2:
            raise ValueError(f"rl.group_size={group_size}: leave-one-out advantages need at least 2 completions")
        out = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"rl.advantage = {mode!r}: must be one of {ADVANTAGES}")
    return out.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """(B,) bool: True for every completion of a group whose rewards are all equal (within atol)."""
    r = _grouped(rewards, group_size)
    spread = r.max(1).values - r.min(1).values  # (P,)
    return (spread <= atol).repeat_interleave(group_size)


# ----------------------------------------------------------------------------- batches, updates


class RowBatch:
    """Tensor fields whose first dimension is the batch row (a dataclass subclass): row selection and
    shuffled minibatches, shared by the estimators' batches."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows):
        def pick(value):
            return value[rows] if isinstance(value, torch.Tensor) else value  # None, block_size

        return type(self)(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def minibatch_bounds(self, size: int | None) -> list[tuple[int, int]]:
        """(start, end) of each minibatch of `size` sequences (the last may be smaller); None = one."""
        size = size or max(len(self), 1)
        return [(start, min(start + size, len(self))) for start in range(0, len(self), size)]

    def minibatches(self, size: int | None, generator: torch.Generator | None = None) -> Iterator:
        """Shuffled minibatches (`minibatch_bounds`)."""
        order = torch.randperm(len(self), generator=generator).to(self.input_ids.device)
        for start, end in self.minibatch_bounds(size):
            yield self.select(order[start:end])


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


@torch.no_grad()
def score_in_chunks(model, batch: RowBatch, chunk: int | None, score: Callable,
                    empty_shape: tuple) -> torch.Tensor:
    """`score(part)` over the whole batch without grad, `chunk` rows per forward (None = all), model in
    eval mode; a batch without rows (every group dropped) gives zeros of `empty_shape`."""
    was_training = model.training
    model.eval()  # no expert-load accounting or dropout on scoring passes
    try:
        step = chunk or max(len(batch), 1)
        chunks = [score(batch.select(slice(start, start + step))) for start in range(0, len(batch), step)]
        return torch.cat(chunks) if chunks else torch.zeros(empty_shape, device=batch.input_ids.device)
    finally:
        model.train(was_training)


def _terms_in_chunks(model, batch: EBPOBatch, cfg: EBPOConfig, mask_token_id: int | None) -> torch.Tensor:
    """ℓ for the whole batch without grad, `minibatch_size` rows per forward."""
    def score(part):
        return block_elbo_terms(model, part.input_ids, part.response_mask, part.block_size, part.t,
                                part.noise_mask, pad_mask=part.pad_mask, mask_token_id=mask_token_id)

    empty = (0, cfg.num_timesteps, num_blocks(batch.input_ids.shape[1], batch.block_size))
    return score_in_chunks(model, batch, cfg.minibatch_size, score, empty)


def kept_rows(input_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, cfg: EBPOConfig,
              pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                            torch.Tensor, dict]:
    """Advantages and zero-variance filtering, shared by the estimators: the kept rows' input_ids,
    scored mask (response ∩ real tokens), pad_mask and advantages, and the batch's metrics."""
    adv = advantages(rewards.float(), cfg.group_size, cfg.advantage).to(input_ids.device)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.drop_zero_variance:
        keep = ~zero_variance_groups(rewards, cfg.group_size)
    r = rewards.double()
    metrics = {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
               "kept_frac": keep.double().mean().item()}
    rows = keep.nonzero().squeeze(1).to(input_ids.device)
    input_ids, response_mask = input_ids[rows], response_mask.bool()[rows]
    pad_mask = None if pad_mask is None else pad_mask.bool()[rows]
    scored = response_mask if pad_mask is None else response_mask & pad_mask
    metrics["response_tokens"] = scored.sum().item()
    return input_ids, scored, pad_mask, adv[rows], metrics


def build_batch(model, input_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor,
                cfg: EBPOConfig, *, block_size: int, pad_mask: torch.Tensor | None = None, ref_model=None,
                generator: torch.Generator | None = None,
                mask_token_id: int | None = None) -> tuple[EBPOBatch, dict]:
    """Advantages, zero-variance filtering, noise draws and θ_old (and π_ref) terms for one rollout batch.

    Rows are prompts × G with each prompt's completions adjacent. `model` is θ_old (the policy
    before this batch's updates). Returns the batch (possibly empty) and its metrics.
    """
    if cfg.kl_beta > 0 and ref_model is None:
        raise ValueError(f"rl.kl_beta = {cfg.kl_beta}: a KL penalty needs a reference model (pass ref_model)")
    input_ids, scored, pad_mask, adv, metrics = kept_rows(input_ids, response_mask, rewards, cfg, pad_mask)
    t, noise = draw_noise(scored, cfg, generator)
    batch = EBPOBatch(input_ids, scored, t, noise,
                      old_terms=torch.empty(0), advantages=adv, block_size=block_size, pad_mask=pad_mask)
    batch.old_terms = _terms_in_chunks(model, batch, cfg, mask_token_id)
    if cfg.kl_beta > 0:
        batch.ref_terms = _terms_in_chunks(ref_model, batch, cfg, mask_token_id)
    return batch, metrics


def ebpo_minibatch_loss(model, batch: EBPOBatch, cfg: EBPOConfig, *,
                        mask_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """EBPO loss of one minibatch under the current θ, from the batch's stored masks and θ_old terms."""
    terms = block_elbo_terms(model, batch.input_ids, batch.response_mask, batch.block_size, batch.t,
                             batch.noise_mask, pad_mask=batch.pad_mask, mask_token_id=mask_token_id)
    if cfg.ratio_level == "sequence":
        counts, mask = batch.response_mask.sum(-1), None  # (B,)
        log_ratio = sequence_log_ratio(terms, batch.old_terms, counts)
        ref_log_ratio = None if batch.ref_terms is None else sequence_log_ratio(batch.ref_terms, terms, counts)
    else:
        counts = block_token_counts(batch.response_mask, batch.block_size)  # (B, nb)
        mask = counts > 0  # blocks with no response token carry no ratio
        log_ratio = block_log_ratio(terms, batch.old_terms, counts)
        ref_log_ratio = None if batch.ref_terms is None else block_log_ratio(batch.ref_terms, terms, counts)
    kl = None if ref_log_ratio is None or cfg.kl_beta == 0 else k3_kl(ref_log_ratio)
    return ebpo_loss(log_ratio, batch.advantages, eps_low=cfg.eps_low, eps_high=cfg.eps_high, mask=mask,
                     kl=kl, beta=cfg.kl_beta)


def policy_update(step_fn: Callable[[torch.Tensor | None], None], batch: RowBatch, cfg: EBPOConfig,
                  loss_fn: Callable[[RowBatch, int], tuple[torch.Tensor, dict]], *,
                  generator: torch.Generator | None = None, steps_per_pass: int | None = None) -> list[dict]:
    """μ = updates_per_batch shuffled passes over the batch; `loss_fn(minibatch, pass_index)` gives the
    loss, `step_fn(loss)` does backward + step (e.g. `engine.backward(loss); engine.step()`). Returns
    the metrics of every minibatch.

    `steps_per_pass` (data parallelism: the most minibatches any rank has) pads each pass with
    `step_fn(None)` calls, so every rank takes part in every optimizer step."""
    history = []
    steps = steps_per_pass or len(batch.minibatch_bounds(cfg.minibatch_size))
    for update_pass in range(cfg.updates_per_batch if steps else 0):
        parts = list(batch.minibatches(cfg.minibatch_size, generator))
        for part in parts:
            loss, metrics = loss_fn(part, update_pass)
            step_fn(loss)
            history.append(metrics)
        for _ in range(steps - len(parts)):
            step_fn(None)
    return history


def ebpo_update(model, step_fn: Callable[[torch.Tensor | None], None], batch: EBPOBatch, cfg: EBPOConfig, *,
                generator: torch.Generator | None = None, mask_token_id: int | None = None,
                steps_per_pass: int | None = None) -> list[dict]:
    """`policy_update` with the EBPO loss (the batch's masks are the same in every pass)."""
    def loss_fn(part, _update_pass):
        return ebpo_minibatch_loss(model, part, cfg, mask_token_id=mask_token_id)

    return policy_update(step_fn, batch, cfg, loss_fn, generator=generator, steps_per_pass=steps_per_pass)
