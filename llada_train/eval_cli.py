"""`llada-train eval`: lm-evaluation-harness tasks on an export; `llada-train eval-tasks`: harness
task files for reasoning-gym families, generated offline.

The harness's results JSON is written as it comes (`--out`), with a `llada_train` section beside
it: tokens per forward, decoding seconds, wall-clock and the ELBO's Monte-Carlo standard errors.
Each task's samples (the prompts the model saw, its outputs, the per-sample metrics) go to
`<out>.samples/<task>.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .decoding import DECODE_PRESETS
from .errors import UserError

CHAT_HELP = ("render each request as one user turn with the model's chat template, exactly as "
             "`generate --prompts` does (default: on, because SFT and RL exports only ever saw prompts in "
             "that form; turn it off for a CPT export or a base checkpoint scored on raw text)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-train eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (an export of cpt/sft/rl)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names (or groups)")
    p.add_argument("--mode", choices=sorted(DECODE_PRESETS), help="decoding preset (default: the export's, else Q)")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    p.add_argument("--include-path", type=Path, help="a directory of extra task YAMLs (the harness's format)")
    p.add_argument("--out", type=Path, help="results JSON (default: print the table only)")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=True, help=CHAT_HELP)
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per decode, (context, continuation) pairs "
                                                              "per ELBO batch")
    p.add_argument("--mc-samples", type=int, default=32,
                   help="Monte-Carlo draws of the ELBO per loglikelihood request (its standard error ~ 1/sqrt(N))")
    p.add_argument("--block-size", type=int, help="diffusion block of the ELBO (default: the export's block_length)")
    p.add_argument("--seed", type=int, default=0, help="seeds the ELBO's noise and any sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _check_args(args) -> None:
    from .generate_cli import _check_model_dir

    _check_model_dir(args.model)
    if args.include_path is not None and not args.include_path.is_dir():
        raise UserError(f"--include-path {args.include_path}: not a directory of task YAMLs")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be > 0, got {args.limit}")


def _task_manager(args, names: list[str]):
    """The harness's task index (plus --include-path); unknown names are refused before the model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f" or in {args.include_path}" if args.include_path else " (pass --include-path for local tasks)"
        raise UserError(f"--tasks: no task named {', '.join(missing)} in lm-evaluation-harness{where}")
    return manager


def main(argv: list[str] | None = None) -> int:
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from .harness import DiffusionLM

    args = build_parser().parse_args(argv)
    _check_args(args)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = _task_manager(args, names)
    lm = DiffusionLM.from_dir(args.model, mode=args.mode, device=args.device, batch_size=args.batch_size,
                              mc_samples=args.mc_samples, seed=args.seed, block_size=args.block_size)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                                      num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                                      log_samples=args.out is not None, random_seed=args.seed,
                                      torch_random_seed=args.seed)
    print(results_table(results))
    if args.out is not None:
        samples = results.pop("samples", {})
        results["llada_train"] = {**lm.stats.summary(), "wall_clock_seconds": round(time.perf_counter() - start, 3),
                                  "decode_mode": lm.decode["mode"], "mc_samples": args.mc_samples,
                                  "loglikelihood": lm.stats.loglikelihood}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
        _write_samples(args.out, samples, handle_non_serializable)
        print(f"results: {args.out}", file=sys.stderr)
    return 0


def results_table(results: dict) -> str:
    """One line per task and metric: value ± the harness's standard error, and n."""
    lines = [f"{'task':<28} {'metric':<24} {'value':>8}   {'stderr':>7}  {'n':>6}"]
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, value in metrics.items():
            name, _, kind = key.partition(",")
            if not kind or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            error = metrics.get(f"{name}_stderr,{kind}")
            error = f"{error:7.4f}" if isinstance(error, (int, float)) else f"{'':>7}"
            label = name if kind == "none" else f"{name} ({kind})"
            lines.append(f"{task:<28} {label:<24} {value:8.4f} ± {error}  {n:>6}")
    return "\n".join(lines)


def _write_samples(out: Path, samples: dict, default) -> None:
    folder = out.with_name(out.name + ".samples")
    folder.mkdir(exist_ok=True)
    for task, rows in samples.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r, default=default) + "\n" for r in rows))


# ---- eval-tasks: reasoning-gym families as harness tasks -----------------------------------------

TASK_YAML = """# {family}: {n} held-out problems (reasoning-gym seed {seed}, options {options}), written by
# `llada-train eval-tasks`. Scored by the family's own score_answer, exactly as the RL reward and
# benchmarks/check_fresh_problems.py score it.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []{max_gen_toks}
process_results: !function rg_scoring.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

SCORING_PY = '''"""reasoning-gym's own verdict on a harness output (written by `llada-train eval-tasks`)."""

from llada_train.data.reasoning_gym import is_correct


def process_results(doc, results):
    return {"acc": float(is_correct(doc, results[0]))}
'''


def build_tasks_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-train eval-tasks", description="harness task files (YAML + jsonl) for "
                                "reasoning-gym families, from a stage config's data.tasks and data.task_options")
    p.add_argument("--config", required=True, help="a stage config (e.g. OUT/rl/config.yaml) naming rg: families")
    p.add_argument("--out", type=Path, required=True, help="directory for the task files (pass it as --include-path)")
    p.add_argument("--n", type=int, default=300, help="problems per family")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the config's run.seed, so the rows "
                                                          "are the RL stage's own held-out problems)")
    p.add_argument("--max-gen-toks", type=int, help="answer length cap (default: the export's saved gen_length, "
                                                   "as `generate --prompts` decodes)")
    return p


def tasks_main(argv: list[str] | None = None) -> int:
    """One `<family>.yaml` + `<family>.jsonl` per rg family: the config's held-out split (never a
    train question), so the harness scores what `generate --prompts` + `score_answer` scores."""
    from .data.tasks import make_rows
    from .presets import resolve_config

    args = build_tasks_parser().parse_args(argv)
    cfg = _read_config(resolve_config(args.config))
    data = cfg.get("data") or {}
    families = [t for t in data.get("tasks") or [] if str(t).startswith("rg:")]
    if not families:
        raise UserError(f"--config {args.config}: data.tasks names no reasoning-gym family (rg:...)")
    seed = cfg.get("run", {}).get("seed", 0) if args.seed is None else args.seed
    options = data.get("task_options") or {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rg_scoring.py").write_text(SCORING_PY)
    for family in families:
        rows = make_rows([family], args.n, split="eval", seed=seed, kind="rl", **{family: options.get(family, {})})
        name = family.replace("rg:", "rg_")
        data_file = (args.out / f"{name}.jsonl").resolve()
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (args.out / f"{name}.yaml").write_text(TASK_YAML.format(
            family=family, n=len(rows), seed=seed, options=json.dumps(options.get(family, {})), task=name,
            data=json.dumps(str(data_file)),
            max_gen_toks=f"\n  max_gen_toks: {args.max_gen_toks}" if args.max_gen_toks else ""))
        print(f"{name}: {len(rows)} problems -> {data_file}")
    return 0


def _read_config(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"--config {path}: not a YAML mapping")
    return cfg


if __name__ == "__main__":
    sys.exit(main())
