"""One registration per stage or estimator: the CLI, the pipeline and Slurm read the registries, and
a bug inside a stage keeps its traceback while a user mistake stays one `error:` line (exit 2)."""

import json
from dataclasses import dataclass

import pytest

from llada_train.cli import main
from llada_train.config import CPTConfig
from llada_train.rl.estimators import ESTIMATORS, register_estimator
from llada_train.stages.registry import STAGES, register_stage
from tests.conftest import CONFIGS

CALLS: list = []


@dataclass
class ToyConfig(CPTConfig):
    """A stage schema of its own: CPT's keys plus one."""

    toy_factor: int = 3  # a key only this stage has


def run_toy(cfg) -> bool:
    CALLS.append(cfg)
    return True


@pytest.fixture
def toy_stage():
    CALLS.clear()
    register_stage("toy", "a stage registered by a test", ToyConfig, run_toy)
    yield
    del STAGES["toy"]


def test_a_registered_stage_is_seen_by_the_cli_pipeline_and_slurm(toy_stage, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "toy" in capsys.readouterr().out
    # the CLI: its schema, then its run function
    assert main(["toy", "--config", "cpt_tiny", "toy_factor=5", "--print-config"]) == 0
    assert "toy_factor: 5" in capsys.readouterr().out
    assert main(["toy", "--config", "cpt_tiny", f"run.out_dir={tmp_path / 'alone'}", "toy_factor=7"]) == 0
    assert [c.toy_factor for c in CALLS] == [7] and CALLS[0].run.out_dir == str(tmp_path / "alone")
    # the pipeline: after the built-in stages in registration order, wired to the previous stage's export
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(f"out_dir: {tmp_path / 'pipe'}\nstages: [rl, toy]\nreport: false\n"
                        "rl: {config: rl_tiny}\ntoy: {config: cpt_tiny, toy_factor: 2}\n")
    assert main(["pipeline", "--config", str(pipeline), "--print-config"]) == 0
    assert "# ---- toy ----" in capsys.readouterr().out
    CALLS.clear()
    assert main(["pipeline", "--config", str(pipeline), "stages=[toy]", "toy.toy_factor=9"]) == 0
    assert [c.toy_factor for c in CALLS] == [9] and (tmp_path / "pipe" / "toy" / "DONE").is_file()
    assert CALLS[0].run.out_dir == str(tmp_path / "pipe" / "toy")
    pipeline.write_text(pipeline.read_text().replace("[rl, toy]", "[toy, rl]"))
    assert main(["pipeline", "--config", str(pipeline)]) == 2  # order = registration order
    assert "cpt, sft, rl, toy" in capsys.readouterr().err
    # Slurm: the submit parser accepts it and renders its job script
    assert main(["submit", "toy", "--config", "cpt_tiny", f"run.out_dir={tmp_path / 'job'}", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "toy" in script and "#SBATCH" in script


def test_an_unregistered_stage_is_a_user_error(capsys):
    assert main(["toy", "--config", "cpt_tiny"]) == 2
    assert "unknown command 'toy'" in capsys.readouterr().err


def test_a_registered_estimator_is_used_by_the_rl_stage(tmp_path, capsys):
    from llada_train.rl.ebpo import EBPOConfig, build_batch, ebpo_update

    used = []

    def counted_build(model, input_ids, response_mask, rewards, policy, options, **kwargs):
        used.append("build")
        assert options is None  # an estimator without a config section of its own
        return build_batch(model, input_ids, response_mask, rewards, policy, EBPOConfig(), **kwargs)

    def counted_update(model, step_fn, batch, policy, options, **kwargs):
        used.append("update")
        return ebpo_update(model, step_fn, batch, policy, EBPOConfig(), **kwargs)

    args = ["rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "model.init_from=", f"run.out_dir={tmp_path}",
            "train.steps=2", "train.batch_size=2", "rl.group_size=2", "rl.minibatch_size=4", "data.num_train=8",
            "data.num_eval=0", "train.save_every=100", "train.log_every=1", "train.export_hf=false",
            "rl.estimator=counted"]
    assert main(args) == 2  # not registered yet: the key and the registered names
    err = capsys.readouterr().err
    assert "rl.estimator" in err and "ebpo" in err and "diffu_grpo" in err
    register_estimator("counted", counted_build, counted_update)
    try:
        assert main(args) == 0
    finally:
        del ESTIMATORS["counted"]
    assert used == ["build", "update"] * 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_a_bug_inside_a_stage_keeps_its_traceback_and_a_user_mistake_exits_2(tmp_path, monkeypatch, capsys):
    from llada_train.model import LLaDA2MoeModelLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    args = ["cpt", "--config", "cpt_tiny", f"run.out_dir={tmp_path / 'run'}", f"data.paths=[{corpus}]",
            "data.eval_fraction=0", "data.cache_dir=", "train.steps=2", "train.batch_size=2"]

    def broken_forward(self, *args, **kwargs):
        raise ValueError("boom: a bug, not the user's mistake")

    monkeypatch.setattr(LLaDA2MoeModelLM, "forward", broken_forward)
    with pytest.raises(ValueError, match="boom"):
        main(args)
    assert "error:" not in capsys.readouterr().err
    monkeypatch.undo()
    args[3] = f"run.out_dir={tmp_path / 'mistake'}"
    assert main([*args, "precision.fp4_block=12"]) == 2  # checked when the config loads, before any work
    err = capsys.readouterr().err
    assert "precision.fp4_block" in err and "Traceback" not in err
    assert not (tmp_path / "mistake").exists()


def test_config_checks_mirror_the_kernels_sets():
    from llada_train.config import FP4_BLOCKS, RHT_DIMS
    from llada_train.kernels import fp4, hadamard

    assert RHT_DIMS == hadamard.RHT_DIMS
    x = __import__("torch").randn(4, 128)
    for block in (4, *FP4_BLOCKS, 256):
        try:
            fp4.quantize_dequantize(x, fmt="e1m2", block_size=block, impl="torch")
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (block in FP4_BLOCKS), block
