"""`llada-train export RUN_DIR`: write RUN_DIR/hf from the newest complete checkpoint.

For runs that stopped before their own export (preempted, `train.export_hf: false`, bad steps):
the model is rebuilt from the run's resolved `config.yaml`, its weights come from the engine
checkpoint (ZeRO partitions merged to fp32 by DeepSpeed's own reader), LoRA adapters are merged.
"""

import json
from pathlib import Path

from .. import checkpoint as ckpt_lib
from ..engine import saved_state_dict
from ..errors import UserError
from .common import build_model, build_tokenizer
from .registry import load_stage_config


def export_run(run_dir) -> Path:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir}: no config.yaml; pass a stage's run directory (run.out_dir), e.g. runs/cpt")
    ckpt = ckpt_lib.find_resume_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'} to export")
    stage = json.loads((ckpt / ckpt_lib.STATE).read_text())["stage"]
    cfg = load_stage_config(stage, str(config_file))
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.run.seed)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.enabled:
        from .sft import apply_lora, merged_state_dict

        model = apply_lora(model, lora)
        model.load_state_dict(saved_state_dict(ckpt))
        model, state = model.get_base_model(), merged_state_dict(model)
    else:
        model.load_state_dict(saved_state_dict(ckpt))
        state = model.state_dict()
    gen_file = run_dir / ckpt_lib.GENERATION_CONFIG
    generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    return ckpt_lib.export_hf(model, state, tokenizer, run_dir / "hf", generation_config)
