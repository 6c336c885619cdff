"""Supervised fine-tuning: chat rows -> response-masked sequences -> the shared mixed objective.

The objective is CPT's (`diffusion.training_loss`) with `maskable = response_mask`: prompt tokens
are never noised, never replaced by T2T, never drafted by MTF and carry no loss, so the prompt is
pure conditioning. Optional LoRA (`peft`) trains only adapters; the export merges them, so `hf/`
is a plain LLaDA2MoeModelLM that the next stage loads with `model.init_from`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.chat import ChatStats, load_chat_rows, response_spans, tokenize_chat
from ..data.prompts import response_budget
from ..data.sources import MalformedRow
from ..data.tasks import is_checkable, make_rows, row_correct
from ..data.text import BatchIterator
from ..decoding import DEFAULT_GEN_LENGTH, complete, generation_config_dict
from ..engine import init_distributed
from ..errors import ConfigError, UserError
from ..teachers import TEACHERS, apply_teacher
from ..trainer import BatchSource, Trainer
from .common import build_model, build_tokenizer, diffusion_loss_fn, eval_loss_fn

ADAPTER = "default"  # peft's adapter name
EXPERTS = "experts"  # lora.target_modules entry for the fused routed-expert weights (nn.Parameters)
EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
DECODE_MODE = "Q"  # accuracy eval and the exported generation defaults


def run_sft(cfg) -> bool:
    """Returns True when training finished (False when stopped by a signal or bad steps)."""
    rank, world = init_distributed()
    tokenizer = build_tokenizer(cfg.model)
    train_split, eval_split = load_sft_splits(cfg)
    train = sft_tensors(train_split, tokenizer, cfg)
    if len(train["input_ids"]) < cfg.train.batch_size:
        raise UserError(f"data.train {train_split.source!r}: {len(train['input_ids'])} usable examples, fewer "
                         f"than one batch (train.batch_size {cfg.train.batch_size}); add data or lower the batch size")
    model = build_model(cfg.model, tokenizer, cfg.run.seed, cfg.precision,
                        engine=None if cfg.lora.enabled else cfg.engine)  # LoRA wraps a whole model
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    loss_fn = diffusion_loss_fn(cfg, model, tokenizer)
    eval_fn, accuracy = None, None
    if eval_split is not None:
        accuracy = task_accuracy_fn(cfg, tokenizer, eval_split.rows)
        eval_fn = sft_eval_fn(eval_loss_fn(cfg, loss_fn, sft_tensors(eval_split, tokenizer, cfg)), accuracy)
    iterator = BatchIterator(len(train["input_ids"]), cfg.train.batch_size, seed=cfg.run.seed, rank=rank,
                             world_size=world)
    trainer = Trainer(cfg, "sft", model, tokenizer, BatchSource(train, iterator), loss_fn, eval_fn,
                      generation_config=_generation_defaults(cfg, accuracy.gen_length if accuracy else None),
                      export_model_fn=merged_lora_export if cfg.lora.enabled else None, eval_at_start=True,
                      rank=rank, world_size=world)
    for split in (train_split, eval_split):
        if split is not None:
            trainer.log(f"data {split.source}: {split.stats.summary()}")
    if cfg.lora.enabled:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer.log(f"LoRA: {trainable} trainable of {sum(p.numel() for p in model.parameters())} parameters")
    return trainer.fit()


# ---- data -----------------------------------------------------------------------------------------


@dataclass
class ChatSplit:
    source: str  # file, hf: name or "tasks"
    rows: list  # normalized rows (data.chat.normalize_row)
    stats: ChatStats  # loading counts, then tokenization counts


def load_sft_splits(cfg) -> tuple[ChatSplit, ChatSplit | None]:
    """Train and held-out rows. `data.train: tasks` generates both splits from `data.tasks` and
    `data.task_options` (disjoint by construction); `data.eval` (file or `hf:` name, whose `test`
    split is read) replaces the generated held-out rows when set; at most `data.num_eval` held-out
    rows are kept (0: no eval)."""
    d = cfg.data
    generated = None
    if d.train == "tasks":
        options = dict(d.task_options)
        try:
            train = make_rows(list(d.tasks), d.num_train, split="train", seed=cfg.run.seed, kind="sft", **options)
            if not d.eval and d.num_eval > 0:
                generated = make_rows(list(d.tasks), d.num_eval, split="eval", seed=cfg.run.seed, kind="sft",
                                      **options)
        except UserError as e:  # not ValueError: a bug inside a generator keeps its traceback
            raise ConfigError(f"bad value for 'data.tasks' / 'data.task_options' / 'data.num_*': {e}") from e
        source = "tasks"
        for name in d.teachers:
            train, taught = apply_teacher(train, name, d.teacher_error_rate, cfg.run.seed)
            source += (f"; {name} ({TEACHERS[name].bug}) on {taught['rows']} rows: wrong on "
                       f"{taught['wrong']} of the {taught['bug_applies']} where its bug shows, right on "
                       f"{taught['right_share']:.1%}")
        train_split = ChatSplit(source, *load_chat_rows(train))
    else:
        train_split = ChatSplit(d.train, *load_chat_rows(d.train, split="train"))
    if generated is not None:
        return train_split, ChatSplit("tasks (eval split)", *load_chat_rows(generated))
    if not d.eval or d.num_eval == 0:
        return train_split, None
    rows, stats = load_chat_rows(d.eval, split="test" if d.eval.startswith("hf:") else "train")
    return train_split, ChatSplit(d.eval, rows[: d.num_eval], stats)


def sft_tensors(split: ChatSplit, tokenizer, cfg) -> dict:
    """Tokenized rows stacked into fixed-shape (N, max_len) tensors: `input_ids`, `maskable`
    (= response mask) and `doc_ids`; the EOS padding after each example has maskable False and
    doc id -1 (outside every document: no attention, no loss)."""
    d = cfg.data
    dataset = tokenize_chat(split.rows, tokenizer, block_size=cfg.diffusion.block_size, max_len=d.max_len,
                            truncate=d.truncate, pack=d.pack, stats=split.stats)
    if len(dataset) == 0:
        raise UserError(f"{split.source}: no usable SFT examples ({split.stats.summary()}); fix the rows, raise "
                         f"data.max_len (now {d.max_len}) or set data.truncate=truncate")
    columns = {"input_ids": ("input_ids", tokenizer.eos_token_id), "maskable": ("response_mask", False),
               "doc_ids": ("doc_ids", -1)}
    tensors = {}
    for key, (name, fill) in columns.items():
        padded = [F.pad(ex[name], (0, d.max_len - len(ex[name])), value=fill) for ex in dataset.examples]
        tensors[key] = torch.stack(padded)  # (N, max_len)
    return tensors


# ---- LoRA -----------------------------------------------------------------------------------------


def apply_lora(model, lcfg):
    """Wrap `model` in a peft LoRA model; only the adapters require grad.

    `target_modules` names nn.Linear modules by suffix (attention `query_key_value`, `dense`; dense
    and shared-expert MLP `gate_proj`, `up_proj`, `down_proj`). The entry `experts` adds LoRA to
    the fused routed-expert weights (E, out, in) through peft's `target_parameters`: one rank-r
    update per expert, applied as a weight parametrization during the forward."""
    from peft import LoraConfig, get_peft_model

    names = list(lcfg.target_modules)
    experts = EXPERTS in names
    linears = [n for n in names if n != EXPERTS]
    config = LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=linears,
                        target_parameters=[f"{EXPERTS}.{p}" for p in EXPERT_PARAMS] if experts else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"bad value for 'lora.target_modules' {names}: {e}") from e


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict (released names, no `base_layer`) with every adapter's
    `scaling * B @ A` added to its weight; the live model is not modified."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    base = peft_model.get_base_model()
    state = {k.replace(".base_layer", ""): v.detach().cpu().clone()
             for k, v in base.state_dict().items() if ".lora_" not in k}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            param = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
            key = f"{name.replace('.base_layer', '')}.{param}"
            delta = module.get_delta_weight(ADAPTER).detach().cpu()
            assert delta.shape == state[key].shape, (key, delta.shape, state[key].shape)
            state[key] = state[key] + delta.to(state[key].dtype)
    return state


def merged_lora_export(engine):
    """Trainer `export_model_fn`: the plain model and its merged weights (ZeRO-3 shards gathered)."""
    with engine.gathered() as module:
        return module.get_base_model(), merged_state_dict(module)


# ---- eval -----------------------------------------------------------------------------------------


def task_accuracy_fn(cfg, tokenizer, rows: list):
    """Exact-match accuracy of threshold decoding (`DECODE_MODE`) on held-out rows that carry a
    checkable `task` (built-in, or `rg:` scored by its dataset) and a string `answer`, on up to `train.eval_batches *
    train.batch_size` prompts; also the decoder's tokens per forward. None when no row is
    checkable. The response budget is the longest gold response (with end marker and EOS) in
    whole blocks."""
    checkable, answers = [], []
    for row in rows:
        if not is_checkable(row) or not isinstance(row.get("answer"), str):
            continue
        try:
            answer = [text for text, is_response in response_spans(row["messages"], tokenizer) if is_response][-1]
        except MalformedRow:
            continue
        checkable.append(row)
        answers.append(answer)
        if len(checkable) == cfg.train.eval_batches * cfg.train.batch_size:
            break
    if not checkable:
        return None
    block = cfg.diffusion.block_size
    gen_length = response_budget(tokenizer, answers, block)
    prompts = [row["messages"][:-1] for row in checkable]

    def accuracy(model) -> dict:
        done = complete(model, tokenizer, prompts, mode=DECODE_MODE, gen_length=gen_length, block_length=block,
                        batch_size=len(prompts))
        right = [row_correct(row, text) for row, text in zip(checkable, done.texts, strict=True)]
        return {"accuracy": sum(right) / len(right),
                "tokens_per_forward": sum(done.tokens_per_forward) / len(done.tokens_per_forward)}

    accuracy.gen_length = gen_length
    return accuracy


def sft_eval_fn(loss_eval, accuracy):
    """Trainer eval hook: held-out loss (fixed noise) and, when available, task accuracy."""

    def eval_fn(engine, step) -> dict:
        metrics = loss_eval(engine, step)
        if accuracy is not None:
            metrics.update(accuracy(engine.module))
        return metrics

    return eval_fn


def _generation_defaults(cfg, gen_length: int | None) -> dict:
    return generation_config_dict(DECODE_MODE, gen_length=gen_length or DEFAULT_GEN_LENGTH,
                                  block_length=cfg.diffusion.block_size)


__all__ = ["ChatSplit", "apply_lora", "load_sft_splits", "merged_lora_export", "merged_state_dict", "run_sft",
           "sft_eval_fn", "sft_tensors", "task_accuracy_fn"]
