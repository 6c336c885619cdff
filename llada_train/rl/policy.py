"""What every RL likelihood estimator shares (docs/design.md §7, §14): the `rl` keys, group advantages
and zero-variance filtering, row batches and their minibatches, scoring without grad, the clipped PPO
surrogate with its k3 KL, and the μ update passes.

An estimator (`rl/ebpo.py`, `rl/diffu_grpo.py`, registered in `rl/estimators.py`) only says how a
completion's likelihood is estimated: its batch's noise, its θ_old scores and its minibatch loss.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..config import check_value
from .estimators import get_estimator

ADVANTAGES = ("group", "loo", "none")
LOG_RATIO_CLAMP = 20.0  # exp() guard; |log ρ| beyond it is a diverged update anyway


@dataclass
class PolicyConfig:
    """The `rl` keys every estimator reads; an estimator's own keys are its section `rl.<estimator>`.
    Defaults follow LLaDA2.1 (docs/design.md §7)."""

    group_size: int = 8  # G completions per prompt
    updates_per_batch: int = 1  # μ passes over each rollout batch
    minibatch_size: int | None = None  # sequences per optimizer step (over all ranks); null = the whole batch
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high (clip-higher)
    advantage: str = "group"  # "group" (r - mean)/(std + eps) | "loo" leave-one-out | "none" raw
    drop_zero_variance: bool = True  # drop groups whose rewards are all equal (they carry no signal)
    kl_beta: float = 0.0  # weight of the k3 KL to the frozen initial model (0 = no reference model)
    estimator: str = "ebpo"  # "ebpo" | "diffu_grpo" (d1): the likelihood in the ratio, keys in rl.<estimator>

    def __post_init__(self):
        get_estimator(self.estimator)  # a ConfigError listing the registered names
        check_value(self.advantage in ADVANTAGES, "rl.advantage",
                    f"must be one of {ADVANTAGES} (got {self.advantage!r})")
        min_group = 1 if self.advantage == "none" else 2
        check_value(self.group_size >= min_group, "rl.group_size",
                    f"must be >= {min_group} with rl.advantage={self.advantage!r} (got {self.group_size})")
        check_value(self.updates_per_batch >= 1, "rl.updates_per_batch", f"must be >= 1 (got {self.updates_per_batch})")
        check_value(self.minibatch_size is None or self.minibatch_size >= 1, "rl.minibatch_size",
                    f"must be >= 1, or null for the whole rollout batch (got {self.minibatch_size})")
        check_value(0.0 <= self.eps_low < 1.0, "rl.eps_low", f"must be in [0, 1) (got {self.eps_low})")
        check_value(self.eps_high >= 0.0, "rl.eps_high", f"must be >= 0 (got {self.eps_high})")
        check_value(self.kl_beta >= 0.0, "rl.kl_beta", f"must be >= 0, 0 disables the KL term (got {self.kl_beta})")


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
    r = _grouped(rewards.double(), group_size)  # (P, G)
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
    r = _grouped(rewards, group_size)  # (P, G)
    spread = r.max(1).values - r.min(1).values  # (P,)
    return (spread <= atol).repeat_interleave(group_size)


def kept_rows(input_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, policy: PolicyConfig,
              pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                            torch.Tensor, dict]:
    """Advantages and zero-variance filtering: the kept rows' input_ids (K, L), scored mask (response ∩
    real tokens, (K, L)), pad_mask (K, L) and advantages (K,), and the batch's metrics."""
    adv = advantages(rewards.float(), policy.group_size, policy.advantage).to(input_ids.device)  # (B,)
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if policy.drop_zero_variance:
        keep = ~zero_variance_groups(rewards, policy.group_size)
    r = rewards.double()
    metrics = {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
               "kept_frac": keep.double().mean().item()}
    rows = keep.nonzero().squeeze(1).to(input_ids.device)
    input_ids, response_mask = input_ids[rows], response_mask.bool()[rows]
    pad_mask = None if pad_mask is None else pad_mask.bool()[rows]
    scored = response_mask if pad_mask is None else response_mask & pad_mask
    metrics["response_tokens"] = scored.sum().item()
    return input_ids, scored, pad_mask, adv[rows], metrics


def check_reference(policy: PolicyConfig, ref_model) -> None:
    """A KL term scores every batch under the frozen reference: fail before any forward without one."""
    if policy.kl_beta > 0 and ref_model is None:
        raise ValueError(f"rl.kl_beta = {policy.kl_beta}: a KL penalty needs a reference model (pass ref_model)")


# ----------------------------------------------------------------------------- scoring


def mask_token_id(model) -> int:
    core = getattr(model, "module", model)  # DeepSpeed engine / DDP wrap the model as `.module`
    return core.config.mask_token_id


def masked_logprobs(model, z: torch.Tensor, attn, position_ids: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """log p(target) where mask, 0 elsewhere: (R, L) float32, from one model call over z (R, 2L).
    Only the masked noisy-half positions reach the lm_head (chunked CE: no (positions x vocab) tensor)."""
    select = F.pad(mask, (0, z.shape[1] - mask.shape[1]))  # (R, 2L)
    out = model(input_ids=z, attention_mask=attn, position_ids=position_ids, output_positions=select,
                targets=targets[mask])
    picked = -out.token_ce  # (M,)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


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


# ----------------------------------------------------------------------------- loss, updates


def k3_kl(log_ratio_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ || π_ref) from log r = log π_ref - log π_θ: r - log r - 1 (≥ 0, unbiased
    under samples of π_θ, low variance)."""
    log_r = log_ratio_ref.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_r.exp() - log_r - 1


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum() / weight.sum().clamp_min(1)


def clipped_policy_loss(log_ratio: torch.Tensor, adv: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.28,
                        mask: torch.Tensor | None = None, kl: torch.Tensor | None = None,
                        beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate -mean(min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â)) + β·mean(KL).

    log_ratio: (B,), (B, nb) or (B, L); adv: (B,) broadcast over the rest; mask: valid entries of
    log_ratio; kl: per-entry KL estimate (same shape). Metrics: clip_frac_low/high = share of entries
    whose gradient the clip cuts (ρ < 1-ε_low with Â < 0 / ρ > 1+ε_high with Â > 0), ratio stats, KL.
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


def policy_update(step_fn: Callable[[torch.Tensor | None], None], batch: RowBatch, policy: PolicyConfig,
                  loss_fn: Callable[[RowBatch, int], tuple[torch.Tensor, dict]], *,
                  generator: torch.Generator | None = None, steps_per_pass: int | None = None) -> list[dict]:
    """μ = updates_per_batch shuffled passes over the batch; `loss_fn(minibatch, pass_index)` gives the
    loss, `step_fn(loss)` does backward + step (e.g. `engine.backward(loss); engine.step()`). Returns
    the metrics of every minibatch.

    `steps_per_pass` (data parallelism: the most minibatches any rank has) pads each pass with
    `step_fn(None)` calls, so every rank takes part in every optimizer step."""
    history = []
    steps = steps_per_pass or len(batch.minibatch_bounds(policy.minibatch_size))
    for update_pass in range(policy.updates_per_batch if steps else 0):
        parts = list(batch.minibatches(policy.minibatch_size, generator))
        for part in parts:
            loss, metrics = loss_fn(part, update_pass)
            step_fn(loss)
            history.append(metrics)
        for _ in range(steps - len(parts)):
            step_fn(None)
    return history
