"""Task families: determinism, disjoint splits, correct answers, strict checking."""

import json
import random

import pytest

from llada_train.data import tasks
from llada_train.data.tasks import TASKS, check, make_rows, split_of


def _solve(task: str, problem: str) -> str:
    """Independent solver from the problem text."""
    if task == "addition":
        a, b = problem.rstrip("=").split("+")
        return str(sum(int(x) for x in (a, b)))
    _, arg = problem.split(" ")
    if task == "reversal":
        return "".join(arg[i] for i in range(len(arg) - 1, -1, -1))
    if task == "sorting":
        return "".join(d * arg.count(d) for d in "0123456789")
    if task == "copy":
        return arg
    if task == "max":
        return str(max(int(x) for x in arg.split(",")))
    raise AssertionError(task)


def _problem(row):
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_deterministic_by_seed_and_well_formed(kind):
    names = list(TASKS)
    a = make_rows(names, 103, split="train", seed=7, kind=kind)
    b = make_rows(names, 103, split="train", seed=7, kind=kind)
    c = make_rows(names, 103, split="train", seed=8, kind=kind)
    assert a == b and a != c
    assert len(a) == 103
    per_task = {t: [r for r in a if r["task"] == t] for t in names}
    assert sorted(len(v) for v in per_task.values()) == [20, 20, 21, 21, 21]
    for t, rows in per_task.items():
        problems = [_problem(r) for r in rows]
        assert len(set(problems)) == len(problems)  # distinct within a task
        for r in rows:
            assert r["answer"] == _solve(t, _problem(r))
            if kind == "sft":
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
                assert r["messages"][1]["content"] == r["answer"]
            else:
                assert set(r) == {"prompt", "answer", "task"}


def test_train_and_eval_are_disjoint_across_seeds():
    train = {(r["task"], _problem(r)) for s in range(3)
             for r in make_rows(list(TASKS), 1500, split="train", seed=s, kind="rl")}
    evals = {(r["task"], _problem(r)) for s in range(3)
             for r in make_rows(list(TASKS), 300, split="eval", seed=s, kind="sft")}
    assert train and evals and not train & evals
    assert all(split_of(t, p) == "train" for t, p in train)
    assert all(split_of(t, p) == "eval" for t, p in evals)


def test_eval_fraction_on_a_fully_enumerated_space():
    # every one-digit addition problem: the hash split puts about EVAL_FRACTION of them in eval
    problems = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    n_eval = sum(split_of("addition", p) == "eval" for p in problems)
    assert 2 <= n_eval <= 25
    rows = make_rows(["addition"], n_eval, split="eval", seed=0, kind="rl", addition={"max_digits": 1})
    assert sorted(r["prompt"] for r in rows) == sorted(p for p in problems if split_of("addition", p) == "eval")
    with pytest.raises(ValueError, match="distinct eval problems"):
        make_rows(["addition"], n_eval + 1, split="eval", seed=0, kind="rl", addition={"max_digits": 1})


def test_options_change_the_problems():
    rows = make_rows(["addition", "reversal"], 200, split="train", seed=1, kind="rl",
                     addition={"max_digits": 2}, reversal={"min_len": 5, "max_len": 5})
    for r in rows:
        if r["task"] == "addition":
            assert all(len(x) <= 2 for x in r["prompt"].rstrip("=").split("+"))
        else:
            assert len(r["prompt"].split(" ")[1]) == 5


def _perturbations(answer: str, rng: random.Random) -> list[str]:
    i = rng.randrange(len(answer))
    other = "0123456789" if answer.isdigit() else "abcdefghijklmnopqrstuvwxyz"
    changed = answer[:i] + rng.choice(other.replace(answer[i], "")) + answer[i + 1:]
    return [changed, answer[:-1], answer + answer[-1], rng.choice(other) + answer, "", answer + " x"]


def test_check_accepts_gold_and_rejects_perturbed():
    rng = random.Random(0)
    for row in make_rows(list(TASKS), 250, split="eval", seed=3, kind="rl"):
        t, answer = row["task"], row["answer"]
        assert check(t, answer, answer)
        assert check(t, answer, f"  {answer}\n")
        assert check(t, answer, f"{answer}<|role_end|><|endoftext|><|endoftext|>")
        for wrong in _perturbations(answer, rng):
            if wrong.strip() != answer:
                assert not check(t, answer, wrong), (t, answer, wrong)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_rows(["nope"], 1, split="train", seed=0, kind="sft")
    with pytest.raises(ValueError, match="split"):
        make_rows(["copy"], 1, split="test", seed=0, kind="sft")
    with pytest.raises(ValueError, match="kind"):
        make_rows(["copy"], 1, split="train", seed=0, kind="dpo")
    with pytest.raises(ValueError, match="max_digits"):
        make_rows(["addition"], 1, split="train", seed=0, kind="sft", addition={"digits": 2})
    with pytest.raises(ValueError, match="not in tasks"):
        make_rows(["copy"], 1, split="train", seed=0, kind="sft", addition={"max_digits": 2})
    with pytest.raises(ValueError, match="min_len"):
        make_rows(["copy"], 1, split="train", seed=0, kind="sft", copy={"min_len": 0})


def test_user_request_mistakes_are_user_errors():
    """Task names, options and counts come from `data.tasks` / `data.task_options` (or the module's CLI):
    UserError. `split` and `kind` are our own code's arguments: a plain ValueError (a bug)."""
    from llada_train.errors import UserError

    for kwargs in ({"tasks": ["nope"]}, {"tasks": []}, {"copy": {"min_len": 0}}, {"addition": {"max_digits": 2}},
                   {"n": 10_000, "copy": {"min_len": 1, "max_len": 1}}):
        args = {"tasks": ["copy"], "n": 1, **kwargs}
        with pytest.raises(UserError):
            make_rows(args.pop("tasks"), args.pop("n"), split="train", seed=0, kind="sft", **args)
    for kwargs in ({"split": "test", "kind": "sft"}, {"split": "train", "kind": "dpo"}):
        with pytest.raises(ValueError) as e:
            make_rows(["copy"], 1, seed=0, **kwargs)
        assert not isinstance(e.value, UserError)


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    tasks.main(["--tasks", "addition,sorting", "--n", "30", "--split", "eval", "--kind", "rl",
                "--seed", "4", "--options", '{"addition": {"max_digits": 2}}', "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_rows(["addition", "sorting"], 30, split="eval", seed=4, kind="rl",
                             addition={"max_digits": 2})
