"""SANDBOX.md §3 E (cases 29-36): cgroups, fork / memory / disk / output bombs, timeouts, stdin.

Limits are kept small so each bomb hits its wall within a fraction of a second. Time is only ever
used as an upper bound on how long a call may hang, never to decide a result.
"""

from __future__ import annotations

import os
import resource
import signal
import textwrap
import time
from pathlib import Path

import pytest
from sandbox_helpers import (
    Background,
    cgroup_mounts,
    cgroups_of,
    cmdline,
    describe,
    find_by_marker,
    py_json,
    sh,
    wait_for,
    workload,
)

# ------------------------------------------------------------------------- 29 cgroups


def nearest_limit(pid: int, controller: str, v1_file: str, v2_file: str) -> tuple[int, Path]:
    """The tightest numeric limit on the pid's cgroup or an ancestor: v1 hierarchy first, then
    the cgroup2 mount (whichever the sandbox uses). Returns (value, the cgroup dir it is set on)."""
    mounts, paths = cgroup_mounts(), cgroups_of(pid)
    for ctrl, name in ((controller, v1_file), ("unified", v2_file)):
        if ctrl not in mounts or ctrl not in paths:
            continue
        leaf = Path(mounts[ctrl]) / paths[ctrl].lstrip("/")
        found = []
        for directory in (leaf, *leaf.parents):
            if not str(directory).startswith(mounts[ctrl]):
                break
            try:
                raw = (directory / name).read_text().strip()
            except OSError:
                continue
            if raw != "max" and int(raw) < 1 << 62:
                found.append((int(raw), directory))
        if found:
            return min(found, key=lambda f: f[0])
    raise AssertionError(f"no {controller} limit found for pid {pid}: {paths}")


def test_29_cgroup_files_hold_the_configured_values(make_sandbox):
    """memory and pids limits sit on the sandbox's cgroup. There is no CPU-rate limit to find
    (cpu.max): `cpu_seconds` is a CPU-time budget, enforced by RLIMIT_CPU (checked in case 6)."""
    sb = make_sandbox(memory_bytes=96 << 20, max_pids=48)
    job = Background(sb, ["sleep", "4429.25"], "4429.25", timeout=60)
    try:
        memory, mem_dir = nearest_limit(job.pid, "memory", "memory.limit_in_bytes", "memory.max")
        pids, pids_dir = nearest_limit(job.pid, "pids", "pids.max", "pids.max")
        assert memory == 96 << 20
        assert pids == 48
        # The payload is a member of (a descendant of) the limited cgroup.
        paths = cgroups_of(job.pid)
        mounts = cgroup_mounts()
        for ctrl, limited in (("memory", mem_dir), ("pids", pids_dir)):
            key = ctrl if ctrl in paths and ctrl in mounts else "unified"
            leaf = Path(mounts[key]) / paths[key].lstrip("/")
            assert leaf == limited or limited in leaf.parents, (leaf, limited)
            assert str(job.pid) in (leaf / "cgroup.procs").read_text().split()
            assert leaf != Path(mounts[key]), f"payload left in the root {ctrl} cgroup"
    finally:
        job.finish()
    sb.close()
    wait_for(lambda: not mem_dir.exists() and not pids_dir.exists(), "sandbox cgroups removed")


# ------------------------------------------------------------------------- 30 fork bomb

FORK_UNTIL_REFUSED = textwrap.dedent(
    """
    import errno, json, os, signal, time
    children = []
    err = None
    while len(children) < 10000:
        try:
            pid = os.fork()
        except OSError as exc:
            err = errno.errorcode[exc.errno]
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps([len(children), err]))
    """
)


def test_30_fork_bomb_contained_and_reaped(make_sandbox):
    sb = make_sandbox(max_pids=24)
    count, err = py_json(sb, FORK_UNTIL_REFUSED)
    assert err == "EAGAIN" and count < 24, (count, err)
    # The classic bomb, made to wait on its children so that it runs until the deadline.
    result = sb.exec(["bash", "-c", "b(){ b | b & wait; }; b"], timeout=1.5)
    assert result.timed_out, describe(result)
    wait_for(lambda: not workload(sb.pid), "fork bomb processes to be reaped")
    after = sb.exec(["echo", "alive"])
    assert (after.exit_code, after.stdout) == (0, b"alive\n"), describe(after)


# ------------------------------------------------------------------------- 31 memory bomb

MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n"


def test_31_memory_bomb_is_oom_killed_and_reported(make_sandbox):
    limit = 64 << 20
    sb = make_sandbox(memory_bytes=limit)
    result = sb.exec(["python3", "-c", MEMORY_BOMB], timeout=30)
    assert result.oom_killed and result.signal == signal.SIGKILL, describe(result)
    assert not result.timed_out and result.exit_code is None, describe(result)
    assert limit // 2 < result.peak_memory <= limit, result.peak_memory
    # Only the bomb died: the sandbox, its init and its warm worker carry on.
    assert sb.exec(["echo", "alive"]).stdout == b"alive\n"
    warm = sb.run_python(MEMORY_BOMB, timeout=30)
    assert warm.oom_killed and warm.signal == signal.SIGKILL, describe(warm)
    assert sb.run_python("print('alive')").stdout == b"alive\n"


# ------------------------------------------------------------------------- 32 disk fill


def test_32_disk_fill_bounded_and_sigxfsz_surfaced(make_sandbox):
    disk = 16 << 20
    sb = make_sandbox(disk_bytes=disk)
    # One file bigger than the limit: RLIMIT_FSIZE stops the writer with SIGXFSZ.
    result = sb.exec(["dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", f"count={2 * disk >> 20}"])
    assert result.signal == signal.SIGXFSZ, describe(result)
    # Many files each under the limit: the tmpfs size stops them with ENOSPC.
    got = py_json(
        sb,
        textwrap.dedent(
            """
            import errno, json, os
            out = {}
            for root in ('/tmp', '/workspace'):
                for f in os.listdir(root):
                    os.unlink(os.path.join(root, f))
                written, err = 0, None
                try:
                    for i in range(10000):
                        with open(f'{root}/fill{i}', 'wb') as f:
                            f.write(b'z' * (1 << 20))
                        written += 1 << 20
                except OSError as exc:
                    err = errno.errorcode[exc.errno]
                out[root] = [written, err]
                for f in os.listdir(root):
                    os.unlink(os.path.join(root, f))
            print(json.dumps(out))
            """
        ),
    )
    for root in ("/tmp", "/workspace"):
        written, err = got[root]
        assert err == "ENOSPC" and written <= disk, (root, written, err)
    assert sh(sb, "echo ok > /workspace/after && cat /workspace/after").stdout == b"ok\n"


# ------------------------------------------------------------------------- 33 output flood


def test_33_output_flood_is_bounded(make_sandbox):
    cap = 64 << 10
    sb = make_sandbox(max_output_bytes=cap)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = sb.exec(["yes"], timeout=1.0)
    assert result.stdout_truncated and not result.stderr_truncated, describe(result)
    assert len(result.stdout) <= cap + 1024 and result.stdout.startswith(b"y\ny\ny\n")
    assert result.timed_out or result.signal is not None, describe(result)
    result = sb.exec(["sh", "-c", "yes error >&2"], timeout=1.0)
    assert result.stderr_truncated and len(result.stderr) <= cap + 1024, describe(result)
    # A flood that ends by itself: exit status kept, head and tail of the output kept.
    result = sb.exec(["seq", "1", "300000"])
    assert result.exit_code == 0 and result.stdout_truncated, describe(result)
    assert result.stdout.startswith(b"1\n2\n3\n") and result.stdout.endswith(b"299999\n300000\n")
    assert len(result.stdout) <= cap + 1024
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 << 10, f"host process grew by {grown_kib} KiB while capturing floods"


# ------------------------------------------------------------------------- 34 timeouts

# name -> (script, the argv word that marks the process which must not survive)
ESCAPES = {
    "background_and_wait": ("sleep 4434.1 & wait", "4434.1"),
    "subshell_orphan_holds_pipe": ("(sleep 4434.2 &); exit 0", "4434.2"),
    "setsid": ("setsid sleep 4434.3 & sleep 30", "4434.3"),
    "nohup": ("nohup sleep 4434.4 >/dev/null 2>&1 & sleep 30", "4434.4"),
    "ignores_sigterm": ("trap '' TERM; sleep 4434.5", "4434.5"),
    "double_fork_daemon": (
        "python3 -c 'import os, time; os.fork() and os._exit(0); os.setsid();"
        " os.fork() and os._exit(0); time.sleep(4434.6)' 4434.6; sleep 30",
        "4434.6",
    ),
}


@pytest.fixture(scope="module")
def timeout_sandbox():
    from sandbox_helpers import new_sandbox

    with new_sandbox() as sb:
        yield sb


@pytest.mark.parametrize("name", list(ESCAPES))
def test_34_timeout_kills_the_whole_tree(name, timeout_sandbox):
    sb = timeout_sandbox
    script, marker = ESCAPES[name]
    start = time.monotonic()
    result = sh(sb, script, timeout=0.5)
    elapsed = time.monotonic() - start
    # Every variant would keep the call (or its pipe) busy for over an hour if anything waited
    # on the tree; the bound only checks that the call came back at its deadline.
    assert elapsed < 10, f"{name}: call took {elapsed:.1f} s"
    if name != "subshell_orphan_holds_pipe":
        assert result.timed_out, describe(result)
    wait_for(lambda: not find_by_marker(sb.pid, marker), f"{name}: 'sleep {marker}' to be killed")
    host_wide = [
        p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if marker in cmdline(p)
    ]
    assert not host_wide, f"{name}: survivors anywhere on the host: {host_wide}"


def test_34_short_timeout_reports_timed_out(sandbox):
    result = sandbox.exec(["sleep", "2"], timeout=0.05)
    assert result.timed_out and result.exit_code != 0, describe(result)


# ------------------------------------------------------------------------- 35 stdin


def test_35_bare_stdin_readers_return_immediately(sandbox):
    for cmd, code in ((["cat"], 0), (["grep", "pattern"], 1), (["sh", "-c", "read x"], 1)):
        result = sandbox.exec(cmd, timeout=20)
        assert not result.timed_out and result.exit_code == code, f"{cmd}: {describe(result)}"
    result = sandbox.run_python("import sys; print(repr(sys.stdin.read()))", timeout=20)
    assert not result.timed_out and result.stdout == b"''\n", describe(result)
    result = sandbox.exec(["wc", "-c"], stdin=b"x" * (1 << 20))
    assert result.stdout.strip() == b"1048576", describe(result)


# ------------------------------------------------------------------------- 36 distinct outcomes


def test_36_timeout_cpu_limit_and_signals_are_distinct(make_sandbox, sandbox):
    timed = sandbox.exec(["sleep", "30"], timeout=0.3)
    assert timed.timed_out and not timed.oom_killed, describe(timed)

    cpu_bound = make_sandbox(cpu_seconds=1)
    spin = cpu_bound.exec(["python3", "-c", "while True: pass"], timeout=30)
    assert not spin.timed_out and not spin.oom_killed, describe(spin)
    assert spin.signal in (signal.SIGXCPU, signal.SIGKILL), describe(spin)
    assert spin.cpu_time >= 0.5, spin.cpu_time

    killed = sh(sandbox, "kill -KILL $$")
    assert (killed.signal, killed.exit_code, killed.timed_out) == (signal.SIGKILL, None, False)
    termed = sh(sandbox, "kill -TERM $$")
    assert (termed.signal, termed.timed_out) == (signal.SIGTERM, False), describe(termed)
    failed = sh(sandbox, "exit 3")
    assert (failed.exit_code, failed.signal, failed.timed_out) == (3, None, False)


WARM_ESCAPE = textwrap.dedent(
    """
    import os, subprocess, time
    subprocess.Popen(['setsid', 'sleep', '4434.7'], stdout=subprocess.DEVNULL)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp('sleep', ['sleep', '4434.8'])
        os._exit(0)
    time.sleep(300)
    """
)


def test_34_timeout_kills_the_tree_of_a_warm_python_call(timeout_sandbox):
    sb = timeout_sandbox
    start = time.monotonic()
    result = sb.run_python(WARM_ESCAPE, timeout=0.5)
    assert time.monotonic() - start < 10 and result.timed_out, describe(result)
    for marker in ("4434.7", "4434.8"):
        wait_for(lambda m=marker: not find_by_marker(sb.pid, m), f"'sleep {marker}' to be killed")
    assert sb.run_python("print('alive')").stdout == b"alive\n"
