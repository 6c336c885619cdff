"""LLaDA2-MoE: one-pass property, MoE vs a naive reference, router, HF layout and round trip."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from llada_train.model import (
    BlockKVCache,
    LLaDA2MoeConfig,
    LLaDA2MoeModelLM,
    block_causal_mask,
    block_diffusion_mask,
    update_expert_bias,
)
from llada_train.model.moe import LLaDA2MoeSparseMoeBlock, group_limited_topk
from tests.conftest import CONFIGS, tiny_config


@pytest.mark.parametrize("block,seq_len", [(4, 16), (8, 24), (2, 6)])
def test_one_pass_noisy_logits_equal_separate_forward(tiny_model, block, seq_len):
    """Noisy-half logits of block k from [x_t ; x_0] == a forward over [x_0 blocks < k ; x_t block k]."""
    torch.manual_seed(block + seq_len)
    x0 = torch.randint(2, 4096, (2, seq_len))
    xt = torch.where(torch.rand(2, seq_len) < 0.5, torch.ones_like(x0), x0)  # id 1 = mask
    pos = torch.arange(seq_len).repeat(2)[None].expand(2, -1)
    with torch.no_grad():
        both = tiny_model(torch.cat([xt, x0], 1), attention_mask=block_diffusion_mask(seq_len, block),
                          position_ids=pos).logits[:, :seq_len]
        for k in range(seq_len // block):
            lo, hi = k * block, (k + 1) * block
            seq = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
            alone = tiny_model(seq, attention_mask=block_causal_mask(hi, block)).logits[:, lo:hi]
            torch.testing.assert_close(both[:, lo:hi], alone, atol=2e-5, rtol=1e-4)


def naive_moe(block: LLaDA2MoeSparseMoeBlock, x: torch.Tensor, cfg) -> torch.Tensor:
    """Every token through its chosen experts one by one, routing re-derived from the definition."""
    gate_w = block.gate.weight
    bias = block.gate.expert_bias
    experts = block.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        scores = torch.sigmoid(x[t] @ gate_w.t())
        chosen = brute_force_topk((scores + bias).tolist(), cfg)
        weights = scores[chosen]
        weights = weights / weights.sum() * cfg.routed_scaling_factor
        for w, e in zip(weights, chosen, strict=True):
            h = F.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            out[t] += w * (experts.down_proj[e] @ h)
        out[t] += block.shared_experts(x[t:t + 1])[0]
    return out


def brute_force_topk(biased, cfg):
    """Search every choice of `topk_group` groups; take the best by the group rule, then top-k."""
    per_group = cfg.num_experts // cfg.n_group
    groups = [biased[g * per_group:(g + 1) * per_group] for g in range(cfg.n_group)]
    group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    best = max(itertools.combinations(range(cfg.n_group), cfg.topk_group),
               key=lambda combo: sum(group_score[g] for g in combo))
    allowed = [g * per_group + i for g in best for i in range(per_group)]
    return sorted(allowed, key=lambda e: -biased[e])[:cfg.num_experts_per_tok]


@pytest.mark.parametrize("seed", range(3))
def test_moe_grouped_dispatch_matches_naive_reference_float64(seed):
    torch.manual_seed(seed)
    cfg = tiny_config(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    block = LLaDA2MoeSparseMoeBlock(cfg).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.gate.expert_bias.normal_(std=0.2)
    x = torch.randn(40, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(block(x), naive_moe(block, x, cfg), atol=1e-10, rtol=1e-10)


def test_group_limited_topk_matches_brute_force():
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=24, n_group=6, topk_group=3, num_experts_per_tok=4)
    scores = torch.rand(200, 24, dtype=torch.float64)
    idx = group_limited_topk(scores, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
    for t in range(scores.shape[0]):
        assert sorted(idx[t].tolist()) == sorted(brute_force_topk(scores[t].tolist(), cfg))


def test_grouped_linear_gradients_match_loop():
    from llada_train.model.moe import _loop_grouped_linear, grouped_linear

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 12, 16, requires_grad=True)
    y = grouped_linear(x, w, counts)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_ref = _loop_grouped_linear(x, w, counts)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_expert_bias_update_follows_load():
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config()).train()
    model(torch.randint(2, 4096, (4, 32)))
    block = model.model.layers[1].mlp
    load = block.expert_load.clone()
    assert load.sum() == 4 * 32 * model.config.num_experts_per_tok
    update_expert_bias(model, rate=0.01)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(block.gate.expert_bias, expected)
    assert block.expert_load.sum() == 0


# The keys of the released LLaDA2.x config.json that a consumer reads (docs/design.md §2 plus those the
# upstream configuration class takes), and the ones whose upstream defaults differ from this model.
RELEASED_CONFIG_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "num_experts", "num_experts_per_tok",
    "num_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor",
    "score_function", "norm_topk_prob", "moe_router_enable_expert_bias", "router_dtype", "rope_theta",
    "partial_rotary_factor", "rotary_dim", "rms_norm_eps", "use_qk_norm", "use_bias", "use_qkv_bias",
    "tie_word_embeddings", "max_position_embeddings", "initializer_range", "pad_token_id", "eos_token_id",
    "embedding_dropout", "attention_dropout", "output_dropout", "norm_head", "use_cache", "use_sliding_window",
    "sliding_window", "max_window_layers", "output_router_logits", "model_type", "architectures",
}
UPSTREAM_DEFAULTS = ("embedding_dropout", "attention_dropout", "output_dropout", "use_bias", "use_qkv_bias",
                     "num_key_value_heads", "norm_head", "tie_word_embeddings", "use_sliding_window")


def test_save_load_round_trip_is_bit_exact_with_released_names(tmp_path, tiny_model):
    tiny_model.model.layers[1].mlp.gate.expert_bias.normal_()
    tiny_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    cfg = tiny_model.config
    expected = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        expected |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                     f"{p}.attention.query_key_value.weight", f"{p}.attention.dense.weight",
                     f"{p}.attention.query_layernorm.weight", f"{p}.attention.key_layernorm.weight"}
        projs = ("gate_proj", "up_proj", "down_proj")
        if i < cfg.first_k_dense_replace:
            expected |= {f"{p}.mlp.{n}.weight" for n in projs}
        else:
            expected |= {f"{p}.mlp.gate.weight", f"{p}.mlp.gate.expert_bias"}
            expected |= {f"{p}.mlp.experts.{e}.{n}.weight" for e in range(cfg.num_experts) for n in projs}
            expected |= {f"{p}.mlp.shared_experts.{n}.weight" for n in projs}
    assert keys == expected
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llada2_moe"
    assert written.keys() >= RELEASED_CONFIG_KEYS, sorted(RELEASED_CONFIG_KEYS - written.keys())
    # the upstream modeling code's defaults differ here: 0.1 dropouts, use_bias True, no KV heads
    assert {k: written[k] for k in UPSTREAM_DEFAULTS} == {
        "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0, "use_bias": False,
        "use_qkv_bias": False, "num_key_value_heads": cfg.num_key_value_heads, "norm_head": False,
        "tie_word_embeddings": False, "use_sliding_window": False}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LLaDA2MoeModelLM
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDA2MoeConfig)
    ref, new = tiny_model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    for k in ref:
        assert torch.equal(ref[k], new[k]), k
    x = torch.randint(2, 4096, (1, 16))
    with torch.no_grad():
        assert torch.equal(tiny_model(x).logits, loaded(x).logits)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        LLaDA2MoeModelLM.from_pretrained(tmp_path)


def test_released_presets_on_meta_have_released_parameter_counts():
    for name, low, high in [("llada2_mini", 16.0e9, 16.5e9), ("llada2_flash", 100e9, 104e9)]:
        cfg = LLaDA2MoeConfig(**yaml.safe_load((CONFIGS / f"model/{name}.yaml").read_text()))
        with torch.device("meta"):
            model = LLaDA2MoeModelLM(cfg)
        total = sum(p.numel() for p in model.parameters())
        assert low < total < high, (name, total)


def test_kv_cache_prefix_matches_full_forward(tiny_model):
    """Committing blocks to the cache one by one gives the same logits as one block-causal pass."""
    torch.manual_seed(1)
    block, n_blocks = 4, 4
    x = torch.randint(2, 4096, (2, block * n_blocks))
    with torch.no_grad():
        full = tiny_model(x, attention_mask=block_causal_mask(x.shape[1], block)).logits
        cache = BlockKVCache()
        for k in range(n_blocks):
            lo, hi = k * block, (k + 1) * block
            mask = block_causal_mask(hi, block, q_start=lo)
            step = tiny_model(x[:, lo:hi], attention_mask=mask, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(step, full[:, lo:hi], atol=2e-5, rtol=1e-4)
        assert cache.get_seq_length() == x.shape[1]
        kept = tiny_model(x, attention_mask=block_causal_mask(x.shape[1], block), logits_to_keep=block + 1).logits
        # logits of the last positions only: a smaller matmul, so BLAS may round differently
        torch.testing.assert_close(kept, full[:, -(block + 1):], atol=2e-5, rtol=1e-4)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="n_group"):
        tiny_config(num_experts=10, n_group=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
