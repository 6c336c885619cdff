"""The recipe's yardstick: exports trained on from one SFT start, scored on the same held-out problems.

Every arm is an export (`hf/` directory) that started from the SFT export of a pipeline run: RL with
either estimator and seed, or more SFT on the same (teacher-labelled) rows for about the same
wall-clock. All are decoded greedily (Q mode) on the RL stage's held-out problems of that run and
scored against gold; per family: accuracy with its 95% Wilson interval, the paired gain over the SFT
start and the paired difference to the `--reference` arm (same problems, normal 95% interval), and
each arm's wall-clock (the last `elapsed_s` of its metrics.jsonl).

Run: python benchmarks/bench_recipe_arms.py --run runs/reasoning --arm "EBPO seed 0=runs/reasoning/rl/hf" \
         --arm "more SFT=runs/more_sft/hf" [--reference "more SFT"] [--name bench_recipe_arms]
Writes benchmarks/results/<name>.{json,md}.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_rl_estimators import wilson
from benchmarks.common import RESULTS, write_results
from llada_train.data.prompts import load_heldout_rows
from llada_train.report import paired_gain, score_model
from llada_train.stages.registry import load_stage_config

START = "SFT start"


def train_seconds(export: Path) -> float | None:
    """Wall-clock of the run whose export this is: the last `elapsed_s` of its metrics (evaluations included)."""
    metrics = export.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    times = [json.loads(line).get("elapsed_s") for line in metrics.read_text().splitlines()]
    times = [t for t in times if t is not None]
    return round(times[-1], 1) if times else None


def interval(before: list[bool], after: list[bool]) -> str:
    mean, lo, hi = paired_gain(before, after)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="pipeline run directory (sft/hf, rl/config.yaml)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=EXPORT", help="an arm's export (repeatable)")
    p.add_argument("--reference", default=None, help="arm the vs_<reference> column compares with")
    p.add_argument("--name", default="bench_recipe_arms")
    args = p.parse_args()
    arms = {START: args.run / "sft" / "hf"} | dict(a.split("=", 1) for a in args.arm)
    arms = {name: Path(path) for name, path in arms.items()}
    cfg = load_stage_config("rl", str(args.run / "rl" / "config.yaml"))
    rows = load_heldout_rows(cfg.data, cfg.run.seed)
    hits = {}
    for name, export in arms.items():
        hits[name] = score_model(export, rows, cfg.data.prompt_field, "Q")["right"]
        print(f"[bench] {name}: {sum(hits[name]) / len(rows):.3f} on {len(rows)}", flush=True)
    reference = args.reference or START
    table = []
    for name, export in arms.items():
        for family in sorted({r["task"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["task"] == family]
            mine, start, ref = ([hits[a][i] for i in idx] for a in (name, START, reference))
            lo, hi = wilson(sum(mine), len(idx))
            table.append({"arm": name, "family": family, "n": len(idx), "accuracy": sum(mine) / len(idx),
                          "acc_ci95": f"[{lo:.3f}, {hi:.3f}]", "gain_vs_start": interval(start, mine),
                          f"vs_{reference}": interval(ref, mine), "train_s": train_seconds(export)})
    notes = (f"Held-out: the RL stage's {len(rows)} problems of {args.run} (seed {cfg.run.seed}), greedy Q decoding, "
             f"scored against gold; 95% Wilson intervals; gains paired on the same problems (normal 95% interval); "
             f"train_s = the arm's last elapsed_s in its metrics.jsonl. Arms: "
             + "; ".join(f"{n} = {p}" for n, p in arms.items()) + ". Command: " + " ".join(sys.argv))
    write_results(args.name, table, notes)
    payload = json.loads((RESULTS / f"{args.name}.json").read_text())
    payload["hits"] = {name: "".join("1" if h else "0" for h in right) for name, right in hits.items()}
    payload["tasks"] = [r["task"] for r in rows]
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
