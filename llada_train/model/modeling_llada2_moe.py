"""LLaDA2-MoE: a block-diffusion MoE transformer, state-dict compatible with the released checkpoints.

Logits are not shifted: the logit at position i predicts token i (masked diffusion, not AR), unless
`config.shift_logits` (this project's option for models converted from an AR model, as Dream-7B does): then
position i's logits come from the hidden state before it, so the AR head keeps its meaning.
Routed experts live fused in memory ([E, out, in] per projection, for grouped GEMMs) and are
written/read in the released per-expert layout by `save_pretrained` / `from_pretrained`.
"""

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import UserError
from .attention import BlockKVCache, LLaDA2MoeAttention, RMSNorm, RotaryEmbedding
from .configuration_llada2_moe import LLaDA2MoeConfig
from .linear_ce import LMHead
from .masks import AttentionLayout
from .moe import LLaDA2MoeExperts, LLaDA2MoeMLP, LLaDA2MoeSparseMoeBlock, update_expert_bias

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_FUSED_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# transformers 5 renamed the output field `past_key_values` to `cache` (the old name warns)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class LLaDA2MoeOutput(CausalLMOutputWithPast):
    """Logits, or with `targets` the per-position results of the chunked linear cross-entropy."""

    token_ce: torch.Tensor | None = None  # (N,) -log p(target), float32
    token_entropy: torch.Tensor | None = None  # (N,) entropy of p (with `with_entropy`)
    token_pred: torch.Tensor | None = None  # (N,) argmax, no gradient


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = LLaDA2MoeMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = LLaDA2MoeSparseMoeBlock(config)

    def forward(self, x, cos, sin, mask, cache=None, commit_len=None):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, cache, commit_len)
        return x + self.mlp(self.post_attention_layernorm(x))


def _as_bool_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """2D padding mask (B, K) or 4D (B|1, 1, Q, K) bool/additive mask -> 4D bool, True = attend."""
    if attention_mask.dim() == 2:
        valid = attention_mask.bool()  # (B, K)
        mask = valid[:, None, None, :].expand(-1, 1, q_len, -1)
        # Padding queries (the last q_len keys) attend to themselves so softmax stays finite.
        q_valid = valid[:, -q_len:]
        eye = torch.eye(q_len, valid.shape[1], dtype=torch.bool, device=valid.device).roll(
            valid.shape[1] - q_len, dims=1
        )
        return mask | (~q_valid[:, None, :, None] & eye)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 2D (B, L) or 4D (B, 1, Q, K); got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]  # noqa: RUF012 (transformers class attribute)
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, LLaDA2MoeExperts):
            for name in EXPERT_PROJS:
                getattr(module, name).normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LLaDA2MoeSparseMoeBlock):
            module.gate.weight.normal_(0.0, std)
            module.gate.expert_bias.zero_()
            module.expert_load.zero_()
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(RotaryEmbedding(module.inv_freq.numel() * 2, self.config.rope_theta).inv_freq)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=False, commit_len=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, H)
        bsz, seq = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=x.device)[None].expand(bsz, -1)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask = attention_mask
        if mask is not None and isinstance(mask, torch.Tensor):
            mask = _as_bool_mask(mask, seq)
        commit = commit_len if use_cache else 0
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, past_key_values, commit, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, past_key_values, commit)
        return self.norm(x)


def previous_hidden(hidden: torch.Tensor, layout, cache: BlockKVCache | None, commit_len: int | None) -> torch.Tensor:
    """`shift_logits`: (B, S, H) -> the hidden state each position's logits are read from, the one before it.

    In the `[x_t ; x_0]` training layout a block's first noisy position reads the clean copy of the token
    before it (which sees exactly the clean prefix, as in decoding). The first new position of a cached
    forward reads the cache's last committed hidden state; with none it reads itself (it predicts the
    sequence's first token, which nothing supervises). A forward that commits stores its last committed
    position's hidden state in the cache for the next forward."""
    seq = hidden.shape[1]
    first = hidden[:, :1] if cache is None or cache.last_hidden is None else cache.last_hidden[:, None]
    if cache is not None and commit_len != 0:
        cache.last_hidden = hidden[:, (seq if commit_len is None else commit_len) - 1]  # (B, H)
    prev = torch.arange(seq, device=hidden.device)  # index into [first ; hidden]: position i - 1 + 1
    if isinstance(layout, AttentionLayout) and layout.kind == "diffusion":
        half, pos = layout.seq_len, torch.arange(layout.seq_len, device=hidden.device)
        block_start = (pos % layout.block_size == 0) & (pos > 0)
        prev[:half] = torch.where(block_start, half + pos, pos)  # x_t: same half, or the clean copy's i - 1
        prev[half] = 0  # the clean half's first position: no predecessor
    return torch.cat([first, hidden], 1)[:, prev]  # (B, S, H)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # noqa: RUF012 (transformers class attribute)

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def register_step_hooks(self, engine, cfg) -> None:
        """Aux-loss-free MoE balancing as the model's own hook: after each applied trainer step, every
        expert bias moves towards the mean load at rate `moe.bias_update_rate` (docs/design.md §2)."""
        engine.register_step_hook(partial(update_expert_bias, self, cfg.moe.bias_update_rate))

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=False, commit_len=None, return_dict=True,
                logits_to_keep=0, output_positions=None, targets=None, with_entropy=False, **kwargs):
        """`past_key_values`: a `BlockKVCache`; with `use_cache=True` the first `commit_len` new
        positions (all when None) are appended to it. Labels are unshifted; -100 is ignored.
        `logits_to_keep=n` computes logits for the last n positions only (0 = all).
        `output_positions` (B, S) bool: only those positions go through the lm_head (logits (N, V),
        row-major order). With `targets` (N,) no logits are made: the output carries `token_ce`,
        `token_pred` (and `token_entropy` with `with_entropy`) from the chunked linear cross-entropy."""
        if use_cache and past_key_values is None:
            past_key_values = BlockKVCache()
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                            use_cache, commit_len)  # (B, S, H)
        if self.config.shift_logits:
            hidden = previous_hidden(hidden, attention_mask, past_key_values, commit_len if use_cache else 0)
        hidden = hidden[:, -logits_to_keep:] if output_positions is None else hidden[output_positions]
        if targets is not None:
            ce, entropy, pred = self.lm_head(hidden.flatten(0, -2), targets.flatten(), with_entropy)
            out = LLaDA2MoeOutput(token_ce=ce, token_entropy=entropy, token_pred=pred)
        else:
            logits = self.lm_head(hidden)  # (B, L or logits_to_keep, V), or (N, V) at output_positions
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
            out = LLaDA2MoeOutput(loss=loss, logits=logits)
        if use_cache:
            out[_CACHE_FIELD] = past_key_values
        return out if return_dict else out.to_tuple()

    # ---- released on-disk layout -------------------------------------------------------------

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        state = to_released_layout(state_dict if state_dict is not None else self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return super().save_pretrained(save_directory, state_dict=state, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None,
                        torch_dtype=None, **kwargs):
        """Load a directory in the released layout (safetensors only; pickles are refused)."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise UserError(
                f"{pretrained_model_name_or_path}: not a directory. Download the checkpoint first "
                "(e.g. `huggingface-cli download inclusionAI/LLaDA2.0-mini --local-dir DIR`) and pass DIR."
            )
        if config is None:
            config = cls.config_from_dir(path, **kwargs)
        with torch.device("meta"):
            model = cls(config)
        state = from_released_layout(load_safetensors_dir(path), config)
        if config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.word_embeddings.weight"])
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise UserError(
                f"{path}: checkpoint does not match LLaDA2MoeConfig: missing keys {sorted(missing)[:8]}, "
                f"unexpected keys {sorted(unexpected)[:8]}"
            )
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.word_embeddings.weight
        model._materialize_runtime_buffers()
        dtype = dtype or torch_dtype
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.eval()
        return model

    @staticmethod
    def config_from_dir(path, **overrides) -> LLaDA2MoeConfig:
        """A checkpoint directory's config.json with config `overrides` (other HF loading kwargs ignored)."""
        path = Path(path)
        try:
            config = LLaDA2MoeConfig.from_pretrained(path)
        except UserError as e:  # a shape check of LLaDA2MoeConfig
            raise UserError(f"{path / 'config.json'}: {e}") from e
        except OSError as e:  # no config.json, or not JSON (transformers reports both as OSError)
            raise UserError(f"{path}: cannot read the model's config.json ({e})") from e
        for key, value in overrides.items():
            if key in LLaDA2MoeConfig().to_dict():
                setattr(config, key, value)
        return config

    def _materialize_runtime_buffers(self):
        """Non-persistent buffers are not in checkpoints: rebuild them off the meta device."""
        rotary = self.model.rotary_emb
        rotary.inv_freq = RotaryEmbedding(self.config.rotary_dim, self.config.rope_theta).inv_freq
        for module in self.modules():
            if isinstance(module, LLaDA2MoeSparseMoeBlock):
                module.expert_load = torch.zeros(self.config.num_experts)


def to_released_layout(state: dict) -> dict:
    """Fused `...experts.gate_proj` (E, out, in) -> `...experts.{e}.gate_proj.weight` (out, in)."""
    out = {}
    for key, value in state.items():
        match = _FUSED_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, proj = match.groups()
        for e in range(value.shape[0]):
            out[f"{prefix}.{e}.{proj}.weight"] = value[e].contiguous()
    return out


def from_released_layout(state: dict, config: LLaDA2MoeConfig) -> dict:
    """Per-expert released keys -> fused (E, out, in) tensors; other keys pass through."""
    out, experts = {}, {}
    for key, value in state.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, e, proj = match.groups()
        experts.setdefault((prefix, proj), {})[int(e)] = value
    for (prefix, proj), by_index in experts.items():
        if sorted(by_index) != list(range(config.num_experts)):
            missing = sorted(set(range(config.num_experts)) - set(by_index))
            raise UserError(f"{prefix}.{proj}: experts {missing[:8]} missing from the checkpoint")
        out[f"{prefix}.{proj}"] = torch.stack([by_index[e] for e in range(config.num_experts)])
    return out


def load_safetensors_dir(path: Path) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" Found pickle files {pickles}: they can run arbitrary code when loaded and are refused; "
                "convert them to safetensors in a trusted environment first." if pickles else "")
        raise UserError(f"{path}: no *.safetensors weights found.{hint}")
    state = {}
    for name in files:
        state.update(load_file(os.fspath(path / name)))
    return state
