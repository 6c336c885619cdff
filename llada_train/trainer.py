"""The loop shared by every stage: step, log, eval, checkpoint, signals, export.

A stage supplies a model, a batch source (with a resumable position) and a loss function;
the trainer owns everything else, so CPT, SFT and RL behave the same under failure and resume.
"""

import hashlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt_lib
from .config import to_dict, to_yaml
from .engine import Engine, build_engine, init_distributed, reduce_over_ranks
from .errors import ConfigError
from .loggers import MetricLoggers
from .progress import progress


@dataclass
class BatchSource:
    """Rows of a tensor dataset served by a resumable index iterator (rank-sharded)."""

    tensors: dict  # name -> (N, ...) tensor
    iterator: object  # data.text.BatchIterator

    def next(self) -> dict:
        idx = next(self.iterator)
        return {k: v[idx] for k, v in self.tensors.items()}

    def state_dict(self) -> dict:
        return self.iterator.state_dict()

    def load_state_dict(self, state: dict):
        self.iterator.load_state_dict(state)


@dataclass
class Trainer:
    cfg: object  # a StageConfig
    stage: str
    model: torch.nn.Module
    tokenizer: object
    batches: BatchSource
    loss_fn: Callable  # (model, batch, step, generator) -> (loss, metrics)
    eval_fn: Callable | None = None  # (model, step) -> metrics
    generation_config: dict | None = None
    export_model_fn: Callable | None = None  # (engine) -> (model, state_dict) for hf/; default: as trained
    # (engine, batch, step, optimizer_step) -> metrics: a stage with its own loop of optimizer steps
    # (RL) replaces the micro-batch loop and takes each step through `optimizer_step`; metrics may
    # carry `step_tokens` (tokens this step).
    step_fn: Callable | None = None
    eval_at_start: bool = False  # evaluate before the first step of a fresh run (RL's baseline)
    rank: int = 0
    world_size: int = 1
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    bad_steps_total: int = 0  # all skipped steps of the run (metrics `bad_steps_total`)
    _voided: bool = False  # this step met a non-finite loss on some rank
    _stop_signal: list = field(default_factory=list)
    # set by setup()
    micro_batch: int = field(init=False, default=0)  # sequences per forward on this rank
    engine: Engine | None = field(init=False, default=None)
    config_hash: str = field(init=False, default="")  # of the resolved config, stored in checkpoints
    loggers: MetricLoggers | None = field(init=False, default=None)  # run.loggers' sinks (rank 0)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
            if self.generation_config:
                (self.run_dir / ckpt_lib.GENERATION_CONFIG).write_text(json.dumps(self.generation_config, indent=1))
        per_rank = self.cfg.train.batch_size // self.world_size
        if per_rank * self.world_size != self.cfg.train.batch_size or per_rank % self.cfg.train.grad_accum:
            raise ConfigError(
                f"train.batch_size {self.cfg.train.batch_size} must split evenly over {self.world_size} ranks "
                f"and train.grad_accum {self.cfg.train.grad_accum} micro-batches"
            )
        self.micro_batch = per_rank // self.cfg.train.grad_accum
        self.engine = build_engine(self.model, self.cfg, self.micro_batch)
        self.config_hash = hashlib.sha256(to_yaml(self.cfg).encode()).hexdigest()[:16]
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, _frame: self._stop_signal.append(signum))
        self._maybe_resume()
        if self.rank == 0:
            self.loggers = MetricLoggers(self.run_dir, self.cfg.run, to_dict(self.cfg), self.stage,
                                         resumed=self.step > 0, warn=self.log)

    def _maybe_resume(self):
        mode = self.cfg.run.resume
        if mode == "never":
            return
        ckpt = Path(mode) if mode != "auto" else ckpt_lib.find_resume_checkpoint(self.run_dir, self.log)
        if ckpt is None:
            return
        state = ckpt_lib.load_checkpoint(self.engine, ckpt)
        if state.get("config_hash") != self.config_hash:
            self.log(f"note: resuming {ckpt} written with a different config (hash {state.get('config_hash')})")
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.bad_steps_total = state.get("bad_steps_total", 0)
        self.batches.load_state_dict(state["data"])
        self.log(f"resumed from {ckpt} at step {self.step}")

    # ---- logging --------------------------------------------------------------------------------

    def log(self, msg: str):
        if self.rank == 0:
            tqdm.write(f"[{self.stage}] {msg}")

    def _write_metrics(self, record: dict):
        if self.loggers is not None:
            self.loggers.log(record)

    # ---- the loop -------------------------------------------------------------------------------

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """Noise RNG derived from (seed, step, rank, micro): resume needs no generator state."""
        seed = hash((self.cfg.run.seed, step, self.rank, micro)) % (2**63)
        return torch.Generator().manual_seed(seed)

    def _any_rank(self, flag: bool) -> bool:
        return bool(reduce_over_ranks(float(flag), op="max")[0])

    def train_step(self) -> dict:
        """One step, from `step_fn` (a stage that owns its loop) or the micro-batch loop; both take
        their optimizer steps through `optimizer_step`, and the expert-bias update and skipped-step
        counters are kept here for both."""
        batch = self.batches.next()
        self._voided = False
        self.engine.train()
        if self.step_fn is not None:
            metrics = self.step_fn(self.engine, batch, self.step, self.optimizer_step)
        else:
            metrics = self._micro_batch_step(batch)
        if not self._voided:
            self.engine.run_step_hooks()
        self.bad_steps = self.bad_steps + 1 if self._voided else 0
        self.bad_steps_total += int(self._voided)
        metrics["bad_step"] = float(self._voided)
        metrics["bad_steps_total"] = self.bad_steps_total
        return metrics

    def optimizer_step(self, loss: torch.Tensor | None) -> torch.Tensor:
        """Backward + optimizer step. A non-finite loss on any rank voids the rest of this trainer
        step on every rank (a zero loss at lr 0, so the collectives still match); `loss` None is a
        rank with nothing to contribute joining the step. Returns the loss used."""
        nonfinite = loss is not None and not torch.isfinite(loss).item()
        self._voided = self._any_rank(nonfinite) or self._voided
        return self.engine.step(loss, void=self._voided)

    def _micro_batch_step(self, batch: dict) -> dict:
        """grad_accum micro-batches, one optimizer step (DeepSpeed accumulates until the last)."""
        micro = {k: v.chunk(self.cfg.train.grad_accum) for k, v in batch.items()}
        totals = {}
        for i in range(self.cfg.train.grad_accum):
            part = {k: v[i] for k, v in micro.items()}
            loss, metrics = self.loss_fn(self.engine, part, self.step, self._generator(self.step, i))
            loss = self.optimizer_step(loss)
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.cfg.train.grad_accum
        return totals

    def fit(self) -> bool:
        """Train to `train.steps`; True when finished, False when stopped (signal, bad steps, failed
        save). Whatever happens, the metric sinks are closed before returning or raising, a W&B run
        marked with the CLI's exit code (0 finished, 3 stopped, 1 crashed)."""
        finished = None
        try:
            finished = self._fit()
            return finished
        finally:
            if self.loggers is not None:
                self.loggers.close(exit_code=0 if finished else 1 if finished is None else 3)

    def _fit(self) -> bool:
        self.setup()
        cfg = self.cfg.train
        tokens_per_step = cfg.batch_size * next(iter(self.batches.tensors.values())).shape[-1]
        bar = progress(cfg.steps, initial=self.step, desc=self.stage, disable=self.rank != 0)
        start = time.time()
        if self.eval_fn and self.eval_at_start and self.step == 0:
            self.evaluate()
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.step += 1
            self.tokens_seen += int(metrics.pop("step_tokens", tokens_per_step))
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.bad_steps:
                record = {"step": self.step, "tokens": self.tokens_seen,
                          "lr": self.engine.lr,
                          "elapsed_s": round(time.time() - start, 2), **metrics}
                self._write_metrics(record)
            if self.bad_steps >= cfg.max_bad_steps:
                self.log(f"stopping: {self.bad_steps} consecutive non-finite steps (train.max_bad_steps), "
                         f"steps {self.step - self.bad_steps + 1}..{self.step}, were skipped; the newest checkpoint "
                         "predates them. Check the data and optim.lr before resuming")
                self._write_metrics({"step": self.step, "stopped": "max_bad_steps"})
                return False
            if self.eval_fn and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                self.evaluate()
            preempted = self._any_rank(bool(self._stop_signal))
            if self.step % cfg.save_every == 0 or self.step == cfg.steps or preempted:
                if self.bad_steps and not preempted:  # keep the newest checkpoint from before the streak
                    self.log(f"not saving step {self.step}: {self.bad_steps} non-finite step(s) in a row")
                elif not self.save():
                    self._write_metrics({"step": self.step, "stopped": "save_error"})
                    return False
            if preempted:
                self.log(f"signal received: saved step {self.step}, exiting for requeue")
                if self.rank == 0:
                    (self.run_dir / "PREEMPTED").write_text(str(self.step))
                return False
        bar.close()
        if cfg.export_hf:
            self.export()
        return True

    def evaluate(self):
        self.engine.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.engine, self.step)
        self.engine.train()
        self._write_metrics({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
        self.log(f"step {self.step}: " + ", ".join(f"eval/{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def save(self) -> bool:
        """Write a checkpoint; False when it failed and train.on_save_error is `stop`."""
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.batches.state_dict(),
                 "config_hash": self.config_hash, "stage": self.stage, "world_size": self.world_size,
                 "expert_parallel": self.engine.expert_parallel,
                 "bad_steps_total": self.bad_steps_total}
        try:
            ckpt_lib.save_checkpoint(self.engine, self.run_dir, self.step, state, self.cfg.train.keep_last)
        except ckpt_lib.CheckpointSaveError as e:
            self._write_metrics({"step": self.step, "save_failed": 1})
            if self.cfg.train.on_save_error == "stop":
                self.log(f"stopping: {e}. Free disk space and rerun with --resume auto "
                         "(train.on_save_error=continue keeps training instead)")
                return False
            self.log(f"warning: {e}; training continues (train.on_save_error=continue)")
        return True

    def export(self):
        if self.export_model_fn is not None:
            model, state = self.export_model_fn(self.engine)
        else:
            model, state = self.engine.module, self.engine.full_state_dict()
        if self.rank == 0:
            out = ckpt_lib.export_hf(model, state, self.tokenizer, self.run_dir / "hf", self.generation_config)
            self.log(f"exported {out}")
        if dist.is_initialized():
            dist.barrier()


__all__ = ["BatchSource", "Trainer", "init_distributed"]
