"""The block-diffusion training objective shared by CPT and SFT (docs/design.md §3-§4).

One forward over `[x_t ; x_0]` trains three things at once: M2T (masked -> token, weighted by
w(t)), T2T (a replaced token -> the original), and "keep" (a visible correct token stays).
Multi-turn Forward (MTF) replaces random tokens by the model's own drafts, so T2T learns to fix
the errors the model really makes. All randomness comes from the `generator` argument.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DiffusionConfig
from .model.masks import AttentionLayout
from .random_draws import uniform


@dataclass
class NoisedBatch:
    x0: torch.Tensor  # (B, L) clean tokens = targets
    xt: torch.Tensor  # (B, L) model input: masks, T2T replacements, MTF drafts, clean tokens
    maskable: torch.Tensor  # (B, L) bool: positions the objective may noise (response / real text)
    masked: torch.Tensor  # (B, L) bool: xt holds the mask token -> M2T loss
    weight: torch.Tensor  # (B, L) float: M2T weight w(t) per position
    replaced: torch.Tensor  # (B, L) bool: xt holds a wrong-or-drafted token -> T2T loss
    doc_ids: torch.Tensor  # (B, L) document ids (packing); -1 = padding
    pad_mask: torch.Tensor  # (B, L) bool, True = real token

    def to(self, device) -> "NoisedBatch":
        return NoisedBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def block_size_at(step: int, cfg: DiffusionConfig, seq_len: int) -> int:
    """Block size from the WSD schedule ([[until_step, size], ...]); 0 means the whole sequence."""
    size = cfg.block_size
    for until, scheduled in cfg.block_schedule:
        if step < until:
            size = scheduled
            break
    return seq_len if size == 0 or size >= seq_len else size


def sample_masks(maskable, block_size, t_min, t_max, per, generator):
    """Mask each maskable token with prob t, t ~ U[t_min, t_max] per block or per sequence.

    Returns masked (B, L) bool and t (B, L) (the t of each position's block/sequence)."""
    bsz, seq_len = maskable.shape
    groups = seq_len // block_size if per == "block" else 1
    t = t_min + (t_max - t_min) * torch.rand(bsz, groups, generator=generator)  # (B, G)
    t = t.repeat_interleave(seq_len // groups, dim=1)  # (B, L)
    masked = maskable & (torch.rand(bsz, seq_len, generator=generator) < t)
    return masked, t


def complementary_pairs(x0, maskable, doc_ids, pad_mask, masked, t):
    """Each example twice: once with its mask, once with the complement over its maskable tokens
    (noise level 1 - t), so every maskable token is supervised exactly once per pair. (2B, L) each."""
    x0, maskable, doc_ids, pad_mask = (torch.cat([v, v]) for v in (x0, maskable, doc_ids, pad_mask))
    masked = torch.cat([masked, maskable[: len(masked)] & ~masked])
    return x0, maskable, doc_ids, pad_mask, masked, torch.cat([t, 1 - t])


def noise_batch(x0, maskable, doc_ids, pad_mask, block_size, cfg: DiffusionConfig, mask_id, generator):
    """M2T noising (+ the complementary copy when enabled)."""
    n = cfg.noise
    masked, t = sample_masks(maskable, block_size, n.t_min, n.t_max, n.per, generator)
    if n.complementary:
        x0, maskable, doc_ids, pad_mask, masked, t = complementary_pairs(x0, maskable, doc_ids, pad_mask, masked, t)
    weight = 1.0 / t.clamp_min(1e-6) if cfg.loss.weighting == "elbo" else torch.ones_like(t)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return NoisedBatch(x0, xt, maskable, masked, weight, torch.zeros_like(masked), doc_ids, pad_mask)


def corrupt_t2t(batch: NoisedBatch, max_ratio, vocab_ids, generator) -> NoisedBatch:
    """Replace r ~ U[0, max_ratio] of each row's visible maskable tokens by random ordinary tokens."""
    if max_ratio <= 0:
        return batch
    bsz, seq_len = batch.x0.shape
    ratio = max_ratio * torch.rand(bsz, 1, generator=generator)
    visible = batch.maskable & ~batch.masked
    replace = visible & (torch.rand(bsz, seq_len, generator=generator) < ratio)
    random_tokens = vocab_ids[torch.randint(len(vocab_ids), (bsz, seq_len), generator=generator)]
    xt = torch.where(replace, random_tokens, batch.xt)
    return _replace(batch, xt=xt, replaced=batch.replaced | replace)


def _replace(batch: NoisedBatch, **changes) -> NoisedBatch:
    return NoisedBatch(**{**batch.__dict__, **changes})


def model_inputs(batch: NoisedBatch, block_size: int) -> dict:
    """`[x_t ; x_0]` with the §3 mask (as an `AttentionLayout`: flex makes it block-sparse, sdpa dense);
    when one block covers the sequence, x_t alone (plain MDM)."""
    bsz, seq_len = batch.xt.shape
    pos = torch.arange(seq_len, device=batch.xt.device)[None].expand(bsz, -1)
    if block_size >= seq_len:
        mask = AttentionLayout("block_causal", seq_len, seq_len, doc_ids=batch.doc_ids,
                               pad_mask=batch.pad_mask)
        return {"input_ids": batch.xt, "position_ids": pos, "attention_mask": mask}
    mask = AttentionLayout("diffusion", seq_len, block_size, doc_ids=batch.doc_ids, pad_mask=batch.pad_mask)
    return {"input_ids": torch.cat([batch.xt, batch.x0], 1), "position_ids": torch.cat([pos, pos], 1),
            "attention_mask": mask}


def supervised_positions(batch: NoisedBatch, cfg: DiffusionConfig) -> torch.Tensor:
    """(B, L) bool: the positions whose logits the objective reads (masked + replaced, + kept when
    `t2t.keep_weight > 0`; CAP's masked positions are among them). Only these reach the lm_head."""
    supervised = batch.masked | batch.replaced
    if cfg.t2t.keep_weight > 0:
        supervised = supervised | batch.maskable
    return supervised


def noisy_forward(model, batch: NoisedBatch, block_size: int, mask_id: int, positions: torch.Tensor,
                  targets: torch.Tensor | None = None, *, with_entropy: bool = False,
                  embed_noise_std: float = 0.0, generator=None):
    """One model call over `model_inputs` that projects only `positions` (B, L) of the noisy half:
    `.logits` (N, V), or with `targets` (N,) the chunked CE results `.token_ce/.token_entropy/.token_pred`.
    Optional Gaussian noise on mask-token embeddings (the AR -> dLLM fix: a fresh mask embedding
    must not look identical everywhere)."""
    inputs = model_inputs(batch, block_size)
    ids = inputs.pop("input_ids")
    inputs.update(output_positions=F.pad(positions, (0, ids.shape[1] - positions.shape[1])),  # (B, L or 2L)
                  targets=targets, with_entropy=with_entropy)
    if embed_noise_std > 0:
        embeds = model.get_input_embeddings()(ids)  # (B, L or 2L, H)
        noise = torch.randn(embeds.shape, generator=generator).to(embeds) * embed_noise_std
        embeds = embeds + noise * (ids == mask_id)[..., None]
        return model(inputs_embeds=embeds, **inputs)
    return model(input_ids=ids, **inputs)


def diffusion_loss(out, batch: NoisedBatch, supervised: torch.Tensor, cfg: DiffusionConfig):
    """Loss = Σ_masked w·CE + t2t.weight·Σ_replaced CE + keep_weight·Σ_kept CE + conf·Σ entropy,
    each divided by the number of maskable tokens (docs/design.md §3-§4). `out`: the model output at the
    `supervised` positions (`noisy_forward` with targets x0[supervised]). Returns (loss, metrics)."""
    ce, pred = out.token_ce, out.token_pred  # (N,)
    n_maskable = batch.maskable.sum().clamp_min(1)
    masked, replaced = batch.masked[supervised], batch.replaced[supervised]  # (N,)
    kept = ~masked & ~replaced
    right = pred == batch.x0[supervised]
    m2t = (ce * batch.weight[supervised] * masked).sum() / n_maskable
    t2t = (ce * replaced).sum() / n_maskable
    loss = m2t + cfg.t2t.weight * t2t
    metrics = {"m2t": m2t.detach(), "t2t": t2t.detach()}
    if cfg.t2t.keep_weight > 0:
        keep = (ce * kept).sum() / n_maskable
        loss = loss + cfg.t2t.keep_weight * keep
        metrics["keep"] = keep.detach()
    if cfg.loss.confidence_weight > 0:
        conf = (out.token_entropy * (masked & right)).sum() / n_maskable
        loss = loss + cfg.loss.confidence_weight * conf
        metrics["confidence"] = conf.detach()
    with torch.no_grad():
        metrics["mask_ratio"] = batch.masked.sum() / n_maskable
        metrics["acc_masked"] = (right & masked).sum() / masked.sum().clamp_min(1)
        if replaced.any():
            metrics["acc_replaced"] = (right & replaced).sum() / replaced.sum()
    return loss, metrics


@torch.no_grad()
def mtf_draft(model, batch: NoisedBatch, block_size, mask_id, draft_ratio, generator) -> NoisedBatch:
    """One drafting turn: the model fills u ~ U[0, draft_ratio] of each row's masked positions with
    its argmax; drafted positions become T2T targets (right or wrong), the rest stay M2T. Only the
    masked positions go through the lm_head."""
    was_training = model.training
    model.eval()
    logits = noisy_forward(model, batch, block_size, mask_id, batch.masked).logits  # (M, V)
    model.train(was_training)
    draft = batch.xt.masked_scatter(batch.masked, logits.argmax(-1))  # (B, L)
    bsz, seq_len = batch.xt.shape
    share = draft_ratio * uniform((bsz, 1), generator, draft.device)
    fill = batch.masked & (uniform((bsz, seq_len), generator, draft.device) < share)
    return _replace(batch, xt=torch.where(fill, draft, batch.xt), masked=batch.masked & ~fill,
                    replaced=batch.replaced | fill)


def _rank0_value(value: float) -> float:
    """Rank 0's draw on every rank: whether a step drafts (MTF) decides how many forwards it makes,
    and ZeRO-3's parameter gathers and expert parallelism's all-to-alls need the same count on all."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    shared = torch.tensor([value if torch.distributed.get_rank() == 0 else 0.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(shared)
    return shared.item()


def training_loss(model, x0, maskable, doc_ids, pad_mask, cfg: DiffusionConfig, *, step: int,
                  mask_id: int, vocab_ids: torch.Tensor, generator: torch.Generator):
    """The full mixed objective for one micro-batch. Returns (loss, metrics)."""
    seq_len = x0.shape[1]
    block = block_size_at(step, cfg, seq_len)
    batch = noise_batch(x0, maskable, doc_ids, pad_mask, block, cfg, mask_id, generator)
    batch = corrupt_t2t(batch, cfg.t2t.max_ratio, vocab_ids, generator)
    batch = batch.to(next(model.parameters()).device)  # noise is drawn on the CPU, the model may be elsewhere
    used_mtf = cfg.mtf.prob > 0 and _rank0_value(torch.rand(1, generator=generator).item()) < cfg.mtf.prob
    if used_mtf:
        for _ in range(cfg.mtf.turns - 1):
            batch = mtf_draft(model, batch, block, mask_id, cfg.mtf.draft_ratio, generator)
    std = cfg.mask_embed_noise_std if step < cfg.mask_embed_noise_steps else 0.0
    supervised = supervised_positions(batch, cfg)
    out = noisy_forward(model, batch, block, mask_id, supervised, batch.x0[supervised],
                        with_entropy=cfg.loss.confidence_weight > 0, embed_noise_std=std, generator=generator)
    loss, metrics = diffusion_loss(out, batch, supervised, cfg)
    metrics["block_size"] = torch.tensor(float(block))
    metrics["mtf"] = torch.tensor(float(used_mtf))
    return loss, metrics


def ordinary_token_ids(vocab_size: int, special_ids) -> torch.Tensor:
    """Token ids T2T may sample: the vocabulary without special tokens."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[list(special_ids)] = False
    return keep.nonzero().squeeze(1)
