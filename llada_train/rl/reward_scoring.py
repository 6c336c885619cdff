"""Batch scoring: every reward function once per batch, concurrently, through an executor (the
local worker pool by default; the Ray layer passes its own, see `RewardExecutor`); weighted sums,
per-function metrics, and `rewards_on_error` for a call that raises or times out (counted, never
fatal)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..errors import UserError
from .reward_calls import RewardError, RewardExecutor, RewardSpec, Scores, canonical_spec, check_scores, resolve_reward
from .reward_pool import LocalRewardPool, describe_exception

log = logging.getLogger(__name__)



@dataclass
class RewardBatch:
    total: list[float]  # (B,) weighted sum of the applicable (non-None) scores; 0 if none applies
    scores: dict[str, Scores]  # name -> (B,) raw scores as used (rewards_on_error after a failure)
    errors: dict[str, str]  # name -> what went wrong in this batch
    # reward/<name>/{mean,std} over applicable scores, /applicable (fraction), /errors and /timeouts
    # (cumulative counts since the computer was built), reward/total/{mean,std}
    metrics: dict[str, float]


class RewardComputer:
    """Scores batches with a weighted sum of reward functions; failures are scored, counted, logged."""

    def __init__(self, specs: Sequence[RewardSpec], rewards_on_error: float = 0.0,
                 executor: RewardExecutor | None = None):
        if not specs:
            raise UserError("rl.rewards: at least one reward function is required")
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"rl.rewards: duplicate reward names {dup}; give each spec a distinct `name`")
        for s in specs:
            resolve_reward(canonical_spec(s.fn))  # fail at startup, not at the first batch
        self.specs = [replace(s, fn=canonical_spec(s.fn)) for s in specs]
        self.rewards_on_error = float(rewards_on_error)
        self._executor = executor
        self._own_pool: LocalRewardPool | None = None
        self.error_counts = {n: 0 for n in names}
        self.timeout_counts = {n: 0 for n in names}

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              columns: Mapping[str, Sequence] | None = None, *,
              executor: RewardExecutor | None = None) -> RewardBatch:
        """`columns`: dataset columns of the rows plus `completion_ids`, each with one entry per completion."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"rewards: {len(prompts)} prompts for {n} completions (repeat each prompt per completion)")
        columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in columns.items():
            if len(v) != n:
                raise ValueError(f"rewards: column {k!r} has {len(v)} entries for {n} completions")
        run = executor or self._executor or self._pool()
        prompts, completions = list(prompts), list(completions)
        with ThreadPoolExecutor(len(self.specs)) as threads:
            futures = [threads.submit(run, s, prompts, completions, {**columns, **s.kwargs}) for s in self.specs]
            outcomes = [self._outcome(s, f, n) for s, f in zip(self.specs, futures, strict=True)]
        scores = {s.name: o[0] for s, o in zip(self.specs, outcomes, strict=True)}
        errors = {s.name: o[1] for s, o in zip(self.specs, outcomes, strict=True) if o[1] is not None}
        total = []
        for i in range(n):
            applicable = [(s.weight, scores[s.name][i]) for s in self.specs if scores[s.name][i] is not None]
            total.append(float(sum(w * v for w, v in applicable)))
        return RewardBatch(total=total, scores=scores, errors=errors, metrics=self._metrics(scores, total))

    def _outcome(self, spec: RewardSpec, future, n: int) -> tuple[Scores, str | None]:
        try:
            return check_scores(future.result(), n, spec.fn), None
        except TimeoutError as e:
            self.timeout_counts[spec.name] += 1
            msg = str(e) or f"timeout after {spec.timeout_s}s"
        except Exception as e:
            self.error_counts[spec.name] += 1
            msg = str(e) if isinstance(e, RewardError) else describe_exception(e)
        log.warning("reward %r failed, scoring %s for this batch: %s", spec.name, self.rewards_on_error, msg)
        return [self.rewards_on_error] * n, msg

    def _metrics(self, scores: dict[str, Scores], total: list[float]) -> dict[str, float]:
        metrics = {}
        for name, vals in [*scores.items(), ("total", total)]:
            xs = [v for v in vals if v is not None]
            if xs:
                mean = sum(xs) / len(xs)
                metrics[f"reward/{name}/mean"] = mean
                metrics[f"reward/{name}/std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
            if name != "total":
                metrics[f"reward/{name}/applicable"] = len(xs) / max(len(vals), 1)
                metrics[f"reward/{name}/errors"] = float(self.error_counts[name])
                metrics[f"reward/{name}/timeouts"] = float(self.timeout_counts[name])
        return metrics

    def _pool(self) -> LocalRewardPool:
        if self._own_pool is None:
            self._own_pool = LocalRewardPool()
        return self._own_pool

    def close(self) -> None:
        if self._own_pool is not None:
            self._own_pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
