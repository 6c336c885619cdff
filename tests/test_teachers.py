"""Imperfect teachers (`data.teacher`): the bug shows exactly where it should, on the asked share of
train rows, the same rows in every run, never on held-out rows; bad settings name the key."""

import json
import math
import operator

import pytest

from llada_train.data.tasks import make_rows
from llada_train.errors import ConfigError
from llada_train.stages.registry import load_stage_config
from llada_train.stages.sft import load_sft_splits
from llada_train.teachers import apply_teacher


def _digits(row):
    return row["messages"][0]["content"].split(" ", 1)[1]


def test_sorting_teacher_drops_repeats_on_the_asked_share_of_the_rows_it_applies_to():
    rows = make_rows(["sorting", "max"], 4000, split="train", seed=3, kind="sft")
    taught, stats = apply_teacher(rows, "sorting_drops_repeats", 0.6, seed=3)
    repeats = [r for r in rows if r["task"] == "sorting" and len(set(_digits(r))) < len(_digits(r))]
    assert stats["rows"] == 2000 and stats["bug_applies"] == len(repeats) > 500
    wrong = 0
    for before, after in zip(rows, taught, strict=True):
        if after is before:  # untouched: gold, or a row the bug does not reach
            continue
        wrong += 1
        digits = _digits(before)
        assert before["task"] == "sorting" and len(set(digits)) < len(digits)
        assert after["answer"] == "".join(sorted(set(digits))) != before["answer"] == after["gold"]
        assert after["messages"][-1]["content"] == after["answer"] and after["messages"][0] == before["messages"][0]
    assert wrong == stats["wrong"]
    n, p = len(repeats), 0.6
    assert abs(wrong - n * p) < 4 * math.sqrt(n * p * (1 - p))  # a fair 60% draw over the applicable rows
    assert stats["right_share"] == pytest.approx(1 - wrong / 2000, abs=1e-4)
    again, _ = apply_teacher(rows, "sorting_drops_repeats", 0.6, seed=3)
    assert again == taught  # the same rows are wrong in every run
    other, _ = apply_teacher(rows, "sorting_drops_repeats", 0.6, seed=4)
    assert other != taught


def _left_to_right(expression: str) -> int:
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    tokens = expression.split()
    value = int(tokens[0])
    for i in range(1, len(tokens), 2):
        value = ops[tokens[i]](value, int(tokens[i + 1]))
    return value


def test_arithmetic_teacher_ignores_precedence_only_where_it_matters():
    options = {"rg:basic_arithmetic": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1,
                                       "operators": ["+", "-", "*"], "allow_parentheses": True,
                                       "allow_negation": False}}
    # allow_parentheses: True, since with False reasoning-gym prints the expression without the
    # parentheses its answer follows (18% of rows contradict their own question)
    rows = make_rows(["rg:basic_arithmetic"], 400, split="train", seed=0, kind="sft", **options)
    taught, stats = apply_teacher(rows, "arithmetic_left_to_right", 1.0, seed=0)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        expression = json.loads(before["rg_entry"])["metadata"]["expression"]
        gold = int(before["answer"])
        assert gold == eval(expression)  # the generator's gold follows precedence
        if "(" in expression:  # not this teacher's kind of problem
            assert after is before
            continue
        naive = _left_to_right(expression)
        if naive == gold:
            assert after is before
        else:
            changed += 1
            assert after["answer"] == str(naive) and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 30  # error_rate 1: every applicable row


def test_sft_applies_the_teacher_to_train_rows_only(tmp_path):
    cfg = load_stage_config("sft", "sft_tiny", ["data.tasks=[sorting]", "data.num_train=600", "data.num_eval=200",
                                                 "data.teacher=sorting_drops_repeats", "data.teacher_error_rate=1.0"])
    train, held_out = load_sft_splits(cfg)
    assert "sorting_drops_repeats" in train.source and "right on" in train.source
    assert any("gold" in r for r in train.rows)
    for row in held_out.rows:  # held-out rows keep the gold answer
        assert row["answer"] == "".join(sorted(_digits(row)))


@pytest.mark.parametrize(("override", "message"), [
    (["data.teacher=nope"], r"data.teacher.*sorting_drops_repeats"),
    (["data.teacher=arithmetic_left_to_right"], r"data.teacher.*rg:basic_arithmetic"),
    (["data.teacher=sorting_drops_repeats", "data.teacher_error_rate=0"], r"data.teacher_error_rate"),
])
def test_teacher_settings_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_stage_config("sft", "sft_tiny", ["data.tasks=[sorting,max]", *override])


def test_report_names_what_sft_lacked_and_splits_held_out_rows_by_the_bug(tmp_path):
    from llada_train.config import to_yaml
    from llada_train.data.prompts import load_heldout_rows
    from llada_train.report import _teacher_subsets, gain_lines

    sft = load_stage_config("sft", "sft_tiny", ["data.tasks=[sorting]", "data.teacher=sorting_drops_repeats"])
    rl = load_stage_config("rl", "rl_tiny", ["data.tasks=[sorting,max]", "data.num_eval=300"])
    for stage, cfg in (("sft", sft), ("rl", rl)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.yaml").write_text(to_yaml(cfg))
    rows = load_heldout_rows(rl.data, rl.run.seed)
    sentence, subsets = _teacher_subsets(tmp_path, rows, rl)
    assert "drops repeated" in sentence and "exact_match" in sentence and "60%" in sentence
    (label_bug, bug), (_, rest) = subsets
    repeats = [i for i, r in enumerate(rows)
               if r["task"] == "sorting" and len(set(r["prompt"][5:])) < len(r["prompt"][5:])]
    assert bug == repeats and 0 < len(bug) < len(rows)
    assert sorted(bug + rest) == [i for i, r in enumerate(rows) if r["task"] == "sorting"]
    lines = gain_lines(rows, [True] * len(rows), [False] * len(rows), subsets)
    assert any(line.startswith(f"| {label_bug} | {len(bug)} |") for line in lines)
    assert lines[-1].startswith(f"| all | {len(rows)} | 1.000 | 0.000 | -1.000")
    (tmp_path / "sft" / "config.yaml").write_text(to_yaml(load_stage_config("sft", "sft_tiny")))
    assert _teacher_subsets(tmp_path, rows, rl) == ("", ())  # gold SFT labels: nothing to say


def test_carry_dropping_teacher_matches_column_addition_without_carries():
    options = {"rg:chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}
    rows = make_rows(["rg:chain_sum"], 600, split="train", seed=1, kind="sft", **options)
    taught, stats = apply_teacher(rows, "sum_drops_carries", 1.0, seed=1)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        a, op, b = json.loads(before["rg_entry"])["metadata"]["expression"].split()
        gold = int(before["answer"])
        assert gold == (int(a) + int(b) if op == "+" else int(a) - int(b))
        carries = op == "+" and any((int(a) // 10**k % 10) + (int(b) // 10**k % 10) >= 10 for k in range(3))
        if not carries:
            assert after is before
            continue
        changed += 1
        column_sum = sum(((int(a) // 10**k % 10) + (int(b) // 10**k % 10)) % 10 * 10**k for k in range(3))
        assert after["answer"] == str(column_sum) != before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 60
