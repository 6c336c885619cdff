"""`llada-train pipeline`: CPT -> SFT -> RL in one run directory, each stage's hf/ feeding the next.

A pipeline file names each stage's own config and overrides it in place:

    out_dir: runs/demo
    stages: [cpt, sft, rl]
    sft:
      config: sft_tiny             # a preset name (llada_train/configs) or a YAML path
      train: {steps: 100}          # any key of the stage's schema

Command-line overrides address a stage by prefix (`sft.train.steps=100`) or the pipeline itself
(`out_dir=...`, `stages=[sft,rl]`, `report=false`). Every stage config is resolved and validated
before the first stage starts. A stage that finished leaves `DONE` in its directory and is skipped
when the pipeline is run again; an interrupted stage resumes from its newest checkpoint.
A pipeline may start from an autoregressive model: `convert:` (and `distill:`, `retention:`), see
`from_ar.py`.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import ConfigError, parse_override, to_yaml
from ..presets import resolve_config
from . import from_ar
from .registry import STAGES, get_stage, load_stage_config

DONE = "DONE"
TOP_KEYS = ("out_dir", "stages", "report")
SECTIONS = ("convert", "distill", "retention")  # from_ar.py


@dataclass
class Pipeline:
    out_dir: Path
    stages: list[str]
    report: bool
    configs: dict = field(default_factory=dict)  # stage -> resolved stage config
    ran: list = field(default_factory=list)  # stages this invocation ran (not finished earlier)
    convert: from_ar.ConvertStep | None = None
    distill: from_ar.DistillStep | None = None
    retention: from_ar.RetentionReport | None = None

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / stage


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    """{'train': {'steps': 5}} -> ['train.steps=5'] (values as YAML flow text, so lists survive)."""
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def _unknown(key: str, source: str) -> ConfigError:
    known = [*TOP_KEYS, *SECTIONS, *STAGES, *(f"{s}.config" for s in STAGES)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown pipeline key '{key}' (stage keys go under <stage>., e.g. sft.).{hint}")


def _split_overrides(overrides: list[str]) -> tuple[dict, dict]:
    """CLI overrides -> (pipeline-level {key: value} and {section: {key: value}}, {stage: ['key=value', ...]})."""
    top, per_stage = {}, {s: [] for s in STAGES}
    for item in overrides:
        key, value = parse_override(item)
        head, dot, rest = key.partition(".")
        if head in STAGES and dot:
            per_stage[head].append(f"{rest}={item.split('=', 1)[1]}")
        elif key in TOP_KEYS:
            top[key] = value
        elif head in SECTIONS and dot and "." not in rest:
            top.setdefault(head, {})[rest] = value
        else:
            raise _unknown(key, f"override '{item}'")
    return top, per_stage


def load_pipeline(path: str | None, overrides: list[str], resume: str | None = None) -> Pipeline:
    if not path:
        raise ConfigError("pipeline config not given (e.g. --config pipeline_tiny)")
    file = resolve_config(path)  # a file, else a preset name (llada_train/configs)
    raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True) or {}
    for key in raw:
        if key not in (*TOP_KEYS, *SECTIONS, *STAGES):
            raise _unknown(key, path)
    top, cli = _split_overrides(overrides)
    for key, value in top.items():
        raw[key] = {**(raw.get(key) or {}), **value} if key in SECTIONS else value
    stages = raw.get("stages", list(STAGES))
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"{path}: bad value for 'stages': {stages!r}; use a non-empty list from {list(STAGES)}")
    order = list(STAGES)  # the registration order
    if sorted(stages, key=order.index) != stages or len(set(stages)) != len(stages):
        raise ConfigError(f"{path}: 'stages' must keep the order {', '.join(order)} without repeats; got {stages}")
    convert, distill, retention = _ar_sections(raw, path)
    pipe = Pipeline(Path(raw.get("out_dir", "runs/pipeline")), stages, bool(raw.get("report", True)),
                    convert=convert, distill=distill, retention=retention)
    previous = None
    for stage in stages:
        section = dict(raw.get(stage) or {})
        stage_file = section.pop("config", None)  # a path (from the current directory) or a preset name
        wired = [f"run.out_dir={pipe.stage_dir(stage)}"]
        if previous is not None:
            wired.append(f"model.init_from={pipe.stage_dir(previous) / 'hf'}")
        elif pipe.convert is not None:
            wired.append(f"model.init_from={from_ar.converted_dir(pipe.out_dir)}")
        if stage == "sft" and pipe.distill is not None:
            wired.append(f"data.train={from_ar.distill_file(pipe.out_dir)}")
        if resume:
            wired.append(f"run.resume={resume}")
        try:
            pipe.configs[stage] = load_stage_config(stage, stage_file, _flatten(section) + cli[stage] + wired)
        except ConfigError as e:
            raise ConfigError(f"{path} [{stage}]: {e}") from e
        previous = stage
    return pipe


def _ar_sections(raw: dict, path: str) -> tuple:
    try:
        return from_ar.parse_sections(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def run_pipeline(pipe: Pipeline, log=print) -> bool:
    """Run the stages in order; True when all finished (False: a stage was stopped, resume later)."""
    if pipe.convert is not None:
        from_ar.prepare(pipe.out_dir, pipe.convert, pipe.distill, log=log)
    for stage in pipe.stages:
        done = pipe.stage_dir(stage) / DONE
        if done.is_file() and pipe.configs[stage].run.resume != "never":
            log(f"[pipeline] {stage}: finished earlier ({done}); delete it to run the stage again")
            continue
        pipe.ran.append(stage)
        log(f"[pipeline] {stage}: starting in {pipe.stage_dir(stage)}")
        if not get_stage(stage).runner()(pipe.configs[stage]):
            log(f"[pipeline] {stage}: stopped; run the same command again to resume it")
            return False
        if is_rank0():
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(to_yaml(pipe.configs[stage]))
    return True


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


__all__ = ["Pipeline", "load_pipeline", "run_pipeline"]
