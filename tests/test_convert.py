"""`llada-train convert`: AR checkpoints -> LLaDA2-MoE, exact under a causal mask, trainable after."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import llada_train.model  # noqa: F401  (registers llada2_moe with the Auto classes)
from llada_train.convert import convert_checkpoint, main
from llada_train.decoding import load_decode_defaults
from llada_train.model import LLaDA2MoeModelLM

N_TOKENS = 300  # tokenizer size of the tiny sources


def save_tokenizer(path, n_tokens=N_TOKENS, extra_special=()):
    """A WordLevel tokenizer: <s> </s> <unk>, words w3..., then `extra_special` as added tokens."""
    specials = ["<s>", "</s>", "<unk>"]
    vocab = {
        t: i for i, t in enumerate(specials + [f"w{i}" for i in range(3, n_tokens - len(extra_special))])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    assert len(tok) == n_tokens
    tok.save_pretrained(path)


SMALL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}
SOURCES = {
    # Llama with attention biases (q, k, v and o): the vocabulary is full, the mask needs a new row.
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(vocab_size=N_TOKENS, attention_bias=True, rope_theta=5000.0, **SMALL),
    ),
    # Qwen2: q/k/v biases, tied embeddings, padded vocabulary (the mask takes a spare row).
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=N_TOKENS + 20, tie_word_embeddings=True, **SMALL)),
    # Qwen3: QK-norm and a head_dim that is not hidden_size / heads.
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(vocab_size=N_TOKENS, head_dim=24, **SMALL)),
}


def make_source(tmp_path, family):
    cls, config = SOURCES[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norms away from 1 and nonzero biases, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / family
    model.save_pretrained(src)
    save_tokenizer(src)
    return model, src


def causal(length):
    return torch.ones(length, length).tril().bool()[None, None]


@pytest.mark.parametrize("family", list(SOURCES))
def test_converted_model_reproduces_source_logits(tmp_path, family):
    source, src = make_source(tmp_path, family)
    dst = convert_checkpoint(str(src), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert isinstance(model, LLaDA2MoeModelLM)

    ids = torch.randint(0, N_TOKENS, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = source(ids).logits  # (B, L, V_src): logit i predicts token i + 1
        got = model(ids, attention_mask=causal(ids.shape[1])).logits
    torch.testing.assert_close(got[..., :N_TOKENS], want[..., :N_TOKENS], atol=2e-5, rtol=1e-4)
    # Bidirectional attention really changes the function (the mask above is doing the work).
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[..., :N_TOKENS], want[..., :N_TOKENS], atol=1e-3)

    # The source tokenizer as transformers loads it (its Qwen classes add <|endoftext|>): the mask comes next.
    n_tok = len(AutoTokenizer.from_pretrained(src))
    tok = AutoTokenizer.from_pretrained(dst)
    cfg = model.config
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == cfg.mask_token_id == n_tok
    assert cfg.eos_token_id == tok.eos_token_id == 1 and cfg.pad_token_id == tok.pad_token_id
    assert cfg.first_k_dense_replace == cfg.num_hidden_layers == 2
    assert cfg.use_qk_norm == (family == "qwen3")
    assert cfg.use_qkv_bias == (family != "qwen3") and cfg.use_bias == (family == "llama")
    assert cfg.vocab_size == max(source.config.vocab_size, n_tok + 1)  # qwen2's padded vocab: no new row
    emb = model.get_input_embeddings().weight
    src_emb = source.get_input_embeddings().weight
    torch.testing.assert_close(emb[n_tok], src_emb[:n_tok].mean(0))
    if family == "qwen2":
        assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # still tied
    else:
        torch.testing.assert_close(model.lm_head.weight[n_tok], source.lm_head.weight[:n_tok].mean(0))
    info = json.loads((dst / "conversion.json").read_text())
    assert info["suggested_mask_embed_noise_std"] == pytest.approx(src_emb[:n_tok].std().item(), rel=1e-4)
    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["mask_token_id"] == n_tok and gen["eos_token_id"] == 1
    decode = load_decode_defaults(dst)  # what the threshold decoder reads back
    assert (
        decode["threshold"] == 0.95 and decode["editing_threshold"] is None and decode["block_length"] == 32
    )


def test_converted_model_trains_masked_diffusion(tmp_path):
    """A few AdamW steps of plain masked CE (bidirectional) on a fixed batch: loss finite, falling."""
    _, src = make_source(tmp_path, "qwen3")
    dst = convert_checkpoint(str(src), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(dst).train()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(3, N_TOKENS, (4, 16), generator=gen)
    masked = torch.rand(x0.shape, generator=gen) < 0.5
    xt = torch.where(masked, model.config.mask_token_id, x0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        logits = model(xt).logits
        loss = F.cross_entropy(logits[masked], x0[masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_cli_casts_to_bfloat16_shards_and_refuses_a_non_empty_target(tmp_path, capsys, monkeypatch):
    source, src = make_source(tmp_path, "llama")
    monkeypatch.setattr("llada_train.convert._MAX_SHARD_BYTES", 40_000)  # force several shards + index
    out = tmp_path / "bf16"
    assert main(["--from", str(src), "--to", str(out), "--dtype", "bfloat16"]) == 0
    assert "mask token '<|mask|>' = id 300" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is not iterable)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.model.word_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.model.norm.weight, source.model.norm.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(str(src), str(out))


def test_unsupported_sources_are_refused(tmp_path):
    _, src = make_source(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(
        ValueError,
        match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, BailingMoeV2ForCausalLM",
    ):
        convert_checkpoint(str(gpt2), str(tmp_path / "o1"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights \['pytorch_model.bin'\].*safetensors"):
        convert_checkpoint(str(pickled), str(tmp_path / "o2"))

    llama31 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,  # as in Llama 3.1's config.json
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    config.pop("rope_parameters", None)
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5, "rope_scaling": llama31}))
    with pytest.raises(ValueError, match="RoPE scaling type 'llama3'"):
        convert_checkpoint(str(src), str(tmp_path / "o3"))
    assert not (tmp_path / "o3").exists()


def test_source_mistakes_are_user_errors(tmp_path):
    """What is wrong with the source checkpoint is the user's to fix (`llada-train convert` prints one
    `error:` line naming the file): an unreadable config.json, or shapes the LLaDA2 config rejects."""
    from llada_train.errors import UserError

    _, src = make_source(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON"):
        convert_checkpoint(str(src), str(tmp_path / "o1"))
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(UserError, match=r"config\.json: num_attention_heads \(4\) must be a multiple of "
                                        r"num_key_value_heads \(3\)"):
        convert_checkpoint(str(src), str(tmp_path / "o2"))
    with pytest.raises(UserError, match="--dtype 'int3'"):
        convert_checkpoint(str(src), str(tmp_path / "o3"), dtype="int3")


# ---- Ling / BailingMoeV2: synthetic checkpoint in the released names, checked against a naive forward

BAILING = {
    "vocab_size": N_TOKENS,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "rope_scaling": None,
}


def bailing_state_dict(c, gen):
    """Random tensors under the BailingMoeV2 names, including one MTP layer (index == num layers)."""

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    h, d, q, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    sd = {
        "model.word_embeddings.weight": rnd(c["vocab_size"], h, scale=1.0),
        "model.norm.weight": 1 + rnd(h),
        "lm_head.weight": rnd(c["vocab_size"], h),
    }
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": 1 + rnd(h),
                p + "post_attention_layernorm.weight": 1 + rnd(h),
                p + "attention.query_key_value.weight": rnd((q + 2 * kv) * d, h),
                p + "attention.dense.weight": rnd(h, q * d),
                p + "attention.query_layernorm.weight": 1 + rnd(d),
                p + "attention.key_layernorm.weight": 1 + rnd(d),
            }
        )
        mlps = (
            ["mlp."]
            if i < c["first_k_dense_replace"]
            else ([f"mlp.experts.{e}." for e in range(c["num_experts"])] + ["mlp.shared_experts."])
        )
        for m in mlps:
            inner = c["intermediate_size"] if m == "mlp." else c["moe_intermediate_size"]
            sd.update(
                {
                    p + m + "gate_proj.weight": rnd(inner, h),
                    p + m + "up_proj.weight": rnd(inner, h),
                    p + m + "down_proj.weight": rnd(h, inner),
                }
            )
        if i >= c["first_k_dense_replace"]:
            sd[p + "mlp.gate.weight"] = rnd(c["num_experts"], h, scale=1.0)
            sd[p + "mlp.gate.expert_bias"] = rnd(c["num_experts"], scale=0.5)
        if i >= c["num_hidden_layers"]:  # MTP-only tensors
            sd.update(
                {
                    p + "enorm.weight": rnd(h),
                    p + "hnorm.weight": rnd(h),
                    p + "eh_proj.weight": rnd(h, 2 * h),
                    p + "final_layernorm.weight": rnd(h),
                }
            )
    return sd


def rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def bailing_reference_logits(sd, c, ids):
    """BailingMoeV2's causal forward written out from its definition, float64, one token at a time
    through the router (sigmoid scores + bias for selection, best top-2 groups, renormalised weights)."""
    sd = {k: v.double() for k, v in sd.items()}
    d, nq, nkv, eps = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], 1e-6
    r = int(d * c["partial_rotary_factor"])
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(ids.shape[1], dtype=torch.float64)[:, None] * inv_freq  # (L, r/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # (B, heads, L, d): rotate-half on the first r dims
        a, rest = x[..., :r], x[..., r:]
        a1, a2 = a[..., : r // 2], a[..., r // 2 :]
        return torch.cat([a * cos + torch.cat([-a2, a1], -1) * sin, rest], -1)

    def swiglu(x, p):
        return (
            F.silu(x @ sd[p + "gate_proj.weight"].T)
            * (x @ sd[p + "up_proj.weight"].T)
            @ sd[p + "down_proj.weight"].T
        )

    x = sd["model.word_embeddings.weight"][ids]  # (B, L, H)
    bsz, length = ids.shape
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = (
            (a @ sd[p + "attention.query_key_value.weight"].T)
            .view(bsz, length, nq + 2 * nkv, d)
            .transpose(1, 2)
        )
        q, k, v = qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :]
        q = rope(rms(q, sd[p + "attention.query_layernorm.weight"], eps))
        k = rope(rms(k, sd[p + "attention.key_layernorm.weight"], eps))
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, length, nq * d)
        x = x + att @ sd[p + "attention.dense.weight"].T
        a = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        if i < c["first_k_dense_replace"]:
            x = x + swiglu(a, p + "mlp.")
            continue
        out = swiglu(a, p + "mlp.shared_experts.")
        per_group = c["num_experts"] // c["n_group"]
        for b in range(bsz):
            for t in range(length):
                s = torch.sigmoid(sd[p + "mlp.gate.weight"] @ a[b, t])
                biased = s + sd[p + "mlp.gate.expert_bias"]
                groups = sorted(
                    range(c["n_group"]),
                    key=lambda g: -biased[g * per_group : (g + 1) * per_group].topk(2).values.sum().item(),
                )[: c["topk_group"]]
                allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
                chosen = sorted(allowed, key=lambda e: -biased[e].item())[: c["num_experts_per_tok"]]
                w = s[chosen] / s[chosen].sum() * c["routed_scaling_factor"]
                for we, e in zip(w, chosen, strict=True):
                    out[b, t] += we * swiglu(a[b, t], f"{p}mlp.experts.{e}.")
        x = x + out
    return rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def test_bailing_moe_v2_maps_released_names_and_matches_reference(tmp_path):
    src = tmp_path / "ling"
    src.mkdir()
    gen = torch.Generator().manual_seed(3)
    sd = bailing_state_dict(BAILING, gen)
    # Two shards with an index, as the released checkpoints come.
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(src / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(
        json.dumps({**BAILING, "architectures": ["BailingMoeV2ForCausalLM"], "model_type": "bailing_moe_v2"})
    )
    save_tokenizer(src, extra_special=["<|mask|>"])  # the Ling vocabulary already has the mask token

    dst = convert_checkpoint(str(src), str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(dst)
    cfg = model.config
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.rotary_dim, cfg.first_k_dense_replace) == (
        N_TOKENS,
        N_TOKENS - 1,
        4,
        1,
    )
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        written = set(f.keys())
        for key in written - {"model.word_embeddings.weight", "lm_head.weight"}:
            torch.testing.assert_close(
                f.get_tensor(key), sd[key], rtol=0, atol=0
            )  # names kept, values untouched
    assert written == {k for k in sd if not k.startswith("model.layers.3.")}  # MTP layer dropped

    ids = torch.randint(0, N_TOKENS - 1, (2, 7), generator=gen)
    with torch.no_grad():
        got = model(ids, attention_mask=causal(ids.shape[1])).logits.double()
    want = bailing_reference_logits(sd, BAILING, ids)
    torch.testing.assert_close(got[..., : N_TOKENS - 1], want[..., : N_TOKENS - 1], atol=1e-4, rtol=1e-4)
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[N_TOKENS - 1], sd["model.word_embeddings.weight"][: N_TOKENS - 1].mean(0))


def test_converted_model_runs_the_convert_cpt_recipe(tmp_path):
    """configs/convert_cpt.yaml through the CLI on a converted Qwen3: warm-up blocks 1 -> 4 -> whole
    sequence, mask-embedding noise from conversion.json; the run trains and exports."""
    import random

    from llada_train.cli import main as cli_main

    _, src = make_source(tmp_path, "qwen3")
    dst = convert_checkpoint(str(src), str(tmp_path / "out"))
    noise = json.loads((tmp_path / "out" / "conversion.json").read_text())["suggested_mask_embed_noise_std"]
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{rng.randrange(3, 60)}" for _ in range(40)) for _ in range(60)))
    run = tmp_path / "run"
    code = cli_main(["cpt", "--config", "configs/convert_cpt.yaml", f"model.init_from={dst}",
                     f"diffusion.mask_embed_noise_std={noise}", f"data.paths=[{corpus}]", f"run.out_dir={run}",
                     "data.seq_len=32", "diffusion.block_schedule=[[2,1],[4,4],[6,0]]",
                     "diffusion.mask_embed_noise_steps=4", "engine.zero_stage=0", "train.steps=6",
                     "train.batch_size=4", "train.log_every=1", "train.save_every=100", "train.eval_every=100",
                     "optim.lr=1e-3", "optim.warmup_steps=1"])
    assert code == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 6 and all(math.isfinite(r["loss"]) for r in train)
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.mask_token_id == json.loads(
        (tmp_path / "out" / "config.json").read_text())["mask_token_id"]


# ---- GGUF sources: what is refused before anything heavy is loaded (the real conversion: test_smollm2.py)


def _gguf(path, arch, **strings):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_mistakes_are_user_errors(tmp_path, monkeypatch, capsys):
    from llada_train.convert import convert_gguf
    from llada_train.errors import UserError

    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"missing\.gguf: no such file"):
        convert_gguf(tmp_path / "missing.gguf", out)
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(UserError, match=r"weights.gguf: not a GGUF file \(it does not start with the bytes 'GGUF'\)"):
        convert_gguf(tmp_path / "weights.gguf", out)
    with pytest.raises(UserError, match=r"GGUF architecture 'gpt2' is not known to `llada-train convert`; "
                                        "known: llama, qwen2, qwen3"):
        convert_gguf(_gguf(tmp_path / "gpt2.gguf", "gpt2"), out)
    with pytest.raises(UserError, match=r"RoPE scaling \(yarn\)"):
        convert_gguf(_gguf(tmp_path / "yarn.gguf", "llama", **{"llama.rope.scaling.type": "yarn"}), out)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes((tmp_path / "gpt2.gguf").read_bytes()[:24])
    with pytest.raises(UserError, match=r"cut\.gguf: the GGUF file cannot be read"):
        convert_gguf(truncated, out)
    llama = _gguf(tmp_path / "llama.gguf", "llama")
    (out / "x").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--to .*out: exists and is not empty"):  # checked before loading
        convert_gguf(llama, out)
    with pytest.raises(UserError, match=r"--source-out .*out: exists and is not empty"):
        convert_gguf(llama, tmp_path / "new", source_out=out)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(UserError, match="needs the `gguf` package: pip install gguf"):
        convert_gguf(llama, tmp_path / "new")
    with pytest.raises(UserError, match=r"none\.gguf: no such file"):  # a .gguf path is a file, not a directory
        main(["--from", str(tmp_path / "none.gguf"), "--to", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--source-out is for a GGUF --from"):
        main(["--from", str(tmp_path), "--to", str(tmp_path / "o"), "--source-out", str(tmp_path / "s")])
