"""CPT stage end to end through the CLI: learning, exact resume, 2-process ZeRO-2, checkpoints, errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llada_train import checkpoint as ckpt_lib
from llada_train.config import ConfigError
from llada_train.stages.registry import load_stage_config
from tests.conftest import CONFIGS, REPO

TINY = [
    "data.seq_len=32", "data.max_docs=30", "diffusion.block_size=8", "diffusion.block_schedule=[]",
    "train.batch_size=4", "train.log_every=1", "train.eval_batches=2", "optim.warmup_steps=2",
]


def cli(*args, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "llada_train.cli", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (the last record wins when a resumed run logs a step again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def tiny_args(run_dir, cache, *extra):
    return ["cpt", "--config", "configs/cpt_tiny.yaml", f"run.out_dir={run_dir}", f"data.cache_dir={cache}",
            *TINY, *extra]


def test_tiny_cpt_lowers_held_out_loss(tmp_path):
    run = tmp_path / "run"
    res = cli(*tiny_args(run, tmp_path / "cache", "train.steps=60", "train.eval_every=30", "optim.lr=5e-3",
                         "train.save_every=1000"))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr  # not a terminal: progress as whole lines, no carriage-return redraws
    assert "\r" not in log and "[cpt] 60/60 (100%)" in log and "[cpt] 30/60 (50%)" in log, log[-2000:]
    evals = [json.loads(x)["eval/loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in x]
    assert len(evals) == 3  # before the first step, at 30 and at 60
    first_loss = next(iter(losses(run).values()))  # about ln(vocab): the untrained model's CE
    assert evals[-1] < 0.7 * first_loss and evals[-1] < evals[0], (first_loss, evals)
    assert (run / "hf" / "model.safetensors").is_file()
    assert (run / "hf" / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_000060"


def test_exact_resume_after_signal_matches_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    steps = ["train.steps=12", "train.save_every=100", "train.eval_every=100"]
    straight = tmp_path / "straight"
    res = cli(*tiny_args(straight, cache, *steps))
    assert res.returncode == 0, res.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llada_train.cli", *tiny_args(interrupted, cache, *steps)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]  # stopped early, checkpoint saved
    stopped_at = int((interrupted / "PREEMPTED").read_text())
    assert 4 <= stopped_at < 12
    res = cli(*tiny_args(interrupted, cache, *steps))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    a, b = losses(straight), losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # bit-identical per-step losses, data order included


def test_two_process_zero2_trains_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    base = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "llada_train.cli",
        *tiny_args(run, tmp_path / "cache", "engine.zero_stage=2", "train.save_every=3", "train.eval_every=100"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    def launch(steps):
        return subprocess.run(
            [sys.executable, *base, f"train.steps={steps}"],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = launch(3)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_000003"
    assert ckpt_lib.verify_checkpoint(ckpt) is None
    # ZeRO-2 shards the optimizer state: one partition file per rank.
    assert len(list((ckpt / "engine").glob("*optim_states.pt"))) == 2
    second = launch(5)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    assert max(losses(run)) == 5
    assert (run / "hf" / "config.json").is_file()
    # `llada-train export` rebuilds hf/ from the ZeRO-2 shards: the same weights the run exported.
    trained = load_file(run / "hf" / "model.safetensors")
    shutil.rmtree(run / "hf")
    res = cli("export", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    exported = load_file(run / "hf" / "model.safetensors")
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    assert json.loads((run / "hf" / "generation_config.json").read_text())["threshold"] > 0


def test_fp4_cpt_trains_through_the_cli(tmp_path):
    run = tmp_path / "run"
    res = cli(*tiny_args(run, tmp_path / "cache", "precision.fp4=ufp4", "train.steps=12", "optim.lr=5e-3",
                         "train.eval_every=100", "train.save_every=100"))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = list(losses(run).values())
    assert sum(curve[-3:]) / 3 < 0.85 * sum(curve[:3]) / 3, curve


def test_export_errors_name_the_problem(tmp_path):
    res = cli("export", str(tmp_path))
    assert res.returncode == 2 and "no config.yaml" in res.stderr


def test_resume_auto_never_picks_a_partial_or_corrupt_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step_000004"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    ckpt_lib.write_manifest(good)
    (root / ".tmp_step_000008").mkdir()  # killed mid-save: never renamed
    (root / ".tmp_step_000008" / "trainer_state.json").write_text("{}")
    no_manifest = root / "step_000006"  # renamed by hand / foreign: no manifest
    no_manifest.mkdir()
    corrupt = root / "step_000005"
    corrupt.mkdir()
    (corrupt / "trainer_state.json").write_text('{"step": 5}')
    ckpt_lib.write_manifest(corrupt)
    (corrupt / "trainer_state.json").write_text('{"step": 6}')  # same size, different bytes
    seen = []
    assert ckpt_lib.find_resume_checkpoint(tmp_path, seen.append) == good
    assert any("manifest" in s for s in seen) and any("checksum" in s and "trainer_state.json" in s for s in seen)


def test_config_errors_name_key_and_suggest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*Did you mean 'train.steps'"):
        load_stage_config("cpt", "configs/cpt_tiny.yaml", ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"bad value for 'train.steps'"):
        load_stage_config("cpt", None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"data.seq_len.*multiple of diffusion.block_size"):
        load_stage_config("cpt", None, ["data.seq_len=30", "diffusion.block_size=8"])
    with pytest.raises(ConfigError, match=r"missing value for 'data.train'"):
        load_stage_config("sft", None, [])
    with pytest.raises(ConfigError, match=r"config file not found: nope.yaml"):
        load_stage_config("cpt", "nope.yaml", [])


def test_cli_reports_bad_config_and_bad_data_path(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  learning_rate: 0.1\n")
    res = cli("cpt", "--config", str(bad_yaml))
    assert res.returncode == 2
    assert "unknown config key 'optim.learning_rate'" in res.stderr
    res = cli(*tiny_args(tmp_path / "run", tmp_path / "cache", f"data.paths=[{tmp_path}/missing_corpus]"))
    assert res.returncode == 2
    assert "missing_corpus" in res.stderr
    res = cli("cpt", "--config", "configs/cpt_tiny.yaml", "--print-config", "train.steps=7")
    assert res.returncode == 0 and "steps: 7" in res.stdout


def test_values_a_yaml_marks_required_must_be_given():
    """configs/convert_cpt.yaml marks `???` keys that have schema defaults; the default must not win."""
    path = str(CONFIGS / "convert_cpt.yaml")
    with pytest.raises(ConfigError, match=r"missing value for 'model.init_from'"):
        load_stage_config("cpt", path)
    cfg = load_stage_config("cpt", path, ["model.init_from=/models/x", "diffusion.mask_embed_noise_std=0.02"])
    assert (cfg.model.init_from, cfg.diffusion.mask_embed_noise_std) == ("/models/x", 0.02)
