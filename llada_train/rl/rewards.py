"""Reward functions for EBPO (DESIGN §8): the TRL-style contract, safe execution, built-ins.

Contract: `fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]`, where
kwargs carry every dataset column of the batch rows (e.g. `answer`, `tests`), `completion_ids`, and
the spec's own `kwargs`; `None` means "not applicable to this row". `async def` is allowed.
Functions are named `module.path:function` or `path/to/file.py:function`.

Execution: `RewardComputer.score` calls every function once per batch, concurrently, through an
executor. The default `LocalRewardPool` runs calls in persistent worker processes and kills a
worker's whole process group when a call overruns its timeout. The Ray layer passes its own
executor (same signature; see `RewardExecutor`) that runs `call_reward` as a Ray task. A call that
raises or times out scores `rewards_on_error` for the batch and is counted; it never kills the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from pathlib import Path

from llada_train.rl import sandbox

log = logging.getLogger(__name__)

Scores = list[float | None]  # one entry per completion

# executor(spec, prompts, completions, kwargs) -> scores. Raise TimeoutError when the call overran
# spec.timeout_s (the call must be stopped by then), any other exception for a failed call.
RewardExecutor = Callable[["RewardSpec", list, list, dict], Scores]


@dataclass
class RewardSpec:
    fn: str  # "module.path:function" or "path/to/file.py:function"
    weight: float = 1.0
    timeout_s: float = 10.0  # per call, i.e. per function per batch
    name: str | None = None  # metrics key; defaults to the function name
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments, e.g. {pattern: ...} for `format`

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.fn!r}: weight must be finite, got {self.weight}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward {self.fn!r}: timeout_s must be > 0, got {self.timeout_s}")
        if self.name is None:
            self.name = self.fn.rpartition(":")[2]


class RewardError(RuntimeError):
    """A reward call failed (raised, returned a malformed result, or its worker died)."""


# ----------------------------------------------------------------------------- resolution

_RESOLVED: dict[str, Callable] = {}
_RESOLVE_LOCK = threading.Lock()


def resolve_reward(spec: str) -> Callable:
    """Import the function named by `spec`; ValueError that names the spec and the problem."""
    with _RESOLVE_LOCK:
        if spec not in _RESOLVED:
            _RESOLVED[spec] = _resolve(spec)
        return _RESOLVED[spec]


def _resolve(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward spec {spec!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module, where = _load_file(spec, target), f"file {target}"
    else:
        where = f"module {target!r}"
        try:
            module = importlib.import_module(target)
        except SyntaxError as e:
            raise ValueError(f"reward spec {spec!r}: syntax error in {e.filename}:{e.lineno}: {e.msg}") from e
        except ImportError as e:
            raise ValueError(f"reward spec {spec!r}: cannot import module {target!r} ({type(e).__name__}: {e}); "
                             f"check the name and that its package is installed or on PYTHONPATH") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward spec {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):  # a config mistake, hence ValueError like the others
        raise ValueError(
            f"reward spec {spec!r}: {attr!r} in {where} is not callable (it is a {type(obj).__name__})")
    return obj


def _load_file(spec: str, target: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"reward spec {spec!r}: file {target} not found (looked at {path})")
    name = f"_llada_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec, so dataclasses/pickle inside the file can find it
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ValueError(f"reward spec {spec!r}: syntax error in {e.filename}:{e.lineno}: {e.msg}") from e
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"reward spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _canonical(spec: str) -> str:
    """File specs become absolute, so worker processes and Ray tasks resolve the same file."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return spec


# ----------------------------------------------------------------------------- one call

def call_reward(fn: str, prompts: list[str], completions: list[str], kwargs: dict) -> Scores:
    """Resolve and call one reward function, awaiting it if async; validated plain-float scores.

    This is the body of a remote reward call: the local worker processes run it, and the Ray layer
    wraps it as a task (`ray.remote(call_reward)`).
    """
    result = resolve_reward(fn)(prompts, completions, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return _as_scores(result, len(completions), fn)


async def _await(awaitable):
    return await awaitable


def _as_scores(result, n: int, fn: str) -> Scores:
    if isinstance(result, (str, bytes)) or (not isinstance(result, Sequence) and not hasattr(result, "tolist")):
        raise RewardError(f"reward {fn!r} returned {type(result).__name__}, expected a list of float | None")
    values = result.tolist() if hasattr(result, "tolist") else list(result)
    if len(values) != n:
        raise RewardError(f"reward {fn!r} returned {len(values)} scores for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward {fn!r} returned {v!r} at index {i}, expected float | None") from None
        if not math.isfinite(f):
            raise RewardError(f"reward {fn!r} returned non-finite {f} at index {i}")
        out.append(f)
    return out


# ----------------------------------------------------------------------------- local process pool

_HEADER = struct.Struct(">Q")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


def _send(fd: int, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _recv(fd: int, deadline: float | None):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class _Worker:
    """One reward worker process in its own session, speaking length-prefixed pickles on stdin/stdout."""

    def __init__(self, start_timeout_s: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from llada_train.rl.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)
        self.loaded: set[str] = set()  # specs already imported in this worker
        try:
            hello = self.recv(start_timeout_s)
        except (TimeoutError, EOFError, pickle.UnpicklingError) as e:
            hello = type(e).__name__
        if hello != ("ready", self.proc.pid):
            self.kill()
            raise RewardError(f"reward worker failed to start ({hello!r}, exit code {self.proc.returncode})")

    def send(self, obj) -> None:
        _send(self.proc.stdin.fileno(), obj)

    def recv(self, timeout_s: float | None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return _recv(self.proc.stdout.fileno(), deadline)

    def kill(self) -> None:
        """SIGTERM (the worker kills its sandboxes), then SIGKILL the whole group, then reap."""
        if self.proc.returncode is None:
            sandbox.terminate_group(self.proc.pid, grace_s=1.0)
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _worker_main() -> None:
    proto_out = os.dup(1)
    os.dup2(2, 1)  # prints from reward functions go to stderr, not into the protocol stream
    proto_in = sys.stdin.fileno()
    parent = os.getppid()

    def on_term(signum, frame):
        sandbox.kill_all()
        os._exit(128 + signum)

    def watch_parent():  # a hung call must not outlive a dead trainer
        while os.getppid() == parent:
            time.sleep(1.0)
        on_term(signal.SIGTERM, None)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch_parent, daemon=True).start()
    _send(proto_out, ("ready", os.getpid()))
    while True:
        try:
            kind, fn, args = _recv(proto_in, None)
        except EOFError:
            return
        try:
            if kind == "load":  # import outside the call's timeout; args = the parent's sys.path
                sys.path[:0] = [p for p in args if p not in sys.path]
                resolve_reward(fn)
                reply = ("ok", None)
            else:
                reply = ("ok", call_reward(fn, *args))
        except BaseException as e:
            reply = ("error", _describe(e))
        _send(proto_out, reply)


def _describe(e: BaseException) -> str:
    """`Type: message (at file:line)` of the innermost frame, short enough for a log line."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{type(e).__name__}: {e}"[:2000] + where


class LocalRewardPool:
    """Reward executor for local mode: persistent worker processes, one busy call per worker.

    A call that overruns `spec.timeout_s` gets its worker's whole process group killed (sandboxes
    included) and raises TimeoutError; a fresh worker is started for the next call. Importing the
    reward's module happens before the call, under `start_timeout_s`, not the call's timeout.
    """

    def __init__(self, start_timeout_s: float = 120.0):
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_workers, self._all)

    def __call__(self, spec: RewardSpec, prompts: list[str], completions: list[str], kwargs: dict) -> Scores:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self.start_timeout_s)
            with self._lock:
                self._all.add(worker)
        healthy, limit = False, f"its start timeout of {self.start_timeout_s}s while importing"
        try:
            if spec.fn not in worker.loaded:
                worker.send(("load", spec.fn, list(sys.path)))
                status, payload = worker.recv(self.start_timeout_s)
                if status == "error":
                    healthy = True
                    raise RewardError(payload)
                worker.loaded.add(spec.fn)
            limit = f"its timeout of {spec.timeout_s}s"
            worker.send(("call", spec.fn, (prompts, completions, kwargs)))
            status, payload = worker.recv(spec.timeout_s)
            healthy = True
        except TimeoutError:
            raise TimeoutError(f"reward {spec.name!r} exceeded {limit}") from None
        except (EOFError, OSError) as e:
            raise RewardError(f"reward worker died during {spec.name!r} ({type(e).__name__})") from None
        finally:
            with self._lock:
                if healthy:
                    self._idle.append(worker)
                else:
                    self._all.discard(worker)
            if not healthy:
                worker.kill()
        if status == "error":
            raise RewardError(payload)
        return payload

    def close(self) -> None:
        self._finalizer()


def _kill_workers(workers: set[_Worker]) -> None:
    for w in list(workers):
        w.kill()
    workers.clear()


# ----------------------------------------------------------------------------- batch scoring

@dataclass
class RewardBatch:
    total: list[float]  # (B,) weighted sum of the applicable (non-None) scores; 0 if none applies
    scores: dict[str, Scores]  # name -> (B,) raw scores as used (rewards_on_error after a failure)
    errors: dict[str, str]  # name -> what went wrong in this batch
    # reward/<name>/{mean,std} over applicable scores, /applicable (fraction), /errors and /timeouts
    # (cumulative counts since the computer was built), reward/total/{mean,std}
    metrics: dict[str, float]


class RewardComputer:
    """Scores batches with a weighted sum of reward functions; failures are scored, counted, logged."""

    def __init__(self, specs: Sequence[RewardSpec], rewards_on_error: float = 0.0,
                 executor: RewardExecutor | None = None):
        if not specs:
            raise ValueError("rewards: at least one reward function is required")
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rewards: duplicate reward names {dup}; give each spec a distinct `name`")
        for s in specs:
            resolve_reward(_canonical(s.fn))  # fail at startup, not at the first batch
        self.specs = [replace(s, fn=_canonical(s.fn)) for s in specs]
        self.rewards_on_error = float(rewards_on_error)
        self._executor = executor
        self._own_pool: LocalRewardPool | None = None
        self.error_counts = {n: 0 for n in names}
        self.timeout_counts = {n: 0 for n in names}

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              columns: Mapping[str, Sequence] | None = None, *,
              executor: RewardExecutor | None = None) -> RewardBatch:
        """`columns`: dataset columns of the rows plus `completion_ids`, each with one entry per completion."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"rewards: {len(prompts)} prompts for {n} completions (repeat each prompt per completion)")
        columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in columns.items():
            if len(v) != n:
                raise ValueError(f"rewards: column {k!r} has {len(v)} entries for {n} completions")
        run = executor or self._executor or self._pool()
        prompts, completions = list(prompts), list(completions)
        with ThreadPoolExecutor(len(self.specs)) as threads:
            futures = [threads.submit(run, s, prompts, completions, {**columns, **s.kwargs}) for s in self.specs]
            outcomes = [self._outcome(s, f, n) for s, f in zip(self.specs, futures, strict=True)]
        scores = {s.name: o[0] for s, o in zip(self.specs, outcomes, strict=True)}
        errors = {s.name: o[1] for s, o in zip(self.specs, outcomes, strict=True) if o[1] is not None}
        total = []
        for i in range(n):
            applicable = [(s.weight, scores[s.name][i]) for s in self.specs if scores[s.name][i] is not None]
            total.append(float(sum(w * v for w, v in applicable)))
        return RewardBatch(total=total, scores=scores, errors=errors, metrics=self._metrics(scores, total))

    def _outcome(self, spec: RewardSpec, future, n: int) -> tuple[Scores, str | None]:
        try:
            return _as_scores(future.result(), n, spec.fn), None
        except TimeoutError as e:
            self.timeout_counts[spec.name] += 1
            msg = str(e) or f"timeout after {spec.timeout_s}s"
        except Exception as e:
            self.error_counts[spec.name] += 1
            msg = str(e) if isinstance(e, RewardError) else _describe(e)
        log.warning("reward %r failed, scoring %s for this batch: %s", spec.name, self.rewards_on_error, msg)
        return [self.rewards_on_error] * n, msg

    def _metrics(self, scores: dict[str, Scores], total: list[float]) -> dict[str, float]:
        metrics = {}
        for name, vals in [*scores.items(), ("total", total)]:
            xs = [v for v in vals if v is not None]
            if xs:
                mean = sum(xs) / len(xs)
                metrics[f"reward/{name}/mean"] = mean
                metrics[f"reward/{name}/std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
            if name != "total":
                metrics[f"reward/{name}/applicable"] = len(xs) / max(len(vals), 1)
                metrics[f"reward/{name}/errors"] = float(self.error_counts[name])
                metrics[f"reward/{name}/timeouts"] = float(self.timeout_counts[name])
        return metrics

    def _pool(self) -> LocalRewardPool:
        if self._own_pool is None:
            self._own_pool = LocalRewardPool()
        return self._own_pool

    def close(self) -> None:
        if self._own_pool is not None:
            self._own_pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?")


def extract_math_answer(text: str) -> str | None:
    """The last \\boxed{...} (balanced braces), else the text after the last `####`, else the last number."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start >= 0:
        i = text.index("{", start) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1]
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.splitlines()[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_math_answer(ans: str) -> str:
    """Canonical string form: no spaces, `$`, `\\text{}`, `\\left/\\right`; `\\frac{a}{b}` -> a/b; 1,000.0 -> 1000."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", ans)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$"):
        s = s.replace(junk, "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return re.sub(r"(\d)\.0+(?!\d)", r"\1", s)


def math_answers_equal(pred: str, ref: str) -> bool:
    """Normalised string equality, or numeric equality when both parse as numbers (fractions exact)."""
    a, b = normalize_math_answer(pred), normalize_math_answer(ref)
    if a == b:
        return True
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return False


def math_answer(prompts: list[str], completions: list[str], *, answer: Sequence, **kwargs) -> Scores:
    """1.0 if the completion's final answer equals the row's `answer` (itself `####`/\\boxed-extracted), else 0.0."""
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        if ref is None:
            out.append(None)
            continue
        ref = str(ref)
        if "####" in ref or "\\boxed" in ref:
            ref = extract_math_answer(ref) or ref
        pred = extract_math_answer(completion)
        out.append(float(pred is not None and math_answers_equal(pred, ref)))
    return out


def exact_match(prompts: list[str], completions: list[str], *, answer: Sequence, **kwargs) -> Scores:
    """1.0 if the stripped completion equals the stripped `answer`."""
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def reasoning_gym(prompts: list[str], completions: list[str], *, task: Sequence, rg_entry: Sequence,
                  rg_options: Sequence | None = None, partial_credit: bool = False, **kwargs) -> Scores:
    """The reasoning-gym dataset's own `score_answer` for `rg:` rows (None for other rows): 1.0 when
    correct; with `partial_credit` its fractional scores, else anything below 1 scores 0."""
    from llada_train.data.reasoning_gym import is_rg_task, score

    options = rg_options if rg_options is not None else ["{}"] * len(completions)
    out = []
    for completion, name, entry, opts in zip(completions, task, rg_entry, options, strict=True):
        if not is_rg_task(name) or entry is None:
            out.append(None)
            continue
        value = score(name, completion, entry, opts or "{}")
        out.append(value if partial_credit or value >= 1.0 else 0.0)
    return out


DEFAULT_FORMAT_PATTERN = r"\\boxed\{.+\}|####\s*\S+"


def format(prompts: list[str], completions: list[str], *, pattern: str = DEFAULT_FORMAT_PATTERN,
           mode: str = "search", **kwargs) -> Scores:  # shadows the builtin: the config name is `rewards:format`
    """1.0 if the completion matches `pattern` (re.DOTALL). mode: `search` (anywhere) or `fullmatch`
    (whole completion, e.g. r"<think>.*</think>\\s*<answer>.*</answer>"). Default: an answer is present."""
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"format reward: mode must be 'search' or 'fullmatch', got {mode!r}")
    match = getattr(re.compile(pattern, re.DOTALL), mode)
    return [float(match(c) is not None) for c in completions]


_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced ```python block if there is one, else the completion as is."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_exec(prompts: list[str], completions: list[str], *, tests: Sequence, entry_point: Sequence | None = None,
              prepend_prompt: bool = False, sandbox_timeout_s: float = 10.0, memory_mb: int = 512,
              workers: int | None = None, **kwargs) -> Scores:
    """1.0 if `[prompt +] code + tests [+ check(entry_point)]` exits 0 in the sandbox, else 0.0.

    `tests` holds Python test code per row (None = not applicable). With `entry_point` (HumanEval
    style) `check(<entry_point>)` is appended. `prepend_prompt` is for completions that continue a
    code prompt. Programs run concurrently in `workers` sandboxes (default: CPU count).
    """
    jobs = {}
    for i, (prompt, completion, test) in enumerate(zip(prompts, completions, tests, strict=True)):
        if test:
            program = (prompt if prepend_prompt else "") + extract_code(completion) + "\n\n" + test + "\n"
            if entry_point is not None and entry_point[i]:
                program += f"\ncheck({entry_point[i]})\n"
            jobs[i] = program
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with ThreadPoolExecutor(n_workers) as pool:
        run = partial(sandbox.run_python, timeout_s=sandbox_timeout_s, memory_mb=memory_mb)
        results = dict(zip(jobs, pool.map(run, jobs.values()), strict=True))
    return [float(results[i].ok) if i in results else None for i in range(len(completions))]
