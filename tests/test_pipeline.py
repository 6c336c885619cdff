"""`llada-train pipeline` + `llada-train report`: config routing, a micro end-to-end run, resume."""

import json
import os
import subprocess
import sys

import pytest

from llada_train.config import ConfigError
from llada_train.stages.pipeline import load_pipeline
from tests.conftest import CONFIGS, REPO

PIPELINE = str(CONFIGS / "pipeline_tiny.yaml")
# A micro version of the demo: every stage runs a handful of steps on short sequences.
MICRO = [
    "cpt.train.steps=4", "cpt.data.seq_len=32", "cpt.data.max_docs=20", "cpt.diffusion.block_size=8",
    "cpt.diffusion.block_schedule=[]", "cpt.train.batch_size=4", "cpt.train.eval_every=4", "cpt.train.save_every=4",
    "sft.train.steps=4", "sft.data.num_train=32", "sft.data.num_eval=8", "sft.train.batch_size=4",
    "sft.train.eval_every=4", "sft.train.save_every=4", "sft.train.eval_batches=1",
    "rl.train.steps=2", "rl.train.batch_size=2", "rl.rl.group_size=2", "rl.data.num_train=8", "rl.data.num_eval=4",
    "rl.train.eval_every=2", "rl.train.save_every=2",
]


def test_stage_sections_and_cli_overrides_reach_each_stage(tmp_path):
    pipe = load_pipeline(PIPELINE, [f"out_dir={tmp_path}", "sft.train.steps=7", "sft.optim.lr=0.5"])
    assert pipe.stages == ["cpt", "sft", "rl"]
    cpt, sft, rl = (pipe.configs[s] for s in pipe.stages)
    assert cpt.train.steps == 80  # from the pipeline file's cpt section, over cpt_tiny.yaml's 200
    assert cpt.diffusion.block_schedule == [[10, 4], [60, 32], [80, 0]]
    assert (sft.train.steps, sft.optim.lr) == (7, 0.5)
    assert cpt.run.out_dir == str(tmp_path / "cpt")
    assert sft.model.init_from == str(tmp_path / "cpt" / "hf")
    assert rl.model.init_from == str(tmp_path / "sft" / "hf")
    later = load_pipeline(PIPELINE, [f"out_dir={tmp_path}", "stages=[sft,rl]"])
    assert later.configs["sft"].model.init_from == "runs/cpt/hf"  # sft_tiny.yaml's own, no cpt in this run


@pytest.mark.parametrize("override, message", [
    ("sft.train.stepz=3", "unknown config key 'train.stepz'. Did you mean 'train.steps'?"),
    ("outdir=x", "unknown pipeline key 'outdir'"),
    ("stages=[rl,cpt]", "must keep the order cpt, sft, rl"),
    ("stages=[dpo]", "bad value for 'stages'"),
    ("cpt.optim.lr=fast", "bad value for 'optim.lr'"),
])
def test_bad_pipeline_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_pipeline(PIPELINE, [override])
    assert message in str(err.value)


def test_micro_pipeline_exports_every_stage_writes_report_and_resumes_to_nothing(tmp_path):
    from transformers import AutoModelForCausalLM

    import llada_train.model  # noqa: F401  (Auto registration)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llada_train.cli", "pipeline", "--config", PIPELINE, f"out_dir={tmp_path}", *MICRO]
    first = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    for stage in ("cpt", "sft", "rl"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / stage / "hf")
        assert model.config.model_type == "llada2_moe"
        assert (tmp_path / stage / "DONE").is_file()
    report = (tmp_path / "report.md").read_text()
    for plot in ("loss.png", "rl.png", "decoding.png"):
        assert (tmp_path / plot).stat().st_size > 5000, plot
        assert f"({plot})" in report
    scores = json.loads((tmp_path / "heldout_scores.json").read_text())
    assert set(scores) == {"SFT S", "SFT Q", "RL S", "RL Q"}
    assert all(0 <= v["accuracy"] <= 1 and v["tpf"] > 0 for v in scores.values())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("finished earlier") == 3
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps  # nothing rewritten


def test_config_reference_is_in_sync_with_the_schemas():
    from llada_train.config import reference_markdown
    from llada_train.stages.registry import STAGES

    expected = reference_markdown({s.name: s.config_schema() for s in STAGES.values()})
    assert (REPO / "docs/config.md").read_text() == expected, (
        "docs/config.md is stale: run `python -m llada_train.stages.registry > docs/config.md`")


# keys a shipped config leaves `???` for the user, with stand-in values
REQUIRED = {"convert_cpt.yaml": ["model.init_from=models/converted", "diffusion.mask_embed_noise_std=0.1"],
            "sft_smollm2.yaml": ["model.init_from=runs/smollm2/converted", "data.train=runs/smollm2/distill.jsonl"],
            "pipeline_smollm2.yaml": [f"convert.from={REPO}"]}  # `make smollm2` writes the GGUF it names


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    """Each stage config in llada_train/configs/ passes its stage's schema and validation (pipeline configs: all
    the stage configs they name)."""

    from llada_train.stages.registry import load_stage_config

    path = str(CONFIGS / name)
    if name.startswith("pipeline"):
        assert load_pipeline(path, REQUIRED.get(name, [])).stages
        return
    stage = {"convert": "cpt"}.get(name.split("_")[0], name.split("_")[0])
    assert load_stage_config(stage, path, REQUIRED.get(name, [])).run.name
    if name in REQUIRED:  # without the user's values it refuses to start
        with pytest.raises(ConfigError, match="missing value"):
            load_stage_config(stage, path)
