"""`"module:name"` references, imported on first use: the registries name their parts this way so
that `--help` and config loading do not import torch, DeepSpeed or a stage's data code."""

import importlib
from collections.abc import Callable


def resolve_ref(ref: Callable | type | str):
    """`ref` itself, or the object a `"module:name"` string names."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
