"""Non-causal GQA attention with per-head QK RMSNorm and partial RoPE; `sdpa` and `flex` backends."""

import torch
import torch.nn.functional as F
from torch import nn


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

    def crop(self, length: int):
        """Drop cached positions past `length` (used by MBE to reopen recent blocks)."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][..., :length, :]
            self.values[layer] = self.values[layer][..., :length, :]

    def select_rows(self, rows: torch.Tensor):
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]


def _flex_attention(q, k, v, mask, scale):
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    from .masks import dense_mask_mod

    if not isinstance(mask, BlockMask):
        b = mask.shape[0] if mask is not None else 1
        mod = dense_mask_mod(mask) if mask is not None else (lambda b, h, qi, ki: qi >= 0)
        mask = create_block_mask(mod, b, None, q.shape[-2], k.shape[-2], device=q.device, _compile=False)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backend = config.attn_backend
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.use_qkv_bias
        )
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
        scale = self.head_dim**-0.5
        if self.backend == "flex":
            out = _flex_attention(q, k, v, mask, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.dense(out)
