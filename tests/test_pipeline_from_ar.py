"""A pipeline that starts from an AR model (`convert:`, `distill:`, `retention:`): conversion before the
first stage, distillation rows that are the source's own greedy answers, the retention table in the
report, and a re-run that redoes nothing."""

import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llada_train.cli import main
from llada_train.config import ConfigError
from llada_train.data.chat import render_prompt
from llada_train.stages.pipeline import load_pipeline

from .test_convert import N_TOKENS, SMALL

EOS = 1
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


def save_byte_tokenizer(path):
    """Byte-level, no merges: every prompt is its own token sequence (a word-level toy vocabulary would read
    the general prompts as a row of <unk>). Ids: <s> </s> <unk>, the 256 byte symbols, spare rows."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = ["<s>", "</s>", "<unk>", *alphabet]
    vocab = {t: i for i, t in enumerate(symbols + [f"spare{i}" for i in range(len(symbols), N_TOKENS)])}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    assert len(tok) == N_TOKENS
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A random Llama whose greedy answers depend on the prompt (weights of std 0.3) and often end within 6
    tokens (the head's EOS row doubled): 9 of the 24 prompts get a non-empty answer that ends."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=N_TOKENS, initializer_range=0.3, **SMALL)).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2
    path = tmp_path_factory.mktemp("ar") / "src"
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def _pipeline_file(tmp_path, source) -> str:
    spec = {
        "out_dir": str(tmp_path / "run"), "stages": ["sft"], "convert": {"from": str(source), "shift_logits": True},
        "distill": {"n": 24, "max_new_tokens": 6, "batch_size": 5},
        "retention": {"modes": ["Q"], "limit": 5, "gen_length": 8, "block_length": 8, "converted": True},
        "sft": {"config": "sft_tiny", "data": {"num_eval": 0, "max_len": 128},
                "diffusion": {"block_size": 8}, "train": {"steps": 2, "batch_size": 4, "save_every": 2,
                                                          "eval_every": 0}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_pipeline_converts_distills_trains_and_reports_retention(tmp_path, source_dir, capsys):
    path = _pipeline_file(tmp_path, source_dir)
    assert main(["pipeline", "--config", path]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "converted" / "config.json").read_text())["shift_logits"] is True
    assert (run / "source").resolve() == source_dir.resolve()
    assert load_pipeline(path, []).configs["sft"].data.train == str(run / "distill.jsonl")

    # Every distillation row is the source's own greedy answer, asked alone (no batch, no padding).
    rows = [json.loads(line) for line in (run / "distill.jsonl").read_text().splitlines()]
    assert 0 < len(rows) < 24  # some answers did not end within 6 tokens, or were empty, and were dropped
    assert len({r["messages"][1]["content"] for r in rows}) > 1
    source, tok = LlamaForCausalLM.from_pretrained(source_dir).eval(), AutoTokenizer.from_pretrained(source_dir)
    for row in rows:
        prompt, answer = (m["content"] for m in row["messages"])
        ids = tok(render_prompt(prompt, tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = source.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)[0]
        new = new[ids.shape[1]:].tolist()
        assert EOS in new and tok.decode(new[:new.index(EOS)], skip_special_tokens=True) == answer

    result = json.loads((run / "retention.json").read_text())
    assert [m["path"] for m in result["models"]] == [str(run / "converted"), str(run / "sft" / "hf")]
    assert result["questions"] == 5 and all(m["n"] == 5 for m in result["models"])
    assert "Knowledge retention" in (run / "report.md").read_text()

    stamp = (run / "distill.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pipeline", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "convert: done earlier" in out and "sft: finished earlier" in out
    assert (run / "distill.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("section, message", [
    ({"convert": {"shift_logits": True}}, "convert.from: missing"),
    ({"convert": {"from": "/no/such.gguf"}}, r"convert.from: /no/such.gguf does not exist \(for SmolLM2 run"),
    ({"convert": {"from": ".", "dtype": "int8"}}, "convert.dtype"),
    ({"convert": {"from": "."}, "distill": {"n": 0}}, r"distill.n: 0; use an integer >= 1"),
    ({"convert": {"from": "."}, "distill": {"prompts": 3}}, r"distill: unknown key\(s\) \['prompts'\]"),
    ({"distill": {"n": 5}}, "need a convert: section"),
    ({"convert": {"from": "."}, "retention": {"modes": ["X"]}}, r"retention.modes: \['X'\]"),
    ({"convert": {"from": "."}, "retention": {"limit": 0}}, r"retention.limit: 0; use an integer >= 1 or null"),
])
def test_from_ar_mistakes_name_the_key(tmp_path, section, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path), "stages": ["sft"], **section,
                                    "sft": {"config": "sft_tiny"}}))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(str(path), [])


def test_submit_asks_for_the_conversion_first(tmp_path, source_dir, capsys):
    """`llada-train submit` runs stages on the cluster, not the convert:/distill: steps: it refuses until they
    ran (`python -m llada_train.stages.from_ar`), then renders the stages' jobs."""
    from llada_train.slurm import main_submit
    from llada_train.stages.from_ar import main as prepare_main

    path = _pipeline_file(tmp_path, source_dir)
    assert main_submit(["pipeline", "--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "convert:/distill: steps have not run" in err and "python -m llada_train.stages.from_ar" in err
    assert prepare_main(["--config", path]) == 0
    assert (tmp_path / "run" / "distill.jsonl").is_file() and not (tmp_path / "run" / "sft").exists()
    capsys.readouterr()
    assert main_submit(["pipeline", "--config", path, "--dry-run"]) == 0
    assert "sft: would write" in capsys.readouterr().err
