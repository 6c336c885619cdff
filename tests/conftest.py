import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "llada_train" / "configs"  # the shipped presets (llada_train.presets.PRESET_DIR)


def tiny_config(**overrides):
    from llada_train.model import LLaDA2MoeConfig

    values = yaml.safe_load((CONFIGS / "model/tiny.yaml").read_text())
    values.update(overrides)
    return LLaDA2MoeConfig(**values)


@pytest.fixture
def tiny_model():
    from llada_train.model import LLaDA2MoeModelLM

    torch.manual_seed(0)
    return LLaDA2MoeModelLM(tiny_config()).eval()
