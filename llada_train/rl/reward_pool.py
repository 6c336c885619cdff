"""The default reward executor: persistent worker processes that each run one reward call at a
time; a call that overruns its timeout has its worker's whole process group killed."""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from llada_train.rl import sandbox

from .reward_calls import RewardError, RewardSpec, Scores, call_reward, resolve_reward

_HEADER = struct.Struct(">Q")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding llada_train (checkout or site-packages)


def _send(fd: int, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _recv(fd: int, deadline: float | None):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class _Worker:
    """One reward worker process in its own session, speaking length-prefixed pickles on stdin/stdout."""

    def __init__(self, start_timeout_s: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from llada_train.rl.reward_pool import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)
        self.loaded: set[str] = set()  # specs already imported in this worker
        try:
            hello = self.recv(start_timeout_s)
        except (TimeoutError, EOFError, pickle.UnpicklingError) as e:
            hello = type(e).__name__
        if hello != ("ready", self.proc.pid):
            self.kill()
            raise RewardError(f"reward worker failed to start ({hello!r}, exit code {self.proc.returncode})")

    def send(self, obj) -> None:
        _send(self.proc.stdin.fileno(), obj)

    def recv(self, timeout_s: float | None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return _recv(self.proc.stdout.fileno(), deadline)

    def kill(self) -> None:
        """SIGTERM (the worker kills its sandboxes), then SIGKILL the whole group, then reap."""
        if self.proc.returncode is None:
            sandbox.terminate_group(self.proc.pid, grace_s=1.0)
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _worker_main() -> None:
    proto_out = os.dup(1)
    os.dup2(2, 1)  # prints from reward functions go to stderr, not into the protocol stream
    proto_in = sys.stdin.fileno()
    parent = os.getppid()

    def on_term(signum, frame):
        sandbox.kill_all()
        os._exit(128 + signum)

    def watch_parent():  # a hung call must not outlive a dead trainer
        while os.getppid() == parent:
            time.sleep(1.0)
        on_term(signal.SIGTERM, None)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch_parent, daemon=True).start()
    _send(proto_out, ("ready", os.getpid()))
    while True:
        try:
            kind, fn, args = _recv(proto_in, None)
        except EOFError:
            return
        try:
            if kind == "load":  # import outside the call's timeout; args = the parent's sys.path
                sys.path[:0] = [p for p in args if p not in sys.path]
                resolve_reward(fn)
                reply = ("ok", None)
            else:
                reply = ("ok", call_reward(fn, *args))
        except BaseException as e:
            reply = ("error", describe_exception(e))
        _send(proto_out, reply)


def describe_exception(e: BaseException) -> str:
    """`Type: message (at file:line)` of the innermost frame, short enough for a log line."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{type(e).__name__}: {e}"[:2000] + where


class LocalRewardPool:
    """Reward executor for local mode: persistent worker processes, one busy call per worker.

    A call that overruns `spec.timeout_s` gets its worker's whole process group killed (sandboxes
    included) and raises TimeoutError; a fresh worker is started for the next call. Importing the
    reward's module happens before the call, under `start_timeout_s`, not the call's timeout.
    """

    def __init__(self, start_timeout_s: float = 120.0):
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_workers, self._all)

    def __call__(self, spec: RewardSpec, prompts: list[str], completions: list[str], kwargs: dict) -> Scores:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self.start_timeout_s)
            with self._lock:
                self._all.add(worker)
        healthy, limit = False, f"its start timeout of {self.start_timeout_s}s while importing"
        try:
            if spec.fn not in worker.loaded:
                worker.send(("load", spec.fn, list(sys.path)))
                status, payload = worker.recv(self.start_timeout_s)
                if status == "error":
                    healthy = True
                    raise RewardError(payload)
                worker.loaded.add(spec.fn)
            limit = f"its timeout of {spec.timeout_s}s"
            worker.send(("call", spec.fn, (prompts, completions, kwargs)))
            status, payload = worker.recv(spec.timeout_s)
            healthy = True
        except TimeoutError:
            raise TimeoutError(f"reward {spec.name!r} exceeded {limit}") from None
        except (EOFError, OSError) as e:
            raise RewardError(f"reward worker died during {spec.name!r} ({type(e).__name__})") from None
        finally:
            with self._lock:
                if healthy:
                    self._idle.append(worker)
                else:
                    self._all.discard(worker)
            if not healthy:
                worker.kill()
        if status == "error":
            raise RewardError(payload)
        return payload

    def close(self) -> None:
        self._finalizer()


def _kill_workers(workers: set[_Worker]) -> None:
    for w in list(workers):
        w.kill()
    workers.clear()
