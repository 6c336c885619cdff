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

from .decoding import DECODE_PRESETS, check_sampling
from .rl.ebpo import EBPOConfig
from .rl.reward_calls import RewardSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and what to do."""


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"bad value for '{key}': {msg}")


# Each section validates its own fields in __post_init__ (it runs when the merged config becomes
# objects), naming the full key; `validate` keeps only the checks that span sections.


@dataclass
class RunConfig:
    name: str = "run"  # label for logs and Slurm job names
    out_dir: str = "runs/run"  # run directory: config.yaml, metrics.jsonl, checkpoints/, hf/
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    seed: int = 0  # seeds init, data order, noise and rollouts (per step and rank)

    def __post_init__(self):
        _check(self.resume in ("auto", "never") or self.resume == MISSING or Path(self.resume).exists(),
               "run.resume", f"'{self.resume}' is neither auto, never nor an existing checkpoint directory")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # configs/model/<preset>.yaml or a path to a YAML of LLaDA2MoeConfig keys
    init_from: str = ""  # an HF directory (previous stage's hf/ export); empty = random init from preset
    overrides: dict = field(default_factory=dict)  # LLaDA2MoeConfig keys to change on top of the preset
    attn_backend: str = "sdpa"  # sdpa | flex
    gradient_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    tokenizer: str = "default"  # HF tokenizer dir; default = data/tokenizer (ignored when init_from has one)

    def __post_init__(self):
        _check(self.attn_backend in ("sdpa", "flex"), "model.attn_backend", "use sdpa or flex")


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

    def __post_init__(self):
        _check(self.truncate in ("drop", "truncate"), "data.truncate", "use drop or truncate")


@dataclass
class NoiseConfig:
    t_min: float = 0.001  # mask ratio t ~ U[t_min, t_max]
    t_max: float = 1.0  # upper end of the mask ratio
    per: str = "block"  # block | sequence: one t per block or one per sequence
    complementary: bool = False  # pair each example with its complement mask (weights 1/t, 1/(1-t))

    def __post_init__(self):
        _check(0 < self.t_min <= self.t_max <= 1, "diffusion.noise.t_min/t_max", "need 0 < t_min <= t_max <= 1")
        _check(self.per in ("block", "sequence"), "diffusion.noise.per", "use 'block' or 'sequence'")


@dataclass
class LossConfig:
    weighting: str = "elbo"  # elbo (1/t) | uniform (1)
    confidence_weight: float = 0.0  # CAP: entropy at correctly predicted masked positions

    def __post_init__(self):
        _check(self.weighting in ("elbo", "uniform"), "diffusion.loss.weighting", "use 'elbo' or 'uniform'")


@dataclass
class T2TConfig:
    max_ratio: float = 0.0  # replace r ~ U[0, max_ratio] of the visible tokens by random tokens
    weight: float = 1.0  # CE at replaced positions towards the original token
    keep_weight: float = 0.0  # CE at visible unchanged positions (learn not to edit correct tokens)

    def __post_init__(self):
        _check(0 <= self.max_ratio <= 1, "diffusion.t2t.max_ratio", "must be in [0, 1]")


@dataclass
class MTFConfig:
    prob: float = 0.0  # share of batches trained with Multi-turn Forward
    turns: int = 2  # turn 1..turns-1 draft without grad, the last turn trains
    draft_ratio: float = 1.0  # each draft fills u ~ U[0, draft_ratio] of the still-masked positions

    def __post_init__(self):
        _check(0 <= self.prob <= 1, "diffusion.mtf.prob", "must be in [0, 1]")
        _check(self.turns >= 2, "diffusion.mtf.turns", "must be >= 2 (drafts, then the training turn)")
        _check(0 < self.draft_ratio <= 1, "diffusion.mtf.draft_ratio", "must be in (0, 1]")


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
        _check(self.block_size > 0, "diffusion.block_size", "must be positive")
        last = -1
        for i, entry in enumerate(self.block_schedule):
            ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry)
            _check(ok, f"diffusion.block_schedule[{i}]", f"expected [until_step, block_size] integers, got {entry}")
            _check(entry[0] > last, f"diffusion.block_schedule[{i}]", "until_step values must increase")
            _check(entry[1] >= 0, f"diffusion.block_schedule[{i}]", "block_size must be >= 0 (0 = whole sequence)")
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
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule", "use cosine, wsd or constant")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO 0-3
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.precision in ("fp32", "bf16"), "engine.precision", "use fp32 or bf16")


@dataclass
class PrecisionConfig:
    fp4: str = "none"  # none | ufp4 | nvfp4
    fp4_block: int = 16  # elements per 4-bit scale block
    rht_dim: int = 16  # randomized Hadamard transform size (16, 32, 64, 128)
    scale_rounding: str = "nearest"  # E4M3 block scales of RTNE operands: nearest | up (docs/fp4.md)
    bf16_first_layers: int = 0  # keep the first N decoder layers in high precision
    bf16_last_layers: int = 0  # keep the last N decoder layers in high precision

    def __post_init__(self):
        _check(self.fp4 in ("none", "ufp4", "nvfp4"), "precision.fp4", "use none, ufp4 or nvfp4")
        _check(self.scale_rounding in ("nearest", "up"), "precision.scale_rounding", "use nearest or up")


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
        _check(self.steps > 0, "train.steps", "must be positive")
        _check(self.batch_size > 0 and self.grad_accum > 0, "train.batch_size",
               "batch_size and grad_accum must be positive")
        _check(self.batch_size % self.grad_accum == 0, "train.batch_size",
               f"global batch {self.batch_size} must be divisible by train.grad_accum {self.grad_accum}")
        _check(self.keep_last >= 1, "train.keep_last", "keep at least one checkpoint")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(self.on_save_error in ("stop", "continue"), "train.on_save_error", "use stop or continue")


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


@dataclass
class CPTConfig(StageConfig):
    data: TextDataConfig = field(default_factory=TextDataConfig)


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
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(not (self.dropout and "experts" in self.target_modules), "lora.dropout",
               "must be 0 when lora.target_modules includes 'experts' (peft cannot apply dropout inside fused "
               "expert weights); set lora.dropout=0")


@dataclass
class SFTConfig(StageConfig):
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class RLDataConfig:
    train: str = "tasks"  # "tasks" (built-in families) or a jsonl/json/parquet file of {prompt, answer, ...} rows
    eval: str = ""  # held-out rows (same format); empty with train=tasks = the families' eval split
    tasks: list = field(default_factory=lambda: ["addition"])  # when train == "tasks"
    task_options: dict = field(default_factory=dict)  # per-task generator options, e.g. {addition: {max_digits: 2}}
    num_train: int = 2000  # generated training prompts (data.train = tasks)
    num_eval: int = 64  # held-out prompts scored greedily at every eval
    prompt_field: str = "prompt"  # a string (one user turn) or a list of chat messages

    def __post_init__(self):
        _check(self.train in ("tasks", MISSING) or Path(self.train).is_file(), "data.train",
               f"'{self.train}' is neither 'tasks' nor an existing file of {{prompt, answer}} rows")
        _check(not self.eval or Path(self.eval).is_file(), "data.eval", f"'{self.eval}' is not an existing file")
        _check(self.num_train >= 1 and self.num_eval >= 0, "data.num_train", "need num_train >= 1, num_eval >= 0")


@dataclass
class RayConfig:
    enabled: bool = False  # false: rollouts and rewards run in-process (same results)
    address: str = ""  # "" = start a local Ray; "auto" = join a running cluster (Slurm)
    num_workers: int = 2  # RolloutWorker actors, each with a model copy
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per rollout actor
    num_cpus: int | None = None  # local Ray only: logical CPUs (default num_workers * cpus_per_worker + 1)
    max_chunk_retries: int = 3  # re-runs of one rollout chunk whose actor died
    reward_tasks: bool = True  # reward calls as Ray tasks (false: the local process pool)

    def __post_init__(self):
        _check(self.num_workers >= 1, "rl.ray.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "rl.ray.cpus_per_worker", "must be > 0")
        _check(self.max_chunk_retries >= 0, "rl.ray.max_chunk_retries", "must be >= 0")


@dataclass
class RLAlgoConfig(EBPOConfig):
    """The `rl` section: the estimator's own settings (EBPOConfig, validated there) plus rollouts,
    rewards and Ray. `minibatch_size` counts sequences over all ranks."""

    decode_mode: str = "S"  # threshold decoder preset for rollouts (S | Q | llada2.0)
    gen_length: int = 0  # response tokens; 0 = the longest train answer (+ EOS) in whole blocks
    threshold: float | None = None  # override of the preset's unmasking threshold
    editing_threshold: float | None = None  # override of the preset's T2T editing threshold
    temperature: float = 1.0  # rollout sampling temperature (evals decode greedily)
    top_k: int | None = None  # rollout top-k sampling (null = off)
    top_p: float | None = None  # rollout nucleus sampling (null = off)
    prompts_per_chunk: int = 2  # prompts (x G rows) per decode call; the unit of rollout seeding and sharding
    eval_mode: str = "Q"  # decoder preset for held-out accuracy and the exported generation config
    # [{fn: "module:function" or "file.py:function", weight, timeout_s, name, kwargs}], summed with weights
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(fn="llada_train.rl.rewards:exact_match")])
    rewards_on_error: float = 0.0  # score of a reward call that raises or times out
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(f"bad value for {e}") from e
        for key in ("decode_mode", "eval_mode"):
            _check(getattr(self, key) in DECODE_PRESETS, f"rl.{key}", f"use one of {sorted(DECODE_PRESETS)}")
        _check(self.gen_length >= 0, "rl.gen_length", "must be >= 0 (0 = from the longest train answer)")
        _check(self.prompts_per_chunk >= 1, "rl.prompts_per_chunk", "must be >= 1")
        try:  # the decoder's own rules for what rollouts will pass it
            check_sampling(self.threshold, self.editing_threshold, self.temperature, self.top_k, self.top_p)
        except ValueError as e:
            raise ConfigError(f"bad value in 'rl': {e}") from e
        _check(len(self.rewards) > 0, "rl.rewards",
               "list at least one reward, e.g. [{fn: 'llada_train.rl.rewards:exact_match'}]")

    def rollout_decoding(self, gen_length: int, block_length: int) -> dict:
        """What rollout decoding gets: {"mode": preset, **generate overrides}."""
        params = {"mode": self.decode_mode, "gen_length": gen_length, "block_length": block_length,
                  "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        for key in ("threshold", "editing_threshold"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params


@dataclass
class RLConfig(StageConfig):
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rl: RLAlgoConfig = field(default_factory=RLAlgoConfig)


SCHEMAS = {"cpt": CPTConfig, "sft": SFTConfig, "rl": RLConfig}


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


def load_config(stage: str, config_path: str | None = None, overrides: list[str] | None = None):
    """Resolved, validated config object (a dataclass instance) for `stage`."""
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage '{stage}'; expected one of {sorted(SCHEMAS)}")
    schema = SCHEMAS[stage]
    cfg = OmegaConf.structured(schema)
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
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
    except ConfigError:
        raise
    except ValueError as e:  # a component defined outside this module (rl.rewards entries)
        raise ConfigError(f"bad value: {e}") from e
    validate(obj)
    return obj


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg) -> None:
    """The checks that span sections (each section checked its own fields when it was built)."""
    d = cfg.diffusion
    if isinstance(cfg, (CPTConfig, SFTConfig)):
        key = "data.seq_len" if isinstance(cfg, CPTConfig) else "data.max_len"
        length = cfg.data.seq_len if isinstance(cfg, CPTConfig) else cfg.data.max_len
        _check(length % d.block_size == 0, key, f"{length} must be a multiple of diffusion.block_size {d.block_size}")
        for i, (_, size) in enumerate(d.block_schedule):
            _check(size == 0 or length % size == 0, f"diffusion.block_schedule[{i}]",
                   f"block size {size} must divide {key} {length} (or be 0 = whole sequence)")
    if isinstance(cfg, RLConfig):
        _check(cfg.train.grad_accum == 1, "train.grad_accum", "must be 1 for RL (optimizer steps per rollout batch "
               "come from rl.minibatch_size and rl.updates_per_batch)")


def model_preset_values(preset: str) -> dict:
    """LLaDA2MoeConfig keys from configs/model/<preset>.yaml or a YAML path."""
    import yaml

    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / "model" / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset: '{preset}' is neither a file nor one of {names}")
    return yaml.safe_load(path.read_text())


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


def reference_markdown() -> str:
    """docs/config.md: every key of every stage with its default and meaning (`python -m llada_train.config`)."""
    intro = ("Generated by `python -m llada_train.config > docs/config.md` from the schemas in "
             "`llada_train/config.py` (a test keeps it in sync). Set keys in a YAML file (`--config`) or as "
             "`dot.key=value` overrides; `--print-config` shows the resolved result.")
    out = ["# Config reference", "", intro, ""]
    shared = dict.fromkeys(r[0] for r in _reference_rows(StageConfig))
    out += ["## Keys every training stage shares (`cpt`, `sft`, `rl`)", "", "| key | default | meaning |",
            "|---|---|---|"]
    out += [f"| `{k}` | `{d}` | {c} |" for k, d, c in _reference_rows(StageConfig)]
    for stage, schema in SCHEMAS.items():
        out += ["", f"## `{stage}` only", "", "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{k}` | `{d}` | {c} |" for k, d, c in _reference_rows(schema) if k not in shared]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
