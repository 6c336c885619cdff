"""RL stage: Ray rollouts equal in-process ones, a killed actor loses no prompt, the CLI loop runs with
failing rewards, exports, and resumes exactly. (Reward timeouts/errors/None at the pool level and the
EBPO maths are covered in test_rewards.py and test_ebpo.py.)"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from llada_train.cli import main
from llada_train.config import ConfigError
from llada_train.data.tokenizer import load_tokenizer
from llada_train.rl.config import RayConfig
from llada_train.rl.rollout import LocalRollouts, RayRollouts, rollout_step
from llada_train.stages.registry import load_stage_config
from tests.conftest import CONFIGS, REPO, tiny_config
from tests.test_cpt import free_port

PROMPTS = ["sort 3141", "reverse abc", "sort 987", "copy xyz", "max 3,9,4", "sort 55", "reverse hello", "copy q"]
DECODE = {"mode": "S", "gen_length": 8, "block_length": 8, "temperature": 1.0, "editing_threshold": 0.9}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _rollouts(executor, tokenizer, step=0, on_result=None):
    return rollout_step(executor, tokenizer, PROMPTS, group_size=2, prompts_per_chunk=1, seed=7, step=step,
                        eos_token_id=0, block_length=8, on_result=on_result)


def _same(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
            and torch.equal(a.pad_mask, b.pad_mask) and a.completions == b.completions)


def test_ray_rollouts_equal_in_process_and_a_killed_actor_loses_no_prompt(ray_local):
    from llada_train.model import LLaDA2MoeModelLM

    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config()).eval()
    tokenizer = load_tokenizer(None)
    local = _rollouts(LocalRollouts(model, DECODE), tokenizer)
    assert local.input_ids.shape[0] == len(PROMPTS) * 2 and local.response_mask.any(1).all()
    # The decoder's layout: prompt, the 8 response slots, EOS to the row's last block end, then padding.
    for r in range(len(local.lengths)):
        resp = local.response_mask[r].nonzero().squeeze(1)
        start, end = int(resp[0]), int(resp[-1]) + 1
        assert torch.equal(resp, torch.arange(start, end)) and end % 8 == 0 and 8 <= end - start < 16
        assert local.pad_mask[r, :end].all() and not local.pad_mask[r, end:].any()
        tail = local.input_ids[r, start + int(local.lengths[r]):end]
        assert (tail == 0).all()  # everything after the first EOS is EOS
    # Sampling matters (the comparison below could fail): another step draws other completions.
    assert not _same(local, _rollouts(LocalRollouts(model, DECODE), tokenizer, step=1))

    pool = RayRollouts(RayConfig(enabled=True, num_workers=2, max_chunk_retries=2), model.config, DECODE)
    try:
        pool.publish(model)
        assert _same(_rollouts(pool, tokenizer), local)
        assert pool.restarts == 0

        killed = []

        def kill_the_other_busy_worker(chunk, worker):
            if not killed:  # the other actor is mid-chunk: chunks go out one at a time to idle actors
                killed.append(1 - worker)
                ray_local.kill(pool.workers[1 - worker], no_restart=True)

        after_kill = _rollouts(pool, tokenizer, on_result=kill_the_other_busy_worker)
        assert killed and pool.restarts == 1
        assert _same(after_kill, local)  # every prompt present, same completions as in-process

        # New weights are published to the (restarted) actors: rollouts follow the learner.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        pool.publish(model)
        assert _same(_rollouts(pool, tokenizer), _rollouts(LocalRollouts(model, DECODE), tokenizer))
    finally:
        pool.close()


REWARDS_FILE = """
import time

def length(prompts, completions, **kwargs):
    assert len(kwargs["answer"]) == len(completions) and len(kwargs["completion_ids"]) == len(completions)
    return [float(len(c) % 3) for c in completions]

def boom(prompts, completions, **kwargs):
    raise RuntimeError("reward bug")

def skip(prompts, completions, **kwargs):
    return [None] * len(completions)

def hang(prompts, completions, **kwargs):
    time.sleep(60)
"""


def _args(run_dir, rewards_file, steps, *extra):
    rewards = (f"rl.rewards=[{{fn: '{rewards_file}:length'}}, {{fn: '{rewards_file}:boom', weight: 0.5}}, "
               f"{{fn: '{rewards_file}:skip'}}, {{fn: '{rewards_file}:hang', timeout_s: 1}}]")
    return ["rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "model.init_from=", f"run.out_dir={run_dir}",
            f"train.steps={steps}", "train.batch_size=2", "rl.group_size=2", "rl.minibatch_size=2",
            "data.num_train=16", "data.num_eval=4", "train.eval_every=100", "train.save_every=1", "train.log_every=1",
            rewards, *extra]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rl_cli_runs_with_failing_rewards_exports_and_resumes_exactly(tmp_path):
    from llada_train.decoding import load_decode_defaults
    from llada_train.model import LLaDA2MoeModelLM

    rewards_file = tmp_path / "my_rewards.py"
    rewards_file.write_text(REWARDS_FILE)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(_args(full, rewards_file, 3)) == 0
    records = _records(full)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
    assert any(r["updates"] > 0 for r in steps)  # the length reward varies: some groups train
    last = steps[-1]
    assert last["reward/boom/errors"] == 4 and last["reward/hang/timeouts"] == 4  # + the step-0 eval
    assert last["reward/skip/applicable"] == 0 and "reward/length/mean" in last
    assert {"eval/accuracy", "eval/reward", "eval/tokens_per_forward"} <= set(records[0])  # baseline at step 0
    trained = next(r for r in steps if r["updates"] > 0)
    assert all(k in trained for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "rollout/tokens_per_forward"))
    assert last["reward/length/errors"] == 0  # the eval passes completion_ids too

    hf = full / "hf"
    LLaDA2MoeModelLM.from_pretrained(hf)
    assert load_decode_defaults(hf)["block_length"] == 8

    # A finished run resumed does nothing more.
    assert main(_args(full, rewards_file, 3)) == 0
    assert _records(full) == records

    # Stopped after step 2, then resumed: step 3 is the uninterrupted run's step 3.
    assert main(_args(split, rewards_file, 2)) == 0
    assert main(_args(split, rewards_file, 3)) == 0
    resumed = next(r for r in _records(split) if r.get("step") == 3 and "loss" in r)
    timing = ("elapsed_s", "rollout/seconds", "rollout/tokens_per_s", "reward_seconds")

    def comparable(record):  # error counters restart with the process; wall times vary
        return {k: v for k, v in record.items() if k not in timing and not k.endswith(("/errors", "/timeouts"))}

    assert comparable(resumed) == comparable(last)
    assert "reward/length/mean" in last and "tokens" in last


def test_rollout_seeds_are_the_same_in_every_process():
    """Resume runs in a new process and Ray workers are other processes: seeds must not depend on
    Python's per-process str-hash salt."""
    from llada_train.rl.rollout import chunk_seed

    code = "from llada_train.rl.rollout import chunk_seed; print(chunk_seed(3, 5, 7))"
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": salt, "PATH": ""},
                             capture_output=True, text=True, check=True, cwd=REPO)
        assert int(out.stdout) == chunk_seed(3, 5, 7)
    assert chunk_seed(3, 5, 7) != chunk_seed(3, 5, 8)


def test_rl_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rl.group_size"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.group_size=1"])
    with pytest.raises(ConfigError, match=r"rl.ebpo.t_min"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.ebpo.t_min=0"])
    with pytest.raises(ConfigError, match=r"rl.rewards entry 'no_colon': fn must be 'module.path:function'"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.rewards=[{fn: no_colon}]"])
    with pytest.raises(ConfigError, match=r"Did you mean 'rl.group_size'"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.group_sise=4"])
    with pytest.raises(ConfigError, match=r"data.train"):
        load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), [f"data.train={tmp_path}/missing.jsonl"])


def test_data_parallel_layout_errors_name_the_key():
    from llada_train.stages.rl import check_data_parallel

    cfg = load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.minibatch_size=6", "rl.ray.enabled=true"])
    check_data_parallel(cfg, 1)  # one process: Ray rollouts are fine
    with pytest.raises(ValueError, match=r"rl.ray.enabled=false"):
        check_data_parallel(cfg, 2)
    cfg.rl.ray.enabled = False
    check_data_parallel(cfg, 2)
    with pytest.raises(ValueError, match=r"rl.minibatch_size 6 .* multiple of the 4 ranks"):
        check_data_parallel(cfg, 4)


def test_two_rank_data_parallel_rl_trains_exports_and_resumes_exactly(tmp_path):
    """torchrun, 2 ranks (gloo, ZeRO-2): each rank rolls out and trains on its half of the prompts.
    Rank 0's reward ties every group, so it drops them all and has no minibatch at all: it must
    still join each of rank 1's optimizer steps (else the run hangs), the weights must move, and a
    resumed run must repeat the uninterrupted one."""
    from safetensors.torch import load_file

    rewards_file = tmp_path / "by_rank.py"
    rewards_file.write_text(
        "import os\n\n"
        "def by_rank(prompts, completions, **kwargs):\n"
        "    if os.environ['RANK'] == '0':\n"
        "        return [1.0] * len(completions)\n"
        "    return [float(i % 2) for i in range(len(completions))]  # 0 and 1 within every group of 2\n")

    def run(run_dir, steps):
        args = ["rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "model.init_from=", f"run.out_dir={run_dir}",
                f"train.steps={steps}", "train.batch_size=4", "rl.group_size=2", "rl.minibatch_size=2",
                "data.num_train=16", "data.num_eval=6", "train.eval_every=3", "train.save_every=1",
                "train.log_every=1", "rl.ray.enabled=false", "engine.zero_stage=2",
                f"rl.rewards=[{{fn: '{rewards_file}:by_rank'}}]"]
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(free_port()), "-m", "llada_train.cli", *args], check=False, cwd=REPO,
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return [r for r in _records(run_dir) if "loss" in r or "eval/accuracy" in r]

    full = run(tmp_path / "full", 3)
    steps = [r for r in full if "loss" in r]  # means over the ranks: rank 0 keeps no group, rank 1 all
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["kept_frac"] == 0.5 and r["updates"] > 0 for r in steps)
    assert all(math.isfinite(v) for r in full for v in r.values() if isinstance(v, (int, float)))
    assert [r["step"] for r in full if "eval/accuracy" in r] == [0, 3]  # held-out prompts split over ranks
    state = json.loads((tmp_path / "full/checkpoints/step_000003/trainer_state.json").read_text())
    assert state["world_size"] == 2

    run(tmp_path / "split", 2)
    after_2, after_3 = (
        load_file(tmp_path / "split/hf/model.safetensors"),
        load_file(tmp_path / "full/hf/model.safetensors"),
    )
    assert any(not torch.equal(after_2[k], after_3[k]) for k in after_3)  # rank 1's step 3 moved the weights
    resumed = run(tmp_path / "split", 3)
    timing = ("elapsed_s", "rollout/seconds", "rollout/tokens_per_s", "reward_seconds")

    def comparable(record):
        return {k: v for k, v in record.items() if k not in timing}

    assert comparable(next(r for r in resumed if r["step"] == 3 and "loss" in r)) == comparable(steps[-1])
    assert torch.equal(load_file(tmp_path / "split/hf/model.safetensors")["lm_head.weight"], after_3["lm_head.weight"])



def test_step_fn_skipped_steps_are_counted(tmp_path):
    """A stage with its own loop of optimizer steps (RL's step_fn) takes them through the trainer's
    optimizer_step: a non-finite loss voids the step and is counted like a micro-batch step's,
    bad_steps_total in the metrics and in the checkpoint it resumes from."""
    from llada_train.data.text import BatchIterator
    from llada_train.engine import init_distributed
    from llada_train.model import LLaDA2MoeModelLM
    from llada_train.trainer import BatchSource, Trainer

    bad_at = {2, 3}

    def step_fn(engine, batch, step, optimizer_step):
        losses = []
        for part in batch["index"].split(1):  # two optimizer steps per trainer step, as RL minibatches
            loss = engine.module(part[:, None] + 2).logits.float().mean()
            if step + 1 in bad_at and not losses:
                loss = loss * float("nan")
            losses.append(optimizer_step(loss).item())
        return {"loss": sum(losses) / len(losses)}

    def trainer(steps):
        cfg = load_stage_config("rl", str(CONFIGS / "rl_tiny.yaml"),
                          [f"run.out_dir={tmp_path}", f"train.steps={steps}", "train.batch_size=2",
                           "train.log_every=1", "train.save_every=1", "train.export_hf=false"])
        torch.manual_seed(0)
        batches = BatchSource({"index": torch.arange(8)}, BatchIterator(8, 2, seed=0))
        return Trainer(cfg, "rl", LLaDA2MoeModelLM(tiny_config()), None, batches, loss_fn=None, step_fn=step_fn)

    init_distributed()
    assert trainer(4).fit()
    assert [r["bad_steps_total"] for r in _records(tmp_path)] == [0, 1, 2, 2]
    assert trainer(5).fit()  # resumed from step 4: the total carries over
    assert _records(tmp_path)[-1]["bad_steps_total"] == 2


def test_rl_rows_errors_name_file_line_and_field(tmp_path):
    from llada_train.data.prompts import read_prompt_rows as read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": "4"}\n{"question": "3+3=", "answer": "6"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected an object with a 'prompt' string") as err:
        read_rows(str(path), "prompt")
    assert "['answer', 'question']" in str(err.value) and "data.prompt_field" in str(err.value)
    path.write_text('{"question": "3+3=", "answer": "6"}\n')
    assert read_rows(str(path), "question") == [{"question": "3+3=", "answer": "6"}]
