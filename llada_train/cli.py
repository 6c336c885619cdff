"""`llada-train <command>`: cpt sft rl pipeline generate convert export submit status fp4-analysis report."""

import argparse
import sys
from functools import partial

from .errors import UserError

USAGE = """llada-train <command> [args]

training stages (each: --config FILE [--resume auto|never|PATH] [--print-config] [key=value ...]):
  cpt           continual pre-training on a text corpus
  sft           supervised fine-tuning on chat data
  rl            EBPO reinforcement learning
  pipeline      CPT -> SFT -> RL in one run directory
  --config takes a YAML path or a preset shipped in llada_train/configs by name (e.g. pipeline_tiny)

tools:
  generate      threshold decoding from a model directory
  convert       AR checkpoint -> LLaDA2-MoE checkpoint
  export        RUN_DIR: write RUN_DIR/hf from the newest checkpoint
  submit        submit a stage or the pipeline to Slurm
  status        RUN_DIR: Slurm job status of a run
  fp4-analysis  UFP4 vs NVFP4 quantizer analysis
  report        RUN_DIR: plots and a markdown summary
"""


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
    from .config import ConfigError, load_config, to_yaml
    from .stages.pipeline import load_pipeline, run_pipeline, stage_runner

    args, overrides = _stage_args(stage, argv)
    try:
        if stage == "pipeline":
            pipe = load_pipeline(args.config, overrides, args.resume)
            text = "".join(f"# ---- {s} ----\n{to_yaml(c)}" for s, c in pipe.configs.items())
            job = partial(run_pipeline, pipe)
        else:
            cfg = load_config(stage, args.config, overrides)
            text = to_yaml(cfg)
            job = partial(stage_runner(stage), cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(text, end="")
        return 0
    try:
        finished = job()
        if finished and stage == "pipeline":
            _pipeline_report(pipe)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if finished else 3


def _pipeline_report(pipe) -> None:
    """The report of a finished pipeline (rank 0), rewritten only when a stage ran this time."""
    from .report import write_report
    from .stages.pipeline import is_rank0

    report = pipe.out_dir / "report.md"
    if pipe.report and is_rank0() and (pipe.ran or not report.is_file()):
        report = write_report(pipe.out_dir)
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
    "fp4-analysis": ("kernels.analysis", "main"),
    "report": ("report", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("cpt", "sft", "rl", "pipeline"):
        return run_stage(command, rest)
    if command in COMMANDS:
        return _delegate(*COMMANDS[command], rest)
    print(f"error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
