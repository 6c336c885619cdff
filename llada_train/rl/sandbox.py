"""Best-effort sandbox for running model-written Python (the `code_exec` reward).

Each run is a fresh `python -I -S` subprocess with:
- a new temp dir as cwd, HOME and TMPDIR, deleted afterwards;
- a scrubbed environment (PATH, LANG, LC_ALL, HOME, TMPDIR only: no inherited secrets);
- resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps,
  plus a SIGALRM backstop so an orphaned child still dies if its parent is killed;
- its own session / process group, SIGKILLed as a whole on timeout (and any stray process whose
  cwd is still inside the temp dir is killed too);
- a prelude that installs a `sys.addaudithook` policy before the user code runs: no sockets other
  than AF_UNIX, no connect/bind/DNS, no writes/renames/deletes outside the temp dir, no reading
  other processes' /proc entries, no exec/subprocess/ctypes, no signals outside its own group, no
  leaving the temp dir or the process group, and a cap on processes in the group (RLIMIT_NPROC is
  per user and ignored for root, so the group cap is what stops a fork bomb when running as root).

It is NOT a security boundary against a determined attacker: audit hooks are in-process and can
be bypassed (e.g. re-initialising a C module), reads anywhere the user can read are allowed, and
disk use is bounded per file, not in total. Use containers/VMs (gVisor, firejail, nsjail) for
untrusted code at scale; this keeps honest-but-buggy model output (infinite loops, huge
allocations, fork bombs, stray writes, accidental network access) from hurting the training run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

_MARK = "[sandbox refused]"

# Runs inside the child before the user code: limits, then the audit policy, then exec the code.
# Kept dependency-free (stdlib only, runs with -S) and small; every refusal raises PermissionError
# with _MARK so the parent can tell a policy hit from an ordinary failure.
_PRELUDE = r"""
import os, sys, resource, _signal  # _signal, not signal: avoids importing enum (startup time)
_cfg = eval(sys.argv[1], {"__builtins__": {}})  # a dict literal written by the parent
_root = os.path.realpath(_cfg["root"])
for _name, _val in _cfg["limits"].items():
    _res = getattr(resource, _name)
    _soft, _hard = _val
    _cur_hard = resource.getrlimit(_res)[1]
    if _cur_hard != resource.RLIM_INFINITY:
        _hard = min(_hard, _cur_hard)
        _soft = min(_soft, _hard)
    resource.setrlimit(_res, (_soft, _hard))
_signal.alarm(_cfg["alarm_s"])
_pgid = os.getpgid(0)
_max_procs = _cfg["max_processes"]
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_MARK = _cfg["mark"]

def _refuse(what):
    raise PermissionError(_MARK + " " + what)

def _abs(path, dir_fd=None):  # real absolute path (relative to dir_fd if given); None for an fd
    if isinstance(path, int):
        return None
    p = os.fsdecode(path)
    if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(p):
        p = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), p)
    return os.path.realpath(p)

def _inside(path, dir_fd=None):
    p = _abs(path, dir_fd)
    return p is None or p == _root or p.startswith(_root + os.sep)

def _other_proc(path):
    parts = (_abs(path) or "").split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()

def _group_size():
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/" + d + "/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[2]) == _pgid:
                        n += 1
            except (OSError, IndexError, ValueError):
                pass
    return n

# event -> ((path arg, its dir_fd arg or None), ...), per the CPython audit events table
_PATH_EVENTS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
                "os.chown": ((0, 3),), "os.truncate": ((0, None),), "os.utime": ((0, 3),),
                "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.rename": ((0, 2), (1, 3)),
                "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chdir": ((0, None),)}
_DENY = ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.forkpty",
         "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata",
         "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
         "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex",
         "resource.setrlimit", "resource.prlimit", "sys.addaudithook")
_busy = []

def _hook(event, args):
    if _busy:
        return
    _busy.append(1)
    try:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _W)
            if writing and not _inside(path):
                _refuse("write outside the sandbox dir: %r" % (path,))
            if _other_proc(path):
                _refuse("reading another process's /proc entry: %r" % (path,))
        elif event in _PATH_EVENTS:
            for i, fd in _PATH_EVENTS[event]:
                if not _inside(args[i], None if fd is None else args[fd]):
                    _refuse("%s outside the sandbox dir: %r" % (event, args[i]))
        elif event == "socket.__new__":
            import socket
            if args[1] != socket.AF_UNIX:
                _refuse("network socket")
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            if event == "os.kill" and target > 0:
                try:
                    target = os.getpgid(target)
                except OSError:
                    return
            if abs(target) not in (0, _pgid):
                _refuse("signal outside the sandbox process group")
        elif event == "os.fork":
            if _group_size() >= _max_procs:
                _refuse("more than %d processes" % _max_procs)
        elif event in _DENY:
            _refuse(event)
    finally:
        _busy.pop()

def _no_escape(*a, **k):
    _refuse("leaving the sandbox process group")

_os_open = os.open

def _open(path, flags, mode=0o777, *, dir_fd=None):  # the "open" audit event does not carry dir_fd
    if flags & _W and not _inside(path, dir_fd):
        _refuse("write outside the sandbox dir: %r" % (path,))
    return _os_open(path, flags, mode, dir_fd=dir_fd)

for _m in (os, sys.modules["posix"]):
    _m.setsid = _m.setpgid = _m.setpgrp = _no_escape
    _m.open = _open
sys.addaudithook(_hook)
sys.argv = ["solution.py"]
_code = compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec")
del _cfg, _name, _val, _res, _soft, _hard, _cur_hard, _m
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

# Live sandbox children -> their temp dirs, so a reward worker being torn down can clean up (kill_all).
_LIVE: dict[subprocess.Popen, str] = {}
_LIVE_LOCK = threading.Lock()


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0 within the time limit
    returncode: int | None  # None if killed on timeout; negative = killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # timeout | cpu_limit | memory_limit | file_size_limit | policy | signal:NAME


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 64,
    file_size_mb: int = 16,
    max_output_bytes: int = 64 * 1024,
    max_open_files: int = 256,
    site_packages: bool = False,
    stdin: str = "",
) -> SandboxResult:
    """Run `code` as a script in a fresh sandboxed interpreter; never raises for anything the code does.

    `site_packages=True` drops `-S` so third-party packages of this environment are importable
    (slower start). stdout/stderr are each truncated to `max_output_bytes`.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0:
        raise ValueError(f"run_python: timeout_s, memory_mb and max_processes must be > 0, got "
                         f"{timeout_s}, {memory_mb}, {max_processes}")
    root = os.path.realpath(tempfile.mkdtemp(prefix="llada-sandbox-"))
    try:
        with open(os.path.join(root, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(root, "stdin.txt"), "w", encoding="utf-8") as f:
            f.write(stdin)
        # The CPU limit is a backstop a second behind the wall-clock timeout: a busy loop must end as
        # 'timeout' even when a loaded machine starts the parent's clock late.
        cpu_s = math.ceil(timeout_s) + 1
        fsize = file_size_mb * 2**20
        # RLIMIT_NPROC counts every task of the user, so allow what exists now plus max_processes.
        nproc = _user_task_count() + max_processes
        cfg = {
            "root": root,
            "alarm_s": cpu_s + 2,
            "max_processes": max_processes,
            "mark": _MARK,
            "limits": {
                "RLIMIT_AS": (memory_mb * 2**20, memory_mb * 2**20),
                "RLIMIT_CPU": (cpu_s, cpu_s + 1),
                "RLIMIT_NPROC": (nproc, nproc),
                "RLIMIT_FSIZE": (fsize, fsize),
                "RLIMIT_NOFILE": (max_open_files, max_open_files),
                "RLIMIT_CORE": (0, 0),
            },
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": root, "TMPDIR": root}
        argv = [sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"]) + ["-c", _PRELUDE, repr(cfg)]
        with open(os.path.join(root, "stdin.txt"), "rb") as fin, \
                open(os.path.join(root, ".stdout"), "wb") as fout, \
                open(os.path.join(root, ".stderr"), "wb") as ferr:
            # Output goes to files (bounded by RLIMIT_FSIZE), so a chatty child can't fill our memory.
            proc = subprocess.Popen(argv, cwd=root, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                    start_new_session=True, close_fds=True)
        with _LIVE_LOCK:
            _LIVE[proc] = root
        try:
            timed_out = not _wait_no_reap(proc.pid, timeout_s)
            _kill_group(proc.pid)  # also reaps stragglers of a finished run
            proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(proc, None)
        _kill_strays(root)
        stdout = _read_capped(os.path.join(root, ".stdout"), max_output_bytes)
        stderr = _read_capped(os.path.join(root, ".stderr"), max_output_bytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rc = None if timed_out else proc.returncode
    return SandboxResult(ok=rc == 0, returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
                         killed_reason=_reason(rc, timed_out, stderr))


def kill_all() -> None:
    """SIGKILL every live sandbox of this process and delete its temp dir (for a worker being torn down)."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for proc, root in live:
        _kill_group(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


def terminate_group(pid: int, grace_s: float = 0.0) -> None:
    """SIGTERM `pid`, give it `grace_s` to exit, then SIGKILL its whole process group.

    For children started with start_new_session (pgid == pid) that are not yet reaped; the caller
    reaps `pid` afterwards (Popen.wait()).
    """
    if grace_s > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _wait_no_reap(pid, grace_s)
    _kill_group(pid)


def _reason(rc: int | None, timed_out: bool, stderr: str) -> str | None:
    if timed_out or rc == -signal.SIGALRM:
        return "timeout"
    if rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        return "cpu_limit"  # the kernel sends SIGXCPU at the soft, SIGKILL at the hard CPU limit
    if rc == -signal.SIGXFSZ:
        return "file_size_limit"
    if rc is not None and rc < 0:
        return f"signal:{signal.Signals(-rc).name}"
    if rc and _MARK in stderr:
        return "policy"
    if rc and "MemoryError" in stderr:
        return "memory_limit"
    if rc and "File too large" in stderr:
        return "file_size_limit"  # Python ignores SIGXFSZ, so the write fails with EFBIG instead
    return None


def _wait_no_reap(pid: int, timeout_s: float) -> bool:
    """Wait for `pid` to exit WITHOUT reaping it, so its pid (= pgid) can't be reused before killpg."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_strays(root: str) -> None:
    """Kill processes that escaped the group but still sit in the sandbox dir (chdir out is refused)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cwd = os.readlink(f"/proc/{d}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + os.sep):
                with contextlib.suppress(OSError):
                    os.kill(int(d), signal.SIGKILL)


def _user_task_count() -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) owned by our real uid."""
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        i, j = status.find(b"\nUid:"), status.find(b"\nThreads:")
        if i >= 0 and j >= 0 and int(status[i + 5:i + 40].split()[0]) == uid:
            n += int(status[j + 9:j + 30].split()[0])
    return n


def _read_capped(path: str, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return ""
    text = data[:cap].decode("utf-8", errors="replace")
    return text + (f"\n[... truncated, {size - cap} more bytes]" if size > cap else "")
