"""`run.loggers`: a W&B run holds metrics.jsonl's scalars and the resolved config (read back from the
offline run's `.wandb` file), a resumed stage continues its W&B run, a broken W&B setup only warns,
the pipeline's report plots reach W&B, and a bad `run.loggers` name is a ConfigError naming the key.

The `.wandb` reader below is needed because wandb 0.31 dropped its Python reader
(`wandb.sdk.internal.datastore`; the Go core writes the file now). The format is unchanged: a 7-byte
header, then LevelDB-log records (crc32, length, type; 32 KiB blocks) of `wandb_internal_pb2.Record`
protobufs; the checksums are verified, so a misread fails loudly.
"""

import json
import struct
import zlib
from pathlib import Path

import pytest
import yaml

from llada_train.config import ConfigError
from llada_train.loggers import ID_FILE, MetricLoggers, log_report
from llada_train.report import PLOTS
from llada_train.stages.registry import load_stage_config
from tests.conftest import CONFIGS
from tests.test_cpt import cli, tiny_args

BLOCK = 32768  # LevelDB log block
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
WARNING = "W&B logging is off from here"


def read_wandb_records(path: Path) -> list:
    """Every Record of a .wandb file, in write order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), "not a .wandb file (header)"
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad checksum at {pos}"
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_run(records: list) -> tuple:
    """(the run record, its config {key: value}, history {step: {key: value}}) of one .wandb file."""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {}
            for item in r.history.item:  # a logged dict (an image) arrives as one item per nested key
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for key in parents:
                    node = node.setdefault(key, {})
                node[leaf] = json.loads(item.value_json)
            history.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    config.pop("_wandb", None)
    return run, config, history


def offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files of run_dir's offline W&B runs, oldest first. The in-process W&B service
    stops first: `run.finish()` returns before wandb-core has written the file out (CI read one
    empty), and the service's shutdown flushes it."""
    import wandb

    wandb.teardown()
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def jsonl_scalars(run_dir: Path) -> dict:
    """metrics.jsonl as {step: {key: number}}, records of one step merged (as W&B merges them)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {}).update(
            {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"})
    return by_step


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline and silent, every wandb directory inside tmp_path, no WANDB_PROJECT/ENTITY/NAME
    from the caller's environment (subprocesses inherit it); the in-process service stops afterwards."""
    import wandb

    base = tmp_path / "wandb-home"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": base / "dir",
           "WANDB_CONFIG_DIR": base / "config", "WANDB_CACHE_DIR": base / "cache", "WANDB_DATA_DIR": base / "data"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    yield
    wandb.teardown()


def run_tiny(run_dir: Path, tmp_path: Path, steps: int, *extra, env=None):
    res = cli(*tiny_args(run_dir, tmp_path / "cache", f"train.steps={steps}", "train.eval_every=2",
                         "train.save_every=100", "train.export_hf=false", *extra), env_extra=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res


def test_wandb_run_holds_the_jsonl_scalars_and_config_and_resume_continues_it(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    env = {"WANDB_NAME": "tiny-from-env"}
    extra = ("run.loggers=[tensorboard,wandb]", "run.wandb.project=llada-train-test")
    run_tiny(run_dir, tmp_path, 3, *extra, env=env)
    first_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_tiny(run_dir, tmp_path, 5, *extra, env=env)  # resumes from the step-3 checkpoint

    first, resumed = offline_runs(run_dir)
    run_id = (run_dir / ID_FILE).read_text()
    runs = [wandb_run(read_wandb_records(path)) for path in (first, resumed)]
    for run, _, _ in runs:  # one W&B run: the resumed invocation kept the id
        assert (run.run_id, run.project, run.display_name, run.job_type) == (
            run_id, "llada-train-test", "tiny-from-env", "cpt")
    # each W&B run holds the resolved config of its invocation (the resumed one: train.steps=5)
    assert runs[0][1] == first_config and runs[0][1]["run"]["loggers"] == ["jsonl", "tensorboard", "wandb"]
    assert runs[1][1] == yaml.safe_load((run_dir / "config.yaml").read_text())
    history = {**runs[0][2], **runs[1][2]}
    assert sorted(runs[0][2]) == [0, 1, 2, 3] and sorted(runs[1][2]) == [4, 5]  # step 0: the first eval
    assert history == jsonl_scalars(run_dir)  # every scalar of metrics.jsonl, at its step
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())


def test_broken_wandb_setup_only_warns_and_training_finishes(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    res = run_tiny(run_dir, tmp_path, 3, "run.loggers=[wandb]", env={"WANDB_MODE": "bogus"})
    log = res.stdout + res.stderr
    line = next(x for x in log.splitlines() if WARNING in x)
    assert log.count(WARNING) == 1 and "wandb.init failed" in line and "bogus" in line, log[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000003"
    assert not (run_dir / "tensorboard").exists()  # run.loggers without tensorboard


def test_wandb_failure_mid_run_warns_once_and_jsonl_stays_complete(tmp_path, offline_wandb):
    cfg = load_stage_config("cpt", str(CONFIGS / "cpt_tiny.yaml"), [f"run.out_dir={tmp_path}", "run.loggers=[wandb]"])
    warnings = []
    loggers = MetricLoggers(tmp_path, cfg.run, {"a": 1}, "cpt", resumed=False, warn=warnings.append)
    loggers.log({"step": 1, "loss": 2.0})
    loggers.wandb.run.finish()  # the run ends under the trainer: the next wandb.log raises
    loggers.log({"step": 2, "loss": 1.5})
    loggers.log({"step": 3, "loss": 1.0, "stopped": "max_bad_steps"})
    loggers.close()
    assert len(warnings) == 1 and "wandb.log failed: UsageError" in warnings[0], warnings
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    _, config, history = wandb_run(read_wandb_records(offline_runs(tmp_path)[0]))
    assert (config, history) == ({"a": 1}, {1: {"loss": 2.0}})


def test_pipeline_report_plots_reach_a_wandb_report_run(tmp_path, offline_wandb):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "demo"
    out.mkdir()
    for name in (PLOTS["loss"], PLOTS["rl"]):  # no decoding.png: nothing logged for it
        plt.figure(figsize=(2, 2))
        plt.plot([0, 1], [1, 0])
        plt.savefig(out / name)
        plt.close()
    stage = str(CONFIGS / "cpt_tiny.yaml")
    configs = {"cpt": load_stage_config("cpt", stage, ["run.loggers=[wandb]", "run.wandb.project=proj"]),
               "sft": load_stage_config("cpt", stage)}  # a stage without W&B
    warnings = []
    log_report(out, configs, PLOTS, warn=warnings.append)
    assert warnings == []
    run, config, history = wandb_run(read_wandb_records(offline_runs(out)[0]))
    assert (run.project, run.display_name, run.job_type) == ("proj", "demo-report", "report")
    assert config == {"out_dir": str(out), "stages": ["cpt", "sft"]}
    images = history[0]
    assert sorted(images) == ["report/loss", "report/rl"]
    for image in images.values():
        assert image["_type"] == "image-file"
        assert next(out.glob(f"wandb/offline-run-*/files/{image['path']}")).stat().st_size == image["size"]


def test_no_wandb_stage_means_no_report_run(tmp_path):
    log_report(tmp_path, {"cpt": load_stage_config("cpt", str(CONFIGS / "cpt_tiny.yaml"))}, PLOTS, warn=print)
    assert not (tmp_path / "wandb").exists() and not (tmp_path / ID_FILE).exists()


@pytest.mark.parametrize("override, message", [
    ("run.loggers=[jsonl,wandbb]", "bad value for 'run.loggers': unknown logger(s) ['wandbb']; use names from "
                                   "['jsonl', 'tensorboard', 'wandb']"),
    ("run.loggers=wandb", "bad value for 'run.loggers'"),
    ("run.wandb.project=team/proj", "bad value for 'run.wandb.project'"),
    ("run.wandb.projekt=x", "unknown config key 'run.wandb.projekt'. Did you mean 'run.wandb.project'?"),
])
def test_bad_logger_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_stage_config("cpt", str(CONFIGS / "cpt_tiny.yaml"), [override])
    assert message in str(err.value)


def test_jsonl_is_always_on():
    cfg = load_stage_config("cpt", str(CONFIGS / "cpt_tiny.yaml"), ["run.loggers=[wandb]"])
    assert cfg.run.loggers == ["jsonl", "wandb"]
    assert load_stage_config("cpt", str(CONFIGS / "cpt_tiny.yaml")).run.loggers == ["jsonl", "tensorboard"]
