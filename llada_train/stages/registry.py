"""The training stages, registered once: `llada-train <stage>`, `llada-train pipeline` (which runs
them in registration order) and `llada-train submit` (Slurm) all read this registry, so a new
stage is one `register_stage` call.

Schemas and run functions may be given as "module:name" so that `--help` and config loading do not
import torch, DeepSpeed or the stage's data code.
"""

from collections.abc import Callable
from dataclasses import dataclass

from ..config import load_config, reference_markdown
from ..errors import ConfigError
from ..refs import resolve_ref


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line for `llada-train --help`
    schema: type | str  # the stage's config dataclass (a StageConfig), or "module:Class"
    run: Callable | str  # (cfg) -> bool: True finished, False stopped (resumable); or "module:function"

    def config_schema(self) -> type:
        return resolve_ref(self.schema)

    def runner(self) -> Callable:
        return resolve_ref(self.run)


STAGES: dict[str, Stage] = {}


def register_stage(name: str, summary: str, schema: type | str, run: Callable | str) -> Stage:
    if name in STAGES:
        raise ValueError(f"stage '{name}' is registered already")
    STAGES[name] = Stage(name, summary, schema, run)
    return STAGES[name]


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; expected one of {list(STAGES)}")
    return STAGES[name]


def load_stage_config(name: str, config_path: str | None = None, overrides: list[str] | None = None):
    """The resolved, validated config of the registered stage `name` (`config.load_config`)."""
    return load_config(get_stage(name).config_schema(), config_path, overrides)


register_stage("cpt", "continual pre-training on a text corpus", "llada_train.config:CPTConfig",
               "llada_train.stages.cpt:run_cpt")
register_stage("sft", "supervised fine-tuning on chat data", "llada_train.config:SFTConfig",
               "llada_train.stages.sft:run_sft")
register_stage("rl", "reinforcement learning (EBPO) with reward functions", "llada_train.rl.config:RLConfig",
               "llada_train.stages.rl:run_rl")


if __name__ == "__main__":  # docs/config.md
    print(reference_markdown({s.name: s.config_schema() for s in STAGES.values()}), end="")
