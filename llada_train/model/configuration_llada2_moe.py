"""LLaDA2-MoE configuration: the released `config.json` keys, defaults = LLaDA2.0-mini.

Every key the released config.json carries is written, including those this model has no use for
(dropouts, sliding window, norm_head): the upstream modeling code defaults its dropouts to 0.1 and
`use_bias` to True, so an export that left them out would train differently there."""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers class attribute)

    def __init__(
        self,
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        hidden_act="silu",
        num_experts=256,
        num_experts_per_tok=8,
        num_shared_experts=1,
        first_k_dense_replace=1,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        norm_topk_prob=True,
        moe_router_enable_expert_bias=True,
        router_dtype="fp32",
        rope_theta=600000.0,
        partial_rotary_factor=0.5,
        rotary_dim=None,
        rms_norm_eps=1e-6,
        use_qk_norm=True,
        use_bias=False,
        use_qkv_bias=False,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        initializer_range=0.006,
        pad_token_id=156892,
        eos_token_id=156892,
        mask_token_id=156895,
        attn_backend="sdpa",
        embedding_dropout=0.0,
        attention_dropout=0.0,
        output_dropout=0.0,
        norm_head=False,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=None,
        output_router_logits=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.norm_topk_prob = norm_topk_prob
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.router_dtype = router_dtype
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = rotary_dim or int(self.head_dim * partial_rotary_factor)
        self.rms_norm_eps = rms_norm_eps
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.use_qkv_bias = use_qkv_bias
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.attn_backend = attn_backend
        # released keys this model does not act on (no dropout, full attention, plain lm_head)
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.norm_head = norm_head
        self.use_cache = use_cache
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = num_hidden_layers if max_window_layers is None else max_window_layers
        self.output_router_logits = output_router_logits
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_shapes()

    def _validate_shapes(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        experts_per_group = self.num_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups "
                f"(topk_group {self.topk_group} x {experts_per_group})"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and <= head_dim ({self.head_dim})")
        if self.attn_backend not in ("sdpa", "flex"):
            raise ValueError(f"attn_backend must be 'sdpa' or 'flex', got {self.attn_backend!r}")
