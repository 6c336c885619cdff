"""Where the trainer's metric records go: metrics.jsonl (always), TensorBoard, Weights & Biases.

`run.loggers` picks the sinks. metrics.jsonl is the record of truth (the report and the tests read
it); the others plot it. W&B is optional in the strong sense: any exception from wandb (bad
settings, no login, no network, a dead service) becomes one warning and turns that sink off, so
experiment tracking can never stop a training run. See docs/tracking.md.
"""

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

SINKS = ("jsonl", "tensorboard", "wandb")  # the valid `run.loggers` names
DEFAULT_PROJECT = "llada-train"
ID_FILE = "wandb_run_id"  # in the run directory: a resumed stage continues the same W&B run


def scalars(record: dict) -> dict:
    """The record's numbers but `step` (the x-axis): what TensorBoard and W&B plot."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


def wandb_target(settings, run_name: str) -> dict:
    """project/entity/name for wandb.init: `run.wandb.*`, else WANDB_PROJECT / WANDB_ENTITY /
    WANDB_NAME, else project llada-train, wandb's default entity and `run.name`."""
    return {"project": settings.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            "entity": settings.entity or os.environ.get("WANDB_ENTITY") or None,
            "name": settings.name or os.environ.get("WANDB_NAME") or run_name}


class WandbSink:
    """One W&B run whose files live in `run_dir/wandb/`. Every wandb call goes through `_guard`:
    the first exception is one warning and turns the sink off for the rest of the run."""

    def __init__(self, warn: Callable[[str], None]):
        self.run = None
        self.warn = warn

    @classmethod
    def start(cls, run_dir: Path, target: dict, config: dict, job_type: str, resumed: bool,
              warn: Callable[[str], None]) -> "WandbSink":
        sink = cls(warn)
        sink.run = sink._guard("wandb.init", _init_run, run_dir, target, config, job_type, resumed)
        return sink

    def _guard(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never stop training, whatever wandb raises
            self.run = None
            detail = " ".join(str(e).split())[:300]
            self.warn(f"warning: W&B logging is off from here ({what} failed: {type(e).__name__}: {detail}); "
                      "training goes on and metrics.jsonl stays complete. Check WANDB_MODE, WANDB_API_KEY or "
                      "`wandb login` (WANDB_MODE=offline needs no network), or drop wandb from run.loggers")
            return None

    def log(self, values: dict, step: int | None = None):
        if self.run is not None:
            self._guard("wandb.log", self.run.log, values, step=step)

    def log_images(self, paths: dict):
        """PNG files as wandb.Image, {key: path}."""
        if self.run is not None:
            import wandb

            self._guard("wandb.log", lambda: self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()}))

    def finish(self, exit_code: int = 0):
        run, self.run = self.run, None
        if run is not None:
            self._guard("wandb.finish", run.finish, exit_code=exit_code)


def _init_run(run_dir: Path, target: dict, config: dict, job_type: str, resumed: bool):
    """wandb.init with the run id kept in the run directory: a stage resumed from a checkpoint
    continues its W&B run, a fresh start (no checkpoint) begins a new one."""
    import wandb

    id_file = run_dir / ID_FILE
    if not (resumed and id_file.is_file()):
        id_file.write_text(uuid.uuid4().hex[:12])
    return wandb.init(**target, config=config, job_type=job_type, dir=str(run_dir),
                      id=id_file.read_text().strip(), resume="allow")


class MetricLoggers:
    """The sinks `run.loggers` names, fed one metrics record at a time (rank 0 only)."""

    def __init__(self, run_dir: Path, run_cfg, config: dict, job_type: str, resumed: bool,
                 warn: Callable[[str], None]):
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if "tensorboard" in run_cfg.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in run_cfg.loggers:
            target = wandb_target(run_cfg.wandb, run_cfg.name)
            self.wandb = WandbSink.start(run_dir, target, config, job_type, resumed, warn)

    def log(self, record: dict):
        """metrics.jsonl first (it must not depend on the others), then the plotting sinks."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars(record)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None and values:
            self.wandb.log(values, step=record["step"])

    def close(self, exit_code: int = 0):
        """exit_code as the CLI's (0 finished, 3 stopped, 1 crashed): W&B marks the run by it."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code)


def log_report(out_dir: Path, configs: dict, plots: dict, warn: Callable[[str], None]) -> None:
    """A finished pipeline's report plots ({key: file in out_dir}) as a short W&B run named
    `<out_dir name>-report` (job type `report`) in the project of the last stage that logged to
    W&B; nothing when no stage did. Its id is kept in out_dir, so a rewritten report continues it."""
    runs = [cfg.run for cfg in configs.values() if "wandb" in cfg.run.loggers]
    if not runs:
        return
    out_dir = Path(out_dir)
    target = {**wandb_target(runs[-1].wandb, ""), "name": f"{out_dir.resolve().name}-report"}
    config = {"out_dir": str(out_dir), "stages": list(configs)}
    sink = WandbSink.start(out_dir, target, config, "report", resumed=True, warn=warn)
    sink.log_images({f"report/{key}": out_dir / name for key, name in plots.items() if (out_dir / name).is_file()})
    sink.finish()
