"""`llada-train submit` / `status` and the sbatch templates, against a real local Slurm.

The rendering and refusal tests need no Slurm. The job tests need `sbatch` and a running
slurmctld + slurmd (`sudo .ci/setup_slurm.sh` starts a single-node one; CI runs it): outside CI
they skip when sbatch is absent, in CI they fail. All jobs are submitted at once by one fixture
and run side by side: a CPT -> RL pipeline (CPT on 2 ranks, RL from its export through the Ray
template, SFT left out to save time: it runs through the same template as CPT) and a second
copy of its CPT stage that is preempted with USR1 mid-run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llada_train import slurm
from tests.conftest import CONFIGS, REPO
from tests.test_cpt import losses

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
PIPELINE = str(CONFIGS / "pipeline_tiny.yaml")
CPT_STEPS = 40
# Seq 32, batch 4, a handful of steps per stage; CPT long enough to be signalled mid-run.
CPT = [f"cpt.train.steps={CPT_STEPS}", "cpt.data.seq_len=32", "cpt.data.max_docs=30", "cpt.diffusion.block_size=8",
       "cpt.diffusion.block_schedule=[]", "cpt.train.batch_size=4", "cpt.train.log_every=1",
       "cpt.train.eval_every=1000", "cpt.train.eval_batches=1", "cpt.train.save_every=1000",
       "cpt.optim.warmup_steps=2"]
RL = ["rl.train.steps=2", "rl.train.batch_size=2", "rl.rl.group_size=2", "rl.rl.minibatch_size=2",
      "rl.data.num_train=8", "rl.data.num_eval=4", "rl.train.eval_every=2", "rl.train.save_every=2",
      "rl.rl.ray.num_workers=1",
      # a reward Ray task's clock includes starting its worker process: minutes on a loaded CI box
      "rl.rl.rewards=[{fn: 'llada_train.rl.rewards:exact_match', timeout_s: 300}]"]
# One CPU per job so two jobs run at once on a 2-CPU node; 2 ranks per node (torchrun, c10d).
RESOURCES = ["--nproc-per-node", "2", "--cpus-per-task", "1", "--time", "30:00", "--grace", "60", "--ray-wait", "180"]


def cli(*args, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llada_train.cli", *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def sh(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def directives(script: str) -> dict:
    """#SBATCH options as sbatch reads them: up to the first command line."""
    out = {}
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            assert key not in out, f"{key} given twice"
            out[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return out


def dry_run(tmp_path, *args) -> str:
    res = cli("submit", *args, "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def bash_syntax_ok(tmp_path, script: str):
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    res = sh("bash", "-n", str(path))
    assert res.returncode == 0, res.stderr


# ---- rendering and refusals (no Slurm needed) ------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 4])
def test_train_script_directives_and_launch(tmp_path, nodes):
    run_dir = tmp_path / "runs" / "x"
    extra = ["--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--qos", "high", "--mem", "0",
             "--sbatch-option=--exclusive"] if nodes == 4 else []
    script = dry_run(tmp_path, "cpt", "--config", str(CONFIGS / "cpt_tiny.yaml"), "--nodes", str(nodes),
                     "--time", "48:00:00", "--grace", "600", *extra, f"run.out_dir={run_dir}", "train.steps=7")
    d = directives(script)
    assert script.count("#SBATCH") == len(d)  # none after the first command, where sbatch stops reading
    assert d["--nodes"] == str(nodes) and d["--ntasks-per-node"] == "1"
    assert d["--signal"] == "B:USR1@600" and "--requeue" in d and d["--time"] == "48:00:00"
    for stream in ("--output", "--error"):
        assert Path(d[stream]).parent == run_dir / "slurm"
    assert d["--chdir"] == str(tmp_path)
    if nodes == 4:
        assert d["--gpus-per-node"] == "8" and d["--cpus-per-task"] == "64"  # 8 CPUs per GPU by default
        assert (d["--partition"], d["--account"], d["--qos"], d["--mem"]) == ("gpu", "proj", "high", "0")
        assert "--exclusive" in d
        assert "NPROC_PER_NODE=8" in script
    else:
        assert "--gpus-per-node" not in d and "--partition" not in d and d["--cpus-per-task"] == "1"
    # One torchrun per node, rendezvous on the first host of the allocation.
    assert 'HEAD=${NODES[0]}' in script and 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert '--rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT"' in script
    assert 'srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1' in script
    assert f"ARGS=(cpt --config {run_dir}/slurm/cpt.yaml --resume auto)" in script
    assert "scontrol requeue" in script
    bash_syntax_ok(tmp_path, script)
    assert not run_dir.exists()  # a dry run writes nothing


@pytest.mark.parametrize("nodes", [1, 4])
def test_rl_script_starts_ray_head_then_workers_then_driver(tmp_path, nodes):
    run_dir = tmp_path / "rl"
    script = dry_run(tmp_path, "rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "--nodes", str(nodes),
                     "--gpus-per-node", "8", "--time", "1-00:00:00", f"run.out_dir={run_dir}")
    d = directives(script)
    assert d["--nodes"] == str(nodes) and d["--signal"] == "B:USR1@300" and "--requeue" in d
    assert Path(d["--output"]).parent == run_dir / "slurm"
    head = script.index('ray_node "$HEAD" --head')
    workers = script.index('for node in "${NODES[@]:1}"; do')
    driver = script.index("-m llada_train.cli \"${ARGS[@]}\" &")
    assert head < workers < driver
    assert "--num-gpus=\"$GPUS_PER_NODE\"" in script and "GPUS_PER_NODE=8" in script
    assert 'export RAY_ADDRESS="$HEAD_IP:$PORT"' in script
    bash_syntax_ok(tmp_path, script)
    # the frozen config the job runs joins the job's Ray cluster
    cfg = slurm.load_stage("rl", str(CONFIGS / "rl_tiny.yaml"), [])
    assert cfg.rl.ray.enabled and cfg.rl.ray.address == "auto"


def test_data_parallel_rl_script_runs_torchrun_without_ray(tmp_path):
    run_dir = tmp_path / "rl"
    script = dry_run(tmp_path, "rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "--rl-layout", "data-parallel",
                     "--nodes", "2", "--gpus-per-node", "8", f"run.out_dir={run_dir}")
    assert "torch.distributed.run" in script and "NPROC_PER_NODE=8" in script and "ray_node" not in script
    assert "ARGS=(rl --config" in script
    bash_syntax_ok(tmp_path, script)
    cfg = slurm.load_stage("rl", str(CONFIGS / "rl_tiny.yaml"), ["rl.ray.enabled=true"], "data-parallel")
    assert not cfg.rl.ray.enabled  # each rank rolls out its own prompts


def test_template_placeholders_are_strict():
    with pytest.raises(KeyError):
        slurm.ScriptTemplate("x={{missing}}").substitute({})
    with pytest.raises(ValueError, match="Invalid placeholder"):
        slurm.ScriptTemplate("x={{ not-a-name }}").substitute({})
    text = 'echo "${A:-1} $B ${C[@]}" {{v}}'  # bash syntax passes through untouched
    assert slurm.ScriptTemplate(text).substitute(v="ok") == 'echo "${A:-1} $B ${C[@]}" ok'


@pytest.mark.parametrize("args, message", [
    (["train.stpes=3"], "unknown config key 'train.stpes'. Did you mean 'train.steps'?"),
    (["--time", "2 days"], "--time: '2 days' is not a Slurm time"),
    (["--time", "10:00", "--grace", "600"], "--grace: 600 s must be shorter than --time 10:00"),
    (["--nodes", "0"], "--nodes: 0 must be >= 1"),
    (["run.resume=never"], "a Slurm job always resumes with 'auto'"),
    (["--after", "12;rm"], "--after: '12;rm' is not a job id"),
])
def test_bad_config_or_options_refused_before_anything_is_written(tmp_path, args, message):
    res = cli("submit", "cpt", "--config", str(CONFIGS / "cpt_tiny.yaml"), f"run.out_dir={tmp_path}/run", *args,
              cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_rl_job_whose_rollout_actors_cannot_fit_is_refused(tmp_path):
    res = cli("submit", "rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "--cpus-per-task", "1",
              "rl.ray.num_workers=2", f"run.out_dir={tmp_path}/run", "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "need 2 CPUs" in res.stderr and "--cpus-per-task 1" in res.stderr, res.stderr


def test_missing_sbatch_is_a_clear_error(tmp_path):
    res = cli("submit", "cpt", "--config", str(CONFIGS / "cpt_tiny.yaml"), f"run.out_dir={tmp_path}/run",
              cwd=tmp_path, env={"PATH": str(tmp_path)})
    assert res.returncode == 2 and "sbatch not found on PATH" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "run").exists()


def test_time_limits_in_seconds():
    assert slurm._seconds("90") == 90 * 60
    assert slurm._seconds("10:30") == 10 * 60 + 30
    assert slurm._seconds("48:00:00") == 48 * 3600
    assert slurm._seconds("2-03") == 51 * 3600
    assert slurm._seconds("1-00:00:05") == 86405
    assert slurm._seconds("UNLIMITED") is None


# ---- real Slurm ------------------------------------------------------------------------------------


def require_slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("CI"):
            pytest.fail("CI: sbatch not found; .ci/setup_slurm.sh should have installed and started Slurm")
        pytest.skip("no local Slurm (sbatch not on PATH); `sudo .ci/setup_slurm.sh` installs and starts one")
    states = sh("sinfo", "-h", "-o", "%T").stdout.split()
    if not {"idle", "mixed", "allocated"} & set(states):
        pytest.fail(f"Slurm is installed but no node is up (sinfo: {states}); run .ci/setup_slurm.sh")


def job_fields(job_id: str) -> dict:
    out = sh("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "slurm").glob("*.out")) +
                     sorted((run_dir / "slurm").glob("*.err")))


def wait_done(job_id: str, run_dir: Path, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in TERMINAL:
            assert fields["JobState"] == "COMPLETED", f"job {job_id}: {fields.get('JobState')}\n{logs(run_dir)}"
            return fields
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job_fields(job_id).get('JobState')} after {timeout} s\n{logs(run_dir)}")


def submitted(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(re.findall(r"^(\w+): submitted job (\d+)", res.stdout, re.MULTILINE))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Submit the pipeline and the to-be-preempted CPT copy; signal the copy mid-run."""
    require_slurm()
    root = tmp_path_factory.mktemp("slurm")
    pipe, pre, dp = root / "pipe", root / "pre", root / "dp"
    ids = {}
    try:
        ids["pipe"] = submitted(cli("submit", "pipeline", "--config", PIPELINE, *RESOURCES, f"out_dir={pipe}",
                                    f"cpt.data.cache_dir={root}/cache_a", *CPT, *RL, "stages=[cpt,rl]", "report=false"))
        dependency = job_fields(ids["pipe"]["rl"]).get("Dependency")
        ids["pre"] = submitted(cli("submit", "pipeline", "--config", PIPELINE, *RESOURCES, f"out_dir={pre}",
                                   f"cpt.data.cache_dir={root}/cache_b", *CPT, "stages=[cpt]"))
        ids["dp"] = submitted(cli("submit", "rl", "--config", str(CONFIGS / "rl_tiny.yaml"), "--rl-layout",
                                  "data-parallel", *RESOURCES, f"run.out_dir={dp}", "model.init_from=",
                                  *(item.removeprefix("rl.") for item in RL if "ray." not in item)))
        pre_id = ids["pre"]["cpt"]
        metrics = pre / "cpt" / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline and job_fields(pre_id).get("JobState") not in TERMINAL, logs(pre / "cpt")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", pre_id], check=True)
        yield {"pipe": pipe, "pre": pre, "dp": dp, "ids": ids, "dependency": dependency}
    finally:
        for group in ids.values():
            sh("scancel", *group.values())


@pytest.mark.slurm
def test_cpt_job_runs_two_ranks_and_exports(jobs):
    run_dir = jobs["pipe"] / "cpt"
    wait_done(jobs["ids"]["pipe"]["cpt"], run_dir)
    state = json.loads((run_dir / "checkpoints" / f"step_{CPT_STEPS:06d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == CPT_STEPS
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / "hf" / "config.json").is_file()
    assert sorted(losses(run_dir)) == list(range(1, CPT_STEPS + 1))


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(jobs):
    run_dir = jobs["pre"] / "cpt"
    fields = wait_done(jobs["ids"]["pre"]["cpt"], run_dir)
    wait_done(jobs["ids"]["pipe"]["cpt"], jobs["pipe"] / "cpt")
    assert int(fields["Restarts"]) == 1
    out = next((run_dir / "slurm").glob("*.out")).read_text()
    saved = re.search(r"checkpoint of step (\d+) saved: requeueing job", out)
    assert saved and "USR1: asking the ranks to checkpoint" in out, out
    step = int(saved.group(1))
    assert 3 <= step < CPT_STEPS
    assert "restart 1 on" in out and f"resumed from {run_dir}/checkpoints/step_{step:06d} at step {step}" in out
    reference = losses(jobs["pipe"] / "cpt")
    assert losses(run_dir) == reference and len(reference) == CPT_STEPS  # bit-identical curve, same final step
    status = json.loads(cli("status", str(jobs["pre"]), "--json").stdout)
    assert (status["state"], status["restarts"], status["step"], status["hf"]) == ("COMPLETED", 1, CPT_STEPS, True)


@pytest.mark.slurm
def test_pipeline_jobs_chain_with_afterok_and_rl_runs_on_ray(jobs):
    ids, pipe = jobs["ids"]["pipe"], jobs["pipe"]
    assert jobs["dependency"].startswith(f"afterok:{ids['cpt']}(")
    for stage in ("cpt", "rl"):
        wait_done(ids[stage], pipe / stage)
        assert (pipe / stage / "hf" / "config.json").is_file()
    rl_config = (pipe / "rl" / "slurm" / "rl.yaml").read_text()
    assert f"init_from: {pipe}/cpt/hf" in rl_config and "address: auto" in rl_config
    out = next((pipe / "rl" / "slurm").glob("*.out")).read_text()
    assert "Ray cluster up at" in out and "rollouts in Ray (1 workers)" in out, out
    rows = [json.loads(line) for line in cli("status", str(pipe), "--json").stdout.splitlines()]
    assert {(r["stage"], r["state"], r["hf"]) for r in rows} == {(s, "COMPLETED", True) for s in ("cpt", "rl")}


@pytest.mark.slurm
def test_data_parallel_rl_job_trains_on_two_ranks_and_exports(jobs):
    run_dir = jobs["dp"]
    wait_done(jobs["ids"]["dp"]["rl"], run_dir)
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert (state["world_size"], state["step"]) == (2, 2)
    assert (run_dir / "hf" / "config.json").is_file()
    assert "enabled: false" in (run_dir / "slurm" / "rl.yaml").read_text()


@pytest.mark.slurm
def test_unknown_partition_is_refused_before_submitting(tmp_path):
    require_slurm()
    res = cli("submit", "cpt", "--config", str(CONFIGS / "cpt_tiny.yaml"), "--partition", "nosuchpart",
              f"run.out_dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 2 and "--partition nosuchpart: no such partition" in res.stderr, res.stderr
    assert "available: debug" in res.stderr
    assert not (tmp_path / "run").exists()
