"""What every training stage shares: building the model and tokenizer and the diffusion loss hook."""

from pathlib import Path

import torch

from ..config import ConfigError, model_preset_values
from ..data.tokenizer import load_tokenizer, special_token_ids
from ..diffusion import ordinary_token_ids, training_loss
from ..kernels.ufp4_linear import apply_fp4
from ..model import LLaDA2MoeConfig, LLaDA2MoeModelLM
from ..sharded_load import load_for_rank


def build_tokenizer(mcfg):
    """The init_from model's tokenizer when it ships one, else `model.tokenizer`."""
    if mcfg.init_from and (Path(mcfg.init_from) / "tokenizer_config.json").is_file():
        return load_tokenizer(mcfg.init_from)
    return load_tokenizer(None if mcfg.tokenizer == "default" else mcfg.tokenizer)


def build_model(mcfg, tokenizer, seed: int, precision=None, engine=None) -> LLaDA2MoeModelLM:
    """Load `model.init_from` (an HF directory) or initialise the preset; check the tokenizer fits;
    with `precision` (the stage's `precision:` section), swap eligible GEMMs to 4-bit. With `engine`
    (the stage's `engine:` section) under ZeRO-3 or expert parallelism on several ranks, each rank
    reads only the weights it keeps (llada_train/sharded_load.py)."""
    if mcfg.init_from:
        if not Path(mcfg.init_from).is_dir():
            raise ConfigError(f"model.init_from: '{mcfg.init_from}' is not a directory (expected an hf/ export)")
        if _loads_by_rank(engine, precision):
            config = LLaDA2MoeModelLM.config_from_dir(mcfg.init_from, attn_backend=mcfg.attn_backend, **mcfg.overrides)
            rank = torch.distributed.get_rank()
            model, read = load_for_rank(Path(mcfg.init_from), config, engine, rank)
            print(f"[load] rank {rank} read {read['read_bytes'] / 2**20:.1f} MiB of the checkpoint's "
                  f"{read['checkpoint_bytes'] / 2**20:.1f} MiB", flush=True)
        else:
            model = LLaDA2MoeModelLM.from_pretrained(mcfg.init_from, attn_backend=mcfg.attn_backend, **mcfg.overrides)
        model.train()
    else:
        values = {**model_preset_values(mcfg.preset), **mcfg.overrides, "attn_backend": mcfg.attn_backend}
        torch.manual_seed(seed)
        model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**values))
    cfg = model.config
    if len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}")
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token or "<|mask|>")
    if mask_id != cfg.mask_token_id:
        raise ConfigError(f"tokenizer mask token id {mask_id} != model mask_token_id {cfg.mask_token_id}; "
                          "set model.overrides.mask_token_id or use the matching tokenizer")
    if mcfg.gradient_checkpointing:
        model.model.gradient_checkpointing = True
    if precision is not None:
        apply_fp4(model, precision.fp4, block=precision.fp4_block, rht_dim=precision.rht_dim,
                  bf16_first_layers=precision.bf16_first_layers, bf16_last_layers=precision.bf16_last_layers,
                  scale_rounding=precision.scale_rounding)
    return model


def _loads_by_rank(engine, precision) -> bool:
    """Rank-by-rank loading applies to several ranks under ZeRO-3 or expert parallelism, without
    4-bit GEMMs (they swap modules after loading; LoRA is applied after loading and checked below)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    fp4 = precision is not None and precision.fp4 != "none"
    return engine is not None and world > 1 and not fp4 and (engine.zero_stage == 3 or engine.expert_parallel > 1)


def diffusion_loss_fn(cfg, model, tokenizer):
    """The mixed M2T+T2T(+MTF) objective as a trainer loss hook; batches carry
    `input_ids`, `maskable` and `doc_ids` (-1 = padding)."""
    mask_id = model.config.mask_token_id
    vocab_ids = ordinary_token_ids(len(tokenizer), special_token_ids(tokenizer))

    def loss_fn(engine, batch, step, generator):
        return training_loss(engine, batch["input_ids"], batch["maskable"], batch["doc_ids"], batch["doc_ids"] >= 0,
                             cfg.diffusion, step=step, mask_id=mask_id, vocab_ids=vocab_ids, generator=generator)

    return loss_fn


def eval_loss_fn(cfg, loss_fn, eval_tensors: dict):
    """Held-out loss over fixed batches with fixed noise, so evals are comparable across steps."""
    bsz = max(1, cfg.train.batch_size)
    n = next(iter(eval_tensors.values())).shape[0]

    def eval_fn(engine, step):
        losses = []
        for i in range(min(cfg.train.eval_batches, max(1, n // bsz))):
            part = {k: v[i * bsz:(i + 1) * bsz] for k, v in eval_tensors.items()}
            loss, _ = loss_fn(engine, part, cfg.train.steps, torch.Generator().manual_seed(1000 + i))
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses)}

    return eval_fn
