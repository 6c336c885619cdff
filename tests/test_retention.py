"""The knowledge-retention evaluation (docs/smollm2.md): the question set, its checkers, the
statistics on fixed inputs, and one end-to-end `llada-train eval-retention` on tiny models."""

import json
from collections import Counter

import pytest
import torch

from llada_train.data.retention_questions import (
    KINDS,
    QUESTIONS,
    build_questions,
    contains_answer,
    is_correct,
    load_questions,
    number_answer,
)
from llada_train.retention import accuracy, markdown, retention, wilson

# ---- statistics


def test_wilson_interval_on_fixed_counts():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    lo, hi = wilson(0, 10)  # not empty at k = 0: the upper end is z^2 / (n + z^2)
    assert lo == 0.0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.277532, abs=1e-6)
    lo, hi = wilson(81, 263)  # inside [0, 1], around the point estimate, narrower with n
    assert lo < 81 / 263 < hi and hi - lo < wilson(8, 26)[1] - wilson(8, 26)[0]


def test_accuracy_and_retention_on_fixed_inputs():
    source = [True, True, True, False, False, True]
    model = [True, False, True, True, False, False]
    assert accuracy(model) == {"n": 6, "correct": 3, "accuracy": 0.5, "ci95": list(wilson(3, 6))}
    # of the 4 the source gets right, the model keeps 2; its right answer to a source miss does not count
    assert retention(source, model) == {"n": 4, "kept": 2, "retention": 0.5, "ci95": list(wilson(2, 4))}
    assert retention([False, False], [True, True])["retention"] is None
    assert accuracy([])["accuracy"] is None
    with pytest.raises(ValueError, match="2 source results, 1 model results"):
        retention([True, False], [True])


# ---- checkers


def test_fact_checker_is_whole_word_case_and_accent_insensitive():
    assert contains_answer("The capital of France is PARIS.", ["Paris"])
    assert not contains_answer("A Parisian café.", ["Paris"])  # whole words only
    assert contains_answer("It is Bogota, in the Andes", ["Bogotá"])  # accents folded
    assert contains_answer("Nuku'alofa", ["Nuku\u02bbalofa"])  # the okina, like an apostrophe, is dropped
    assert contains_answer("It's Port au Prince.", ["Port-au-Prince"])  # punctuation read as spaces
    assert contains_answer("Washington, D.C. is the capital", ["Washington, D.C.", "Washington"])
    assert not contains_answer("", ["Paris"]) and not contains_answer("Paris", [""])
    row = {"kind": "fact", "answers": ["New Delhi"]}
    assert is_correct(row, "new delhi") and not is_correct(row, "Delhi")


def test_symbol_checker_is_case_sensitive():
    row = {"kind": "symbol", "answers": ["Fe"]}
    assert is_correct(row, "The chemical symbol for iron is Fe.") and is_correct(row, "(Fe)")
    assert not is_correct(row, "fe") and not is_correct(row, "Fear of iron") and not is_correct(row, "FE")


def test_number_checker_reads_the_first_number_that_is_not_an_operand():
    row = {"kind": "number", "answers": ["19"], "operands": [12, 7]}
    for text in ("12 + 7 = 19", "The answer is 19.", "19", "12 plus 7 makes 19.0 in total, not 20"):
        assert is_correct(row, text), text
    for text in ("12 + 7 = 14", "It is 20, or 19", "twelve plus seven", "12 + 7 = 190", "1.19"):
        assert not is_correct(row, text), text
    assert number_answer("15-8=7", [15, 8]) == 7  # a minus touching the operand: still the operand
    assert is_correct({"kind": "number", "answers": ["1019"], "operands": [1000, 19]}, "That is 1,019.")
    with pytest.raises(ValueError, match="unknown kind 'essay'"):
        is_correct({"id": "x", "kind": "essay"}, "")


def test_rg_checker_is_the_familys_score_answer():
    row = next(r for r in load_questions() if r["family"] == "rg:chain_sum")
    answer = row["answers"][0]
    assert is_correct(row, answer) and is_correct(row, f"{answer}<|im_end|>")  # cut at template markup
    assert not is_correct(row, f"The answer is {answer}.")  # strict: the bare answer only


# ---- the question set


def test_question_set_is_the_committed_file_and_each_answer_passes_its_checker():
    rows = load_questions()
    assert rows == build_questions(), f"{QUESTIONS} is stale: python -m llada_train.data.retention_questions"
    assert len(rows) >= 300 and len({r["id"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == set(KINDS)
    families = Counter(r["family"] for r in rows)
    assert families["capitals"] >= 100 and families["arithmetic"] == 100 and families["rg:leg_counting"] == 20
    for row in rows:
        assert is_correct(row, row["answers"][0]), row["id"]
        if row["kind"] != "rg":  # echoing the question is never right
            assert not is_correct(row, row["question"]), row["id"]
    assert Counter(r["family"] for r in load_questions(limit=60)).keys() >= {"capitals", "arithmetic",
                                                                              "element_names"}


# ---- end to end, tiny models


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """An AR source (a random tiny Llama with the project tokenizer) and the tiny preset LLaDA2 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llada_train.data.tokenizer import load_tokenizer
    from llada_train.model import LLaDA2MoeModelLM
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("retention")
    torch.manual_seed(0)
    tok = load_tokenizer(None)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    source.save_pretrained(root / "source")
    tok.save_pretrained(root / "source")
    LLaDA2MoeModelLM(tiny_config()).save_pretrained(root / "tiny")
    return root / "source", root / "tiny"


def test_eval_retention_end_to_end_on_tiny_models(tiny_pair, tmp_path, capsys):
    from llada_train.cli import main

    source, tiny = tiny_pair
    out = tmp_path / "retention.json"
    assert main(["eval-retention", "--source", str(source), "--model", str(tiny), "--out", str(out), "--limit", "10",
                 "--modes", "Q,S", "--block-length", "16", "--gen-length", "32", "--max-new-tokens", "8"]) == 0
    result = json.loads(out.read_text())
    assert result["questions"] == 10 and len(result["rows"]) == 10
    src = result["source"]
    assert src["n"] == 10 and 0 <= src["ci95"][0] <= src["ci95"][1] <= 1
    assert [(m["path"], m["mode"]) for m in result["models"]] == [(str(tiny), "Q"), (str(tiny), "S")]
    for m in result["models"]:
        assert m["n"] == 10 and m["retention"]["n"] == src["correct"]
        assert m["tokens_per_forward"] > 0 and m["seconds"] >= 0
        assert sum(k for k, _ in m["by_family"].values()) == m["correct"]
    for row in result["rows"]:
        assert {"source", f"{tiny}:Q", f"{tiny}:S"} <= row.keys()
        assert row[f"{tiny}:Q"]["nfe"] >= 1
    printed = capsys.readouterr()
    assert printed.out == markdown(result) and "(source, AR)" in printed.out  # the table; progress on stderr
    assert f"[retention] wrote {out}" in printed.err


def test_eval_retention_refuses_a_diffusion_model_as_source(tiny_pair, tmp_path, capsys):
    from llada_train.cli import main

    _, tiny = tiny_pair
    assert main(["eval-retention", "--source", str(tiny), "--model", str(tiny), "--out", str(tmp_path / "r")]) == 2
    assert "an LLaDA2-MoE model; --source takes the autoregressive model" in capsys.readouterr().err
