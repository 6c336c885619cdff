"""Attention masks for block diffusion (docs/design.md §3): dense boolean tensors and flex `mask_mod`s.

Convention: True = the query may attend to the key. Masks are (B or 1, 1, Q, K).
A query row that would attend to nothing (a padding position) attends to itself only, so softmax
stays finite; its output is never used.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace

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


def _keep_mod(allowed, b, q_pos, k_pos, is_self, doc_ids, pad_mask):
    """Intersect a `mask_mod` rule with documents and padding; a padding query attends to itself only."""
    if doc_ids is not None:
        allowed = allowed & (doc_ids[b, q_pos] == doc_ids[b, k_pos])
    if pad_mask is not None:
        q_ok = pad_mask[b, q_pos]
        allowed = (allowed & q_ok & pad_mask[b, k_pos]) | (~q_ok & is_self)
    return allowed


def block_diffusion_mask_mod(seq_len: int, block_size: int, doc_ids=None, pad_mask=None):
    """flex-attention `mask_mod` equivalent to `block_diffusion_mask` (same rules, index math)."""

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
        return _keep_mod(allowed, b, q_pos, k_pos, q_idx == kv_idx, doc_ids, pad_mask)

    return mask_mod


def block_causal_mask_mod(seq_len: int, block_size: int, doc_ids=None, pad_mask=None, q_start: int = 0,
                          device=None):
    """flex-attention `mask_mod` equivalent to `block_causal_mask` (query i is position q_start + i)."""

    # a tensor, so compiled flex reads it as an input instead of specialising on every decoding step
    offset = torch.tensor(q_start, device=device if device is not None else _ids_device(doc_ids, pad_mask))

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        allowed = kv_idx // block_size <= q_pos // block_size
        return _keep_mod(allowed, b, q_pos, kv_idx, q_pos == kv_idx, doc_ids, pad_mask)

    return mask_mod


def dense_mask_mod(mask: torch.Tensor):
    """Wrap any dense (B or 1, 1, Q, K) boolean mask as a flex `mask_mod` (general but not sparse-aware)."""
    batched = mask.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b if batched else 0, 0, q_idx, kv_idx]

    return mask_mod


_LAYOUT_KINDS = ("diffusion", "block_causal")


@dataclass(eq=False)
class AttentionLayout:
    """The structure of a §3 mask, passed as `attention_mask` instead of a dense tensor.

    `flex` turns it into a block-sparse `BlockMask` (a `mask_mod` over indices, so masked tiles are
    skipped); `sdpa` into the dense boolean mask. Both are built once per forward (the layers share
    this object) and BlockMasks are also cached across forwards per shape and ids content.
    kind "diffusion": the `[x_t ; x_0]` training layout, Q = K = 2L. kind "block_causal": decoding
    and inference, queries `q_start..seq_len-1` (the uncached tail), keys `0..seq_len-1`.
    """

    kind: str
    seq_len: int
    block_size: int
    doc_ids: torch.Tensor | None = None  # (B, L) document index of each position
    pad_mask: torch.Tensor | None = None  # (B, L) True = real token
    q_start: int = 0
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False)
    _block_mask: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.kind not in _LAYOUT_KINDS:
            raise ValueError(f"AttentionLayout.kind must be one of {_LAYOUT_KINDS}, got {self.kind!r}")
        if self.kind == "diffusion" and self.seq_len % self.block_size:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of block_size {self.block_size}")
        if self.kind == "diffusion" and self.q_start:
            raise ValueError("q_start applies to block_causal layouts only (the training layout is uncached)")
        if not 0 <= self.q_start < self.seq_len:
            raise ValueError(f"q_start {self.q_start} must lie in [0, seq_len={self.seq_len})")
        for name in ("doc_ids", "pad_mask"):
            ids = getattr(self, name)
            if ids is not None and (ids.dim() != 2 or ids.shape[1] != self.seq_len):
                shape = tuple(ids.shape)
                raise ValueError(f"AttentionLayout.{name} must be (B, {self.seq_len}), got {shape}")
        # contiguous ids: compiled flex guards on the strides of tensors its mask_mod reads (a sliced
        # padding mask would make every decoding step a new kernel, and inductor's CPU path fail)
        if self.doc_ids is not None:
            self.doc_ids = self.doc_ids.contiguous()
        if self.pad_mask is not None:
            self.pad_mask = self.pad_mask.bool().contiguous()

    @property
    def q_len(self) -> int:
        return 2 * self.seq_len if self.kind == "diffusion" else self.seq_len - self.q_start

    @property
    def kv_len(self) -> int:
        return 2 * self.seq_len if self.kind == "diffusion" else self.seq_len

    @property
    def batch(self) -> int | None:
        """Rows of the ids tensors, or None when one mask serves the whole batch."""
        ids = self.doc_ids if self.doc_ids is not None else self.pad_mask
        return None if ids is None else ids.shape[0]

    def mask_mod(self, device=None):
        """The flex `mask_mod` of this layout (ids tensors must already be on `device`)."""
        if self.kind == "diffusion":
            return block_diffusion_mask_mod(self.seq_len, self.block_size, self.doc_ids, self.pad_mask)
        return block_causal_mask_mod(self.seq_len, self.block_size, self.doc_ids, self.pad_mask, self.q_start,
                                     device)

    def dense(self, device=None) -> torch.Tensor:
        """The boolean mask (B or 1, 1, Q, K), True = attend, as `block_diffusion_mask` builds it."""
        device = torch.device(device) if device is not None else self._ids_device()
        if self._dense is None or self._dense.device != device:
            on = self._on(device)
            args = (on.seq_len, on.block_size, on.doc_ids, on.pad_mask)
            if self.kind == "diffusion":
                self._dense = block_diffusion_mask(*args, device=device)
            else:
                self._dense = block_causal_mask(*args, q_start=self.q_start, device=device)
        return self._dense

    def block_mask(self, device):
        """The flex `BlockMask` on `device`, from the LRU cache when this shape and ids were seen."""
        if self._block_mask is None:
            key = self._cache_key(device)
            cached = _BLOCK_MASKS.pop(key, None)
            self._block_mask = cached if cached is not None else self._create_block_mask(device)
            _BLOCK_MASKS[key] = self._block_mask
            while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
                _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        return self._block_mask

    def _create_block_mask(self, device):
        from torch.nn.attention.flex_attention import create_block_mask

        # compiling the mask construction pays off on GPUs; on CPU the vmap'd dense build is cheap
        return create_block_mask(self._on(device).mask_mod(device), self.batch, None, self.q_len, self.kv_len,
                                 device=device, _compile=torch.device(device).type == "cuda")

    def _on(self, device) -> "AttentionLayout":
        """This layout with its ids tensors on `device`."""
        ids = [t.to(device) if t is not None else None for t in (self.doc_ids, self.pad_mask)]
        return replace(self, doc_ids=ids[0], pad_mask=ids[1])

    def _ids_device(self) -> torch.device:
        return _ids_device(self.doc_ids, self.pad_mask)

    def _cache_key(self, device) -> tuple:
        content = [_content_digest(t) for t in (self.doc_ids, self.pad_mask)]
        return (self.kind, self.seq_len, self.block_size, self.q_start, str(device), self.batch, *content)


def _ids_device(doc_ids, pad_mask) -> torch.device:
    ids = doc_ids if doc_ids is not None else pad_mask
    return ids.device if ids is not None else torch.device("cpu")


_BLOCK_MASK_CACHE_SIZE = 32
_BLOCK_MASKS: OrderedDict = OrderedDict()


def _content_digest(ids: torch.Tensor | None) -> str | None:
    """A key for an ids tensor's values (one host copy of a (B, L) tensor per forward)."""
    if ids is None:
        return None
    return hashlib.blake2b(ids.detach().to("cpu", torch.int64).numpy().tobytes(), digest_size=16).hexdigest()
