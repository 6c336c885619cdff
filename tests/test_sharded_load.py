"""Rank-by-rank loading (llada_train/sharded_load.py): each rank reads from the safetensors shards only
what it keeps under expert parallelism and/or ZeRO-3, and the engine built on it computes what the
model read whole computes (real torchrun ranks over gloo; tests/load_worker.py measures)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llada_train.sharded_load import CheckpointReader

from .test_cpt import free_port

WORKER = Path(__file__).with_name("load_worker.py")
REPO = WORKER.parents[1]


def test_flat_ranges_and_expert_blocks_equal_the_whole_tensor_sliced(tmp_path):
    """Random shapes and ranges, across files and across the per-expert keys of a fused tensor."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    experts, out_dim, in_dim = 5, 3, 7
    per_expert = {f"model.layers.1.mlp.experts.{e}.up_proj.weight": torch.randn(out_dim, in_dim, generator=g)
                  for e in range(experts)}
    plain = {"model.norm.weight": torch.randn(11, generator=g), "lm_head.weight": torch.randn(13, 6, generator=g)}
    save_file(dict(list(per_expert.items())[:2]) | plain, tmp_path / "a.safetensors")
    save_file(dict(list(per_expert.items())[2:]), tmp_path / "b.safetensors")
    reader = CheckpointReader(tmp_path, experts)
    fused = torch.stack(list(per_expert.values()))  # (E, out, in)
    wholes = {"model.layers.1.mlp.experts.up_proj": fused, **plain}
    for name, whole in wholes.items():
        assert torch.equal(reader.read(name), whole)
        for _ in range(20):
            start = int(torch.randint(0, whole.numel(), (1,), generator=g))
            end = int(torch.randint(start + 1, whole.numel() + 1, (1,), generator=g))
            assert torch.equal(reader.read_flat(name, whole.shape, start, end), whole.reshape(-1)[start:end])
    assert torch.equal(reader.read("model.layers.1.mlp.experts.up_proj", range(1, 4)), fused[1:4])
    assert reader.checkpoint_bytes() == 4 * (fused.numel() + sum(t.numel() for t in plain.values()))


@pytest.mark.parametrize(("ep", "zero"), [(2, 2), (2, 3)])
def test_each_rank_reads_only_what_it_keeps_and_computes_the_whole_models_logits(tmp_path, ep, zero):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(WORKER), "--ep", str(ep), "--zero", str(zero), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["checkpoint_bytes"]
    assert ranks[0]["shards"] > 2 and total >= ranks[0]["param_bytes"]
    for r in ranks:
        assert r["logits_rel"] < 1e-5
        if zero == 3:  # its partition of every tensor in whole rows: about half, never the whole
            assert 0.45 * total < r["read_bytes"] < 0.55 * total
        else:  # every non-expert weight, and half of the experts
            assert r["read_bytes"] == total - r["expert_bytes"] // ep
    assert sum(r["read_bytes"] for r in ranks) >= total  # every weight read by some rank
