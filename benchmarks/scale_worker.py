"""One rank of benchmarks/bench_scale.py (run under torchrun, gloo, one thread per rank).

`--mode load`: host memory of building the model from a released-layout checkpoint (`model.init_from`,
read rank by rank under ZeRO-3 or expert parallelism) and the DeepSpeed engine on it: resident set
before, after the load and its peak through engine init.
`--mode train`: the real trainer on the same checkpoint: every torch.distributed collective of the
first `--count-steps` steps counted (`plan.count_collectives`), each step timed, and the peak resident
set of the training steps (the peak is reset after engine init, so the load's transients are not in it).
Writes OUT/rank{r}.json.
"""

import argparse
import ctypes
import json
import os
import re
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


def memory() -> dict:
    """Resident set now and its peak since start (or since the last `reset_peak`), in bytes."""
    status = Path("/proc/self/status").read_text()
    def kib(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024
    return {"rss": kib("VmRSS"), "peak": kib("VmHWM")}


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost"]]


def heap() -> dict:
    """glibc's own count (`mallinfo2`): bytes the program holds in malloc'd blocks (`in_use`: heap chunks
    in use + mmapped blocks) and bytes malloc holds from the OS (`held`: the heap arenas, free chunks
    included, + mmapped blocks). `held - in_use` is freed memory malloc kept (fragmentation, no trim)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "held": info.arena + info.hblkhd}


class HeapPeak:
    """Peaks of `heap()` sampled every `every` seconds on a thread while the block runs, overall and per
    phase of the step (`phased` labels the engine's backward and optimizer step; the rest is forward)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, {"in_use": 0, "held": 0}, threading.Event()
        self.phase, self.in_use_by_phase = "forward", {}

    def _sample(self):
        while not self._stop.wait(self.every):
            now, phase = heap(), self.phase
            self.peak = {k: max(self.peak[k], now[k]) for k in now}
            self.in_use_by_phase[phase] = max(self.in_use_by_phase.get(phase, 0), now["in_use"])

    def phased(self, obj, name: str) -> None:
        """`obj.name(...)` runs labelled as phase `name`."""
        original = getattr(obj, name)

        def labelled(*args, **kwargs):
            self.phase = name
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = "forward"

        setattr(obj, name, labelled)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current VmRSS


def overrides(ckpt: Path, zero: int, ep: int, out: Path) -> list[str]:
    """cpt_tiny at LLaDA2.0-mini's width (hidden 2048, 256 experts of 512, top-8 in 8 groups, 16 heads of
    128), one dense and one MoE layer, 64-token rows in 16-token blocks, 2 sequences per rank, bf16."""
    return [f"model.init_from={ckpt}", f"engine.zero_stage={zero}", f"engine.expert_parallel={ep}",
            "engine.precision=bf16", "data.seq_len=64", "diffusion.block_size=16", "diffusion.block_schedule=[]",
            "diffusion.mtf.prob=0.0", "train.batch_size=4", "train.grad_accum=1", f"run.out_dir={out}/run",
            "run.resume=never", "run.loggers=[jsonl]"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["load", "train"], required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--count-steps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from llada_train.data.text import BatchIterator
    from llada_train.engine import build_engine, init_distributed
    from llada_train.plan import count_collectives
    from llada_train.stages.common import build_model, build_tokenizer, diffusion_loss_fn
    from llada_train.stages.registry import load_stage_config
    from llada_train.trainer import BatchSource, Trainer

    rank, world = init_distributed()
    cfg = load_stage_config("cpt", "cpt_tiny", overrides(args.ckpt, args.zero, args.ep, args.out))
    tokenizer = build_tokenizer(cfg.model)
    torch.distributed.barrier()
    result = {"before": memory(), "heap_before": heap()}
    model = build_model(cfg.model, tokenizer, cfg.run.seed, engine=cfg.engine)
    result["loaded"] = memory()
    if args.mode == "load":
        build_engine(model, cfg, micro_batch=cfg.train.batch_size // world)
        result["engine"] = memory()
    else:
        ids = torch.randint(5, len(tokenizer), (64, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
        docs = torch.zeros_like(ids, dtype=torch.int32)
        rows = BatchIterator(len(ids), cfg.train.batch_size, seed=0, rank=rank, world_size=world)
        trainer = Trainer(cfg, "cpt", model, tokenizer,
                          BatchSource({"input_ids": ids, "doc_ids": docs, "maskable": docs >= 0}, rows),
                          diffusion_loss_fn(cfg, model, tokenizer), rank=rank, world_size=world)
        trainer.setup()
        result["engine"] = memory()
        reset_peak()
        times = []
        heap_peak = HeapPeak()
        for name in ("backward", "step"):
            heap_peak.phased(trainer.engine._ds, name)
        with heap_peak, count_collectives() as counts:
            for _ in range(args.count_steps):
                times.append(_timed(trainer.train_step))
        times += [_timed(trainer.train_step) for _ in range(args.steps - args.count_steps)]
        result |= {"steps": memory(), "heap_steps_peak": heap_peak.peak,
                   "heap_in_use_by_phase": heap_peak.in_use_by_phase, "step_seconds": times,
                   "collectives": {f"{kind}/{n}": [c.calls, c.payload, c.sent] for (kind, n), c in counts.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()


def _timed(fn) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    fn()
    torch.distributed.barrier()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
