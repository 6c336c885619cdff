"""Attention masks for block diffusion (DESIGN §3): dense boolean tensors and flex `mask_mod`s.

Convention: True = the query may attend to the key. Masks are (B or 1, 1, Q, K).
A query row that would attend to nothing (a padding position) attends to itself only, so softmax
stays finite; its output is never used.
"""

import torch


def _block_ids(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device) // block_size  # (L,)


def _pair_keep(doc_ids: torch.Tensor | None, pad_mask: torch.Tensor | None, n_copies: int):
    """(B, Q, K) mask of pairs allowed by documents and padding, over `n_copies` concatenated halves."""
    keep = None
    if doc_ids is not None:
        docs = doc_ids.repeat(1, n_copies)  # (B, cL)
        keep = docs[:, :, None] == docs[:, None, :]
    if pad_mask is not None:
        valid = pad_mask.bool().repeat(1, n_copies)  # (B, cL)
        pad_keep = valid[:, :, None] & valid[:, None, :]
        keep = pad_keep if keep is None else keep & pad_keep
    return keep


def _attend_self_if_empty(mask: torch.Tensor) -> torch.Tensor:
    empty = ~mask.any(-1, keepdim=True)  # (B, Q, 1)
    eye = torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | (empty & eye)


def block_diffusion_mask(
    seq_len: int,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Mask over the 2L training layout `[x_t ; x_0]`: (B or 1, 1, 2L, 2L).

    noisy->noisy: same block; noisy->clean: strictly earlier blocks; clean->clean: block-causal;
    clean->noisy: never. `doc_ids` (B, L) restricts to the same packed document, `pad_mask`
    (B, L) (True = real token) removes padding.
    """
    if seq_len % block_size:
        raise ValueError(f"seq_len {seq_len} is not a multiple of block_size {block_size}")
    if doc_ids is not None:
        device = doc_ids.device
    elif pad_mask is not None:
        device = pad_mask.device
    blk = _block_ids(seq_len, block_size, device)
    bq, bk = blk[:, None], blk[None, :]
    noisy_noisy = bq == bk
    noisy_clean = bk < bq
    clean_clean = bk <= bq
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)  # (L, 2L)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)  # (L, 2L)
    mask = torch.cat([top, bottom], dim=0)[None]  # (1, 2L, 2L)
    keep = _pair_keep(doc_ids, pad_mask, 2)
    if keep is not None:
        mask = _attend_self_if_empty(mask & keep)
    return mask[:, None]


def block_causal_mask(
    seq_len: int,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    q_start: int = 0,
    device=None,
) -> torch.Tensor:
    """Block-causal mask for decoding and inference: q attends to k when blk(k) <= blk(q).

    Queries are positions `q_start..seq_len-1` (the uncached tail when a KV cache holds the
    prefix); returns (B or 1, 1, seq_len - q_start, seq_len).
    """
    if doc_ids is not None:
        device = doc_ids.device
    elif pad_mask is not None:
        device = pad_mask.device
    blk = _block_ids(seq_len, block_size, device)
    mask = (blk[None, :] <= blk[:, None])[None]  # (1, L, L)
    keep = _pair_keep(doc_ids, pad_mask, 1)
    if keep is not None:
        mask = _attend_self_if_empty(mask & keep)
    return mask[:, None, q_start:]


def block_diffusion_mask_mod(seq_len: int, block_size: int, doc_ids=None, pad_mask=None):
    """flex-attention `mask_mod` equivalent to `block_diffusion_mask` (same rules, index math)."""
    two_l = 2 * seq_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= seq_len
        k_clean = kv_idx >= seq_len
        q_pos = q_idx - q_clean * seq_len
        k_pos = kv_idx - k_clean * seq_len
        bq = q_pos // block_size
        bk = k_pos // block_size
        allowed = (
            (~q_clean & ~k_clean & (bq == bk))
            | (~q_clean & k_clean & (bk < bq))
            | (q_clean & k_clean & (bk <= bq))
        )
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_pos] == doc_ids[b, k_pos])
        if pad_mask is not None:
            q_ok = pad_mask[b, q_pos]
            allowed = (allowed & q_ok & pad_mask[b, k_pos]) | (~q_ok & (q_idx == kv_idx))
        return allowed

    mask_mod.seq_len = two_l
    return mask_mod


def dense_mask_mod(mask: torch.Tensor):
    """Wrap any dense (B or 1, 1, Q, K) boolean mask as a flex `mask_mod` (general but not sparse-aware)."""
    batched = mask.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b if batched else 0, 0, q_idx, kv_idx]

    return mask_mod
