"""A pipeline that starts from an autoregressive model (docs/smollm2.md): its `convert:` section converts
the AR source before the first stage (`OUT/source/`: the source as a Hugging Face folder, `OUT/converted/`:
the LLaDA2-MoE checkpoint the first stage starts from), and its optional `distill:` section answers general
prompts with the source (`data/distill.py`) into `OUT/distill.jsonl`, the SFT stage's training rows.

    convert: {from: .cache/smollm2/gguf/SmolLM2-135M-Instruct.Q4_1.gguf, shift_logits: true}
    distill: {n: 1500, max_new_tokens: 64}
    retention: {modes: [Q], limit: null, converted: false}   # the report's knowledge-retention table

Each step is skipped when its output is there, so a re-run resumes at the first unfinished stage.
`llada-train submit` does not run them on the cluster: `python -m llada_train.stages.from_ar --config F
[overrides]` runs them alone first (on a node with the memory for the conversion).
"""

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ConfigError

SMOLLM2_HINT = "for SmolLM2 run `make smollm2` first (docs/smollm2.md)"


@dataclass
class ConvertStep:
    source: str  # `from:` an AR Hugging Face folder or a .gguf file
    shift_logits: bool = False
    dtype: str | None = None  # float32 | bfloat16 | null (the source's)
    mask_token: str = "<|mask|>"

    def __post_init__(self):
        if not Path(self.source).exists():
            raise ConfigError(f"convert.from: {self.source} does not exist ({SMOLLM2_HINT})")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"convert.dtype: {self.dtype!r}; use float32, bfloat16 or null (keep the source's)")


@dataclass
class DistillStep:
    n: int = 1500  # general prompts asked
    seed: int = 0
    max_new_tokens: int = 64  # answers that do not end within it are dropped
    batch_size: int = 32

    def __post_init__(self):
        for f in fields(self):
            if f.name != "seed" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1):
                raise ConfigError(f"distill.{f.name}: {getattr(self, f.name)!r}; use an integer >= 1")


@dataclass
class RetentionReport:
    modes: list | None = None  # decoding presets (default Q, S)
    limit: int | None = None  # the first N questions (null = all 420)
    gen_length: int = 32
    block_length: int = 32
    converted: bool = False  # also the converted model before training (slow: it rarely settles a block)

    def __post_init__(self):
        """Checked when the pipeline loads, not after its training."""
        from ..decoding import DECODE_PRESETS

        bad = [m for m in self.modes or [] if m not in DECODE_PRESETS]
        if bad or (self.modes is not None and not isinstance(self.modes, list)):
            raise ConfigError(f"retention.modes: {self.modes!r}; use a list of {sorted(DECODE_PRESETS)}")
        for key in ("limit", "gen_length", "block_length"):
            value = getattr(self, key)
            if not (value is None and key == "limit") and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"retention.{key}: {value!r}; use an integer >= 1" +
                                  (" or null (all questions)" if key == "limit" else ""))


def _section(cls, raw, key: str, rename: dict | None = None):
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping of {[f.name for f in fields(cls)]}, got {raw!r}")
    values = {(rename or {}).get(k, k): v for k, v in raw.items()}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def parse_sections(raw: dict) -> tuple:
    """(ConvertStep | None, DistillStep | None, RetentionReport | None) from the pipeline file's sections."""
    if "convert" in raw and raw["convert"] is not None and "from" not in raw["convert"]:
        raise ConfigError(f"convert.from: missing; name the AR source (an HF folder or a .gguf file; {SMOLLM2_HINT})")
    convert = _section(ConvertStep, raw.get("convert"), "convert", {"from": "source"})
    distill = _section(DistillStep, raw.get("distill"), "distill")
    retention = _section(RetentionReport, raw.get("retention"), "retention")
    if (distill or retention) and convert is None:
        raise ConfigError("distill / retention: need a convert: section (they ask the AR source)")
    if convert is not None and retention is None:
        retention = RetentionReport()  # the report shows what the adaptation kept
    return convert, distill, retention


def converted_dir(out_dir: Path) -> Path:
    return out_dir / "converted"


def source_dir(out_dir: Path) -> Path:
    return out_dir / "source"


def distill_file(out_dir: Path) -> Path:
    return out_dir / "distill.jsonl"


def prepare(out_dir: Path, convert: ConvertStep, distill: DistillStep | None, log=print) -> None:
    """Convert (and distill) once; other ranks of a multi-process launch wait for rank 0's files."""
    if int(os.environ.get("RANK", "0")) != 0:
        _wait_for(lambda: not missing_outputs(out_dir, convert, distill))
        return
    from ..convert import convert_checkpoint, convert_gguf

    out, src = converted_dir(out_dir), source_dir(out_dir)
    if (out / "config.json").is_file():
        log(f"[pipeline] convert: done earlier ({out})")
    else:
        log(f"[pipeline] convert: {convert.source} -> {out} (shift_logits={convert.shift_logits})")
        out_dir.mkdir(parents=True, exist_ok=True)
        options = {"mask_token": convert.mask_token, "dtype": convert.dtype, "shift_logits": convert.shift_logits}
        if Path(convert.source).is_file() and (src / "config.json").is_file():  # read before an interruption
            convert_checkpoint(str(src), str(out), **options)
        elif Path(convert.source).is_file():
            convert_gguf(convert.source, out, source_out=src, **options)
        else:
            convert_checkpoint(convert.source, str(out), **options)
            if not src.exists():
                src.symlink_to(Path(convert.source).resolve(), target_is_directory=True)
    if distill is not None and not distill_file(out_dir).is_file():
        from ..data.distill import distill as run_distill

        run_distill(src, distill_file(out_dir), n=distill.n, seed=distill.seed,
                    max_new_tokens=distill.max_new_tokens, batch_size=distill.batch_size, log=log)


def missing_outputs(out_dir: Path, convert: ConvertStep | None, distill: DistillStep | None) -> list[Path]:
    """The files `prepare` writes that are not there yet."""
    wanted = [converted_dir(out_dir) / "config.json"] if convert else []
    wanted += [distill_file(out_dir)] if distill else []
    return [p for p in wanted if not p.exists()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .pipeline import load_pipeline

    ap = argparse.ArgumentParser(prog="python -m llada_train.stages.from_ar",
                                 description="Run a pipeline's convert: and distill: steps alone.")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.config, args.overrides)
    if pipe.convert is None:
        raise ConfigError(f"{args.config}: no convert: section")
    prepare(pipe.out_dir, pipe.convert, pipe.distill)
    return 0


def _wait_for(ready, poll: float = 2.0) -> None:
    while not ready():
        time.sleep(poll)


if __name__ == "__main__":
    import sys

    sys.exit(main())
