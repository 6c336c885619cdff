"""The train/eval split of generated problems and the answer part of a completion, shared by the
built-in task families (tasks.py) and the reasoning-gym ones (reasoning_gym.py)."""

from __future__ import annotations

import hashlib

EVAL_FRACTION = 0.1  # share of problems (by hash) that belong to the eval split


def split_of(task: str, problem: str) -> str:
    """``"eval"`` or ``"train"``, from a hash of the problem alone (seed-independent)."""
    digest = hashlib.blake2b(f"{task}\x00{problem}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") / 2**64 < EVAL_FRACTION else "train"


def normalize_completion(completion: str) -> str:
    """The answer part of a completion: text before any template markup, whitespace stripped."""
    return completion.split("<", 1)[0].strip()
