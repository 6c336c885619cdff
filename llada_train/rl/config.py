"""The RL stage's config schema: the shared stage sections plus `data` (prompt rows) and `rl` (the
policy update, the estimators' own sections, rollouts, rewards, Ray). It lives with RL so that
`llada_train/config.py` stays free of decoding and RL imports."""

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from ..config import StageConfig, check_value
from ..decoding import DECODE_PRESETS, check_sampling
from ..errors import ConfigError, UserError
from .diffu_grpo import DiffuGRPOConfig
from .ebpo import EBPOConfig
from .policy import PolicyConfig
from .reward_calls import RewardSpec


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
        check_value(self.train in ("tasks", MISSING) or Path(self.train).is_file(), "data.train",
               f"'{self.train}' is neither 'tasks' nor an existing file of {{prompt, answer}} rows")
        check_value(not self.eval or Path(self.eval).is_file(), "data.eval", f"'{self.eval}' is not an existing file")
        check_value(self.num_train >= 1 and self.num_eval >= 0, "data.num_train", "need num_train >= 1, num_eval >= 0")


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
        check_value(self.num_workers >= 1, "rl.ray.num_workers", "must be >= 1")
        check_value(self.cpus_per_worker > 0, "rl.ray.cpus_per_worker", "must be > 0")
        check_value(self.max_chunk_retries >= 0, "rl.ray.max_chunk_retries", "must be >= 0")


@dataclass
class RLAlgoConfig(PolicyConfig):
    """The `rl` section: the policy update shared by every estimator (PolicyConfig), each registered
    estimator's own keys in its sub-section (`rl.ebpo`, `rl.diffu_grpo`), rollouts, rewards and Ray.
    `minibatch_size` counts sequences over all ranks."""

    ebpo: EBPOConfig = field(default_factory=EBPOConfig)
    diffu_grpo: DiffuGRPOConfig = field(default_factory=DiffuGRPOConfig)
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
        super().__post_init__()
        for key in ("decode_mode", "eval_mode"):
            check_value(getattr(self, key) in DECODE_PRESETS, f"rl.{key}", f"use one of {sorted(DECODE_PRESETS)}")
        check_value(self.gen_length >= 0, "rl.gen_length", "must be >= 0 (0 = from the longest train answer)")
        check_value(self.prompts_per_chunk >= 1, "rl.prompts_per_chunk", "must be >= 1")
        try:  # the decoder's own rules for what rollouts will pass it
            check_sampling(self.threshold, self.editing_threshold, self.temperature, self.top_k, self.top_p)
        except UserError as e:
            raise ConfigError(f"bad value in 'rl': {e}") from e
        check_value(len(self.rewards) > 0, "rl.rewards",
               "list at least one reward, e.g. [{fn: 'llada_train.rl.rewards:exact_match'}]")

    def estimator_options(self):
        """The chosen estimator's own section (None when it has no keys)."""
        return getattr(self, self.estimator, None)

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

    def validate(self) -> None:
        check_value(self.train.grad_accum == 1, "train.grad_accum", "must be 1 for RL (optimizer steps per rollout "
                    "batch come from rl.minibatch_size and rl.updates_per_batch)")
