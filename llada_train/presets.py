"""Files shipped inside the package: config presets, model presets, Slurm job templates and the
default tokenizer. They live next to the code, so an installed wheel finds them from any directory.

`--config X` (and a pipeline file's `config:` entries) resolve through `resolve_config`: an existing
file wins; else X names a preset in llada_train/configs/ (`pipeline_tiny`, `pipeline_tiny.yaml`
and `configs/pipeline_tiny.yaml` all work). `model.preset` resolves the same way in configs/model/.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PRESET_DIR = PACKAGE_DIR / "configs"  # stage and pipeline configs: <name>.yaml
MODEL_PRESET_DIR = PRESET_DIR / "model"  # LLaDA2MoeConfig keys: <name>.yaml
TEMPLATE_DIR = PACKAGE_DIR / "slurm_templates"  # Slurm batch script templates: <name>.sbatch.tmpl
TOKENIZER_DIR = PACKAGE_DIR / "data" / "tokenizer"  # the default tokenizer (tokenizer.json)


def list_presets() -> list[str]:
    """Names of the stage and pipeline presets (`--config NAME`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def list_model_presets() -> list[str]:
    """Names of the model presets (`model.preset=NAME`)."""
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def _lookup(arg: str, directory: Path, prefix: tuple[str, ...]) -> Path | None:
    """directory/X or directory/X.yaml, with a leading `prefix` of X's parts dropped; None if neither."""
    parts = Path(arg).parts
    if Path(arg).is_absolute() or not parts:
        return None
    if parts[:len(prefix)] == prefix:
        parts = parts[len(prefix):]
    if not parts or ".." in parts:
        return None
    rel = Path(*parts)
    for candidate in (directory / rel, directory / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _file_or_preset(arg: str, directory: Path, prefix: tuple[str, ...]) -> Path | None:
    """An existing file `arg` (relative to the current directory) wins; else its preset, or None."""
    if arg and Path(arg).is_file():
        return Path(arg)
    return _lookup(arg, directory, prefix) if arg else None


def resolve_config(path_or_name: str) -> Path:
    """The YAML that `--config path_or_name` means: an existing file (relative to the current
    directory) wins; else a preset in llada_train/configs/ named `X`, `X.yaml` or `configs/X[.yaml]`."""
    arg = str(path_or_name or "")
    found = _file_or_preset(arg, PRESET_DIR, ("configs",))
    if found is None:
        raise ConfigError(f"config file not found: {arg or '(none given)'} (no such file, and no preset of that "
                          f"name in {PRESET_DIR}; presets: {', '.join(list_presets())})")
    return found


def model_preset_path(name_or_path: str) -> Path:
    """The YAML of LLaDA2MoeConfig keys that `model.preset` means: an existing file wins; else a
    preset in llada_train/configs/model/ named `X`, `X.yaml` or `configs/model/X[.yaml]`."""
    arg = str(name_or_path or "")
    found = _file_or_preset(arg, MODEL_PRESET_DIR, ("configs", "model"))
    if found is None:
        raise ConfigError(f"model.preset: '{arg}' is neither a file nor one of {list_model_presets()}")
    return found
