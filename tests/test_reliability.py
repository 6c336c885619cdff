"""Fault injection (issue 10): each test causes a real fault and checks the run survives it as documented
in docs/reliability.md. Training faults go through the CLI in subprocesses (`python -m llada_train.cli cpt`)
on the tiny config; their losses and weights are compared with one uninterrupted reference run."""

import json
import math
import os
import pickle
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llada_train import checkpoint as ckpt_lib
from llada_train.config import ConfigError, ModelConfig
from llada_train.data.text import MAX_LINE_CHARS, BatchIterator, build_corpus
from llada_train.data.tokenizer import load_tokenizer
from llada_train.rl.reward_calls import RewardSpec
from llada_train.rl.reward_pool import LocalRewardPool
from llada_train.rl.reward_scoring import RewardComputer
from llada_train.stages.common import build_model
from llada_train.stages.registry import load_stage_config
from tests.conftest import REPO
from tests.test_cpt import free_port, losses, tiny_args

STEPS = 10
# t2t/mtf off: their random replacement tokens would break the NaN test's control over which tokens a step sees.
COMMON = [f"train.steps={STEPS}", "train.save_every=2", "train.keep_last=10", "train.eval_every=1000",
          "train.export_hf=false", "diffusion.t2t.max_ratio=0", "diffusion.mtf.prob=0"]
ENGINE_FILE = Path("engine") / "mp_rank_00_model_states.pt"


def start(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "llada_train.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, rc: int = 0) -> str:
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == rc, text[-3000:]
    return text


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def steps_saved(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt / ENGINE_FILE, map_location="cpu", weights_only=True)["module"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} hold different weights"


def wait_until(cond, proc, timeout_s=400.0, poll_s=0.005):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting to inject the fault"
        time.sleep(poll_s)


class Reference:
    """The uninterrupted run every faulty run is compared with (started once, in the background)."""

    def __init__(self, root: Path):
        self.root, self.cache, self.run = root, root / "cache", root / "reference"
        self.log = root / "reference.log"
        self.proc = start(tiny_args(self.run, self.cache, *COMMON), self.log)
        self._done = False

    def done(self) -> Path:
        if not self._done:
            finish(self.proc, self.log)
            assert steps_saved(self.run) == list(range(2, STEPS + 1, 2))
            self._done = True
        return self.run

    def ckpt(self, step: int) -> Path:
        return self.done() / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    r = Reference(tmp_path_factory.mktemp("reliability"))
    yield r
    if r.proc.poll() is None:
        r.proc.kill()
        r.proc.wait()


# ----------------------------------------------------------------------------- non-finite steps


def test_nonfinite_steps_are_skipped_counted_and_stop_keeps_pre_streak_checkpoint(tmp_path, ref):
    """Embedding rows set to +inf for every token the first 4 batches never contain: steps 1-4 are finite
    and identical to the reference; steps 5-7 see such a token, their loss is NaN, they are skipped and
    counted; the run stops at train.max_bad_steps=3 and its newest checkpoint is step 4."""
    first_bad, max_bad = 5, 3
    tok = load_tokenizer(None)
    cfg = load_stage_config("cpt", "configs/cpt_tiny.yaml", [a for a in tiny_args("x", ref.cache, *COMMON)[3:]])
    d = cfg.data
    corpus = build_corpus(d.paths, tok, seq_len=d.seq_len, eval_fraction=d.eval_fraction, seed=cfg.run.seed,
                          max_docs=d.max_docs, cache_dir=d.cache_dir, text_field=d.text_field)
    order = BatchIterator(len(corpus.train_ids), cfg.train.batch_size, seed=cfg.run.seed)
    batches = [set(corpus.train_ids[next(order)].flatten().tolist()) for _ in range(first_bad + max_bad - 1)]
    model = build_model(ModelConfig(preset="tiny"), tok, cfg.run.seed)  # the reference's initial weights
    clean = set().union(*batches[:first_bad - 1]) | {model.config.mask_token_id}
    poison = sorted(set(range(model.config.vocab_size)) - clean)
    assert all(b - clean for b in batches[first_bad - 1:]), "each later batch must hold a poisoned token"
    with torch.no_grad():
        model.model.word_embeddings.weight[poison] = float("inf")
    init = tmp_path / "poisoned_hf"
    ckpt_lib.export_hf(model, model.state_dict(), None, init)

    run = tmp_path / "run"
    out = finish(start(tiny_args(run, ref.cache, *COMMON, f"model.init_from={init}", "train.save_every=1",
                                 f"train.max_bad_steps={max_bad}"), tmp_path / "log"), tmp_path / "log", rc=3)
    recs = records(run)
    ref_losses = losses(ref.done())
    by_step = {r["step"]: r for r in recs if "loss" in r}
    last_bad = first_bad + max_bad - 1
    assert sorted(by_step) == list(range(1, last_bad + 1))
    for step in range(1, first_bad):
        assert by_step[step]["loss"] == ref_losses[step] and by_step[step]["bad_step"] == 0.0
    for i, step in enumerate(range(first_bad, last_bad + 1)):
        assert math.isnan(by_step[step]["loss"])
        assert (by_step[step]["bad_step"], by_step[step]["bad_steps_total"]) == (1.0, i + 1)
    assert recs[-1] == {"step": last_bad, "stopped": "max_bad_steps"}
    assert f"stopping: {max_bad} consecutive non-finite steps" in out and f"steps {first_bad}..{last_bad}" in out
    assert f"not saving step {first_bad}" in out
    assert steps_saved(run) == list(range(1, first_bad))  # nothing saved inside the streak
    newest = ckpt_lib.find_resume_checkpoint(run, print)
    assert newest.name == f"step_{first_bad - 1:06d}"
    got, want = weights(newest), weights(ref.ckpt(first_bad - 1))
    emb = "model.word_embeddings.weight"
    keep = torch.ones(len(want[emb]), dtype=torch.bool)
    keep[poison] = False
    assert torch.isinf(got[emb][poison]).all() and torch.equal(got[emb][keep], want[emb][keep])
    assert all(torch.equal(got[k], want[k]) for k in want if k != emb)


# ----------------------------------------------------------------------------- kill -9 and corrupt shards


def test_kill9_during_save_and_training_then_corrupt_shards_resume_exactly(tmp_path, ref):
    """SIGKILL mid-checkpoint-write, bit-flip the newest shard, resume, SIGKILL mid-training, truncate the
    newest shard, resume to the end: each resume takes the newest intact checkpoint (weights identical to
    the reference's at that step) and the final loss curve equals the uninterrupted one bit for bit.
    Two seeds (kill points) run side by side, as separate runs."""
    seeds = [0, 1]
    with ThreadPoolExecutor(len(seeds)) as pool:
        list(pool.map(lambda seed: _kill_chain(tmp_path / f"seed{seed}", ref, seed), seeds))  # re-raises


def _kill_chain(tmp_path: Path, ref: Reference, seed: int):
    tmp_path.mkdir()
    rng = random.Random(seed)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = tiny_args(run, ref.cache, *COMMON)

    # 1. SIGKILL the moment a checkpoint directory is being written (step >= 6, so two saves precede it).
    proc = start(args, tmp_path / "a.log")
    first = rng.choice([6, 8])
    partial = []

    def writing():
        partial.extend(p for p in ckpts.glob(".tmp_step_*") if int(p.name[-6:]) >= first)
        return bool(partial)

    wait_until(writing, proc)
    proc.kill()
    proc.wait()
    hit = int(partial[0].name[-6:])
    assert partial[0].is_dir() and not (ckpts / f"step_{hit:06d}").exists()  # killed before the rename
    assert steps_saved(run) == list(range(2, hit, 2))
    assert ckpt_lib.find_resume_checkpoint(run, print) == ckpts / f"step_{hit - 2:06d}"

    # Bit-flip the newest complete checkpoint's engine shard: detected, named, and skipped.
    flipped = ckpts / f"step_{hit - 2:06d}" / ENGINE_FILE
    with open(flipped, "r+b") as f:
        f.seek(rng.randrange(flipped.stat().st_size))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    problem = ckpt_lib.verify_checkpoint(flipped.parents[1])
    assert str(flipped) in problem and "checksum mismatch" in problem
    expect = ckpts / f"step_{hit - 4:06d}"
    assert ckpt_lib.find_resume_checkpoint(run, print) == expect
    assert_same_weights(expect, ref.ckpt(hit - 4))
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: checksum mismatch"):
        ckpt_lib.load_checkpoint(None, flipped.parents[1])  # an explicit --resume PATH is refused, not loaded

    # 2. Resume; SIGKILL at a random moment a few steps in.
    before = len(records(run))
    proc = start(args, tmp_path / "b.log")
    wait_until(lambda: len(records(run)) >= before + rng.randint(1, 3), proc, poll_s=0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.wait()
    out = (tmp_path / "b.log").read_text()
    assert f"skipping checkpoint: {flipped}: checksum mismatch" in out
    assert f"resumed from {expect} at step {hit - 4}" in out
    assert not (run / "hf").exists()
    for step in steps_saved(run):  # every step_N is complete: only our own bit flip may be found
        problem = ckpt_lib.verify_checkpoint(ckpts / f"step_{step:06d}")
        assert problem is None or (step == hit - 2 and "checksum mismatch" in problem), problem

    # Truncate the newest complete checkpoint's shard: the next resume falls back past it.
    newest = ckpts / f"step_{steps_saved(run)[-1]:06d}"
    truncated = newest / ENGINE_FILE
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    assert "truncated" in ckpt_lib.verify_checkpoint(newest) and str(truncated) in ckpt_lib.verify_checkpoint(newest)
    resume_from = ckpt_lib.find_resume_checkpoint(run, print)
    assert resume_from is not None and resume_from != newest
    assert_same_weights(resume_from, ref.ckpt(int(resume_from.name[5:])))

    # 3. Resume to the end.
    out = finish(start(args, tmp_path / "c.log"), tmp_path / "c.log")
    assert f"skipping checkpoint: {truncated}: size" in out
    assert f"resumed from {resume_from}" in out
    a, b = losses(ref.done()), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # bit-identical per-step losses
    assert not list(ckpts.glob(".tmp_step_*")) + list(ckpts.glob(".old_step_*"))  # crash leftovers removed
    assert_same_weights(ckpts / f"step_{STEPS:06d}", ref.ckpt(STEPS))


# ----------------------------------------------------------------------------- disk full


def _tmpfs(path: Path, size_mb: int):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)


def test_disk_full_while_saving_continue_and_stop(tmp_path, ref):
    """checkpoints/ on a real 40 MiB tmpfs: the first checkpoint (~29 MB) fits, every later one hits ENOSPC.
    Each failed save removes its partial directory and leaves step 2 intact; `continue` trains to the end
    with the reference's losses, `stop` exits (code 3) with a message naming the cause."""
    runs = {mode: tmp_path / mode for mode in ("continue", "stop")}
    mounted = []
    try:
        for run in runs.values():
            _tmpfs(run / "checkpoints", 40)
            mounted.append(run / "checkpoints")
        procs = {mode: start(tiny_args(run, ref.cache, *COMMON, "train.keep_last=1", f"train.on_save_error={mode}"),
                             tmp_path / f"{mode}.log") for mode, run in runs.items()}
        outs = {mode: finish(p, tmp_path / f"{mode}.log", rc=0 if mode == "continue" else 3)
                for mode, p in procs.items()}
        for mode, run in runs.items():
            ckpts = run / "checkpoints"
            assert steps_saved(run) == [2] and not list(ckpts.glob(".tmp_step_*")), list(ckpts.iterdir())
            assert ckpt_lib.verify_checkpoint(ckpts / "step_000002") is None
            assert_same_weights(ckpts / "step_000002", ref.ckpt(2))
            assert (ckpts / "latest").read_text() == "step_000002"
            free = re.search(r"failed \(rank 0: .*; ([0-9.]+) MiB free there\)", outs[mode])
            assert free and float(free.group(1)) < 1.0, outs[mode][-2000:]  # the message shows the disk is full
        failed = [r["step"] for r in records(runs["continue"]) if r.get("save_failed")]
        assert failed == [4, 6, 8, 10]
        assert "warning: saving checkpoint" in outs["continue"] and "training continues" in outs["continue"]
        assert losses(runs["continue"]) == losses(ref.done())
        recs = records(runs["stop"])
        assert recs[-1] == {"step": 4, "stopped": "save_error"} and max(losses(runs["stop"])) == 4
        assert f"stopping: saving checkpoint {runs['stop'] / 'checkpoints' / 'step_000004'} failed" in outs["stop"]
        assert "Free disk space and rerun with --resume auto" in outs["stop"]
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_on_one_rank_fails_the_save_on_all_ranks(tmp_path, ref):
    """2-process ZeRO-2 (each rank writes its own optimizer shard) on a 50 MiB tmpfs: the first checkpoint
    (~37 MB) fits, the second runs out of space on whichever rank(s); all ranks agree, none hangs in a
    collective, and with `continue` the run finishes."""
    run = tmp_path / "run"
    _tmpfs(run / "checkpoints", 50)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        args = tiny_args(run, ref.cache, "engine.zero_stage=2", "train.steps=4", "train.save_every=2",
                         "train.keep_last=1", "train.eval_every=1000", "train.export_hf=false",
                         "train.on_save_error=continue")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port()), "-m", "llada_train.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=400)  # a rank stuck in a collective would hang here
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
                proc.wait()
        assert proc.returncode == 0, out[-3000:]
        assert re.search(r"warning: saving checkpoint \S+step_000004 failed \(rank [01]: ", out), out[-3000:]
        assert steps_saved(run) == [2] and not list((run / "checkpoints").glob(".tmp_step_*"))
        assert ckpt_lib.verify_checkpoint(run / "checkpoints" / "step_000002") is None
        assert max(losses(run)) == 4
    finally:
        subprocess.run(["umount", "-l", str(run / "checkpoints")], check=False)


def test_on_save_error_is_validated():
    with pytest.raises(ConfigError, match=r"train.on_save_error"):
        load_stage_config("cpt", None, ["train.on_save_error=ignore"])
    with pytest.raises(ConfigError, match=r"train.max_bad_steps"):
        load_stage_config("cpt", None, ["train.max_bad_steps=0"])


# ----------------------------------------------------------------------------- hostile corpus


def test_hostile_corpus_is_consumed_with_counts(tmp_path):
    """Random binary, undecodable bytes, a 3 MB line, empty files, broken JSON/JSONL/Parquet, deeply nested
    JSON: build_corpus (what `cpt` calls) keeps exactly the good documents and counts the rest."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    root.mkdir()
    good = [f"def good_{i}(x):\n    return x + {i}\n" for i in range(6)]
    (root / "a_good.py").write_text(good[0])
    (root / "binary.txt").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes() + b"\x00")
    (root / "undecodable.md").write_bytes(b"ok " + bytes([0xC3, 0x28, 0xFF, 0xFE]) * 1000)
    (root / "huge_line.txt").write_text("short\n" + "z" * 3_000_000)
    for name in ("empty.txt", "empty.jsonl", "empty.json", "empty.parquet"):
        (root / name).write_bytes(b"")
    (root / "garbage.parquet").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "garbage.json").write_bytes(b"\xff\xfe{{{not json")
    pq.write_table(pa.table({"text": [good[1], None]}), root / "ok.parquet")
    lines = [json.dumps({"text": good[2]}).encode(),
             b"{\"text\": \"cut in the mid",
             rng.integers(1, 256, 300, dtype=np.uint8).tobytes().replace(b"\n", b" "),
             b"[" * 100_000 + b"]" * 100_000,  # nesting past the JSON parser's recursion limit
             json.dumps({"text": "q" * (MAX_LINE_CHARS * 3)}).encode(),
             json.dumps({"text": good[3]}).encode(),
             json.dumps({"text": good[4] + "\ud800"}).encode(),  # lone surrogate
             json.dumps({"text": good[5]}).encode(),
             b"{\"text\": \"no newline at the end"]
    (root / "rows.jsonl").write_bytes(b"\n".join(lines))
    tok = load_tokenizer(None)
    corpus = build_corpus([str(root)], tok, seq_len=32, eval_fraction=0.0)
    s = corpus.stats
    assert {k: v for k, v in s.items() if k in ("files", "docs") or k.startswith("skipped_")} == {
        "files": 12, "docs": 5,  # good[0..3] and good[5]
        "skipped_binary": 1,       # binary.txt
        "skipped_undecodable": 4,  # undecodable.md, garbage.json, the random-bytes row, the lone surrogate
        "skipped_long_line": 2,    # huge_line.txt, the long jsonl row
        "skipped_empty": 1,        # empty.txt (empty .json/.jsonl files hold no rows)
        "skipped_bad_json": 3,     # cut row, deep nesting, unterminated last line
        "skipped_bad_parquet": 2,  # empty.parquet, garbage.parquet
        "skipped_not_text": 1,     # the null row of ok.parquet
    }
    want = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in (good[:4] + good[5:]))
    assert s["train_tokens"] == want


# ----------------------------------------------------------------------------- hostile reward code


def test_hostile_completions_through_the_reward_pool_score_zero(tmp_path, monkeypatch):
    """What an RL run's code_exec reward sees: each test passes only if the attack worked."""
    secret = secrets.token_hex(8)
    monkeypatch.setenv("LLADA_TEST_SECRET", secret)  # inherited by the reward worker, not by the sandbox
    target = tmp_path / "escaped.txt"
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    cases = {
        "fork_bomb": "import os\ndef f():\n    while True:\n        os.fork()\n",
        "memory": "def f():\n    return len(bytearray(512 * 1024**2))\n",  # fine without the 256 MB cap
        "write_outside": f"def f():\n    return open({str(target)!r}, 'w').write('x')\n",
        "env_secret": "import os\ndef f():\n    return os.environ.get('LLADA_TEST_SECRET')\n",
        "parent_environ": "import os\ndef f():\n    return open(f'/proc/{os.getppid()}/environ').read()\n",
        "network": f"import socket\ndef f():\n    return socket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "never_returns": "def f():\n    while True:\n        pass\n",
        "control_own_dir": "def f():\n    return open('scratch.txt', 'w').write('x')\n",  # allowed: must pass
    }
    tests = {
        "fork_bomb": "def check(f):\n    assert f()\n",
        "memory": "def check(f):\n    assert f() > 0\n",
        "write_outside": "def check(f):\n    assert f() == 1\n",
        "env_secret": f"def check(f):\n    assert f() == {secret!r}\n",
        "parent_environ": f"def check(f):\n    assert {secret!r} in f()\n",
        "network": "def check(f):\n    assert f()\n",
        "never_returns": "def check(f):\n    f()\n",
        "control_own_dir": "def check(f):\n    assert f() == 1\n",
    }
    names = list(cases)
    pool = LocalRewardPool()
    try:
        rc = RewardComputer([RewardSpec("llada_train.rl.rewards:code_exec", timeout_s=60,
                                        kwargs={"sandbox_timeout_s": 2.0, "memory_mb": 256, "workers": 2})],
                            executor=pool)
        t0 = time.monotonic()
        out = rc.score(["q"] * len(names), [cases[n] for n in names],
                       {"tests": [tests[n] for n in names], "entry_point": ["f"] * len(names)})
        assert time.monotonic() - t0 < 45
        with pytest.raises(TimeoutError):
            server.accept()  # no connection got through
    finally:
        server.close()
        pool.close()
    assert dict(zip(names, out.scores["code_exec"], strict=True)) == {n: float(n.startswith("control")) for n in names}
    assert not out.errors  # contained inside the sandbox: the reward call itself succeeded
    assert not target.exists()


# ----------------------------------------------------------------------------- loading


class _Payload:
    """Unpickling this runs `open(path, 'w')`: proof a loader executed pickle code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoints_are_refused_and_loads_are_weights_only(tmp_path, tiny_model):
    hf = tmp_path / "hf"
    tiny_model.config.save_pretrained(hf)
    marker = tmp_path / "pwned"
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": torch.zeros(1), "payload": _Payload(str(marker))}, f, protocol=2)
    tok = load_tokenizer(None)
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*arbitrary code.*safetensors"):
        build_model(ModelConfig(init_from=str(hf)), tok, 0)  # the path `model.init_from` takes
    assert not marker.exists()
    # A checkpoint directory whose rng file was swapped for a pickle bomb (manifest rewritten to match):
    # the loader's torch.load is weights_only, so the bomb is refused instead of run.
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    with open(ckpt / "rng_states.pt", "wb") as f:
        pickle.dump([_Payload(str(marker))], f, protocol=2)
    ckpt_lib.write_manifest(ckpt)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(ckpt / "rng_states.pt", weights_only=True)
    assert not marker.exists()
    # No loader in the package opts out of weights_only or into remote code.
    for path in (REPO / "llada_train").rglob("*.py"):
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{i}: torch.load without weights_only=True"


def test_rng_state_roundtrips_through_a_weights_only_file(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in the numpy state
    torch.save([ckpt_lib.rng_state()], tmp_path / "rng.pt")
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    ckpt_lib.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want
