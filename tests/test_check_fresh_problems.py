"""benchmarks/check_fresh_problems.py: fresh problems exclude every train question, and the verdict
is reasoning-gym's own (gold passes, a teacher's wrong answer fails)."""

import json

import pytest

from benchmarks.check_fresh_problems import fresh_problems, paired, verify, wilson
from llada_train.data.tasks import make_rows
from llada_train.teachers import apply_teacher

AIW = {"task_types": ["siblings", "friends"], "task_type_weights": [0.5, 0.5]}


def test_fresh_problems_skip_seen_questions_and_gold_passes_the_verifier_where_the_teacher_fails():
    train = make_rows(["rg:aiw"], 600, split="train", seed=0, kind="sft", **{"rg:aiw": AIW})
    seen = {r["messages"][0]["content"] for r in train}
    fresh = fresh_problems("rg:aiw", AIW, 200, seed=31, seen=seen)
    assert len({r["prompt"] for r in fresh}) == 200 and not seen & {r["prompt"] for r in fresh}
    for row in fresh:
        assert verify("rg:aiw", AIW, json.loads(row["entry"])["answer"] + "<|eos|>", row["entry"])
    taught, _ = apply_teacher(train, "aiw_forgets_herself", 1.0, seed=0)
    wrong = [r for r in taught if "gold" in r][:20]
    assert len(wrong) == 20
    for row in wrong:
        assert not verify("rg:aiw", AIW, row["answer"], row["rg_entry"])


def test_intervals_match_their_definitions():
    lo, hi = wilson(30, 100)
    assert lo < 0.30 < hi and hi - lo == pytest.approx(0.177, abs=0.002)  # the textbook Wilson width at 30/100
    mean, lo, hi = paired([True, False, False, True] * 50, [True, True, False, True] * 50)
    assert mean == pytest.approx(0.25) and lo < 0.25 < hi
