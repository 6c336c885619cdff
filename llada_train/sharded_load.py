"""Loading a checkpoint at scale: each rank reads from the safetensors shards only what it keeps.

`LLaDA2MoeModelLM.from_pretrained` reads every shard into host memory and stacks the experts, on
every rank: for flash that is 206 GB per rank before DeepSpeed partitions anything. Here the model
is built without weights and each tensor is read with `safe_open` slices:

- expert parallelism at ZeRO 1-2 (`engine.expert_parallel: N`): every non-expert weight whole, and of
  each fused (E, out, in) expert tensor only the E/N experts AutoEP keeps on this rank (its
  contiguous block of expert ids). The fused tensor is allocated at full size but only the local
  block is written; the untouched pages are never resident, and AutoEP copies the block out and
  frees the buffer inside `deepspeed.initialize`.
- ZeRO-3 (with or without EP): the model is built under `deepspeed.zero.Init`, which partitions
  each parameter over the ranks as it is created, and each rank reads only the flat element range
  of its own partition of every tensor (AutoEP then gathers one layer's experts at a time).

The peak host memory of a rank is then about (checkpoint size / ranks sharing it) plus the largest
single tensor, instead of the whole checkpoint (`benchmarks/bench_scale.py` measures it).
"""

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError
from .model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from .model.modeling_llada2_moe import _FUSED_KEY

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointReader:
    """A released-layout safetensors directory read tensor by tensor, under the model's names: a
    fused `...mlp.experts.gate_proj` (E, out, in) is made of the per-expert
    `...mlp.experts.{e}.gate_proj.weight` (out, in) keys."""

    def __init__(self, path: Path, num_experts: int):
        self.path, self.num_experts = Path(path), num_experts
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.file_of = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(os.fspath(file), framework="pt") as f:
                    self.file_of.update(dict.fromkeys(f.keys(), file.name))
        if not self.file_of:
            raise UserError(f"{self.path}: no *.safetensors weights found")
        self._open: dict[str, object] = {}
        self.bytes_read = 0  # what this rank has read so far (the point of reading by slices)

    def checkpoint_bytes(self) -> int:
        total = 0
        for key in self.file_of:
            part = self._slice(key)
            total += math.prod(part.get_shape()) * _DTYPE_BYTES[part.get_dtype()]
        return total

    def _slice(self, key: str):
        if key not in self.file_of:
            raise UserError(f"{self.path}: tensor '{key}' missing from the checkpoint")
        name = self.file_of[key]
        if name not in self._open:
            self._open[name] = safe_open(os.fspath(self.path / name), framework="pt")
        return self._open[name].get_slice(key)

    def _expert_key(self, name: str, expert: int) -> str:
        prefix, proj = _FUSED_KEY.match(name).groups()
        return f"{prefix}.{expert}.{proj}.weight"

    def _key(self, name: str) -> str:
        """The checkpoint key of a non-expert tensor (a tied head reads the embeddings)."""
        if name == "lm_head.weight" and name not in self.file_of:
            return "model.word_embeddings.weight"
        return name

    def _counted(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read(self, name: str, experts: range | None = None) -> torch.Tensor:
        """A whole tensor, or of a fused expert tensor the experts in `experts` (E_local, out, in)."""
        if _FUSED_KEY.match(name) is None:
            return self._counted(self._slice(self._key(name))[:])
        ids = range(self.num_experts) if experts is None else experts
        return torch.stack([self._counted(self._slice(self._expert_key(name, e))[:]) for e in ids])

    def read_flat(self, name: str, shape: torch.Size, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the tensor flattened in C order, reading only the rows that hold them."""
        if _FUSED_KEY.match(name) is None:
            return _flat_range(self._slice(self._key(name)), shape, start, end, self._counted)
        per_expert = math.prod(shape[1:])
        parts = []
        for e in range(start // per_expert, math.ceil(end / per_expert)):
            lo, hi = max(start, e * per_expert), min(end, (e + 1) * per_expert)
            parts.append(_flat_range(self._slice(self._expert_key(name, e)), shape[1:], lo - e * per_expert,
                                     hi - e * per_expert, self._counted))
        return torch.cat(parts)


def _flat_range(tensor_slice, shape, start: int, end: int, counted) -> torch.Tensor:
    """Elements [start, end) of a safetensors slice of `shape`, flattened: whole leading rows read."""
    if len(shape) == 0:
        return counted(tensor_slice[:]).reshape(1)[start:end]
    row = math.prod(shape[1:])
    first, last = start // row, math.ceil(end / row)
    rows = counted(tensor_slice[first:last]).reshape(-1)  # (rows * row,)
    return rows[start - first * row:end - first * row]


def _local_experts(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The experts AutoEP keeps on an EP rank: a contiguous block of E/N ids."""
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def load_local_experts(config: LLaDA2MoeConfig, ep_size: int, rank: int, reader: CheckpointReader):
    """The model with every non-expert weight and only this rank's E/N experts written (ZeRO 1-2 + EP).
    AutoEP's EP groups are consecutive ranks, so the EP rank is `rank % ep_size`."""
    local = _local_experts(config.num_experts, ep_size, rank % ep_size)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    state = {}
    for name, param in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # the tied head is the embeddings
        if _FUSED_KEY.match(name):
            block = reader.read(name, local)  # (E/N, out, in) in the checkpoint's dtype
            full = torch.empty(param.shape, dtype=block.dtype)  # pages outside the block are never written
            full[local.start:local.stop] = block
            state[name] = full
        else:
            state[name] = reader.read(name)  # in the checkpoint's dtype, as from_pretrained loads it
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.word_embeddings.weight
    model._materialize_runtime_buffers()
    return model


def load_partitioned(config: LLaDA2MoeConfig, ds_config: dict, reader: CheckpointReader) -> LLaDA2MoeModelLM:
    """The model built under ZeRO-3's `zero.Init` (each parameter partitioned as it is created), each
    rank's partition of every parameter read from the checkpoint as a flat element range."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LLaDA2MoeModelLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is the embeddings' parameter: listed once
            part = param.ds_tensor  # (partition size,) flat, the tail past ds_numel is padding
            start = part.ds_numel * torch.distributed.get_rank(group=param.ds_process_group)
            end = min(start + part.ds_numel, param.ds_numel)
            if start < end:
                part[:end - start].copy_(reader.read_flat(name, param.ds_shape, start, end))
        for name, buffer in model.named_buffers():  # persistent buffers (expert biases) are not partitioned
            if name in reader.file_of:
                buffer.copy_(reader.read(name))
    return model


def zero_init_config(engine_cfg) -> dict:
    """What `zero.Init` reads of the DeepSpeed config: the stage, parameter offload and the dtype."""
    zero = {"stage": 3, **({"offload_param": {"device": "cpu"}} if engine_cfg.offload_params else {})}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": engine_cfg.precision == "bf16"}}


def load_for_rank(path: Path, config: LLaDA2MoeConfig, engine_cfg, rank: int) -> tuple[LLaDA2MoeModelLM, dict]:
    """`model.init_from` as this rank keeps it under ZeRO-3 and/or expert parallelism, and what it
    read: `{"read_bytes", "checkpoint_bytes"}`."""
    reader = CheckpointReader(path, config.num_experts)
    if engine_cfg.zero_stage == 3:
        model = load_partitioned(config, zero_init_config(engine_cfg), reader)
    else:
        model = load_local_experts(config, engine_cfg.expert_parallel, rank, reader)
    return model, {"read_bytes": reader.bytes_read, "checkpoint_bytes": reader.checkpoint_bytes()}

