"""`llada-train convert`: an autoregressive Hugging Face checkpoint -> an LLaDA2-MoE checkpoint.

LLaDA2.0 starts from an AR model and turns it into a block-diffusion model by continued training;
the architecture itself does not change. So conversion is a pure re-naming of weights (plus one new
embedding row for the mask token): with a causal attention mask the converted model computes the
source model's logits exactly. Only the objective changes in CPT (see docs/convert.md).

Sources: Llama, Qwen2, Qwen3 (dense; written as all-dense layers) and Ling / BailingMoeV2 (MoE,
already in the released LLaDA2 layout). Safetensors only: pickles can run code when loaded.
A GGUF file (llama.cpp's format) of a Llama / Qwen2 / Qwen3 model is read through transformers,
dequantized to float32, written as a Hugging Face folder and converted from there (`convert_gguf`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from .decoding import generation_config_dict
from .errors import UserError
from .model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from .model.modeling_llada2_moe import to_released_layout

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "BailingMoeV2ForCausalLM": "bailing_moe_v2",
}
_DENSE = ("llama", "qwen2", "qwen3")
# GGUF `general.architecture` -> the transformers class it loads as (transformers reads the file)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GGUF_MAGIC = b"GGUF"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_MAX_SHARD_BYTES = 4 << 30


class _SourceTensors:
    """Lazy reader over a (possibly sharded) safetensors directory; remembers what was consumed."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
            hint = (
                f" It holds pickle weights {pickles}: loading a pickle can execute arbitrary code, so "
                "they are refused. Re-save them as safetensors in a trusted environment (e.g. "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`)"
                " and convert that."
                if pickles
                else ""
            )
            raise UserError(f"{path}: no *.safetensors weights found.{hint}")
        self.path = path
        self._handles = {name: safe_open(os.fspath(path / name), framework="pt") for name in files}
        self._where = {key: name for name, h in self._handles.items() for key in h.keys()}  # noqa: SIM118 (safe_open is not iterable)
        self._taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def take(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UserError(
                f"{self.path}: no tensor {key!r}; the weights do not match the architecture in config.json"
            )
        self._taken.add(key)
        return self._handles[self._where[key]].get_tensor(key)

    def untaken(self) -> list[str]:
        return sorted(set(self._where) - self._taken)


class _ShardWriter:
    """Writes tensors into ~4 GiB safetensors shards (+ index), HF naming, as they come."""

    def __init__(self, out: Path):
        self.out, self.max_bytes = out, _MAX_SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self):
        save_file(
            self.pending, os.fspath(self.out / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"}
        )
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending:
            self._flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self.shards, strict=True)):
            (self.out / f"shard-{i}.tmp").rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---- config ------------------------------------------------------------------------------------


def _read_config(src: Path) -> tuple[str, dict]:
    path = src / "config.json"
    if not path.exists():
        raise UserError(f"{src}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if family is None:
        raise UserError(
            f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported by "
            f"`llada-train convert`; supported: {', '.join(SUPPORTED)}"
        )
    if family in _DENSE:  # transformers' own config class fills the keys config.json leaves at default
        try:
            cfg = {**AutoConfig.from_pretrained(src).to_dict(), "architectures": archs}
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"{path}: transformers cannot read this config: {e}") from e
    return family, cfg


def _rope(cfg: dict, where: Path) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor); refuses RoPE scaling (LLaDA2 has plain RoPE only)."""
    params = cfg.get("rope_parameters") or {}  # transformers >= 5 nests RoPE settings here
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(
            f"{where}: RoPE scaling type {kind!r} is not implemented by LLaDA2MoeConfig (plain RoPE with "
            "rope_theta only); converting would silently change the position encoding. Supported: no "
            "rope_scaling / rope_type 'default'."
        )
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    factor = cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
    return float(theta), float(factor)


def _model_config(family: str, cfg: dict, keys: _SourceTensors, where: Path) -> dict:
    """LLaDA2MoeConfig keyword arguments describing the same network as the source."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(
            f"{where}: hidden_act {cfg['hidden_act']!r} unsupported; LLaDA2 MLPs are SwiGLU (silu)"
        )
    theta, factor = _rope(cfg, where)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    common = {
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "rope_theta": theta,
        "partial_rotary_factor": factor,
        "rotary_dim": int(head_dim * factor),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "max_position_embeddings": cfg.get("max_position_embeddings", 32768),
        "initializer_range": cfg.get("initializer_range", 0.02),
    }
    if family == "bailing_moe_v2":
        if cfg.get("score_function", "sigmoid") != "sigmoid":
            raise UserError(
                f"{where}: router score_function {cfg['score_function']!r} unsupported (sigmoid only)"
            )
        return dict(
            common,
            moe_intermediate_size=cfg["moe_intermediate_size"],
            num_experts=cfg["num_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            num_shared_experts=cfg.get("num_shared_experts") or 0,
            first_k_dense_replace=cfg.get("first_k_dense_replace", 0),
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
            norm_topk_prob=cfg.get("norm_topk_prob", True),
            moe_router_enable_expert_bias=cfg.get("moe_router_enable_expert_bias", True),
            router_dtype=cfg.get("router_dtype", "fp32"),
            use_qk_norm=cfg.get("use_qk_norm", False),
            use_bias=cfg.get("use_bias", False),
            use_qkv_bias=cfg.get("use_qkv_bias", False),
        )
    if cfg.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias=true unsupported (LLaDA2 MLPs have no bias)")
    windows = [t for t in cfg.get("layer_types") or [] if t != "full_attention"]
    if cfg.get("use_sliding_window") or windows:
        raise UserError(
            f"{where}: sliding-window attention layers unsupported; LLaDA2 attends to the whole sequence"
        )
    attn = "model.layers.0.self_attn."
    return dict(
        common,
        # All layers dense: the MoE settings below only need to validate, no MoE layer is built.
        first_k_dense_replace=cfg["num_hidden_layers"],
        moe_intermediate_size=cfg["intermediate_size"],
        num_experts=1,
        num_experts_per_tok=1,
        num_shared_experts=0,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        moe_router_enable_expert_bias=False,
        use_qk_norm=attn + "q_norm.weight" in keys,
        use_qkv_bias=attn + "q_proj.bias" in keys,
        use_bias=attn + "o_proj.bias" in keys,
    )


# ---- weights -----------------------------------------------------------------------------------


def _dense_tensors(src: _SourceTensors, n_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama / Qwen2 / Qwen3 names -> released LLaDA2 names; q, k, v fused row-wise in that order."""
    yield "model.word_embeddings.weight", src.take("model.embed_tokens.weight")
    for i in range(n_layers):
        s, d = f"model.layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{d}{norm}.weight", src.take(f"{s}{norm}.weight")
        for kind in ("weight", "bias"):
            qkv = [f"{s}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if qkv[0] in src:
                yield f"{d}attention.query_key_value.{kind}", torch.cat([src.take(k) for k in qkv])
            if f"{s}self_attn.o_proj.{kind}" in src:
                yield f"{d}attention.dense.{kind}", src.take(f"{s}self_attn.o_proj.{kind}")
        for ours, theirs in (("query_layernorm", "q_norm"), ("key_layernorm", "k_norm")):
            if f"{s}self_attn.{theirs}.weight" in src:
                yield f"{d}attention.{ours}.weight", src.take(f"{s}self_attn.{theirs}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{d}mlp.{proj}.weight", src.take(f"{s}mlp.{proj}.weight")
    yield "model.norm.weight", src.take("model.norm.weight")
    if "lm_head.weight" in src:
        yield "lm_head.weight", src.take("lm_head.weight")


def _bailing_tensors(src: _SourceTensors, config: LLaDA2MoeConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """BailingMoeV2 already uses the released names; multi-token-prediction layers (indices past
    num_hidden_layers) are dropped: the diffusion model has no next-token head."""

    def layer_of(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[2]) if key.startswith("model.layers.") else None

    for key in src.keys():  # noqa: SIM118 (_SourceTensors is not iterable)
        layer = layer_of(key)
        if layer is not None and layer >= config.num_hidden_layers:
            src.take(key)  # MTP layer: consumed, not written
        elif not key.endswith("rotary_emb.inv_freq"):
            yield key, src.take(key)
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        bias = f"model.layers.{i}.mlp.gate.expert_bias"
        if bias not in src:  # checkpoints trained without the aux-free bias: zero = plain routing
            yield bias, torch.zeros(config.num_experts, dtype=torch.float32)


def _with_mask_row(weight: torch.Tensor, vocab: int, mask_id: int, mean_rows: list[int]) -> torch.Tensor:
    """Grow to `vocab` rows if needed; the mask row = mean of the real tokens' rows: a neutral point
    of the embedding cloud, neither zero nor any real token (as transformers' `mean_resizing`)."""
    if weight.shape[0] < vocab:
        weight = torch.cat([weight, weight.new_zeros(vocab - weight.shape[0], weight.shape[1])])
    else:
        weight = weight.clone()
    weight[mask_id] = weight[mean_rows].float().mean(0).to(weight.dtype)
    return weight


def _expected_shapes(config: LLaDA2MoeConfig) -> dict[str, torch.Size]:
    """On-disk names and shapes the converted checkpoint must have (built on the meta device)."""
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    shapes = {k: v.shape for k, v in to_released_layout(model.state_dict()).items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _write_weights(
    source: Path, stream, out: Path, expected: dict, vocab: int, mask_id: int, mean_rows: list[int], dtype
) -> tuple[torch.dtype, float]:
    """Check every mapped tensor against `expected` (names and shapes), add the mask row, cast, write.
    Returns the weights' dtype and the per-coordinate std of the source token embeddings."""
    writer = _ShardWriter(out)
    weights_dtype = noise_std = None
    for name, tensor in stream:
        if name == "model.word_embeddings.weight":
            noise_std = round(tensor[mean_rows].float().std().item(), 6)
        if name in ("model.word_embeddings.weight", "lm_head.weight"):
            tensor = _with_mask_row(tensor, vocab, mask_id, mean_rows)
        if dtype is not None and tensor.is_floating_point() and not name.endswith("expert_bias"):
            tensor = tensor.to(dtype)  # the router bias stays fp32, as the router runs in fp32
        want = expected.pop(name, None)
        if want != tensor.shape:
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the converted model expects "
                f"{'no such tensor' if want is None else tuple(want)}; config.json and weights disagree"
            )
        writer.add(name, tensor)
        weights_dtype = weights_dtype or tensor.dtype
    if expected:
        raise UserError(
            f"{source}: the checkpoint lacks tensors the converted model needs: {sorted(expected)[:8]}"
        )
    writer.close()
    return weights_dtype, noise_std


# ---- entry points ------------------------------------------------------------------------------


def _check_paths(src: str, dst: str, dtype):
    source, out = Path(src), Path(dst)
    if not source.is_dir():
        raise UserError(f"--from {src}: not a directory (download the checkpoint first, then pass its directory)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--to {dst}: exists and is not empty; choose a new directory")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype {dtype!r}: choose float32 or bfloat16")
        dtype = getattr(torch, dtype)
    return source, out, dtype


def _tokenizer_with_mask(source: Path, mask_token: str):
    """The source tokenizer with `mask_token` added (pad = eos if unset); (tokenizer, its size before,
    whether the mask token was already there)."""
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: could not load its tokenizer (tokenizer.json / tokenizer_config.json): {e}") from e
    n_before, had_mask = len(tok), mask_token in tok.get_vocab()
    tok.add_special_tokens({"mask_token": mask_token})
    if tok.eos_token_id is None:
        raise UserError(f"{source}: the tokenizer has no eos token; set `eos_token` in tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, n_before, had_mask


def convert_checkpoint(src: str, dst: str, *, mask_token: str = "<|mask|>", dtype=None,
                       shift_logits: bool = False) -> Path:
    """Convert the AR checkpoint directory `src` into an LLaDA2-MoE checkpoint directory `dst`.

    `dtype` (None, "float32", "bfloat16" or a torch dtype) casts the floating weights; None keeps the
    source dtype. `shift_logits` sets the model's option of that name: the converted head keeps
    predicting the next token (Dream-style), instead of being retrained to predict its own position.
    `dst` must not exist or be empty; it is written under `dst.partial` and renamed when complete.
    Returns `dst`.
    """
    source, out, dtype = _check_paths(src, dst, dtype)
    family, cfg = _read_config(source)
    tensors = _SourceTensors(source)
    try:
        kwargs = _model_config(family, cfg, tensors, source / "config.json")
    except KeyError as e:  # a key the architecture needs that config.json lacks
        raise UserError(f"{source / 'config.json'}: no {e} key, which a {family} config must have") from e
    tok, n_before, had_mask = _tokenizer_with_mask(source, mask_token)
    mask_id = tok.convert_tokens_to_ids(mask_token)
    vocab = max(kwargs["vocab_size"], len(tok))
    try:  # its shape checks (heads vs kv heads, expert groups, rotary_dim) are about the source config
        config = LLaDA2MoeConfig(**{**kwargs, "vocab_size": vocab}, mask_token_id=mask_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 shift_logits=shift_logits)
    except UserError as e:
        raise UserError(f"{source / 'config.json'}: {e}") from e
    config.architectures = ["LLaDA2MoeModelLM"]
    with _written_whole(out) as partial:
        stream = (_bailing_tensors(tensors, config) if family == "bailing_moe_v2"
                  else _dense_tensors(tensors, config.num_hidden_layers))
        if config.tie_word_embeddings:  # some tied checkpoints still store a copy of lm_head
            stream = ((name, t) for name, t in stream if name != "lm_head.weight")
        mean_rows = [i for i in range(min(n_before, kwargs["vocab_size"])) if i != mask_id]
        weights_dtype, noise_std = _write_weights(source, stream, partial, _expected_shapes(config), vocab, mask_id,
                                                  mean_rows, dtype)
        leftover = [k for k in tensors.untaken() if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise UserError(f"{source}: source tensors with no place in the converted model: {leftover[:8]}")
        config.dtype = str(weights_dtype).removeprefix("torch.")
        config.save_pretrained(partial)
        tok.save_pretrained(partial)
        # LLaDA2.0-style decoding defaults: threshold 0.95, no editing, blocks of 32.
        GenerationConfig(**generation_config_dict("llada2.0"), mask_token_id=mask_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(partial)
        info = {"source": os.fspath(source.resolve()), "architecture": family, "mask_token": mask_token,
                "mask_token_id": mask_id, "mask_token_was_in_vocab": had_mask,
                "embedding_rows_added": vocab - kwargs["vocab_size"], "mask_row_init": "mean of the other token rows",
                "suggested_mask_embed_noise_std": noise_std}
        (partial / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


@contextlib.contextmanager
def _written_whole(out: Path) -> Iterator[Path]:
    """A directory written under `out.partial` and renamed to `out` (absent or empty) only when the block
    completes; on any failure the partial directory is removed, so `out` never holds half a model."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)

# ---- GGUF sources ------------------------------------------------------------------------------


def _gguf_field(reader, key: str):
    """A scalar or string metadata value of a GGUFReader (None when absent); works with gguf >= 0.10."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if len(field.types) == 1 and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else part.tolist()


def inspect_gguf(path) -> dict:
    """What `convert_gguf` checks before loading anything heavy: the file is a GGUF, `gguf` is
    installed, the architecture is one the converter knows, and no RoPE scaling is declared.
    Returns {"architecture", "name", "file_type", "license", "tensors"}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--from {path}: no such file or directory")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"--from {path}: not a GGUF file (it does not start with the bytes 'GGUF'); pass a "
                        "llama.cpp .gguf file or a Hugging Face checkpoint directory")
    try:
        import gguf
    except ImportError as e:
        raise UserError(f"--from {path}: reading a GGUF file needs the `gguf` package: pip install gguf") from e
    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except (ValueError, OSError, IndexError, KeyError, EOFError) as e:  # a truncated or corrupt file
        raise UserError(f"--from {path}: the GGUF file cannot be read ({type(e).__name__}: {e})") from e
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"--from {path}: GGUF architecture {arch!r} is not known to `llada-train convert`; "
                        f"known: {', '.join(GGUF_ARCHITECTURES)}")
    scaling = _gguf_field(reader, f"{arch}.rope.scaling.type")
    names = {t.name for t in reader.tensors}
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise UserError(f"--from {path}: the model uses RoPE scaling ({scaling or 'rope_freqs.weight'}), which "
                        "LLaDA2MoeConfig does not implement (plain RoPE only); converting would silently change "
                        "the position encoding")
    file_type = _gguf_field(reader, "general.file_type")
    with contextlib.suppress(ValueError, TypeError, AttributeError):  # the name when gguf knows the number
        file_type = gguf.LlamaFileType(file_type).name
    return {"architecture": arch, "name": _gguf_field(reader, "general.name"), "file_type": file_type,
            "license": _gguf_field(reader, "general.license"), "tensors": len(names)}


def _require_empty(flag: str, path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{flag} {path}: exists and is not empty; choose a new directory")


def save_gguf_as_hf(gguf_path, out) -> Path:
    """The GGUF's model as transformers reads it (dequantized, float32) written as a Hugging Face
    folder `out` (config.json, model.safetensors, tokenizer with its chat template); via
    `out.partial`, renamed when complete. transformers marks a GGUF-loaded model quantized and
    refuses to save it, so its weights go into a model built afresh from the config without the
    quantization entry (on the meta device: no second copy of the weights)."""
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM

    gguf_path, out = Path(gguf_path), Path(out)
    if find_spec("accelerate") is None:  # transformers needs it to load any GGUF
        raise UserError(f"--from {gguf_path}: transformers needs `accelerate` to load a GGUF file: pip install "
                        "accelerate")
    where, name = os.fspath(gguf_path.resolve().parent), gguf_path.name
    load = {"gguf_file": name}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for plain float weights
        from transformers import GgufConfig

        load["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **load)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = type(model.config).from_dict(config)
    with torch.device("meta"):
        clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    del model
    with _written_whole(out) as partial:
        clean.eval().save_pretrained(partial, safe_serialization=True)
        tok.save_pretrained(partial)
    return out


def convert_gguf(gguf_path, dst, *, source_out=None, mask_token: str = "<|mask|>", dtype=None,
                 shift_logits: bool = False) -> Path:
    """Convert a GGUF file (Llama / Qwen2 / Qwen3) into an LLaDA2-MoE checkpoint `dst`.

    transformers reads and dequantizes the file (weights, config and the tokenizer with its chat
    template); that AR model is written as a Hugging Face folder, `source_out` when given (kept, so
    evaluations can load the source with transformers) or a temporary folder next to `dst`, and
    converted as `convert_checkpoint` does. A 4-bit GGUF gives the 4-bit model's function in float
    weights, not the original release. Returns `dst`."""
    gguf_path = Path(gguf_path)
    info = inspect_gguf(gguf_path)
    _check_paths(os.fspath(gguf_path.parent), os.fspath(dst), dtype)  # --to empty, --dtype valid: before loading
    dst = Path(dst)
    if source_out is not None:
        _require_empty("--source-out", Path(source_out))
        source = Path(source_out)
    else:
        source = dst.with_name(f".{dst.name}.gguf-source")
        shutil.rmtree(source, ignore_errors=True)
    try:
        save_gguf_as_hf(gguf_path, source)
        out = convert_checkpoint(os.fspath(source), os.fspath(dst), mask_token=mask_token, dtype=dtype,
                                 shift_logits=shift_logits)
    finally:
        if source_out is None:
            shutil.rmtree(source, ignore_errors=True)
    record = json.loads((out / "conversion.json").read_text())
    record.update(source=os.fspath(gguf_path.resolve()),
                  gguf={k: v for k, v in info.items() if k != "tensors"},
                  source_hf=os.fspath(Path(source_out).resolve()) if source_out is not None else None)
    (out / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llada-train convert",
        description="Convert an autoregressive Hugging Face checkpoint (Llama, Qwen2, Qwen3, "
        "Ling/BailingMoeV2) or a GGUF file (Llama, Qwen2, Qwen3) into an LLaDA2-MoE block-diffusion "
        "checkpoint (then run CPT on it).",
    )
    parser.add_argument(
        "--from", dest="src", required=True, metavar="PATH",
        help="source checkpoint directory, or a .gguf file (read and dequantized through transformers)",
    )
    parser.add_argument(
        "--source-out", metavar="DIR", default=None,
        help="with a GGUF --from: also keep the dequantized AR source as a Hugging Face folder here",
    )
    parser.add_argument(
        "--to", dest="dst", required=True, metavar="DIR", help="output directory (new or empty)"
    )
    parser.add_argument(
        "--mask-token", default="<|mask|>", help="mask token, added to the tokenizer if absent"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="cast the weights (default: keep the source dtype)",
    )
    parser.add_argument(
        "--shift-logits", action="store_true",
        help="keep the AR head's meaning: position i's logits predict token i from position i - 1 (as "
        "Dream-7B); default: the released LLaDA2 layout, logits predict their own position",
    )
    args = parser.parse_args(argv)
    if Path(args.src).is_file() or args.src.lower().endswith(".gguf"):
        out = convert_gguf(args.src, args.dst, source_out=args.source_out, mask_token=args.mask_token,
                           dtype=args.dtype, shift_logits=args.shift_logits)
    elif args.source_out is not None:
        raise UserError(f"--source-out is for a GGUF --from; {args.src} is not a file")
    else:
        out = convert_checkpoint(args.src, args.dst, mask_token=args.mask_token, dtype=args.dtype,
                                 shift_logits=args.shift_logits)
    info = json.loads((out / "conversion.json").read_text())
    print(
        f"converted {info['architecture']} checkpoint {args.src} -> {out} "
        f"(mask token {info['mask_token']!r} = id {info['mask_token_id']}, "
        f"{info['embedding_rows_added']} embedding row(s) added)"
    )
    return 0
