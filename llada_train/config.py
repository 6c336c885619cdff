"""Structured configs: one dataclass schema per stage; defaults < YAML (--config) < dot.key=value.

Every user mistake (unknown key, wrong type, missing value, out-of-range value) is reported here,
before any work starts, with the full dotted key and, for typos, a suggestion.
"""

import difflib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from .errors import ConfigError
from .loggers import SINKS
from .presets import model_preset_path, resolve_config
from .teachers import TEACHERS


def check_value(cond: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming `key` unless `cond`."""
    if not cond:
        raise ConfigError(f"bad value for '{key}': {msg}")


# Each section validates its own fields in __post_init__ (it runs when the merged config becomes
# objects), naming the full key; `validate` keeps only the checks that span sections.


WANDB_PROJECT_BAD_CHARS = "/\\#?%:"  # wandb.init refuses these in a project name


@dataclass
class WandbConfig:
    project: str = ""  # W&B project; empty = $WANDB_PROJECT, else llada-train
    entity: str = ""  # W&B user or team; empty = $WANDB_ENTITY, else your wandb default
    name: str = ""  # W&B run name; empty = $WANDB_NAME, else run.name

    def __post_init__(self):
        bad = "".join(sorted(set(self.project) & set(WANDB_PROJECT_BAD_CHARS)))
        check_value(not bad, "run.wandb.project", f"'{self.project}' contains {bad!r}; W&B project names "
                    f"cannot contain any of {WANDB_PROJECT_BAD_CHARS!r}")
        check_value(len(self.project) <= 128, "run.wandb.project", "W&B project names have at most 128 characters")


@dataclass
class RunConfig:
    name: str = "run"  # label for logs and Slurm job names
    out_dir: str = "runs/run"  # run directory: config.yaml, metrics.jsonl, checkpoints/, hf/
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    seed: int = 0  # seeds init, data order, noise and rollouts (per step and rank)
    # metric sinks: jsonl (metrics.jsonl, always on) | tensorboard | wandb (docs/tracking.md)
    loggers: list = field(default_factory=lambda: ["jsonl", "tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        check_value(self.resume in ("auto", "never") or self.resume == MISSING or Path(self.resume).exists(),
               "run.resume", f"'{self.resume}' is neither auto, never nor an existing checkpoint directory")
        unknown = [name for name in self.loggers if name not in SINKS]
        check_value(not unknown, "run.loggers", f"unknown logger(s) {unknown}; use names from {list(SINKS)}")
        if "jsonl" not in self.loggers:  # metrics.jsonl is the record every tool reads: always on
            self.loggers = ["jsonl", *self.loggers]


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name in llada_train/configs/model/ or a path to a YAML of LLaDA2MoeConfig keys
    init_from: str = ""  # an HF directory (previous stage's hf/ export); empty = random init from preset
    overrides: dict = field(default_factory=dict)  # LLaDA2MoeConfig keys to change on top of the preset
    attn_backend: str = "sdpa"  # sdpa | flex
    gradient_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    tokenizer: str = "default"  # HF tokenizer dir; default = the packaged one (ignored when init_from has one)

    def __post_init__(self):
        check_value(self.attn_backend in ("sdpa", "flex"), "model.attn_backend", "use sdpa or flex")


@dataclass
class TextDataConfig:
    paths: list = field(default_factory=lambda: ["stdlib"])  # files, dirs, "stdlib" or "hf:name"
    text_field: str = "text"  # column holding the text in jsonl/parquet/hf rows
    seq_len: int = 128  # packed sequence length (tokens per row)
    eval_fraction: float = 0.02  # share of documents held out (by content hash, stable across runs)
    max_docs: int | None = None  # read at most this many documents (null = all)
    cache_dir: str = ".cache/corpus"  # tokenized corpus cache (empty = no cache)
    num_proc: int = 1  # tokenizer worker processes


@dataclass
class ChatDataConfig:
    train: str = MISSING  # jsonl/json/parquet file or hf:name with messages or alpaca rows; "tasks" = built-in
    eval: str = ""  # held-out rows (same formats); empty = no eval
    tasks: list = field(default_factory=lambda: ["addition", "reversal"])  # when train == "tasks"
    task_options: dict = field(default_factory=dict)  # per-task generator options, e.g. {sorting: {max_len: 4}}
    num_train: int = 4000  # generated training rows (data.train = tasks)
    num_eval: int = 200  # held-out rows kept for eval loss and accuracy (0 = no eval)
    max_len: int = 64  # tokens per example after EOS padding (a multiple of diffusion.block_size)
    truncate: str = "drop"  # drop | truncate
    pack: bool = False  # pack several examples per row with document masks
    teacher: Any = ""  # data.train = tasks: a teacher name or a list, one per family (teachers.py); "" = gold
    teacher_error_rate: float = 0.6  # share of the train rows where a teacher's bug shows that get its answer

    def __post_init__(self):
        check_value(self.truncate in ("drop", "truncate"), "data.truncate", "use drop or truncate")
        for name in self.teachers:
            self._check_teacher(name)
        families = [TEACHERS[name].task for name in self.teachers]
        check_value(len(families) == len(set(families)), "data.teacher", "one teacher per task family")
        if self.teachers:
            check_value(0 < self.teacher_error_rate <= 1, "data.teacher_error_rate", "must be in (0, 1]")

    @property
    def teachers(self) -> list[str]:
        """The teacher names of `data.teacher` (a name or a list of names)."""
        names = [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)
        return [name for name in names if name]

    def _check_teacher(self, name) -> None:
        check_value(name in TEACHERS, "data.teacher", f"use one of {sorted(TEACHERS)} (or \"\" for gold)")
        task = TEACHERS[name].task
        check_value(self.train == "tasks" and task in self.tasks, "data.teacher",
                    f"'{name}' answers the task family {task!r}: needs data.train=tasks with it in "
                    f"data.tasks (got data.train={self.train!r}, data.tasks={list(self.tasks)})")


@dataclass
class NoiseConfig:
    t_min: float = 0.001  # mask ratio t ~ U[t_min, t_max]
    t_max: float = 1.0  # upper end of the mask ratio
    per: str = "block"  # block | sequence: one t per block or one per sequence
    complementary: bool = False  # pair each example with its complement mask (weights 1/t, 1/(1-t))

    def __post_init__(self):
        check_value(0 < self.t_min <= self.t_max <= 1, "diffusion.noise.t_min/t_max", "need 0 < t_min <= t_max <= 1")
        check_value(self.per in ("block", "sequence"), "diffusion.noise.per", "use 'block' or 'sequence'")


@dataclass
class LossConfig:
    weighting: str = "elbo"  # elbo (1/t) | uniform (1)
    confidence_weight: float = 0.0  # CAP: entropy at correctly predicted masked positions

    def __post_init__(self):
        check_value(self.weighting in ("elbo", "uniform"), "diffusion.loss.weighting", "use 'elbo' or 'uniform'")


@dataclass
class T2TConfig:
    max_ratio: float = 0.0  # replace r ~ U[0, max_ratio] of the visible tokens by random tokens
    weight: float = 1.0  # CE at replaced positions towards the original token
    keep_weight: float = 0.0  # CE at visible unchanged positions (learn not to edit correct tokens)

    def __post_init__(self):
        check_value(0 <= self.max_ratio <= 1, "diffusion.t2t.max_ratio", "must be in [0, 1]")


@dataclass
class MTFConfig:
    prob: float = 0.0  # share of batches trained with Multi-turn Forward
    turns: int = 2  # turn 1..turns-1 draft without grad, the last turn trains
    draft_ratio: float = 1.0  # each draft fills u ~ U[0, draft_ratio] of the still-masked positions

    def __post_init__(self):
        check_value(0 <= self.prob <= 1, "diffusion.mtf.prob", "must be in [0, 1]")
        check_value(self.turns >= 2, "diffusion.mtf.turns", "must be >= 2 (drafts, then the training turn)")
        check_value(0 < self.draft_ratio <= 1, "diffusion.mtf.draft_ratio", "must be in (0, 1]")


@dataclass
class DiffusionConfig:
    block_size: int = 32  # diffusion block (tokens); also the SFT EOS-padding multiple
    # WSD block-size schedule: [[until_step, block_size], ...]; block_size 0 = whole sequence (plain MDM).
    block_schedule: list = field(default_factory=list)  # [[until_step, size], ...]; 0 = whole sequence; [] = block_size
    mask_embed_noise_std: float = 0.0  # Gaussian noise on masked-position embeddings (converted AR models)
    mask_embed_noise_steps: int = 0  # apply that noise for the first N steps
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    t2t: T2TConfig = field(default_factory=T2TConfig)
    mtf: MTFConfig = field(default_factory=MTFConfig)

    def __post_init__(self):
        check_value(self.block_size > 0, "diffusion.block_size", "must be positive")
        last = -1
        for i, entry in enumerate(self.block_schedule):
            ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry)
            check_value(ok, f"diffusion.block_schedule[{i}]",
                        f"expected [until_step, block_size] integers, got {entry}")
            check_value(entry[0] > last, f"diffusion.block_schedule[{i}]", "until_step values must increase")
            check_value(entry[1] >= 0, f"diffusion.block_schedule[{i}]", "block_size must be >= 0 (0 = whole sequence)")
            last = entry[0]


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr as a share of the peak (cosine, wsd)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 20  # linear warm-up steps
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps in the final decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)

    def __post_init__(self):
        check_value(self.lr > 0, "optim.lr", "must be positive")
        check_value(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule", "use cosine, wsd or constant")
        check_value(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO 0-3
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    expert_parallel: int = 1  # ranks sharing one copy of the routed experts (E/N each; DeepSpeed AutoEP)

    def __post_init__(self):
        check_value(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", "must be 0, 1, 2 or 3")
        check_value(self.expert_parallel >= 1, "engine.expert_parallel",
                    "must be >= 1 (1 = every rank holds every expert)")
        check_value(self.precision in ("fp32", "bf16"), "engine.precision", "use fp32 or bf16")


FP4_BLOCKS = (8, 16, 32, 64, 128)  # elements per 4-bit scale block the quantizers accept
RHT_DIMS = (16, 32, 64, 128)  # Hadamard sizes the RHT kernels accept


@dataclass
class PrecisionConfig:
    fp4: str = "none"  # none | ufp4 | nvfp4
    fp4_block: int = 16  # elements per 4-bit scale block
    rht_dim: int = 16  # randomized Hadamard transform size (16, 32, 64, 128)
    scale_rounding: str = "nearest"  # E4M3 block scales of RTNE operands: nearest | up (docs/fp4.md)
    bf16_first_layers: int = 0  # keep the first N decoder layers in high precision
    bf16_last_layers: int = 0  # keep the last N decoder layers in high precision

    def __post_init__(self):
        check_value(self.fp4 in ("none", "ufp4", "nvfp4"), "precision.fp4", "use none, ufp4 or nvfp4")
        check_value(self.scale_rounding in ("nearest", "up"), "precision.scale_rounding", "use nearest or up")
        # the kernels' own sets (kernels/fp4.py, kernels/hadamard.py RHT_DIMS; a test keeps them equal)
        check_value(self.fp4_block in FP4_BLOCKS, "precision.fp4_block", f"use one of {FP4_BLOCKS}")
        check_value(self.rht_dim in RHT_DIMS, "precision.rht_dim", f"use one of {RHT_DIMS}")
        for key in ("bf16_first_layers", "bf16_last_layers"):
            check_value(getattr(self, key) >= 0, f"precision.{key}", "must be >= 0")


@dataclass
class MoETrainConfig:
    bias_update_rate: float = 0.001  # aux-loss-free balancing step on expert_bias


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # global batch (sequences per optimizer step)
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 50  # steps between held-out evaluations
    eval_batches: int = 4  # held-out batches per evaluation
    save_every: int = 100  # steps between checkpoints (one is also written at the end)
    keep_last: int = 2  # complete checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    on_save_error: str = "stop"  # a failed checkpoint save (disk full, I/O error): stop | continue
    export_hf: bool = True  # write run_dir/hf (safetensors + config + tokenizer) at the end

    def __post_init__(self):
        check_value(self.steps > 0, "train.steps", "must be positive")
        check_value(self.batch_size > 0 and self.grad_accum > 0, "train.batch_size",
               "batch_size and grad_accum must be positive")
        check_value(self.batch_size % self.grad_accum == 0, "train.batch_size",
               f"global batch {self.batch_size} must be divisible by train.grad_accum {self.grad_accum}")
        check_value(self.keep_last >= 1, "train.keep_last", "keep at least one checkpoint")
        check_value(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        check_value(self.on_save_error in ("stop", "continue"), "train.on_save_error", "use stop or continue")


@dataclass
class StageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """The checks that span sections (each section checked its own fields when it was built)."""


def check_length_fits_blocks(d: DiffusionConfig, key: str, length: int) -> None:
    """Rows of `length` tokens split into whole diffusion blocks, at every block size the schedule uses."""
    check_value(length % d.block_size == 0, key, f"{length} must be a multiple of diffusion.block_size {d.block_size}")
    for i, (_, size) in enumerate(d.block_schedule):
        check_value(size == 0 or length % size == 0, f"diffusion.block_schedule[{i}]",
               f"block size {size} must divide {key} {length} (or be 0 = whole sequence)")


@dataclass
class CPTConfig(StageConfig):
    data: TextDataConfig = field(default_factory=TextDataConfig)

    def validate(self) -> None:
        check_length_fits_blocks(self.diffusion, "data.seq_len", self.data.seq_len)


@dataclass
class LoRAConfig:
    enabled: bool = False  # train LoRA adapters only; the export merges them
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # adapter scale alpha / r
    dropout: float = 0.0  # adapter input dropout (must be 0 with `experts` targets)
    # modules by name suffix; `experts` adds per-expert adapters to the fused routed experts
    target_modules: list = field(default_factory=lambda: ["query_key_value", "dense", "gate_proj", "up_proj",
                                                          "down_proj"])

    def __post_init__(self):
        check_value(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        check_value(not (self.dropout and "experts" in self.target_modules), "lora.dropout",
               "must be 0 when lora.target_modules includes 'experts' (peft cannot apply dropout inside fused "
               "expert weights); set lora.dropout=0")


@dataclass
class SFTConfig(StageConfig):
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        check_length_fits_blocks(self.diffusion, "data.max_len", self.data.max_len)


def _known_keys(schema, prefix="") -> list[str]:
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys += _known_keys(type(default), key + ".")
    return keys


def _suggest(key: str, schema) -> str:
    close = difflib.get_close_matches(key, _known_keys(schema), n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in _known_keys(schema) if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" Did you mean '{close[0]}'?" if close else ""


def _explain(err: OmegaConfBaseException, schema, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{source}: unknown config key '{key}'.{_suggest(key, schema)}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{source}: missing value for '{key}': set it in the YAML or as {key}=VALUE")
    if isinstance(err, ValidationError):
        msg = str(err).split("\n")[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {err}")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100)")
    key, value = item.split("=", 1)
    return key.strip(), OmegaConf.create({"v": value}).v if value == "" else _yaml_value(value)


def _yaml_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys a YAML file marks `???` (the user must supply them)."""
    keys = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            keys.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(node[key]):
            keys += _missing_keys(node[key], f"{prefix}{key}.")
    return keys


def load_config(schema: type, config_path: str | None = None, overrides: list[str] | None = None):
    """Resolved, validated config object (an instance of the dataclass `schema`, a StageConfig);
    `stages.registry.load_stage_config` takes a registered stage's name instead."""
    cfg = OmegaConf.structured(schema)
    if config_path:
        path = resolve_config(config_path)  # a file, else a preset name (llada_train/configs)
        try:
            user = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors carry line numbers
            raise ConfigError(f"{config_path}: cannot parse YAML: {e}") from e
        user.pop("stage", None)
        try:
            cfg = OmegaConf.merge(cfg, user)
            for key in _missing_keys(user):  # merging `???` over a default keeps the default: re-mark it
                OmegaConf.update(cfg, key, MISSING)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, config_path) from e
    for item in overrides or []:
        key, value = parse_override(item)
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from e
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            raise ConfigError(f"override '{item}': unknown config key '{key}'.{_suggest(key, schema)}")
    try:
        obj = OmegaConf.to_object(cfg)  # each section's __post_init__ checks its fields here
    except OmegaConfBaseException as e:
        raise _explain(e, schema, config_path or "config") from e
    obj.validate()
    return obj


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    """The resolved config as plain dicts and lists (what W&B stores as the run's config)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def model_preset_values(preset: str) -> dict:
    """LLaDA2MoeConfig keys from llada_train/configs/model/<preset>.yaml or a YAML path."""
    import yaml

    return yaml.safe_load(model_preset_path(preset).read_text())


# ---- reference ------------------------------------------------------------------------------------


def _field_comments(schema) -> dict[str, str]:
    """Trailing `# ...` comments of a dataclass's field lines, which serve as the key docs."""
    import inspect
    import re

    comments = {}
    for cls in reversed([c for c in schema.__mro__ if is_dataclass(c)]):  # a subclass's comment wins
        above = ""
        for line in inspect.getsource(cls).splitlines():
            field_line = re.match(r"\s+(\w+):([^#]*)(#\s?(.*))?$", line)
            if field_line:
                comments[field_line.group(1)] = (field_line.group(4) or above).strip()
            above = line.strip()[1:] if line.strip().startswith("#") else ""
    return comments


def _reference_rows(schema, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    comments = _field_comments(schema)
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            rows += _reference_rows(type(default), f"{prefix}{f.name}.")
            continue
        shown = "(required)" if default is MISSING else json.dumps(_plain(default))
        rows.append((prefix + f.name, shown, comments.get(f.name, "").replace("|", "\\|")))
    return rows


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, list) else (
        OmegaConf.to_container(OmegaConf.structured(value)) if is_dataclass(value) else value)


def reference_markdown(schemas: dict[str, type]) -> str:
    """docs/config.md: every key of every stage (name -> schema) with its default and meaning."""
    intro = ("Generated by `python -m llada_train.stages.registry > docs/config.md` from the registered stages' "
             "schemas (`llada_train/config.py`, `llada_train/rl/config.py`; a test keeps it in sync). Set keys "
             "in a YAML file (`--config`) or as `dot.key=value` overrides; `--print-config` shows the resolved result.")
    out = ["# Config reference", "", intro, ""]
    shared = dict.fromkeys(r[0] for r in _reference_rows(StageConfig))
    out += ["## Keys every training stage shares (`cpt`, `sft`, `rl`)", "", "| key | default | meaning |",
            "|---|---|---|"]
    out += [f"| `{k}` | `{d}` | {c} |" for k, d, c in _reference_rows(StageConfig)]
    for name, schema in schemas.items():
        out += ["", f"## `{name}` only", "", "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{k}` | `{d}` | {c} |" for k, d, c in _reference_rows(schema) if k not in shared]
    return "\n".join(out) + "\n"

