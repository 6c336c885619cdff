"""Non-causal GQA attention with per-head QK RMSNorm and partial RoPE; `sdpa` and `flex` backends."""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .masks import AttentionLayout, dense_mask_mod

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate-half) RoPE over the first `rotary_dim` dims of each head."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, L, R/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, R)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos/sin: (B, L, R) with R <= D; dims past R pass through."""
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, R)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


class BlockKVCache:
    """Prefix KV cache for block decoding: holds keys/values of committed blocks per layer.

    A forward with `use_cache=True` appends the first `commit_len` new positions (all when None);
    with `use_cache=False` the cache is only read. Committed positions never change, which is
    what block diffusion guarantees for finished blocks.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.last_hidden: torch.Tensor | None = None  # (B, H) the last committed position's (`shift_logits`)

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def read_and_update(self, layer: int, k: torch.Tensor, v: torch.Tensor, commit_len: int | None):
        """k, v: (B, Hkv, Lnew, D). Returns the full (cached + new) keys and values."""
        if layer in self.keys:
            k_all = torch.cat([self.keys[layer], k], dim=-2)
            v_all = torch.cat([self.values[layer], v], dim=-2)
        else:
            k_all, v_all = k, v
        if commit_len != 0:
            n = k.shape[-2] if commit_len is None else commit_len
            new_k, new_v = k[..., :n, :], v[..., :n, :]
            if layer in self.keys:
                new_k = torch.cat([self.keys[layer], new_k], dim=-2)
                new_v = torch.cat([self.values[layer], new_v], dim=-2)
            self.keys[layer], self.values[layer] = new_k, new_v
        return k_all, v_all

    def select_rows(self, rows: torch.Tensor):
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[rows]


class _FlexRunner:
    """`flex_attention` compiled, eager only when compiling fails (no C++ compiler, an unsupported
    platform): one warning, then eager for good. On CUDA shapes turn dynamic after the first
    recompile; on CPU each shape compiles once (inductor's CPU flex kernel with dynamic shapes
    indexes out of bounds for short query blocks in torch 2.13)."""

    def __init__(self):
        self.compiled = None
        self.eager_on: set[str] = set()  # device types where compiling failed

    def mode(self, device_type: str = "cpu") -> str:
        """"compiled" or "eager": how flex runs on that device type."""
        return "eager" if device_type in self.eager_on else "compiled"

    def __call__(self, q, k, v, block_mask, scale):
        from torch.nn.attention.flex_attention import flex_attention

        kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": True}
        if q.device.type not in self.eager_on:
            if self.compiled is None:
                # decoding meets a new (Q, K) at every block: allow that many per-shape kernels
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                self.compiled = {"cuda": torch.compile(flex_attention),
                                 "cpu": torch.compile(flex_attention, dynamic=False)}
            try:
                return self.compiled["cpu" if q.device.type == "cpu" else "cuda"](q, k, v, **kwargs)
            except Exception as err:  # inductor/dynamo failures of any kind; eager re-raises real errors
                self.eager_on.add(q.device.type)
                reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                logger.warning("flex_attention could not be compiled on %s (%s); running it eager "
                               "(dense scores, no tile skipping)", q.device, reason)
        return flex_attention(q, k, v, **kwargs)


FLEX = _FlexRunner()


class _FlexWithTiledBackward(torch.autograd.Function):
    """flex on CPU with gradients: torch has no flex backward on CPU (and compiled CPU flex returns
    no log-sum-exp), so the forward runs the compiled block-sparse kernel and the backward
    recomputes the softmax tile row by tile row over the key tiles the BlockMask keeps, under the
    element mask (the FlashAttention backward in torch; skipped tiles cost nothing)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, dense_mask, scale):
        out = FLEX(q.detach(), k.detach(), v.detach(), block_mask, scale)
        ctx.save_for_backward(q, k, v, out, dense_mask)
        ctx.block_mask, ctx.scale = block_mask, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, mask = ctx.saved_tensors  # mask: (B|1, 1, Q, K)
        bsz, heads = q.shape[:2]
        groups = heads // k.shape[1]
        q32, d_out = q.float(), d_out.float()
        k_rep, v_rep = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
        delta = (d_out * out.float()).sum(-1, keepdim=True)  # (B, H, Q, 1)
        d_q, d_k, d_v = torch.zeros_like(q32), torch.zeros_like(k_rep), torch.zeros_like(v_rep)
        tiles = ctx.block_mask.to_dense()[:, 0].bool()  # (B|1, nQ, nK): tiles with any kept pair
        q_tile, k_tile = ctx.block_mask.BLOCK_SIZE
        for b in range(bsz):
            for i, kept in enumerate(tiles[b % tiles.shape[0]]):
                rows = slice(i * q_tile, (i + 1) * q_tile)
                cols = (kept.nonzero() * k_tile + torch.arange(k_tile)).flatten()
                cols = cols[cols < k.shape[-2]]  # key positions of the kept tiles
                if rows.start >= q.shape[-2] or cols.numel() == 0:
                    continue
                kb, vb, do = k_rep[b][:, cols], v_rep[b][:, cols], d_out[b, :, rows]  # (H, n, D)
                allowed = mask[b % mask.shape[0], 0, rows][:, cols]  # (q_tile, n)
                scores = q32[b, :, rows] @ kb.transpose(-1, -2) * ctx.scale  # (H, q_tile, n)
                probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
                d_scores = probs * (do @ vb.transpose(-1, -2) - delta[b, :, rows]) * ctx.scale
                d_q[b, :, rows] = d_scores @ kb
                d_k[b].index_add_(1, cols, d_scores.transpose(-1, -2) @ q32[b, :, rows])
                d_v[b].index_add_(1, cols, probs.transpose(-1, -2) @ do)

        def per_kv_head(grad):  # (B, H, K, D) -> (B, Hkv, K, D): sum over the query heads of a group
            return grad.view(bsz, heads // groups, groups, *grad.shape[2:]).sum(2)

        return d_q.to(q.dtype), per_kv_head(d_k).to(k.dtype), per_kv_head(d_v).to(v.dtype), None, None, None


def _dense_block_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device):
    """A `BlockMask` from a dense boolean mask (or none): general, but every tile is evaluated."""
    from torch.nn.attention.flex_attention import create_block_mask

    if mask is None:
        return create_block_mask(lambda b, h, qi, ki: qi >= 0, None, None, q_len, kv_len, device=device,
                                 _compile=False)
    batch = mask.shape[0] if mask.shape[0] > 1 else None
    return create_block_mask(dense_mask_mod(mask), batch, None, q_len, kv_len, device=device, _compile=False)


def flex_attention_forward(q, k, v, mask, scale):
    """q: (B, H, Q, D), k/v: (B, Hkv, K, D); `mask` an `AttentionLayout` (block-sparse), a dense
    boolean (B|1, 1, Q, K) tensor or None. Returns (B, H, Q, D)."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if isinstance(mask, AttentionLayout):
        if (mask.q_len, mask.kv_len) != (q_len, kv_len):
            raise ValueError(f"AttentionLayout is for {mask.q_len} queries x {mask.kv_len} keys, "
                             f"got {q_len} x {kv_len} (does the KV cache hold q_start positions?)")
        block_mask = mask.block_mask(q.device)
    else:
        block_mask = _dense_block_mask(mask, q_len, kv_len, q.device)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if isinstance(mask, AttentionLayout):
            mask = mask.dense(q.device)
        elif mask is None:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=q.device)
        return _FlexWithTiledBackward.apply(q, k, v, block_mask, mask, scale)
    return FLEX(q, k, v, block_mask, scale)


def attend(q, k, v, mask, scale, backend: str):
    """Non-causal GQA attention through `backend`; `mask` as `flex_attention_forward` takes it."""
    if backend == "flex":
        return flex_attention_forward(q, k, v, mask, scale)
    if isinstance(mask, AttentionLayout):
        mask = mask.dense(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backend = config.attn_backend
        qkv_dim = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_dim, bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.query_layernorm = self.key_layernorm = None

    def forward(self, x, cos, sin, mask, cache: BlockKVCache | None = None, commit_len: int | None = 0):
        bsz, seq, _ = x.shape
        qkv = self.query_key_value(x).view(bsz, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.read_and_update(self.layer_idx, k, v, commit_len)
        out = attend(q, k, v, mask, self.head_dim**-0.5, self.backend)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.dense(out)
