"""Continual pre-training: corpus -> packed rows -> mixed M2T+T2T objective -> checkpoints -> hf/."""

from ..data.text import BatchIterator, build_corpus
from ..decoding import generation_config_dict
from ..engine import init_distributed
from ..trainer import BatchSource, Trainer
from .common import build_model, build_tokenizer, diffusion_loss_fn, eval_loss_fn


def run_cpt(cfg) -> bool:
    """Returns True when training finished (False when stopped by a signal or bad steps)."""
    rank, world = init_distributed()
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.run.seed, cfg.precision, cfg.engine)
    d = cfg.data
    corpus = build_corpus(d.paths, tokenizer, seq_len=d.seq_len, eval_fraction=d.eval_fraction, seed=cfg.run.seed,
                          max_docs=d.max_docs, num_proc=d.num_proc, cache_dir=d.cache_dir or None,
                          text_field=d.text_field)
    tensors = {"input_ids": corpus.train_ids, "doc_ids": corpus.train_docs, "maskable": corpus.train_docs >= 0}
    iterator = BatchIterator(len(corpus.train_ids), cfg.train.batch_size, seed=cfg.run.seed, rank=rank,
                             world_size=world)
    loss_fn = diffusion_loss_fn(cfg, model, tokenizer)
    eval_tensors = {"input_ids": corpus.eval_ids, "doc_ids": corpus.eval_docs, "maskable": corpus.eval_docs >= 0}
    trainer = Trainer(cfg, "cpt", model, tokenizer, BatchSource(tensors, iterator), loss_fn,
                      eval_loss_fn(cfg, loss_fn, eval_tensors), generation_config=generation_config_dict("S"),
                      eval_at_start=True, rank=rank, world_size=world)
    if rank == 0:
        trainer.log(f"corpus: {corpus.stats}")
    return trainer.fit()
