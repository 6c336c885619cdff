"""Every command answers a user mistake the same way: one `error:` line (or argparse's usage line)
and exit code 2, never a traceback."""

import pytest

from llada_train.cli import COMMANDS, main
from tests.conftest import tiny_config

STAGES = ("cpt", "sft", "rl", "pipeline")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llada_train.model import LLaDA2MoeModelLM

    out = tmp_path_factory.mktemp("model")
    LLaDA2MoeModelLM(tiny_config()).save_pretrained(out)
    return out


def _mistakes(tmp, model_dir) -> dict[str, list[list[str]]]:
    """command -> [argv with a missing path, argv with a bad value]."""
    bad_dir = tmp / "not_a_run"
    bad_dir.mkdir(exist_ok=True)
    stage = {s: [[s, "--config", str(tmp / "missing.yaml")],
                 [s, "--config", f"configs/{s}_tiny.yaml", f"{'sft.' if s == 'pipeline' else ''}train.steps=-1"]]
             for s in STAGES}
    return {
        **stage,
        "generate": [["generate", "--model", str(tmp / "missing"), "--prompt", "hi"],
                     ["generate", "--model", str(model_dir), "--prompt", "hi", "--threshold", "7"]],
        "convert": [["convert", "--from", str(tmp / "missing"), "--to", str(tmp / "out")],
                    ["convert", "--from", str(model_dir), "--to", str(tmp / "out"), "--dtype", "int3"]],
        "export": [["export", str(tmp / "missing")], ["export", str(bad_dir)]],
        "submit": [["submit", "cpt", "--config", str(tmp / "missing.yaml")],
                   ["submit", "cpt", "--config", "configs/cpt_tiny.yaml", "train.steps=-1"]],
        "status": [["status", str(tmp / "missing")], ["status", str(bad_dir)]],
        "fp4-analysis": [["fp4-analysis", "--model-dir", str(tmp / "missing")], ["fp4-analysis", "--seed", "x"]],
        "report": [["report", str(tmp / "missing")], ["report", str(bad_dir)]],
    }


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


def test_every_command_reports_user_mistakes_without_a_traceback(tmp_path, model_dir, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    mistakes = _mistakes(tmp_path, model_dir)
    assert set(mistakes) == set(STAGES) | set(COMMANDS)  # a new command needs its cases here
    for cases in mistakes.values():
        for argv in cases:
            code = _exit_code(argv)
            err = capsys.readouterr().err
            assert code == 2, (argv, code, err[-2000:])
            assert "Traceback" not in err and "error:" in err, (argv, err[-2000:])
