"""LLaDA2-MoE configuration: the released `config.json` keys, defaults = LLaDA2.0-mini.

Every key the released config.json carries is written, including those this model has no use for
(dropouts, sliding window, norm_head): the upstream modeling code defaults its dropouts to 0.1 and
`use_bias` to True, so an export that left them out would train differently there."""

from transformers import PretrainedConfig

from ..errors import UserError

# The released config.json keys and their LLaDA2.0-mini values (pad/eos/tie go to PretrainedConfig).
RELEASED_DEFAULTS = {
    "vocab_size": 157184, "hidden_size": 2048, "intermediate_size": 5120, "moe_intermediate_size": 512,
    "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
    "hidden_act": "silu", "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "score_function": "sigmoid", "norm_topk_prob": True, "moe_router_enable_expert_bias": True,
    "router_dtype": "fp32", "rope_theta": 600000.0, "partial_rotary_factor": 0.5, "rotary_dim": None,
    "rms_norm_eps": 1e-6, "use_qk_norm": True, "use_bias": False, "use_qkv_bias": False,
    "max_position_embeddings": 32768, "initializer_range": 0.006, "mask_token_id": 156895,
    # released keys this model does not act on (no dropout, full attention, plain lm_head)
    "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0, "norm_head": False,
    "use_cache": True, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": None,
    "output_router_logits": False,
}


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers class attribute)

    def __init__(self, pad_token_id=156892, eos_token_id=156892, tie_word_embeddings=False, attn_backend="sdpa",
                 shift_logits=False, **kwargs):
        for key, default in RELEASED_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rotary_dim = self.rotary_dim or int(self.head_dim * self.partial_rotary_factor)
        if self.max_window_layers is None:
            self.max_window_layers = self.num_hidden_layers
        self.attn_backend = attn_backend  # this project's key: sdpa | flex
        # this project's key: position i's logits predict token i from position i - 1's hidden state (AR-converted
        # models, as Dream-7B); False is the released LLaDA2 layout
        self.shift_logits = bool(shift_logits)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate_shapes()

    def _validate_shapes(self):
        """The values come from a model's config.json or a model preset and its overrides: a user error."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts % self.n_group:
            raise UserError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise UserError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        experts_per_group = self.num_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise UserError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups "
                f"(topk_group {self.topk_group} x {experts_per_group})"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise UserError(f"rotary_dim ({self.rotary_dim}) must be even and <= head_dim ({self.head_dim})")
        if self.attn_backend not in ("sdpa", "flex"):
            raise UserError(f"attn_backend must be 'sdpa' or 'flex', got {self.attn_backend!r}")
