"""Imperfect teachers (`data.teacher`): the bug shows exactly where it should, on the asked share of
train rows, the same rows in every run, never on held-out rows; bad settings name the key."""

import json
import math
import operator
import re

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


def _right_grouped(expression: str) -> int:
    """A naive reference: `a o1 b o2 c` as `a o1 (b o2 c)`, through Python's own evaluator."""
    a, o1, b, o2, c = expression.split()
    return eval(f"{a} {o1} ({b} {o2} {c})")


def test_right_to_left_teacher_groups_chains_from_the_right_only_where_it_matters():
    options = {"rg:chain_sum": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}}
    rows = make_rows(["rg:chain_sum"], 500, split="train", seed=2, kind="sft", **options)
    taught, stats = apply_teacher(rows, "chain_sum_right_to_left", 1.0, seed=2)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        expression = json.loads(before["rg_entry"])["metadata"]["expression"]
        assert int(before["answer"]) == eval(expression)  # gold groups from the left
        grouped = _right_grouped(expression)
        if grouped == int(before["answer"]):
            assert after is before
            continue
        changed += 1
        assert expression.split()[1] == "-"  # only a leading minus makes the grouping matter
        assert after["answer"] == str(grouped) and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 150


AIW = {"rg:aiw": {"task_types": ["siblings", "friends"], "task_type_weights": [0.5, 0.5]}}


def test_aiw_teacher_forgets_herself_on_the_friends_wording_only():
    rows = make_rows(["rg:aiw"], 400, split="train", seed=5, kind="sft", **AIW)
    taught, stats = apply_teacher(rows, "aiw_forgets_herself", 1.0, seed=5)
    friends = 0
    for before, after in zip(rows, taught, strict=True):
        entry = json.loads(before["rg_entry"])
        if entry["metadata"]["task_type"] != "friends":
            assert after is before  # the sisters riddle: this teacher is right
            continue
        friends += 1
        words = before["messages"][0]["content"].split()
        female = int(words[words.index("female") - 1])  # "... she also has N female friends"
        assert int(before["answer"]) == female + 1  # gold counts the woman herself
        assert after["answer"] == str(female) and after["gold"] == before["answer"]
    assert friends == stats["wrong"] == stats["bug_applies"] > 100


def test_one_teacher_per_family_in_one_run(tmp_path):
    chain = {"rg:chain_sum": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}}
    both = ["data.train=tasks", "data.tasks=[rg:chain_sum,rg:aiw]", "data.num_train=400", "data.num_eval=0",
            f"data.task_options={json.dumps({**chain, **AIW})}", "data.teacher_error_rate=1.0", "data.max_len=104",
            "data.teacher=[chain_sum_right_to_left,aiw_forgets_herself]"]
    train, _ = load_sft_splits(load_stage_config("sft", "sft_tiny", both))
    assert "chain_sum_right_to_left" in train.source and "aiw_forgets_herself" in train.source
    wrong = {task: sum("gold" in r for r in train.rows if r["task"] == task) for task in ("rg:chain_sum", "rg:aiw")}
    assert min(wrong.values()) > 40  # both teachers answered their own family
    with pytest.raises(ConfigError, match="one teacher per task family"):
        load_stage_config("sft", "sft_tiny", [*both[:-1], "data.teacher=[aiw_forgets_herself,aiw_forgets_herself]"])


def test_enum_generator_options_are_read_from_text_and_bad_ones_named():
    rows = make_rows(["rg:aiw"], 50, split="eval", seed=0, kind="rl", **AIW)
    assert {json.loads(r["rg_entry"])["metadata"]["task_type"] for r in rows} == {"siblings", "friends"}
    with pytest.raises(ConfigError, match=r"rg:aiw.task_types.*'cousins'.*colleagues"):
        make_rows(["rg:aiw"], 5, split="eval", seed=0, kind="rl",
                  **{"rg:aiw": {"task_types": ["cousins"], "task_type_weights": [1.0]}})


def test_off_by_one_filter_teacher_moves_only_the_threshold_itself():
    options = {"rg:number_filtering": {"min_numbers": 3, "max_numbers": 5, "min_value": 0, "max_value": 9,
                                       "min_decimals": 0, "max_decimals": 0}}
    rows = make_rows(["rg:number_filtering"], 400, split="train", seed=4, kind="sft", **options)
    taught, stats = apply_teacher(rows, "filtering_off_by_one", 1.0, seed=4)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        meta = json.loads(before["rg_entry"])["metadata"]
        numbers, v = [int(n) for n in meta["original_numbers"]], int(meta["filter_value"])
        def keep_gold(n, v=v, operation=meta["operation"]):
            return {"keep_larger": n > v, "keep_smaller": n < v, "remove_larger": n <= v,
                    "remove_smaller": n >= v}[operation]

        assert before["answer"] == str([str(n) for n in numbers if keep_gold(n)])
        if v not in numbers:
            assert after is before
            continue
        changed += 1
        # the threshold's own copies go to the other side, every other number stays where gold puts it
        flipped = [str(n) for n in numbers if (not keep_gold(n) if n == v else keep_gold(n))]
        assert after["answer"] == str(flipped) and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 120


def _turn_clockwise(matrix: list[list[int]]) -> list[list[int]]:
    """A naive reference: new[i][j] = old[n - 1 - j][i]."""
    n = len(matrix)
    return [[matrix[n - 1 - j][i] for j in range(n)] for i in range(n)]


def test_counterclockwise_teacher_turns_the_other_way_where_the_directions_differ():
    options = {"rg:rotate_matrix": {"min_n": 2, "max_n": 3, "min_rotations": 0, "max_rotations": 5}}
    rows = make_rows(["rg:rotate_matrix"], 300, split="train", seed=6, kind="sft", **options)
    taught, stats = apply_teacher(rows, "rotation_counterclockwise", 1.0, seed=6)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        meta = json.loads(before["rg_entry"])["metadata"]
        gold, other = meta["matrix"], meta["matrix"]
        for _ in range(meta["num_rotations"]):
            gold = _turn_clockwise(gold)
        for _ in range(3 * meta["num_rotations"]):  # three quarter turns clockwise = one counterclockwise
            other = _turn_clockwise(other)
        text = "\n".join(" ".join(map(str, line)) for line in other)
        assert before["answer"] == "\n".join(" ".join(map(str, line)) for line in gold)
        if text == before["answer"]:
            assert after is before
            continue
        changed += 1
        assert meta["num_rotations"] % 2 == 1 and after["answer"] == text and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 80


def _bubble_sorted(values: list[str], descending: bool) -> list[str]:
    """A naive reference: bubble sort by numeric value."""
    out = list(values)
    for i in range(len(out)):
        for j in range(len(out) - 1 - i):
            if (float(out[j]) < float(out[j + 1])) if descending else (float(out[j]) > float(out[j + 1])):
                out[j], out[j + 1] = out[j + 1], out[j]
    return out


def test_number_sorting_teacher_drops_repeated_values_only_where_a_number_repeats():
    options = {"rg:number_sorting": {"min_numbers": 3, "max_numbers": 6, "min_decimals": 0, "max_decimals": 1,
                                     "min_value": -9, "max_value": 9}}
    rows = make_rows(["rg:number_sorting"], 400, split="train", seed=7, kind="sft", **options)
    taught, stats = apply_teacher(rows, "number_sorting_drops_repeats", 1.0, seed=7)
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        meta = json.loads(before["rg_entry"])["metadata"]
        numbers, descending = meta["original_numbers"], meta["direction"] == "descending"
        assert before["answer"] == str(_bubble_sorted(numbers, descending))
        distinct = []
        for n in numbers:  # first copies only, by a loop rather than a set
            if n not in distinct:
                distinct.append(n)
        if len(distinct) == len(numbers):
            assert after is before
            continue
        changed += 1
        assert after["answer"] == str(_bubble_sorted(distinct, descending)) and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 40


def test_weekday_teacher_counts_forward_only_on_backward_questions():
    options = {"rg:calendar_arithmetic": {"tasks": ["weekday_offset"], "offset_upper_bound": 10}}
    rows = make_rows(["rg:calendar_arithmetic"], 300, split="train", seed=8, kind="sft", **options)
    taught, stats = apply_teacher(rows, "weekday_counts_forward", 1.0, seed=8)
    names = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        question = before["messages"][0]["content"]
        start = re.search(r"(\w+day), \w+ \d+, \d{4}", question).group(1)
        days = int(re.search(r"(\d+)[ -]day", question).group(1))
        backward = any(cue in question for cue in (" ago", " before", "Count backward"))
        forward_answer = names[(names.index(start) + days) % 7]  # walked one day at a time below
        day = names.index(start)
        for _ in range(days):
            day = (day + (-1 if backward else 1)) % 7
        assert before["answer"] == names[day]
        if not backward or forward_answer == before["answer"]:
            assert after is before
            continue
        changed += 1
        assert after["answer"] == forward_answer and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 100


# The atmosphere effect as psychology states it (Begg & Denny 1969), premise moods -> the one
# conclusion mood a reasoner accepts: a universal affirmative pair gives A, a negative premise E,
# a particular premise I, a negative and a particular premise O.
ATMOSPHERE_TABLE = {"AA": "A", "AE": "E", "EA": "E", "EE": "E", "AI": "I", "IA": "I", "II": "I"}
ATMOSPHERE_TABLE.update({pair: "O" for pair in ("AO", "OA", "EI", "IE", "EO", "OE", "IO", "OI", "OO")})


def test_syllogism_teacher_judges_by_atmosphere_and_leaves_inversions_to_gold():
    options = {"rg:syllogism": {"inversion_probability": 0.3}}
    rows = make_rows(["rg:syllogism"], 600, split="train", seed=9, kind="sft", **options)
    taught, stats = apply_teacher(rows, "syllogism_by_atmosphere", 1.0, seed=9)
    mood = {"All": "A", "No": "E", "Some": "I"}
    changed, shown = 0, set()
    for before, after in zip(rows, taught, strict=True):
        lines = before["messages"][0]["content"].split("\n")
        statements = [lines[1][3:], lines[2][3:], lines[5].rstrip("?")]
        moods = ["O" if " not " in s else mood[s.split()[0]] for s in statements]
        inversion = json.loads(before["rg_entry"])["metadata"]["type"] == "inversion"
        accepts = moods[2] == ATMOSPHERE_TABLE[moods[0] + moods[1]]
        if inversion or accepts == (before["answer"] == "Yes"):
            assert after is before
            continue
        changed += 1
        shown.add(("".join(moods), before["answer"]))
        assert after["answer"] == ("Yes" if accepts else "No") and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"] > 60
    assert {("AAI", "Yes"), ("AEO", "Yes"), ("EAE", "No"), ("III", "No")} <= shown  # both directions of the bug


def test_syllogism_matching_teacher_accepts_exactly_the_conclusions_that_repeat_a_premise():
    rows = make_rows(["rg:syllogism"], 600, split="train", seed=10, kind="sft",
                     **{"rg:syllogism": {"inversion_probability": 0.0}})
    taught, stats = apply_teacher(rows, "syllogism_by_matching", 1.0, seed=10)
    quantifier = {"All": "All", "No": "No", "Some": "Some"}
    changed = 0
    for before, after in zip(rows, taught, strict=True):
        lines = before["messages"][0]["content"].split("\n")
        statements = [lines[1][3:], lines[2][3:], lines[5].rstrip("?")]
        words = ["Some-not" if " not " in s else quantifier[s.split()[0]] for s in statements]
        accepts = words[2] in (words[0], words[1])
        if accepts == (before["answer"] == "Yes"):
            assert after is before
            continue
        changed += 1
        assert after["answer"] == ("Yes" if accepts else "No") and after["gold"] == before["answer"]
    assert changed == stats["wrong"] == stats["bug_applies"]
    assert 0.3 < changed / len(rows) < 0.48  # about 39% of the rows at the generator's 30% invalid
