"""The presets, Slurm templates and tokenizer ship inside the package: `--config NAME` finds a
preset from any directory, and a wheel built from the tree works outside the source checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llada_train.cli import main
from llada_train.errors import ConfigError, UserError
from llada_train.presets import (
    MODEL_PRESET_DIR,
    PRESET_DIR,
    TEMPLATE_DIR,
    TOKENIZER_DIR,
    list_model_presets,
    list_presets,
    model_preset_path,
    resolve_config,
)
from llada_train.stages.pipeline import load_pipeline
from llada_train.stages.registry import load_stage_config
from tests.conftest import REPO

TINY = PRESET_DIR / "pipeline_tiny.yaml"


def test_presets_live_in_the_package():
    package = REPO / "llada_train"
    assert [package / "configs", package / "configs" / "model"] == [PRESET_DIR, MODEL_PRESET_DIR]
    assert (TEMPLATE_DIR / "train.sbatch.tmpl").is_file() and (TEMPLATE_DIR / "rl.sbatch.tmpl").is_file()
    assert (TOKENIZER_DIR / "tokenizer.json").is_file()
    assert {"cpt_tiny", "sft_tiny", "rl_tiny", "pipeline_tiny"} <= set(list_presets())
    assert "tiny" not in list_presets() and "tiny" in list_model_presets()  # model presets are apart
    for old in ("configs", "slurm"):  # nothing is read from the checkout's top level any more
        assert not (REPO / old).exists(), f"{old}/ is back at the repo root; it belongs in llada_train/"


def test_resolve_config_file_wins_then_preset_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arg in ("pipeline_tiny", "pipeline_tiny.yaml", "configs/pipeline_tiny.yaml", "./configs/pipeline_tiny",
                str(TINY)):
        assert resolve_config(arg) == TINY, arg
    (tmp_path / "pipeline_tiny.yaml").write_text("out_dir: mine\n")  # an existing file wins over the preset
    assert resolve_config("pipeline_tiny.yaml") == Path("pipeline_tiny.yaml")
    assert resolve_config("pipeline_tiny") == TINY  # (no file of that exact name here)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cpt_tiny.yaml").write_text("train: {steps: 3}\n")
    assert resolve_config("configs/cpt_tiny.yaml") == Path("configs/cpt_tiny.yaml")
    assert resolve_config("configs/cpt_tiny") == PRESET_DIR / "cpt_tiny.yaml"
    for arg in ("nope", "configs/nope.yaml", "model/nope", "../configs/cpt_tiny.yaml", "/no/such/cpt_tiny.yaml", ""):
        with pytest.raises(ConfigError) as err:
            resolve_config(arg)
        assert isinstance(err.value, UserError)
        assert f"config file not found: {arg or '(none given)'}" in str(err.value)
        assert all(name in str(err.value) for name in list_presets())


def test_model_preset_path_by_name_or_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = MODEL_PRESET_DIR / "tiny.yaml"
    for arg in ("tiny", "tiny.yaml", "configs/model/tiny.yaml", str(tiny)):
        assert model_preset_path(arg) == tiny, arg
    (tmp_path / "mine.yaml").write_text("hidden_size: 64\n")
    assert model_preset_path("mine.yaml") == Path("mine.yaml")
    with pytest.raises(ConfigError, match=r"model.preset: 'huge' is neither a file nor one of .*'llada2_mini'"):
        model_preset_path("huge")


def test_stage_and_pipeline_presets_load_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_stage_config("cpt", "cpt_tiny").run.name == "cpt_tiny"
    pipe = load_pipeline("pipeline_tiny", [f"out_dir={tmp_path}/demo"])
    assert pipe.stages == ["cpt", "sft", "rl"] and pipe.configs["cpt"].train.steps == 80
    # a pipeline file's `config:` entries: a path from the current directory first, else a preset name
    sft_tiny = (PRESET_DIR / "sft_tiny.yaml").read_text()
    (tmp_path / "my_sft.yaml").write_text(sft_tiny.replace("name: sft_tiny", "name: my_sft"))
    (tmp_path / "mine.yaml").write_text("stages: [sft, rl]\nsft: {config: my_sft.yaml}\nrl: {config: rl_tiny}\n")
    pipe = load_pipeline("mine.yaml", [])
    assert (pipe.configs["sft"].run.name, pipe.configs["rl"].run.name) == ("my_sft", "rl_tiny")
    (tmp_path / "bad.yaml").write_text("stages: [sft]\nsft: {config: sft_nope}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \[sft\]: config file not found: sft_nope .*sft_tiny"):
        load_pipeline("bad.yaml", [])
    assert main(["pipeline", "--config", "nope", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: nope" in err and "pipeline_tiny" in err


# Runs the installed package's CLI; refuses to run if `llada_train` would come from anywhere else
# (the checkout's editable install, the current directory).
RUNNER = """
import sys
from pathlib import Path
target = Path(sys.argv[1]).resolve()
import llada_train
assert Path(llada_train.__file__).resolve().is_relative_to(target), f"imported {llada_train.__file__}, not {target}"
if sys.argv[2] == "tokenizer":
    from llada_train.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
    tok = load_tokenizer(None)
    assert Path(DEFAULT_TOKENIZER).resolve().is_relative_to(target), DEFAULT_TOKENIZER
    print("tokenizer", len(tok), tok.mask_token, tok.mask_token_id)
    sys.exit(0)
from llada_train.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path):
    """`pip wheel` of the tree, installed into an empty directory and run from a third one: the
    tiny pipeline preset resolves by name, the Slurm templates render and the tokenizer loads."""
    src, wheels, target, elsewhere = (tmp_path / d for d in ("src", "wheels", "target", "elsewhere"))
    src.mkdir()  # build from a copy: no build/ or egg-info written into the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "llada_train", src / "llada_train", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # everything needed is local: no network
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("llada_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("configs", "*.yaml"), ("configs/model", "*.yaml"), ("slurm_templates", "*.tmpl"),
                            ("data/tokenizer", "*"), ("data/retention", "*")):
        shipped = sorted((REPO / "llada_train" / folder).glob(pattern))
        assert shipped and all(f"llada_train/{folder}/{p.name}" in names for p in shipped), (folder, names)
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                             env=env, capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (target / "llada_train" / "presets.py").is_file()

    elsewhere.mkdir()
    elsewhere = elsewhere.resolve()  # as the subprocess's cwd will report it
    run_env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    def run(*args):
        res = subprocess.run([sys.executable, "-c", RUNNER, str(target), *args], cwd=elsewhere, env=run_env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0, (args, res.stdout[-3000:], res.stderr[-3000:])
        return res.stdout

    text = run("pipeline", "--config", "pipeline_tiny", "--print-config")
    for stage in ("cpt", "sft", "rl"):
        assert f"# ---- {stage} ----\n" in text
    assert "name: cpt_tiny" in text and "name: sft_tiny" in text and "name: rl_tiny" in text
    assert "steps: 80" in text  # the pipeline file's own override of cpt_tiny's steps

    scripts = run("submit", "pipeline", "--config", "pipeline_tiny", "--cpus-per-task", "4", "--dry-run")
    assert scripts.count("#!/bin/bash") == 3
    assert scripts.count("llada_train/slurm_templates/train.sbatch.tmpl") == 2  # cpt, sft
    assert "Ray head" in scripts and f"ARGS=(cpt --config {elsewhere}/runs/demo/cpt/slurm/cpt.yaml" in scripts

    assert run("tokenizer").split() == ["tokenizer", "4096", "<|mask|>", "1"]
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # --print-config and --dry-run write nothing
