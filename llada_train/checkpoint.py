"""Atomic checkpoints, exact resume and HF export.

A checkpoint is written to `checkpoints/.tmp_step_N/`, completed with a manifest (sizes and
SHA-256 of every file), then renamed to `step_N/`; the `latest` pointer is replaced last. A crash
at any moment leaves either the old state or the new one, never a half-written `step_N/` that
`--resume auto` would pick up.
"""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
GENERATION_CONFIG = "generation_config.json"  # run-dir copy, so `llada-train export` can rebuild hf/


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Tensors, tuples and numbers only, so the file loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


class CheckpointSaveError(OSError):
    """A save failed (disk full, quota, I/O error); the partial checkpoint was removed, older ones are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path):
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_atomic(ckpt / MANIFEST, json.dumps(entries, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when complete and intact, else what is wrong (naming the file)."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"{ckpt}: no {MANIFEST} (incomplete checkpoint)"
    for rel, meta in json.loads(manifest.read_text()).items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != meta["size"]:
            return f"{path}: size {path.stat().st_size} != {meta['size']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{path}: checksum mismatch (corrupted)"
    return None


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    error = None
    try:
        engine.save_state(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        error = e
    rngs = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    if _rank() == 0 and error is None:
        try:
            torch.save(rngs, tmp / "rng_states.pt")
            _write_atomic(tmp / STATE, json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
        except (OSError, RuntimeError) as e:
            error = e
    problems = []
    if error is not None:  # torch.save hides ENOSPC behind "unexpected pos": report the free space too
        free_mib = shutil.disk_usage(tmp if tmp.exists() else root).free / 2**20
        problems.append(f"{type(error).__name__}: {error}; {free_mib:.1f} MiB free there")
    if dist.is_initialized():  # every rank must agree, or the others would wait at the next collective
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = [f"rank {r}: {p}" for r, ps in enumerate(gathered) for p in ps]
    if problems:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointSaveError(f"saving checkpoint {final} failed ({'; '.join(problems)}); "
                                  f"removed the partial {tmp.name}, earlier checkpoints are intact")
    if _rank() == 0:
        old = root / f".old_{final.name}"  # a step saved again: move the old one aside atomically first,
        if final.exists():  # so a crash never leaves a half-deleted step_N
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _write_atomic(root / "latest", final.name)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int):
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest complete, intact checkpoint (the `latest` pointer first, then a scan)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"skipping checkpoint: {problem}")
    return None


def load_checkpoint(engine, ckpt: Path) -> dict:
    """Restore engine (model, optimizer, schedule) and this rank's RNG; returns the trainer state."""
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise UserError(f"cannot resume: {problem}; pass a complete checkpoint (RUN_DIR/checkpoints/step_N) to "
                        "--resume, or --resume never")
    state = json.loads((ckpt / STATE).read_text())
    saved_ep, ep = state.get("expert_parallel", 1), engine.expert_parallel
    if saved_ep != ep:
        raise UserError(f"cannot resume {ckpt}: it was written at engine.expert_parallel={saved_ep}, this run has "
                        f"{ep}, and expert shards do not reshard. Resume at expert_parallel={saved_ep}, or "
                        f"`llada-train export {ckpt.parent.parent}` and start a new run with "
                        "model.init_from=<its hf/>")
    engine.load_state(ckpt)
    rngs = torch.load(ckpt / "rng_states.pt", weights_only=True)
    set_rng_state(rngs[min(_rank(), len(rngs) - 1)])
    return state


def export_hf(model, state_dict: dict, tokenizer, out_dir: Path, generation_config: dict | None = None):
    """`hf/`: safetensors in the released layout + config + tokenizer + generation config."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if generation_config:
        from transformers import GenerationConfig

        GenerationConfig(**generation_config).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
