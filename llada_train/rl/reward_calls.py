"""Reward functions' contract (docs/design.md §8) and one call of one function: specs, resolution of
`module.path:function` / `path/to/file.py:function`, sync or async calls, result checking.

Contract: `fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]`, where
kwargs carry every dataset column of the batch rows (e.g. `answer`, `tests`), `completion_ids`, and
the spec's own `kwargs`; `None` means "not applicable to this row". `async def` is allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, UserError

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
        """Also the config's check of each `rl.rewards` entry."""
        if ":" not in self.fn:
            raise ConfigError(f"rl.rewards entry {self.fn!r}: fn must be 'module.path:function' or 'file.py:function'")
        if not math.isfinite(self.weight):
            raise ConfigError(f"rl.rewards entry {self.fn!r}: weight must be finite, got {self.weight}")
        if not self.timeout_s > 0:
            raise ConfigError(f"rl.rewards entry {self.fn!r}: timeout_s must be > 0, got {self.timeout_s}")
        if self.name is None:
            self.name = self.fn.rpartition(":")[2]


class RewardError(RuntimeError):
    """A reward call failed (raised, returned a malformed result, or its worker died)."""


# ----------------------------------------------------------------------------- resolution

_RESOLVED: dict[str, Callable] = {}
_RESOLVE_LOCK = threading.Lock()


def resolve_reward(spec: str) -> Callable:
    """Import the function named by `spec`; UserError that names the spec and the problem."""
    with _RESOLVE_LOCK:
        if spec not in _RESOLVED:
            _RESOLVED[spec] = _resolve(spec)
        return _RESOLVED[spec]


def _resolve(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"reward spec {spec!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module, where = _load_file(spec, target), f"file {target}"
    else:
        where = f"module {target!r}"
        try:
            module = importlib.import_module(target)
        except SyntaxError as e:
            raise UserError(f"reward spec {spec!r}: syntax error in {e.filename}:{e.lineno}: {e.msg}") from e
        except ImportError as e:
            raise UserError(f"reward spec {spec!r}: cannot import module {target!r} ({type(e).__name__}: {e}); "
                            f"check the name and that its package is installed or on PYTHONPATH") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward spec {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):  # a config mistake, hence UserError like the others
        raise UserError(
            f"reward spec {spec!r}: {attr!r} in {where} is not callable (it is a {type(obj).__name__})")
    return obj


def _load_file(spec: str, target: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward spec {spec!r}: file {target} not found (looked at {path})")
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
        raise UserError(f"reward spec {spec!r}: syntax error in {e.filename}:{e.lineno}: {e.msg}") from e
    except Exception as e:  # the user's file failed at import time: its own error, named
        del sys.modules[name]
        raise UserError(f"reward spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def canonical_spec(spec: str) -> str:
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
    return check_scores(result, len(completions), fn)


async def _await(awaitable):
    return await awaitable


def check_scores(result, n: int, fn: str) -> Scores:
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
