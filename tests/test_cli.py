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
        "plan": [["plan", "--config", str(tmp / "missing.yaml"), "--nodes", "1", "--gpus-per-node", "8"],
                 ["plan", "--config", "configs/cpt_tiny.yaml", "--nodes", "0", "--gpus-per-node", "8"]],
        "fp4-analysis": [["fp4-analysis", "--model-dir", str(tmp / "missing")], ["fp4-analysis", "--seed", "x"]],
        "report": [["report", str(tmp / "missing")], ["report", str(bad_dir)]],
        "eval": [["eval", "--model", str(tmp / "missing"), "--tasks", "rg_aiw"],
                 ["eval", "--model", str(model_dir), "--tasks", "no_such_task"]],
        "eval-retention": [["eval-retention", "--source", str(tmp / "missing"), "--model", str(model_dir), "--out",
                            str(tmp / "r.json")],
                           ["eval-retention", "--source", str(_llama_source(tmp)), "--model", str(model_dir),
                            "--out", str(tmp / "r.json"), "--modes", "Q,fast"]],
        "eval-tasks": [["eval-tasks", "--config", str(tmp / "missing.yaml"), "--out", str(tmp / "tasks")],
                       ["eval-tasks", "--config", "configs/sft_tiny.yaml", "--out", str(tmp / "tasks")]],
    }


def _llama_source(tmp):
    """A directory that passes eval-retention's --source check (an AR config.json); nothing is loaded."""
    src = tmp / "ar_source"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    return src


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


# ---- user mistakes vs bugs inside the tools -------------------------------------------------------------


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def _llama_dir(tmp):
    out = tmp / "llama"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    return out


@pytest.mark.parametrize("case", ["no_model", "not_llada", "bad_gen_length", "bad_batch_size", "bad_prompts_row",
                                  "no_convert_source"])
def test_tool_user_mistake_is_one_error_line(case, tmp_path, model_dir, capsys):
    """A UserError raised where a tool reads its input: exit 2, one `error:` line naming the input, no traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{"prompt": oops}\n')
    argv, names = {
        "no_model": (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "/nonexistent/model"),
        "not_llada": (["generate", "--model", str(_llama_dir(tmp_path)), "--prompt", "hi"], "model_type 'llama'"),
        "bad_gen_length": (["generate", "--model", str(model_dir), "--prompt", "hi", "--gen-length", "0"],
                           "gen_length must be an integer >= 1"),
        "bad_batch_size": (["generate", "--model", str(model_dir), "--prompts", str(prompts), "--batch-size", "0"],
                           "--batch-size"),
        "bad_prompts_row": (["generate", "--model", str(model_dir), "--prompts", str(prompts), "--device", "cpu"],
                            f"{prompts}:2: not valid JSON"),
        "no_convert_source": (["convert", "--from", "/nonexistent/ckpt", "--to", str(tmp_path / "out")],
                              "--from /nonexistent/ckpt: not a directory"),
    }[case]
    assert main(argv) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and names in lines[0], lines


def _tool_call(tool: str, tmp_path, model_dir) -> tuple[str, list[str]]:
    """(function the tool calls, argv that reaches it)."""
    return {
        "generate": ("llada_train.generate_cli.generate",
                     ["generate", "--model", str(model_dir), "--prompt", "hi", "--gen-length", "4", "--block-length",
                      "4", "--device", "cpu"]),
        "convert": ("llada_train.convert._read_config",
                    ["convert", "--from", str(model_dir), "--to", str(tmp_path / "out")]),
        "report": ("llada_train.report.write_report", ["report", str(tmp_path)]),
    }[tool]


@pytest.mark.parametrize("tool", ["generate", "convert", "report"])
def test_bug_inside_a_tool_keeps_its_traceback(tool, tmp_path, model_dir, monkeypatch, capsys):
    """A ValueError from inside a tool (torch, numpy and transformers raise them too) is a bug: it leaves
    `main` as itself, instead of becoming an `error:` line that reads like the user's typo."""
    from llada_train.errors import UserError

    target, argv = _tool_call(tool, tmp_path, model_dir)

    def fail(exc):
        def raise_(*args, **kwargs):
            raise exc

        return raise_

    monkeypatch.setattr(target, fail(ValueError("boom")))
    with pytest.raises(ValueError, match="boom") as e:
        main(argv)
    assert not isinstance(e.value, UserError)
    assert _error_lines(capsys) == []
    monkeypatch.setattr(target, fail(UserError("your input is wrong")))  # the same spot, a user mistake
    assert main(argv) == 2
    assert _error_lines(capsys) == ["error: your input is wrong"]
