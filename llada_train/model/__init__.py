"""LLaDA2-MoE model, registered with transformers' Auto classes (no trust_remote_code needed)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import BlockKVCache
from .configuration_llada2_moe import LLaDA2MoeConfig
from .masks import block_causal_mask, block_diffusion_mask, block_diffusion_mask_mod
from .modeling_llada2_moe import LLaDA2MoeModel, LLaDA2MoeModelLM
from .moe import update_expert_bias

AutoConfig.register("llada2_moe", LLaDA2MoeConfig, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)

__all__ = [
    "BlockKVCache",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "block_causal_mask",
    "block_diffusion_mask",
    "block_diffusion_mask_mod",
    "update_expert_bias",
]
