"""The estimator benchmark's answer-spread statistics, by hand on built-in `max` rows."""

import pytest

from benchmarks.bench_rl_estimators import answer_spread


def test_answer_spread_by_hand():
    rows = [{"task": "max", "answer": "9"}, {"task": "max", "answer": "4"}]
    samples = [["9", "8", "8", "7"],  # 3 distinct, mode 8 wrong; errors 0, 1, 1, 2
               ["4", "4", "x", "0"]]  # 3 distinct, mode 4 right; errors 0, 0, (not an integer), 4
    got = answer_spread(rows, samples)
    assert got["distinct_of_k"] == 3.0 and got["mode_correct"] == 0.5
    assert got["int_abs_error_share"] == pytest.approx({"0": 3 / 7, "1": 2 / 7, "2": 1 / 7, ">=3": 1 / 7})
    assert "int_abs_error_share" not in answer_spread([{"task": "max", "answer": "a b"}], [["c", "d"]])
