"""`llada-train plan` against what really happens: the FakeTensor trace against a real CPU pass, the model
states against a real 2-rank DeepSpeed engine's tensors, the bytes per collective against every
torch.distributed call of three real training steps (tests/plan_worker.py measures, this file compares),
and the shipped presets against the GPU they are sized for, read from the plan's own numbers."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llada_train import plan
from llada_train.errors import UserError
from llada_train.stages.registry import load_stage_config

from .plan_worker import STEPS, WORLD, overrides
from .test_cpt import free_port

WORKER = Path(__file__).with_name("plan_worker.py")
REPO = WORKER.parents[1]

# (ZeRO stage, expert parallel, gradient checkpointing, MTF probability): ZeRO-3 with every pass kind its
# parameter gathers see (forward, recompute, drafting forwards that replace the recorded trace); expert
# parallelism 2 on ZeRO-2 (all-to-all in forward, backward, recompute and drafting forwards, per-micro-batch
# all-reduce over two groups); and on ZeRO-3 (the flash preset's combination: experts reduce-scattered
# over their own group)
RUNS = {"zero3": (3, 1, True, 1.0), "ep2_zero2": (2, 2, True, 1.0), "ep2_zero3": (3, 2, False, 0.0)}


def _config(zero, ep, checkpointing, mtf):
    return load_stage_config("cpt", "cpt_tiny", overrides(zero, ep, checkpointing, mtf))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (config, per-rank results) of three real training steps on WORLD gloo ranks."""
    out = {}
    for name, (zero, ep, checkpointing, mtf) in RUNS.items():
        where = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(free_port()), str(WORKER), "--zero", str(zero), "--ep", str(ep), "--mtf", str(mtf),
               "--out", str(where), *(["--checkpointing"] if checkpointing else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        ranks = [json.loads((where / f"rank{r}.json").read_text()) for r in range(WORLD)]
        out[name] = (_config(zero, ep, checkpointing, mtf), ranks)
    return out


def _planned(cfg):
    lay = plan.layout_of(cfg, 1, WORLD)
    mcfg = plan.model_config(cfg)
    return lay, plan.inventory(mcfg), plan.trace_activations(mcfg, lay)


def test_fake_trace_matches_a_real_cpu_pass():
    """The tiny preset in bf16: the FakeTensor trace of two layers, extended to four, against a real pass of
    the four-layer model through the same recorder (saved storages when the forward ends, most bytes
    alive), without and with gradient checkpointing."""
    from llada_train.model import LLaDA2MoeModelLM

    cfg = load_stage_config("cpt", "cpt_tiny", ["engine.precision=bf16", "data.seq_len=32", "diffusion.block_size=16",
                                                "diffusion.block_schedule=[]", "diffusion.noise.complementary=true",
                                                "train.batch_size=2"])
    lay = plan.layout_of(cfg, 1, 1)
    mcfg = plan.model_config(cfg)
    assert mcfg.num_hidden_layers == 4  # the trace runs two of them
    act = plan.trace_activations(mcfg, lay, attention="as_run")  # the attention this CPU runs
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(mcfg).to(torch.bfloat16).train()
    for checkpointing in (False, True):
        model.model.gradient_checkpointing = checkpointing
        saved, peak = plan.measured_activations(model, lay)
        assert act.saved(checkpointing) == pytest.approx(saved, rel=0.01), (checkpointing, act, saved)
        assert act.peak(checkpointing) == pytest.approx(peak, rel=0.03), (checkpointing, act, peak)
    assert act.saved(True) < act.saved(False) and act.peak(True) < act.peak(False)


def test_model_states_match_the_engine(runs):
    """Parameters, fp32 master weights + AdamW moments and the optimizer step's fp32 gradient, byte for byte
    what DeepSpeed holds on each rank (ZeRO-3: also the gradient partition and the bucket, which ZeRO-2 has
    released when its step runs); what the step allocates at its peak (the fp32 gradient and AdamW's
    temporaries, per tensor on CPU) against every tensor the real steps made, from the second step on (the
    first also makes state that stays)."""
    for name, (cfg, ranks) in runs.items():
        lay, inv, _ = _planned(cfg)
        states = plan.model_states(inv, replace(lay, adam="single_tensor"))
        for r in ranks:
            held = r["held"]
            assert states.params == held["after"]["params"], name
            assert states.optimizer == held["step"]["master"] + held["step"]["moments"], name
            assert states.step_transient == held["step"]["step_grads"], name
            made = max(r["step_new_bytes"][1:])
            assert made == pytest.approx(states.step_transient + states.adam_temporaries, rel=1e-4), name
            if lay.zero == 3:
                assert states.grads == held["step"]["grads"], name
                assert held["step"]["grad_bucket"] == lay.dtype_bytes * plan.REDUCE_BUCKET, name
            else:  # released when each backward ends; the gradient buffer with the last group's fp32 copy
                assert held["step"]["grad_bucket"] == 0, name
                groups, whole = len(plan.optimizer_groups(inv, lay)), states.params  # bf16 bytes of every weight
                assert r["grads_alive"][-1] == 0, name
                assert all(states.grads <= alive <= whole for alive in r["grads_alive"][-groups:-1]), name


def _counted(ranks) -> dict:
    """(kind, group size) -> (payload, sent) per rank, the mean over ranks (all-to-all rows differ by rank)."""
    out = {}
    for r in ranks:
        for key, (_calls, payload, sent) in r["collectives"].items():
            kind, n = key.split("/")
            total = out.setdefault((kind, int(n)), [0.0, 0.0])
            total[0] += payload / len(ranks)
            total[1] += sent / len(ranks)
    return out


def test_bytes_per_collective_match_three_real_steps(runs):
    """Every collective kind carrying >= 1% of the bytes, within 5% of what the real run passed to
    torch.distributed (payload, and sent bytes except for the all-to-all, whose rows to other ranks follow
    the routing of untrained weights). The plan counts the first steps' warm-up gathers (ZeRO-3 records
    its trace) as the run does."""
    for name, (cfg, ranks) in runs.items():
        lay, inv, act = _planned(cfg)
        predicted = {}
        for c in plan.communication(inv, lay, act, steps=STEPS)[0]:
            total = predicted.setdefault((c.kind, c.group_size), [0.0, 0.0])
            total[0], total[1] = total[0] + c.payload, total[1] + c.sent
        counted = _counted(ranks)
        everything = sum(v[0] for v in counted.values())
        big = {k for k, v in counted.items() if v[0] >= 0.01 * everything}
        assert big == {k for k, v in predicted.items() if v[0] >= 0.01 * everything}, (name, counted, predicted)
        for key in big:
            assert predicted[key][0] == pytest.approx(counted[key][0], rel=0.05), (name, key, predicted, counted)
            if key[0] != "all_to_all":
                assert predicted[key][1] == pytest.approx(counted[key][1], rel=0.05), (name, key)


def test_deepspeed_defaults_are_the_ones_planned():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig()
    assert (zero.reduce_bucket_size, zero.param_persistence_threshold, zero.max_reuse_distance,
            zero.prefetch_bucket_size, zero.sub_group_size) == (
        plan.REDUCE_BUCKET, plan.PERSISTENCE_THRESHOLD, plan.MAX_REUSE_DISTANCE, plan.PREFETCH_BUCKET,
        plan.OPTIMIZER_SUB_GROUP)
    assert zero.use_multi_rank_bucket_allreduce  # gradient buckets are all-reduced whole at ZeRO 1-2


def test_presets_on_the_clusters_they_are_sized_for(tmp_path, monkeypatch, capsys):
    """mini on 4 x 8 H100 and flash (EP 8) on 8 x 8 H100 fit; flash with EP 1 keeps the experts' gathers on
    the inter-node fabric, and at ZeRO-2 does not fit: `plan` exits 2 with one error line naming a knob
    that makes it fit."""
    from llada_train.cli import main

    mini = plan.make_plan(load_stage_config("cpt", "cpt_llada2_mini"), 4, 8, "h100")
    assert mini.fits and mini.total <= mini.usable and mini.layout.world == 32
    flash_cfg = load_stage_config("cpt", "cpt_llada2_flash")
    flash = plan.make_plan(flash_cfg, 8, 8, "h100")
    assert flash.layout.ep == 8 and flash.fits
    ep1_cfg = load_stage_config("cpt", "cpt_llada2_flash", ["engine.expert_parallel=1"])
    ep1_act = plan.trace_activations(plan.model_config(ep1_cfg), plan.layout_of(ep1_cfg, 8, 8))
    ep1 = plan.make_plan(ep1_cfg, 8, 8, "h100", act=ep1_act)
    gathered = {c.group: c.sent for c in flash.collectives if c.what.startswith("ZeRO-3 parameter")}
    assert sum(c.sent for c in ep1.collectives if c.what.startswith("ZeRO-3 parameter")) > 4 * sum(gathered.values())
    assert ep1.time.step_s > flash.time.step_s and ep1.time.mfu < flash.time.mfu

    zero2 = ["engine.expert_parallel=1", "engine.zero_stage=2"]
    refused = plan.make_plan(load_stage_config("cpt", "cpt_llada2_flash", zero2), 8, 8, "h100", act=ep1_act)
    assert not refused.fits and refused.total > refused.usable
    monkeypatch.setattr(plan, "trace_activations", lambda *a, **k: ep1_act)
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "cpt_llada2_flash", "--nodes", "8", "--gpus-per-node", "8", "--json", str(out),
                 *zero2]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "Traceback" not in captured.err, captured.err
    knob = errors[0].split("; set ")[1].split(" ")[0]  # e.g. engine.zero_stage=3
    fixed = plan.make_plan(load_stage_config("cpt", "cpt_llada2_flash", [*zero2, knob]), 8, 8, "h100", act=ep1_act)
    assert fixed.fits, errors[0]
    assert "DOES NOT FIT" in captured.out and json.loads(out.read_text())["fits"] is False


def test_a_batch_that_does_not_split_is_a_user_error():
    cfg = load_stage_config("cpt", "cpt_llada2_mini")
    with pytest.raises(UserError, match=r"train\.batch_size 256"):
        plan.layout_of(cfg, 3, 8)
    with pytest.raises(UserError, match=r"expert_parallel=3 must divide"):
        plan.layout_of(load_stage_config("cpt", "cpt_llada2_mini", ["engine.expert_parallel=3"]), 4, 8)
