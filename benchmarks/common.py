"""Shared helpers for benchmark scripts: timing and writing results as JSON + a markdown table."""

import json
import os
import platform
import time
from pathlib import Path

import torch

# LLADA_BENCH_RESULTS redirects every result (benchmarks/gpu_check.sh points it at $OUT or a scratch dir)
RESULTS = Path(os.environ.get("LLADA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def time_call(fn, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(name: str, rows: list[dict], notes: str = "") -> Path:
    """benchmarks/results/<name>.json and <name>.md (one table, columns from the first row)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "rows": rows, "notes": notes}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    cols = list(rows[0])
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [f"# {name}", "", f"Machine: {payload['machine']}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
