"""One rank of the sharded-loading checks (tests/test_sharded_load.py runs it under torchrun, gloo).

Rank 0 saves a seeded small LLaDA2-MoE in several safetensors shards; every rank then loads it the
way it keeps it (`sharded_load.load_for_rank` under `--ep N --zero Z`), builds the DeepSpeed engine,
and compares the engine's logits with the plain model's (read whole by `from_pretrained`) on the
same rows. Writes what it read and measured to OUT/rank{r}.json.
"""

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

from llada_train.engine import build_engine, init_distributed  # noqa: E402
from llada_train.model import LLaDA2MoeModelLM  # noqa: E402
from llada_train.sharded_load import load_for_rank  # noqa: E402
from llada_train.stages.registry import load_stage_config  # noqa: E402
from tests.ep_worker import SEQ, VOCAB, small_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep", type=int, required=True)
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank, _ = init_distributed()
    ckpt = args.out / "ckpt"
    if rank == 0:
        small_model(seed=3).save_pretrained(ckpt, max_shard_size="40KB")  # several shards and an index
    torch.distributed.barrier()
    reference = LLaDA2MoeModelLM.from_pretrained(ckpt).eval()
    cfg = load_stage_config("cpt", "cpt_tiny", [f"engine.expert_parallel={args.ep}", f"engine.zero_stage={args.zero}"])
    model, read = load_for_rank(ckpt, reference.config, cfg.engine, rank)
    engine = build_engine(model, cfg, micro_batch=1).eval()
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7 + rank))
    with torch.no_grad():
        logits, ref = engine(input_ids=ids).logits, reference(input_ids=ids).logits
    shards = len(list(ckpt.glob("*.safetensors")))
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        **read, "shards": shards, "logits_rel": ((logits - ref).abs().max() / ref.abs().max()).item(),
        "expert_bytes": sum(p.numel() * 4 for n, p in reference.named_parameters() if ".experts." in n),
        "param_bytes": sum(p.numel() * 4 for p in reference.parameters())}))


if __name__ == "__main__":
    main()
