"""benchmarks/gpu_check.sh in dry mode: every step of the GPU check runs at tiny sizes on CPU."""

import json
import os
import subprocess

from tests.conftest import REPO

STEPS = ["gpu_tests", "train", "bench_attention", "decode", "fp4", "ufp4_linear"]


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    failed = {s["name"]: s["log_tail"][-1500:] for s in report["steps"] if s["rc"] != 0}
    assert not failed, failed
    for step in report["steps"]:
        if step["result"]:
            rows = step["results"]["rows"]
            assert rows and all(len(row) > 2 for row in rows), step["name"]
    # the CUDA tests were collected and skipped, not silently missing
    assert "skipped" in report["steps"][0]["log_tail"]
