"""`llada-train <command>`: the registered training stages, pipeline, and the tools (generate convert export
submit status plan fp4-analysis report eval eval-tasks eval-retention)."""

import argparse
import sys
from functools import partial

from .errors import UserError

TOOLS = """tools:
  generate      threshold decoding from a model directory
  convert       AR checkpoint (HF folder or GGUF file) -> LLaDA2-MoE checkpoint
  export        RUN_DIR: write RUN_DIR/hf from the newest checkpoint
  submit        submit a stage or the pipeline to Slurm
  status        RUN_DIR: Slurm job status of a run
  plan          per-rank memory, bytes per step and step time of a config on N nodes x G GPUs
  fp4-analysis  UFP4 vs NVFP4 quantizer analysis
  report        RUN_DIR: plots and a markdown summary
  eval          lm-evaluation-harness tasks on a model directory
  eval-tasks    harness task files for reasoning-gym families (offline)
  eval-retention  fixed questions: AR source vs LLaDA2 models made from it (accuracy, retention)
"""


def usage() -> str:
    """The command list, training stages read from the stage registry."""
    from .stages.registry import STAGES

    lines = ["llada-train <command> [args]", "",
             "training stages (each: --config FILE [--resume auto|never|PATH] [--print-config] [key=value ...]):"]
    lines += [f"  {s.name:<13} {s.summary}" for s in STAGES.values()]
    lines += [f"  {'pipeline':<13} {' -> '.join(STAGES)} in one run directory",
              "  --config takes a YAML path or a preset shipped in llada_train/configs by name (e.g. pipeline_tiny)",
              ""]
    return "\n".join(lines) + "\n" + TOOLS


def _stage_args(stage: str, argv: list[str]):
    parser = argparse.ArgumentParser(prog=f"llada-train {stage}")
    parser.add_argument("--config", help="YAML config (keys as in `--print-config`)")
    parser.add_argument("--resume", help="auto (default), never, or a checkpoint directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dot.key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    if stage == "pipeline":  # load_pipeline routes --resume to every stage
        return args, list(args.overrides)
    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    return args, overrides


def run_stage(stage: str, argv: list[str]) -> int:
    """A training stage or the pipeline. A UserError (config, data, paths, reward code) is one
    `error:` line and exit 2; any other exception is a bug and keeps its traceback."""
    args, overrides = _stage_args(stage, argv)
    try:
        text, job = _load_job(stage, args, overrides)
        if args.print_config:
            print(text, end="")
            return 0
        finished = job()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if finished else 3


def _load_job(stage: str, args, overrides: list[str]):
    """(the resolved config as YAML, the job to run) for a stage or the pipeline."""
    from .config import to_yaml
    from .stages.pipeline import load_pipeline, run_pipeline
    from .stages.registry import get_stage, load_stage_config

    if stage == "pipeline":
        pipe = load_pipeline(args.config, overrides, args.resume)
        text = "".join(f"# ---- {s} ----\n{to_yaml(c)}" for s, c in pipe.configs.items())

        def job():
            finished = run_pipeline(pipe)
            if finished:
                _pipeline_report(pipe)
            return finished

        return text, job
    cfg = load_stage_config(stage, args.config, overrides)
    return to_yaml(cfg), partial(get_stage(stage).runner(), cfg)


def _pipeline_report(pipe) -> None:
    """The report of a finished pipeline (rank 0), rewritten only when a stage ran this time; its
    plots go to W&B too when a stage logged there (`run.loggers`)."""
    from .loggers import log_report
    from .report import PLOTS, write_report
    from .stages.pipeline import is_rank0

    report = pipe.out_dir / "report.md"
    if pipe.report and is_rank0() and (pipe.ran or not report.is_file()):
        report = write_report(pipe.out_dir, retention=pipe.retention)
        log_report(pipe.out_dir, pipe.configs, PLOTS, warn=print)
    if report.is_file():
        print(f"[pipeline] report: {report}")


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llada-train export")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from .stages.export import export_run

    print(export_run(args.run_dir))
    return 0


def _delegate(module: str, func: str, argv: list[str]) -> int:
    """Run a tool's main. A user mistake (a UserError: bad path, value or file) is one `error:`
    line and exit code 2, as for the training stages; anything else keeps its traceback."""
    import importlib

    try:
        mod = importlib.import_module(f"llada_train.{module}")
    except ImportError as e:
        print(f"error: this command is not available in this build ({e})", file=sys.stderr)
        return 2
    try:
        return getattr(mod, func)(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


COMMANDS = {
    "export": ("cli", "export_main"),
    "generate": ("generate_cli", "main"),
    "convert": ("convert", "main"),
    "submit": ("slurm", "main_submit"),
    "status": ("slurm", "main_status"),
    "plan": ("plan", "main"),
    "fp4-analysis": ("kernels.analysis", "main"),
    "report": ("report", "main"),
    "eval": ("eval_cli", "main"),
    "eval-tasks": ("eval_cli", "tasks_main"),
    "eval-retention": ("retention", "main"),
}


def main(argv: list[str] | None = None) -> int:
    from .progress import quiet_library_bars
    from .stages.registry import STAGES

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    quiet_library_bars()
    if command in STAGES or command == "pipeline":
        return run_stage(command, rest)
    if command in COMMANDS:
        return _delegate(*COMMANDS[command], rest)
    print(f"error: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
