"""The public Python contract of dsec: Sandbox, ExecResult, file API, pool, async, check()."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest

import dsec


@pytest.fixture(scope="module")
def sb():
    with dsec.Sandbox(timeout=20.0) as s:
        yield s


def test_exec_str_runs_through_sh(sb):
    r = sb.exec("echo hi; echo oops >&2; exit 3")
    assert isinstance(r, dsec.ExecResult)
    assert (r.exit_code, r.signal, r.stdout, r.stderr) == (3, None, b"hi\n", b"oops\n")
    assert not (r.timed_out or r.oom_killed or r.stdout_truncated or r.stderr_truncated)
    assert r.wall_time > 0 and r.cpu_time >= 0 and r.peak_memory > 0
    assert "exit_code=3" in repr(r)


def test_exec_argv_list_env_cwd_and_stdin(sb):
    r = sb.exec(["printenv", "FOO"], env={"FOO": "bar"})
    assert r.stdout == b"bar\n"
    sb.exec("mkdir -p /workspace/sub")
    assert sb.exec("pwd", cwd="sub").stdout == b"/workspace/sub\n"
    assert sb.exec("pwd", cwd="/tmp").stdout == b"/tmp\n"
    assert sb.exec(["cat"], stdin=b"abc\x00def").stdout == b"abc\x00def"
    assert sb.exec(["cat"], stdin="héllo").stdout == "héllo".encode()
    assert sb.exec(["cat"]).stdout == b""  # stdin is /dev/null by default


def test_failures_are_results(sb):
    r = sb.exec(["no-such-program"])
    assert r.exit_code == 127 and b"no-such-program" in r.stderr
    r = sb.exec("kill -TERM $$")
    assert (r.exit_code, r.signal) == (None, 15)


def test_coreutils_python_and_sh_work(sb):
    assert sb.exec("ls -l /bin >/dev/null && echo ok").stdout == b"ok\n"
    r = sb.exec(["python3", "-c", "import json; print(json.dumps({'a': 1}))"])
    assert r.stdout == b'{"a": 1}\n'


def test_timeout_is_a_result(sb):
    r = sb.exec("sleep 30", timeout=0.3)
    assert r.timed_out and r.exit_code is None and r.signal == 9
    assert r.wall_time < 5.0


def test_files_persist_across_calls_not_across_sandboxes(sb):
    sb.write_file("notes.txt", "hello")
    assert sb.exec("cat /workspace/notes.txt").stdout == b"hello"
    sb.exec("echo more >> notes.txt")
    assert sb.read_file("/workspace/notes.txt") == b"hellomore\n"
    with dsec.Sandbox() as other:
        assert other.exec("test -e /workspace/notes.txt").exit_code == 1


def test_file_api_reaches_files_the_sandbox_locked(sb):
    sb.exec("echo s > locked; chmod 000 locked; mkdir -p shut; chmod 000 shut")
    assert sb.read_file("locked") == b"s\n"
    sb.write_file("shut/inner", "in")
    assert sb.read_file("shut/inner") == b"in"


def test_run_python_is_warm_and_isolated_per_call(sb):
    r = sb.run_python("x = 41\nprint(x + 1)")
    assert r.exit_code == 0 and r.stdout == b"42\n"
    r = sb.run_python("print(x)")  # no state leaks between calls
    assert r.exit_code == 1 and b"NameError" in r.stderr
    assert sb.run_python("import sys; sys.exit(5)").exit_code == 5
    r = sb.run_python("while True: pass", timeout=0.3)
    assert r.timed_out
    assert sb.run_python(b"print('bytes ok')").stdout == b"bytes ok\n"


def test_output_is_bounded_head_and_tail():
    with dsec.Sandbox(max_output_bytes=100) as s:
        r = s.exec("seq 1 10000")
    assert r.stdout_truncated and len(r.stdout) == 100 and r.stdout_total == 48894
    assert r.stdout.startswith(b"1\n2\n3\n") and r.stdout.endswith(b"9999\n10000\n")


def test_close_and_closed_errors():
    s = dsec.Sandbox()
    pid = s.pid
    assert pid > 0 and not s.closed and "open" in repr(s)
    s.close()
    s.close()  # idempotent
    assert s.closed
    assert not os.path.exists(f"/proc/{pid}/status")
    for call in (
        lambda: s.exec("true"),
        lambda: s.run_python("pass"),
        lambda: s.read_file("x"),
        lambda: s.write_file("x", b""),
    ):
        with pytest.raises(dsec.SandboxClosedError):
            call()


def test_exception_tree():
    assert issubclass(dsec.PolicyError, dsec.SandboxError)
    assert issubclass(dsec.PolicyError, ValueError)
    for e in (dsec.SandboxSetupError, dsec.PathError, dsec.SandboxClosedError):
        assert issubclass(e, dsec.SandboxError)
    assert issubclass(dsec.SandboxError, Exception)


def test_async_variants(sb):
    async def main():
        a, b = await asyncio.gather(
            sb.exec_async("echo a"), sb.run_python_async("print('b')", timeout=10)
        )
        return a.stdout, b.stdout

    assert asyncio.run(main()) == (b"a\n", b"b\n")


def test_pool_resets_sandboxes_and_applies_back_pressure():
    with dsec.SandboxPool(2, timeout=10.0) as pool:
        a = pool.acquire()
        b = pool.acquire()
        a.write_file("secret", "x")
        with pytest.raises(TimeoutError):
            pool.acquire(timeout=0.2)
        got = []
        t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=20)))
        t.start()
        pool.release(a)
        t.join(20)
        assert got and a.closed
        c = got[0]
        assert c.exec("test -e /workspace/secret").exit_code == 1
        pool.release(b)
        pool.release(c)
        with pool.sandbox() as d:
            assert d.exec("echo ok").stdout == b"ok\n"


def test_check_reports_enforced_protections():
    info = dsec.check()
    for k in ("user_ns", "pid_ns", "mount_ns", "net_ns", "ipc_ns", "uts_ns", "cgroup_ns"):
        assert info[k] is True
    assert info["seccomp"] is True
    assert info["landlock_abi"] >= 1 and info["landlock_enforced"] is True
    assert info["cgroup"] in ("v1", "v2")
    assert info["enforced"] is True, info["problems"]
    assert info["posture"]["CapEff"] == "0000000000000000"


def test_init_leaves_the_owners_session():
    """A terminal Ctrl-C (SIGINT to the foreground group) must not kill sandboxes."""
    with dsec.Sandbox() as s:
        stat = Path(f"/proc/{s.pid}/stat").read_text().rsplit(")", 1)[1].split()
        outer = int(stat[1])
        outer_stat = Path(f"/proc/{outer}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(outer_stat[2]) != os.getpgid(0)
        assert int(outer_stat[3]) != os.getsid(0)


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler during the test: a process started with SIGINT ignored (a
    background job of a non-interactive shell) inherits SIG_IGN, and Python then installs none,
    so Ctrl-C would never reach the call."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("kind", ["exec", "python"])
@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_cancels_the_call_and_keeps_the_sandbox(sb, kind):
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            if kind == "exec":
                sb.exec("sleep 60; echo finished", timeout=60)
            else:
                sb.run_python("import time; time.sleep(60)", timeout=60)
    finally:
        timer.cancel()
    assert not sb.closed
    assert sb.exec("echo usable").stdout == b"usable\n"
    assert sb.exec("ps -e -o comm= | grep -c sleep || true").stdout == b"0\n"


def test_stub_matches_the_compiled_module():
    import ast

    import dsec._native as native

    stub = ast.parse((Path(dsec.__file__).parent / "_native.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, ast.ClassDef | ast.FunctionDef)} | {
        n.target.id for n in stub.body if isinstance(n, ast.AnnAssign)
    }
    actual = {n for n in dir(native) if not n.startswith("_")}
    assert declared == actual
    for cls in ("Sandbox", "ExecResult"):
        node = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == cls)
        members = {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
        real = {m for m in dir(getattr(native, cls)) if not m.startswith("_")}
        assert real <= members, real - members
    assert set(dsec.__all__) <= set(dir(dsec))
