"""Expert parallelism (`engine.expert_parallel`, DeepSpeed AutoEP) against EP = 1: real torchrun ranks
over gloo, each holding E/N experts; logits, loss, every gradient, five optimizer steps, the expert
biases, routing extremes and the export (tests/ep_worker.py measures, this file asserts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada_train.engine import check_expert_parallel
from llada_train.errors import ConfigError
from llada_train.stages.registry import load_stage_config

from .conftest import tiny_config
from .test_cpt import free_port

WORKER = Path(__file__).with_name("ep_worker.py")
REPO = WORKER.parents[1]


def run_ranks(tmp_path: Path, world: int, ep: int, zero: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--master_port", str(free_port()), str(WORKER), "--ep", str(ep), "--zero", str(zero),
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(("world", "ep", "zero"), [(2, 2, 2), (4, 4, 1), (4, 2, 3)])
def test_expert_parallel_matches_ep1(tmp_path, world, ep, zero):
    ranks = run_ranks(tmp_path, world, ep, zero)
    per_rank = 8 // ep
    for r in ranks:
        # each rank holds exactly E/N experts of every MoE layer, the same ones as the reference's slice
        assert r["holds_right_experts"]
        assert all(ids == list(range(r["ep_rank"] * per_rank, (r["ep_rank"] + 1) * per_rank))
                   for ids in r["held_experts"].values()) and len(r["held_experts"]) == 2
        assert r["rows_to_other_ranks"] > 0  # tokens really travelled to remote experts
        assert r["logits_rel"] < 1e-5 and abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"])
        assert max(r["grad_rel"].values()) < 1e-4, sorted(r["grad_rel"].items(), key=lambda kv: -kv[1])[:5]
        assert len(r["grad_rel"]) == len(r["grad_names"])  # every parameter compared, in the model's names
        assert r["extreme_logits_rel"] < 1e-5  # experts 2-7 get no token at all
        assert r["losses"] == pytest.approx(r["base_losses"], rel=1e-5)
        assert r["bias_same_on_all_ranks"] and r["bias_moved"]
        assert r["export_keys_equal"] and r["export_rel"] < 1e-4
    assert sorted(r["ep_rank"] for r in ranks) == sorted(list(range(ep)) * (world // ep))


def test_expert_parallel_refuses_what_it_does_not_combine_with():
    from llada_train.model import LLaDA2MoeModelLM

    model = LLaDA2MoeModelLM(tiny_config())  # 8 experts
    cases = [(["engine.expert_parallel=2", "engine.zero_stage=2"], 3, "number of ranks"),
             (["engine.expert_parallel=3", "engine.zero_stage=2"], 3, "num_experts"),
             (["engine.expert_parallel=2", "engine.zero_stage=0"], 2, "zero_stage 1, 2 or 3"),
             (["engine.expert_parallel=2", "engine.zero_stage=2", "precision.fp4=ufp4"], 2, "precision.fp4")]
    for overrides, world, message in cases:
        cfg = load_stage_config("cpt", "cpt_tiny", overrides)
        with pytest.raises(ConfigError, match=message):
            check_expert_parallel(model, cfg, world)
    with pytest.raises(ConfigError, match=r"engine\.expert_parallel"):
        load_stage_config("cpt", "cpt_tiny", ["engine.expert_parallel=0"])


def test_adopted_router_routes_exactly_as_the_model_gate_in_bf16():
    """AutoEP's stock router computes the gate logits in bf16 (the activations' dtype); the adopted one
    computes them in fp32 as LLaDA2MoeGate does, so expert choice and weights are identical."""
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    from llada_train.expert_parallel import adopt_router
    from llada_train.model.moe import LLaDA2MoeGate

    cfg = tiny_config(num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    torch.manual_seed(0)
    gate = LLaDA2MoeGate(cfg).to(torch.bfloat16)
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
        gate.expert_bias.copy_(torch.randn(16) * 0.05)
    x = torch.randn(4096, cfg.hidden_size).to(torch.bfloat16)
    idx, weights, _ = gate(x)
    router = TokenChoiceTopKRouter(cfg.hidden_size, 16, 4, 2, 4, "sigmoid", True, cfg.routed_scaling_factor, False)
    router.gate.weight.data = gate.weight.data.clone()
    router.e_score_correction_bias = gate.expert_bias.clone()
    with torch.no_grad():
        _, stock_idx, _ = router(x)
        adopt_router(router)
        ours_weights, ours_idx, counts = router(x)
    same_set = (stock_idx.sort(-1).values == idx.sort(-1).values).all(-1)
    assert same_set.float().mean() < 1.0  # the stock router picks other experts for some tokens
    assert torch.equal(ours_idx, idx) and torch.equal(ours_weights, weights)
    assert torch.equal(counts.long(), torch.bincount(idx.reshape(-1), minlength=16))


def test_cpt_under_expert_parallel_resumes_exactly_through_the_cli(tmp_path):
    """torchrun, 2 ranks, EP = 2, ZeRO-2: a run resumed from its step-2 checkpoint reproduces the
    uninterrupted run's losses and export bit for bit; `llada-train export` of the checkpoint gives
    the same hf/; a checkpoint refuses another EP size."""
    import shutil

    from safetensors.torch import load_file

    from .test_cpt import losses, tiny_args

    def torchrun(run, *extra):
        args = tiny_args(run, tmp_path / "cache", "train.steps=4", "train.save_every=2", "train.eval_every=100",
                         "engine.zero_stage=2", *extra)
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "llada_train.cli", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=600)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    res = torchrun(straight, "engine.expert_parallel=2")
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    shutil.rmtree(resumed / "hf")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (
        resumed / "metrics.jsonl").read_text().splitlines() if '"step": 3' not in line and '"step": 4' not in line))
    res = torchrun(resumed, "engine.expert_parallel=2")
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr, res.stderr[-3000:]
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in a  # the released per-expert layout, all 8 experts
    shutil.rmtree(resumed / "hf")  # `llada-train export` reads the per-expert files back, outside the run
    res = subprocess.run([sys.executable, "-m", "llada_train.cli", "export", str(resumed)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    c = load_file(resumed / "hf" / "model.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    res = torchrun(resumed, "engine.expert_parallel=1", "train.steps=6")  # each rank: one error line, exit 2
    assert res.returncode != 0 and "error: cannot resume" in res.stderr
    assert "written at engine.expert_parallel=2" in res.stderr


LENGTH_REWARD = "def length(prompts, completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n"


def test_rl_under_expert_parallel_follows_ep1(tmp_path):
    """torchrun, 2 ranks: RL at EP = 2 (ZeRO-2) and at ZeRO-3 against EP = 1 (ZeRO-2), from one random
    tiny model with a reward that varies (completion length). Rollouts and evaluations decode with a
    gathered full copy (each rank its own number of forwards), θ_old scoring and minibatches are joined
    by placeholder forwards; a step-0 rollout is the same in every layout, losses follow EP = 1."""
    from llada_train.model import LLaDA2MoeModelLM

    start = tmp_path / "start"
    torch.manual_seed(0)
    LLaDA2MoeModelLM(tiny_config()).save_pretrained(start)
    (tmp_path / "length.py").write_text(LENGTH_REWARD)

    def rl(name, *extra):
        args = ["rl", "--config", "configs/rl_tiny.yaml", f"model.init_from={start}", f"run.out_dir={tmp_path / name}",
                "data.num_train=64", "data.num_eval=8", "train.steps=3", "train.batch_size=4", "rl.group_size=4",
                "rl.gen_length=8", "rl.temperature=1.0", "rl.minibatch_size=8", "train.eval_every=3",
                "train.save_every=100", "optim.warmup_steps=0", "optim.lr=1e-3",
                f'rl.rewards=[{{fn: "{tmp_path / "length.py"}:length"}}]', *extra]
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(free_port()), "-m", "llada_train.cli", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-4000:]
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    base = rl("ep1", "engine.zero_stage=2")
    for other in (rl("ep2", "engine.zero_stage=2", "engine.expert_parallel=2"), rl("zero3", "engine.zero_stage=3")):
        steps = {r["step"]: r for r in other if "loss" in r}
        ref = {r["step"]: r for r in base if "loss" in r}
        assert sorted(steps) == sorted(ref) == [1, 2, 3]
        assert steps[1]["reward/length/mean"] == ref[1]["reward/length/mean"]  # same weights, same rollouts
        assert ref[1]["updates"] > 0 and ref[1]["loss"] != 0
        for step in (1, 2, 3):
            assert steps[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-3, abs=1e-6)
        evals = [r for r in other if "eval/reward" in r]
        assert [r["step"] for r in evals] == [0, 3]
        assert evals[0]["eval/reward"] == next(r for r in base if "eval/reward" in r)["eval/reward"]
