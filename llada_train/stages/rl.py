"""EBPO reinforcement learning (docs/design.md §7): rollout -> rewards -> advantages -> θ_old terms -> μ updates.

One RL step = one Trainer step: `train.batch_size` prompts are drawn by the resumable batch
iterator, each gets `rl.group_size` completions (in-process or in Ray actors, `rl/rollout.py`),
rewards score them (`rl/reward_scoring.py`), and the estimator named by `rl.estimator` (registered in
`rl/estimators.py`; EBPO by default) turns them into clipped likelihood-ratio updates, one optimizer
step per minibatch. Every random draw is seeded from (run.seed, step, ...), so a
resumed run repeats the uninterrupted one. Scaling: one learner process with rollouts in
`rl.ray.num_workers` Ray actors, or data parallelism under torchrun (each rank rolls out, scores
and trains on its share of the prompts; gradients are averaged), rollouts in-process per rank.
"""

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from ..data.chat import render_prompt
from ..data.prompts import load_rl_rows, response_budget
from ..data.tasks import is_checkable, row_correct
from ..data.text import BatchIterator
from ..decoding import complete, generation_config_dict
from ..engine import init_distributed, reduce_over_ranks
from ..errors import ConfigError
from ..rl.estimators import get_estimator
from ..rl.reward_scoring import RewardComputer
from ..rl.rollout import build_rollouts, ray_reward_executor, rollout_step, stable_seed
from ..trainer import BatchSource, Trainer
from .common import build_model, build_tokenizer


def run_rl(cfg, eval_fn=None) -> bool:
    """Returns True when training finished (False when stopped by a signal or bad steps). `eval_fn`
    `(engine, step) -> metrics` replaces the held-out evaluation (benchmarks/bench_rl_estimators.py)."""
    rank, world = init_distributed()
    check_data_parallel(cfg, world)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.run.seed, engine=cfg.engine)
    train_rows, eval_rows = load_rl_rows(cfg.data, cfg.run.seed)
    if len(train_rows) < cfg.train.batch_size:
        raise ConfigError(f"data.train {cfg.data.train!r}: {len(train_rows)} prompts, fewer than one step's "
                         f"train.batch_size {cfg.train.batch_size}")
    gen_length = rl_response_budget(cfg, tokenizer, train_rows)
    ref_model = None
    if cfg.rl.kl_beta > 0:  # the frozen starting policy
        ref_model = build_model(cfg.model, tokenizer, cfg.run.seed).eval().requires_grad_(False)
    rewards = RewardComputer(list(cfg.rl.rewards), cfg.rl.rewards_on_error,
                             executor=ray_reward_executor if cfg.rl.ray.enabled and cfg.rl.ray.reward_tasks else None)
    decode = cfg.rl.rollout_decoding(gen_length, cfg.diffusion.block_size)
    rollouts = build_rollouts(cfg.rl.ray, model, decode)
    try:
        iterator = BatchIterator(len(train_rows), cfg.train.batch_size, seed=cfg.run.seed, rank=rank, world_size=world)
        batches = BatchSource({"index": torch.arange(len(train_rows))}, iterator)
        step_fn = rl_step_fn(cfg, tokenizer, train_rows, rollouts, rewards, ref_model, rank, world)
        if eval_fn is None and eval_rows:
            eval_fn = rl_eval_fn(cfg, tokenizer, eval_rows, rewards, gen_length, rank, world, rollouts)
        trainer = Trainer(cfg, "rl", model, tokenizer, batches, loss_fn=None, eval_fn=eval_fn,
                          generation_config=generation_config_dict(cfg.rl.eval_mode, gen_length=gen_length,
                                                                   block_length=cfg.diffusion.block_size),
                          step_fn=step_fn, eval_at_start=True, rank=rank, world_size=world)
        trainer.log(f"{len(train_rows)} train prompts, {len(eval_rows)} held-out; gen_length {gen_length}; "
                    f"rollouts {f'in Ray ({cfg.rl.ray.num_workers} workers)' if cfg.rl.ray.enabled else 'in-process'}")
        return trainer.fit()
    finally:
        rollouts.close()
        rewards.close()


def check_data_parallel(cfg, world: int) -> None:
    """Settings that cannot work with `world` data-parallel ranks."""
    if world == 1:
        return
    if cfg.rl.ray.enabled:
        raise ConfigError(f"rl under torchrun ({world} ranks): each rank decodes its own prompts in-process; set "
                         "rl.ray.enabled=false (Ray rollout workers serve a one-process learner)")
    if cfg.rl.minibatch_size and cfg.rl.minibatch_size % world:
        raise ConfigError(f"rl.minibatch_size {cfg.rl.minibatch_size} (sequences per optimizer step over all ranks) "
                         f"must be a multiple of the {world} ranks")


# ---- data -----------------------------------------------------------------------------------------


def rl_response_budget(cfg, tokenizer, rows: list[dict]) -> int:
    """`rl.gen_length`, or the longest `answer` (+ EOS) of the train rows in whole blocks."""
    if cfg.rl.gen_length:
        return cfg.rl.gen_length
    answers = [str(r["answer"]) for r in rows if r.get("answer") is not None]
    if not answers:
        raise ConfigError("rl.gen_length = 0 needs an `answer` column to size responses; set rl.gen_length")
    return response_budget(tokenizer, answers, cfg.diffusion.block_size)


def _prompt_text(prompt, tokenizer) -> str:
    return prompt if isinstance(prompt, str) else render_prompt(prompt, tokenizer)


def _reward_columns(rows: list[dict], prompt_field: str, group_size: int) -> dict:
    keys = sorted({k for r in rows for k in r} - {prompt_field})
    return {k: [r.get(k) for r in rows for _ in range(group_size)] for k in keys}


# ---- one RL step ----------------------------------------------------------------------------------


def _mean_over_ranks(metrics: dict, world: int) -> dict:
    """Each metric's mean over the ranks that report it (a rank without minibatches has no clip
    fractions, so the key sets can differ: gathered as objects, not reduced as tensors)."""
    if world == 1:
        return metrics
    gathered = [None] * world
    dist.all_gather_object(gathered, metrics)
    keys = sorted({k for m in gathered for k in m})
    return {k: sum(m[k] for m in gathered if k in m) / sum(k in m for m in gathered) for k in keys}


def rl_step_fn(cfg, tokenizer, rows: list[dict], rollouts, rewards: RewardComputer, ref_model,
               rank: int = 0, world: int = 1):
    """Trainer `step_fn`: one rollout batch and its μ × minibatch optimizer steps. Under data
    parallelism each rank rolls out, scores and trains on its own prompts (its own rollout and
    mask seeds); DeepSpeed averages the gradients, and every rank takes the same optimizer steps."""
    # rl.minibatch_size counts sequences over all ranks; each rank takes its share
    ecfg = replace(cfg.rl, minibatch_size=cfg.rl.minibatch_size // world if cfg.rl.minibatch_size else None)
    build, update = get_estimator(ecfg.estimator).steps()
    options = ecfg.estimator_options()
    group = cfg.rl.group_size
    field = cfg.data.prompt_field
    seed = cfg.run.seed if world == 1 else stable_seed(cfg.run.seed, "rank", rank)

    def step_fn(engine, batch, step, optimizer_step) -> dict:
        chosen = [rows[i] for i in batch["index"].tolist()]
        model = engine.module
        rollouts.publish(engine)  # the weights after the previous step's updates
        roll = rollout_step(rollouts, tokenizer, [r[field] for r in chosen], group_size=group,
                            prompts_per_chunk=cfg.rl.prompts_per_chunk, seed=seed, step=step,
                            eos_token_id=model.config.eos_token_id, block_length=cfg.diffusion.block_size)
        prompts = [_prompt_text(r[field], tokenizer) for r in chosen for _ in range(group)]
        columns = {**_reward_columns(chosen, field, group), "completion_ids": roll.completion_ids}
        start = time.perf_counter()
        scored = rewards.score(prompts, roll.completions, columns)
        reward_s = time.perf_counter() - start
        generator = torch.Generator().manual_seed(stable_seed(seed, step, "ebpo"))
        device = next(model.parameters()).device  # rollouts come back on the CPU
        if ref_model is not None:
            ref_model.to(device)  # built before the engine placed the policy; a no-op after the first step
        with engine.counting_forwards() as forwards:
            update_batch, batch_metrics = build(engine, roll.input_ids.to(device), roll.response_mask.to(device),
                                                torch.tensor(scored.total), ecfg, options,
                                                block_size=cfg.diffusion.block_size, pad_mask=roll.pad_mask.to(device),
                                                ref_model=ref_model, generator=generator)
        if engine.sharded:  # θ_old scoring took as many forwards as this rank kept rows for
            engine.join_forwards(forwards[0])
        engine.train()
        steps_per_pass = None  # data parallelism: every rank joins the most minibatches any rank has
        if world > 1:
            own = len(update_batch.minibatch_bounds(ecfg.minibatch_size))
            steps_per_pass = int(reduce_over_ranks(own, op="max")[0])
        history = update(engine, joining_step(engine, optimizer_step), update_batch, ecfg, options,
                         generator=generator, steps_per_pass=steps_per_pass)
        metrics = {k: v for k, v in scored.metrics.items()}
        metrics.update({k: float(v) for k, v in batch_metrics.items()})
        keys = sorted({k for h in history for k in h})
        metrics.update({k: sum(h[k] for h in history if k in h) / len(history) for k in keys})
        metrics.setdefault("loss", 0.0)  # no update when every group had zero variance
        metrics.update({
            "updates": float(len(history)),
            "rollout/tokens_per_forward": roll.tokens_per_forward,
            "rollout/response_len": roll.lengths.float().mean().item(),
            "rollout/tokens_per_s": roll.lengths.sum().item() / max(roll.seconds, 1e-9),
            "rollout/seconds": roll.seconds,
            "reward_seconds": reward_s,
            "step_tokens": int(reduce_over_ranks(float(roll.pad_mask.sum()))[0]),
        })
        return _mean_over_ranks(metrics, world)

    return step_fn


def joining_step(engine, optimizer_step):
    """`optimizer_step`, where a rank with no minibatch left (`None`) still runs a forward when
    forwards are collectives (`engine.sharded`), so the ranks' gathers and all-to-alls pair up."""
    if not engine.sharded:
        return optimizer_step
    return lambda loss: optimizer_step(engine.placeholder_loss() if loss is None else loss)


# ---- held-out evaluation --------------------------------------------------------------------------


def rl_eval_fn(cfg, tokenizer, rows: list[dict], rewards: RewardComputer, gen_length: int,
               rank: int = 0, world: int = 1, rollouts=None):
    """Greedy `rl.eval_mode` decoding of the held-out prompts: exact-match accuracy (task rows, via
    tasks.row_correct; per family too when there are several), mean reward and tokens per forward.
    Under data parallelism each rank decodes every `world`-th prompt and the sums are combined."""
    field = cfg.data.prompt_field
    bsz = max(cfg.train.batch_size * cfg.rl.group_size // world, 1)
    mine = rows[rank::world]
    tasks = sorted({r["task"] for r in rows if is_checkable(r)})

    def eval_fn(engine, step) -> dict:
        model = engine.module
        if engine.sharded:  # decode with a gathered full copy: each rank's prompts take their own forwards
            rollouts.publish(engine)
            model = rollouts.model
        done = complete(model, tokenizer, [r[field] for r in mine], mode=cfg.rl.eval_mode, gen_length=gen_length,
                        block_length=cfg.diffusion.block_size, batch_size=bsz) if mine else None
        texts = done.texts if done else []
        graded = [(r["task"], row_correct(r, t)) for r, t in zip(mine, texts, strict=True) if is_checkable(r)]
        scores = []
        if done:
            columns = {**_reward_columns(mine, field, 1), "completion_ids": done.token_ids}
            scores = rewards.score([_prompt_text(r[field], tokenizer) for r in mine], texts, columns).total
        n, tpf, reward, *counts = reduce_over_ranks(
            len(mine), sum(done.tokens_per_forward) if done else 0.0, sum(scores), *_task_counts(graded, tasks))
        metrics = {"tokens_per_forward": tpf / n, "reward": reward / n}
        if sum(counts[0::2]):
            metrics["accuracy"] = sum(counts[1::2]) / sum(counts[0::2])
        if len(tasks) > 1:  # one accuracy per family: `accuracy/rg:countdown`, ...
            metrics.update({f"accuracy/{task}": counts[2 * i + 1] / counts[2 * i]
                            for i, task in enumerate(tasks) if counts[2 * i]})
        return metrics

    return eval_fn


def _task_counts(graded: list[tuple[str, bool]], tasks: list[str]) -> list[int]:
    """(rows, right) of each task in `tasks` order, flattened: the same length on every rank."""
    return [x for task in tasks for x in (sum(t == task for t, _ in graded), sum(ok for t, ok in graded if t == task))]


__all__ = [
    "check_data_parallel",
    "rl_eval_fn",
    "rl_step_fn",
    "run_rl",
]
