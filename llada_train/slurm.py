"""`llada-train submit` and `llada-train status`: a stage, or CPT -> SFT -> RL, as Slurm batch jobs.

The job scripts are files, llada_train/slurm_templates/{train,rl}.sbatch.tmpl, with `{{name}}`
placeholders (so bash's own `$X` and `${X:-y}` need no escaping). `submit` resolves and validates
the stage config and the Slurm options, checks that Slurm is there and the partition exists, and
only then writes the resolved config and the rendered script into RUN_DIR/slurm/ and calls sbatch.
The job always runs with `--resume auto` on that frozen config, so a requeued job continues
exactly where the previous run saved. Preemption (docs/design.md §10): Slurm sends USR1 `--grace`
seconds before the time limit; the ranks checkpoint, rank 0 writes RUN_DIR/PREEMPTED, and the
batch script, once every rank has exited, runs `scontrol requeue`.
"""

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

from .config import to_yaml
from .errors import ConfigError, UserError
from .presets import TEMPLATE_DIR
from .stages.registry import STAGES, load_stage_config

JOBS_FILE = "jobs.jsonl"  # RUN_DIR/slurm/jobs.jsonl: one line per submitted job
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|unlimited|infinite)$", re.IGNORECASE)
_PLAIN = re.compile(r"^[^\s'\"\\]+$")  # a value an #SBATCH line carries as is


class SlurmError(UserError):
    """Slurm is missing, or refused or cannot take the job; the message says what to do."""


class ScriptTemplate(string.Template):
    """`{{name}}` placeholders; a `{{` that is not one is an error, a missing value a KeyError."""

    pattern = r"\{\{(?:(?P<escaped>(?!))|\s*(?P<named>[a-z_][a-z0-9_]*)\s*\}\}|(?P<braced>(?!))|(?P<invalid>))"


def render(template: str, values: dict) -> str:
    """The script text of TEMPLATE_DIR/`template` with every placeholder filled (and every value used)."""
    tmpl = ScriptTemplate((TEMPLATE_DIR / template).read_text())
    names = {m.group("named") for m in tmpl.pattern.finditer(tmpl.template) if m.group("named")}
    assert names == set(values), f"{template}: placeholders {sorted(names)} != values {sorted(values)}"
    return tmpl.substitute(values)


# ---- options --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llada-train submit",
        description="Submit a training stage (one of the registered stages) or the pipeline (its stages as "
                    "dependent jobs) to Slurm. The job checkpoints on USR1 (sent --grace seconds before --time runs "
                    "out), requeues itself and resumes.")
    p.add_argument("stage", choices=[*STAGES, "pipeline"])  # the registered stages, read when the parser is built
    p.add_argument("--config", help="the stage's YAML (or the pipeline YAML for `pipeline`)")
    p.add_argument("overrides", nargs="*", help="dot.key=value overrides (pipeline: cpt.train.steps=...)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 = a CPU job (no GPU request)")
    p.add_argument("--nproc-per-node", type=int, help="ranks per node (default: gpus-per-node, or 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (default: 8 per GPU, or 1 per rank)")
    p.add_argument("--mem", help="memory per node, e.g. 200G (0 = all of it)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit, e.g. 48:00:00 or 2-00:00:00")
    p.add_argument("--grace", type=int, default=300,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 300)")
    p.add_argument("--job-name", help="default: RUN_NAME-STAGE")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="one more #SBATCH option, e.g. --sbatch-option=--exclusive (repeatable)")
    p.add_argument("--ray-wait", type=int, default=300, help="RL: seconds the Ray cluster may take to start")
    p.add_argument("--rl-layout", choices=["ray", "data-parallel"], default="ray",
                   help="RL: one learner with Ray rollout actors on every node (ray), or torchrun data "
                        "parallelism, each rank rolling out its own prompts (data-parallel)")
    p.add_argument("--after", help="start only after job JOBID succeeded (--dependency=afterok:JOBID)")
    p.add_argument("--dry-run", action="store_true", help="print the script(s); write and submit nothing")
    return p


def _check_options(opts):
    """Every option problem, before anything is written or submitted."""
    def bad(flag, msg):
        raise SlurmError(f"{flag}: {msg}")

    if opts.nodes < 1:
        bad("--nodes", f"{opts.nodes} must be >= 1")
    if opts.gpus_per_node < 0:
        bad("--gpus-per-node", f"{opts.gpus_per_node} must be >= 0")
    if opts.nproc_per_node is None:
        opts.nproc_per_node = max(1, opts.gpus_per_node)
    if opts.nproc_per_node < 1:
        bad("--nproc-per-node", f"{opts.nproc_per_node} must be >= 1")
    if opts.cpus_per_task is None:
        opts.cpus_per_task = 8 * opts.gpus_per_node if opts.gpus_per_node else opts.nproc_per_node
    if opts.cpus_per_task < 1:
        bad("--cpus-per-task", f"{opts.cpus_per_task} must be >= 1")
    for flag in ("mem", "partition", "account", "qos", "job_name"):
        value = getattr(opts, flag)
        if value is not None and not _PLAIN.match(value):
            bad(f"--{flag.replace('_', '-')}", f"{value!r} must be one word without quotes or spaces")
    if opts.time is not None:
        if not _TIME.match(opts.time):
            bad("--time", f"{opts.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
        limit = _seconds(opts.time)
        if limit is not None and opts.grace >= limit:
            bad("--grace", f"{opts.grace} s must be shorter than --time {opts.time}")
    if opts.grace < 1:
        bad("--grace", "must be >= 1 second")
    for opt in opts.sbatch_option:
        if not opt.startswith("-") or "\n" in opt:
            bad("--sbatch-option", f"{opt!r} is not an sbatch option (write --sbatch-option=--exclusive)")
    if opts.after is not None and not re.fullmatch(r"\d+(:\d+)*", opts.after):
        bad("--after", f"{opts.after!r} is not a job id (or ids joined by ':')")


def _seconds(limit: str) -> int | None:
    """Slurm time limit -> seconds (None = unlimited)."""
    if limit.lower() in ("unlimited", "infinite"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = ([*parts, 0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        h, m, s = parts
    else:  # MM[:SS]
        h, (m, s) = 0, ([*parts, 0])[:2]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def _directives(opts) -> str:
    lines = [f"--{key.replace('_', '-')}={value}" for key in ("partition", "account", "qos", "time", "mem")
             if (value := getattr(opts, key)) is not None]
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    lines += opts.sbatch_option
    return "\n".join(f"#SBATCH {line}" for line in lines)


# ---- one stage -------------------------------------------------------------------------------------


def load_stage(stage: str, config: str | None, overrides: list[str], rl_layout: str = "ray"):
    """The stage config as the job will run it."""
    return for_slurm(stage, load_stage_config(stage, config, overrides), rl_layout)


def for_slurm(stage: str, cfg, rl_layout: str = "ray"):
    """RL joins the job's own Ray cluster (or, data-parallel, rolls out in each rank); every job
    resumes from its own checkpoints."""
    if cfg.run.resume != "auto":
        raise ConfigError(f"run.resume={cfg.run.resume}: a Slurm job always resumes with 'auto' (a requeued job "
                          "must continue from its own checkpoints); to start from other weights set model.init_from")
    if stage == "rl" and rl_layout == "ray":
        cfg.rl.ray.enabled, cfg.rl.ray.address = True, "auto"
    elif stage == "rl":
        cfg.rl.ray.enabled = False
    return cfg


def prepare(stage: str, cfg, opts) -> dict:
    """Paths and the rendered script of one job (nothing written yet)."""
    run_dir = Path(cfg.run.out_dir).resolve()
    workdir = Path.cwd().resolve()
    for what, path in (("run.out_dir", run_dir), ("the working directory", workdir)):
        if not _PLAIN.match(str(path)):
            raise ConfigError(f"{what} '{path}' has spaces or quotes, which #SBATCH lines cannot carry; "
                              "use a path without them")
    log_dir = run_dir / "slurm"
    config_path = log_dir / f"{stage}.yaml"
    script_path = log_dir / f"{stage}.sbatch"
    python = Path(sys.executable)
    values = {
        "stage": stage,
        "job_name": opts.job_name or re.sub(r"[^\w.-]", "_", f"{cfg.run.name}-{stage}"),
        "nodes": opts.nodes,
        "cpus_per_task": opts.cpus_per_task,
        "grace_s": opts.grace,
        "workdir": workdir,
        "log_dir": log_dir,
        "directives": _directives(opts),
        "run_dir_q": shlex.quote(str(run_dir)),
        "python_q": shlex.quote(str(python)),
        "venv_bin_q": shlex.quote(str(python.parent)),
        "config_q": shlex.quote(str(config_path)),
        "script_q": shlex.quote(str(script_path)),
    }
    if stage == "rl" and opts.rl_layout == "ray":
        _check_ray_fits(cfg.rl.ray, opts)
        values.update(gpus_per_node=opts.gpus_per_node, ray_wait_s=opts.ray_wait)
        script = render("rl.sbatch.tmpl", values)
    else:
        values.update(nproc_per_node=opts.nproc_per_node)
        script = render("train.sbatch.tmpl", values)
    return {"stage": stage, "run_dir": run_dir, "config_path": config_path, "config_text": to_yaml(cfg),
            "script_path": script_path, "script": script}


def _check_ray_fits(ray, opts):
    """Rollout actors the job's Ray cluster cannot place would wait forever: refuse them now."""
    need, have = ray.num_workers * ray.cpus_per_worker, opts.nodes * opts.cpus_per_task
    if ray.cpus_per_worker > opts.cpus_per_task or need > have:
        raise SlurmError(f"rl.ray.num_workers {ray.num_workers} x rl.ray.cpus_per_worker {ray.cpus_per_worker} "
                         f"need {need:g} CPUs ({ray.cpus_per_worker:g} on one node), but the job has --nodes "
                         f"{opts.nodes} x --cpus-per-task {opts.cpus_per_task}: raise --cpus-per-task or lower them")


def check_slurm(partition: str | None):
    """sbatch is on PATH and the partition (if one is named) exists."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found on PATH: run `llada-train submit` on a Slurm login node (or load "
                         "its module); --dry-run prints the job script without Slurm")
    if partition is None:
        return
    res = _run(["scontrol", "show", "partition", partition])
    if res.returncode != 0:
        names = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
        raise SlurmError(f"--partition {partition}: no such partition on this cluster; "
                         f"available: {', '.join(sorted(set(names))) or 'none listed by sinfo'}")


def submit(job: dict, after: str | None) -> str:
    """Write the config and script into RUN_DIR/slurm/, sbatch it; returns the job id."""
    job["script_path"].parent.mkdir(parents=True, exist_ok=True)
    job["config_path"].write_text(job["config_text"])
    job["script_path"].write_text(job["script"])
    # A dependent job is cancelled when its predecessor fails, not left pending forever.
    chain = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    cmd = ["sbatch", "--parsable", *chain, str(job["script_path"])]
    res = _run(cmd)
    if res.returncode != 0:
        raise SlurmError(f"sbatch refused {job['script_path']}: {res.stderr.strip() or res.stdout.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    record = {"job_id": job_id, "stage": job["stage"], "script": str(job["script_path"]), "after": after,
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(job["script_path"].parent / JOBS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    return job_id


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")


def _stage_jobs(opts) -> list[dict]:
    """The jobs to submit, in order, every config validated."""
    if opts.stage != "pipeline":
        return [prepare(opts.stage, load_stage(opts.stage, opts.config, opts.overrides, opts.rl_layout), opts)]
    from .stages.from_ar import missing_outputs
    from .stages.pipeline import DONE, load_pipeline

    pipe = load_pipeline(opts.config, opts.overrides)
    missing = missing_outputs(pipe.out_dir, pipe.convert, pipe.distill)
    if missing:
        raise SlurmError(f"{opts.config}: its convert:/distill: steps have not run (no {missing[0]}); run them "
                         f"first with `python -m llada_train.stages.from_ar --config {opts.config}` (same overrides)")
    jobs = []
    for stage in pipe.stages:
        if (pipe.stage_dir(stage) / DONE).is_file():
            print(f"{stage}: finished earlier ({pipe.stage_dir(stage) / DONE}); not submitted")
            continue
        jobs.append(prepare(stage, for_slurm(stage, pipe.configs[stage], opts.rl_layout), opts))
    return jobs


def main_submit(argv: list[str]) -> int:
    opts = build_parser().parse_intermixed_args(argv)
    try:
        _check_options(opts)
        jobs = _stage_jobs(opts)
        if opts.dry_run:
            for job in jobs:
                print(f"{job['stage']}: would write {job['script_path']} (and {job['config_path'].name})",
                      file=sys.stderr)
                print(job["script"])
            return 0
        check_slurm(opts.partition)
        after, done = opts.after, []
        for job in jobs:
            try:
                after = submit(job, after)
            except SlurmError as e:
                if not done:
                    raise
                raise SlurmError(f"{e} (already submitted: {', '.join(done)}; scancel them, or submit the "
                                 f"rest with --after {after})") from e
            done.append(f"{job['stage']} {after}")
            print(f"{job['stage']}: submitted job {after}; logs and script in {job['script_path'].parent}")
    except UserError as e:  # ConfigError, SlurmError; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---- status ----------------------------------------------------------------------------------------


def job_state(job_id: str) -> dict:
    """State of one job from squeue (live), else sacct (finished; needs accounting), else scontrol."""
    res = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%M|%l|%R"])
    if res.returncode == 0 and res.stdout.strip():
        state, elapsed, limit, where = res.stdout.strip().splitlines()[0].split("|", 3)
        info = {"state": state, "elapsed": elapsed, "limit": limit, "source": "squeue",
                ("reason" if state == "PENDING" else "nodes"): where}
    else:
        acct = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode,Elapsed"])
        if acct.returncode == 0 and acct.stdout.strip():
            state, code, elapsed = acct.stdout.strip().splitlines()[-1].split("|")
            info = {"state": state.split()[0], "exit_code": code, "elapsed": elapsed, "source": "sacct"}
        else:
            why = (acct.stderr.strip().splitlines() or ["no record"])[0]
            info = {"state": "UNKNOWN", "source": "none",
                    "note": f"not known to squeue any more, and sacct has no record ({why})"}
    show = _run(["scontrol", "show", "job", "-o", job_id])
    fields = dict(re.findall(r"(\w+)=(\S*)", show.stdout)) if show.returncode == 0 else {}
    if "Restarts" in fields:
        info["restarts"] = int(fields["Restarts"])
    if "ExitCode" in fields and "exit_code" not in info and info["state"] not in ("PENDING", "RUNNING"):
        info["exit_code"] = fields["ExitCode"]
    return info


def run_progress(run_dir: Path) -> dict:
    """What the run directory says: last logged step, target steps, latest checkpoint, export."""
    out = {"step": None, "steps": None, "checkpoint": None, "hf": (run_dir / "hf" / "config.json").is_file(),
           "preempted": (run_dir / "PREEMPTED").is_file()}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
                out["step"] = json.loads(line).get("step", out["step"])
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        out["checkpoint"] = latest.read_text().strip()
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        out["steps"] = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("steps")
    return out


def main_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llada-train status", description="Slurm state and progress of a run "
                                "submitted with `llada-train submit` (a stage's run dir or a pipeline's).")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
    args = p.parse_args(argv)
    root = Path(args.run_dir)
    files = sorted([root / "slurm" / JOBS_FILE, *root.glob(f"*/slurm/{JOBS_FILE}")])
    files = [f for f in files if f.is_file()]
    if not files:
        print(f"error: {root}: no {JOBS_FILE} here or in its stage directories (was it submitted with "
              "`llada-train submit`?)", file=sys.stderr)
        return 2
    if shutil.which("squeue") is None:
        print("warning: squeue not found on PATH: showing the run directory only", file=sys.stderr)
    for jobs_file in files:
        record = json.loads(jobs_file.read_text().splitlines()[-1])  # the newest submission of that run dir
        run_dir = jobs_file.parent.parent
        row = {"run_dir": str(run_dir), **record, **run_progress(run_dir)}
        if shutil.which("squeue"):
            row.update(job_state(record["job_id"]))
        if args.json:
            print(json.dumps(row))
            continue
        state = row.get("state", "?")
        times = f"  elapsed {row['elapsed']}" + (f"/{row['limit']}" if row.get("limit") else "") \
            if row.get("elapsed") else ""
        extra = "".join(f"  {k.replace('_', ' ')} {row[k]}" for k in ("nodes", "reason", "exit_code", "restarts")
                        if row.get(k) not in (None, ""))
        print(f"{run_dir}  {record['stage']} job {record['job_id']}  {state}{times}{extra}")
        progress = f"step {row['step'] or 0}/{row['steps'] or '?'}  checkpoint {row['checkpoint'] or '-'}  " \
                   f"hf/ {'yes' if row['hf'] else 'no'}" + ("  PREEMPTED (requeue pending)" if row["preempted"] else "")
        print(f"    {progress}")
        if row.get("note"):
            print(f"    {row['note']}")
    return 0


# ---- inside the RL job -----------------------------------------------------------------------------


def wait_for_ray(nodes: int, timeout: float, address: str) -> bool:
    """Until `nodes` Ray nodes are alive at address (host:port); probes the port before ray.init,
    which would otherwise block for minutes on a head that is not up yet."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"[llada-train] no Ray head at {address} after {timeout:.0f} s", file=sys.stderr)
                return False
            time.sleep(1)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while True:
            alive = sum(n["Alive"] for n in ray.nodes())
            if alive >= nodes:
                return True
            if time.monotonic() > deadline:
                print(f"[llada-train] {alive} of {nodes} Ray nodes up after {timeout:.0f} s", file=sys.stderr)
                return False
            time.sleep(1)
    finally:
        ray.shutdown()


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llada_train.slurm", description="helpers the job scripts call")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("ray-wait", help="wait until N Ray nodes are alive at $RAY_ADDRESS")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    return 0 if wait_for_ray(args.nodes, args.timeout, os.environ["RAY_ADDRESS"]) else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
