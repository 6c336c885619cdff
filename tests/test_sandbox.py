"""Sandbox containment: each hostile program fails as a contained error and leaves nothing behind."""

import os
import secrets
import socket
import tempfile
import time
from pathlib import Path

import pytest

from llada_train.rl.sandbox import run_python


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_soon(pids, wait_s=3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(_alive(p) for p in pids)


def test_normal_run_stdout_stdin_exit_code():
    r = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('err', file=sys.stderr)\n", stdin="hello")
    assert (r.ok, r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (True, 0, "HELLO\n", "err\n",
                                                                                        False, None)
    r = run_python("import sys; sys.exit(3)")
    assert (r.ok, r.returncode, r.killed_reason) == (False, 3, None)
    r = run_python(
        "open('scratch.txt', 'w').write('x'); import os; print(os.listdir('.'), os.getcwd() == os.environ['HOME'])"
    )
    assert r.ok and "'scratch.txt'" in r.stdout and "True" in r.stdout  # its own temp dir is writable


def test_infinite_loop_and_its_children_are_killed():
    code = ("import os, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    time.sleep(600)\n"
            "print(os.getcwd(), os.getpid(), pid, flush=True)\n"
            "while True:\n    pass\n")
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1.0)
    assert time.monotonic() - t0 < 5
    assert (r.ok, r.timed_out, r.returncode, r.killed_reason) == (False, True, None, "timeout")
    cwd, *pids = r.stdout.split()
    assert len(pids) == 2 and _gone_soon([int(p) for p in pids])
    assert cwd.startswith(tempfile.gettempdir()) and not os.path.exists(cwd)  # temp dir removed


def test_huge_allocation_is_refused():
    r = run_python("x = bytearray(4 * 1024**3)", memory_mb=256)
    assert (r.ok, r.killed_reason) == (False, "memory_limit") and "MemoryError" in r.stderr
    r = run_python("x = bytearray(64 * 1024**2); print(len(x))", memory_mb=256)
    assert r.ok and r.stdout == f"{64 * 1024**2}\n"  # the limit is not below what it allows


def test_fork_bomb_is_contained():
    code = ("import os, sys\n"
            "while True:\n"
            "    try:\n        os.fork()\n        print(os.getpid(), flush=True)\n"
            "    except Exception:\n        pass\n")
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1.5, max_processes=16)
    assert time.monotonic() - t0 < 6
    assert not r.ok and r.timed_out
    pids = {int(p) for p in r.stdout.split()}
    assert 1 < len(pids) <= 2 * 16, len(pids)  # forks racing past the group-size check overshoot < 2x
    assert _gone_soon(pids)


def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os; os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os; os.symlink({str(tmp_path)!r}, 'link'); open('link/escaped.txt', 'w')",
        f"import os; os.remove({str(victim)!r})",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; fd = os.open({str(tmp_path)!r}, os.O_RDONLY); "
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        f"import os; os.chdir({str(tmp_path)!r})",
    ):
        r = run_python(code)
        assert (r.ok, r.killed_reason) == (False, "policy"), (code, r)
        assert "[sandbox refused]" in r.stderr
    assert not target.exists() and victim.read_text() == "keep"


def test_environment_secrets_are_not_inherited(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("SECRET_TOKEN", token)
    r = run_python("import os; print(os.environ.get('SECRET_TOKEN')); print(sorted(os.environ))")
    assert r.ok and token not in r.stdout and r.stdout.startswith("None\n")
    assert r.stdout.splitlines()[1] == str(sorted(["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]))
    r = run_python("import os; print(open(f'/proc/{os.getppid()}/environ').read())")
    assert token not in r.stdout and r.killed_reason == "policy"


def test_network_is_refused():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for code in (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     "import socket; s = socket.socket(socket.AF_INET6)",
                     "import socket; socket.getaddrinfo('example.com', 80)",
                     f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
            r = run_python(code)
            assert (r.ok, r.killed_reason) == (False, "policy"), (code, r)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing got through
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # while the port is reachable
        server.accept()[0].close()
    finally:
        server.close()


def test_subprocess_signals_and_session_escape_are_refused():
    for code in ("import subprocess; subprocess.run(['true'])",
                 "import os; os.system('true')",
                 "import os; os.kill(os.getppid(), 9)",
                 "import os; os.setsid()",
                 "import ctypes; ctypes.CDLL(None)"):
        r = run_python(code)
        assert (r.ok, r.killed_reason) == (False, "policy"), (code, r)
    assert os.getpid() > 0  # we are still here


def test_output_is_capped():
    r = run_python("import sys\nfor _ in range(1000): sys.stdout.write('x' * 1000)", max_output_bytes=1000)
    assert r.ok and r.stdout.startswith("x" * 1000) and r.stdout.endswith("[... truncated, 999000 more bytes]")
    r = run_python("while True: print('x' * 10000)", file_size_mb=1)
    assert (r.ok, r.killed_reason) == (False, "file_size_limit")


def test_bad_limits_are_user_errors():
    with pytest.raises(ValueError, match="must be > 0"):
        run_python("pass", timeout_s=0)
