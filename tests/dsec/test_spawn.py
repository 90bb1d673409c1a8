"""Background processes (`Sandbox.spawn`), `write_file(parents=True)` and the CPU bandwidth
limit (`cpus`, the cgroup cpu quota). Every test runs real sandboxed processes and checks from
the host that nothing is left behind (processes, cgroups)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sandbox_helpers import (
    cgroup_mounts,
    cgroups_of,
    descendants,
    find_by_marker,
    gone_or_zombie,
    sandbox_cgroups,
    wait_for,
)

import dsec


def read_until(proc: dsec.Process, want: bytes, stream: str = "stdout") -> bytes:
    """Reads `stream` incrementally until `want` shows up (bounded by wait_for's deadline)."""
    got = b""

    def more() -> bool:
        nonlocal got
        got += getattr(proc, f"read_{stream}")()
        return want in got

    wait_for(more, f"{want!r} on the {stream} of {proc!r}")
    return got


def test_spawn_outlives_the_call_and_output_is_read_incrementally(make_sandbox):
    sb = make_sandbox()
    p = sb.spawn("echo started; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo bye >&2; exit 3")
    assert read_until(p, b"started\n") == b"started\n"
    # Still running across other calls; nothing more to read yet.
    assert sb.exec("echo other").stdout == b"other\n"
    assert p.poll() is None and p.returncode is None
    assert p.read_stdout() == b""
    sb.write_file("/tmp/go", b"")
    assert p.wait(timeout=15) == 3
    assert (p.exit_code, p.signal, p.returncode) == (3, None, 3)
    assert p.read_stderr() == b"bye\n"
    assert p.read_stdout() == b""
    # Once exited and read, answers come from the handle.
    assert p.poll() == 3 and p.wait() == 3
    assert isinstance(p.cpu_time, float)


def test_a_spawned_server_answers_exec_calls(make_sandbox):
    sb = make_sandbox()
    sb.write_file("site/a/b.txt", b"served", parents=True)
    server = sb.spawn(["python3", "-m", "http.server", "--bind", "127.0.0.1", "8765"], cwd="site")
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8765/a/b.txt').read().decode())"

    def answered() -> bool:
        r = sb.exec(["python3", "-c", fetch])
        return r.ok and r.stdout == b"served\n"

    wait_for(answered, "the spawned server to answer")
    assert b"GET /a/b.txt" in read_until(server, b"GET /a/b.txt", "stderr")
    with pytest.raises(TimeoutError, match="did not exit within"):
        server.wait(timeout=0.1)
    server.kill()
    assert (server.returncode, server.signal) == (-9, 9)
    server.kill()  # idempotent


def test_kill_ends_the_whole_tree_and_close_ends_every_process(make_sandbox):
    before = sandbox_cgroups()
    sb = make_sandbox()
    marker = "7391.5"
    p = sb.spawn(f"sleep {marker} & sleep {marker} & wait")
    q = sb.spawn(["sleep", marker])
    pids = wait_for(
        lambda: (found := find_by_marker(sb.pid, marker)) and len(found) >= 3 and found,
        "the three sleeps",
    )
    p.kill()
    assert p.returncode == -9
    left = find_by_marker(sb.pid, marker)
    assert len(left) == 1, left  # q's sleep only
    assert q.poll() is None
    init = sb.pid
    sb.close()
    wait_for(lambda: gone_or_zombie(pids), "spawned processes gone with the sandbox")
    assert descendants(init) == []
    dsec.stop_spares()  # the spare its limit set started
    wait_for(lambda: sandbox_cgroups() == before, "the sandbox's cgroups removed")
    with pytest.raises(dsec.SandboxClosedError):
        q.poll()
    # What the handle already knew stays readable.
    assert p.returncode == -9


def test_spawned_processes_count_against_the_sandbox_limits(make_sandbox):
    sb = make_sandbox(memory_bytes=128 << 20, max_pids=24)
    hog = sb.spawn(["python3", "-c", "x = b'x' * (512 << 20); print('allocated')"])
    assert hog.wait(timeout=15) == -9, hog.read_stdout() + hog.read_stderr()
    assert hog.read_stdout() == b""
    # Sleepers started in the background hold pids (init + reaper + sh + 18 of max_pids=24):
    # a call that needs a dozen more cannot fork; once they are killed it can.
    holder = sb.spawn("for i in $(seq 18); do sleep 100 & done; wait")
    wait_for(lambda: len(find_by_marker(sb.pid, "100")) == 18, "18 background sleepers")
    ten = "for i in $(seq 10); do sleep 0.1 & done; wait; echo done"
    r = sb.exec(ten)
    assert r.exit_code != 0 and b"fork" in r.stderr.lower(), r
    holder.kill()
    r = sb.exec(ten)
    assert r.stdout == b"done\n", r


def test_spawn_bad_input(make_sandbox):
    sb = make_sandbox()
    for cmd, match in (([], "empty"), (3, "cmd must be"), (["a\0b"], "NUL")):
        with pytest.raises(dsec.PolicyError, match=match):
            sb.spawn(cmd)
    with pytest.raises(dsec.PolicyError, match="env"):
        sb.spawn(["true"], env={"A=B": "c"})
    p = sb.spawn(["definitely-not-a-command"])
    assert p.wait(timeout=15) == 127
    assert b"definitely-not-a-command" in p.read_stderr()
    q = sb.spawn(["sleep", "10"])
    for bad in (-1, 0, float("nan"), "1"):
        with pytest.raises(dsec.PolicyError, match="timeout"):
            q.wait(timeout=bad)
    with pytest.raises(dsec.PolicyError, match="max_bytes"):
        q.read_stdout(max_bytes=-1)
    q.kill()


def test_write_file_parents(make_sandbox):
    sb = make_sandbox()
    with pytest.raises(dsec.PathError, match="No such file"):
        sb.write_file("x/y/z.txt", b"1")
    sb.write_file("x/y/z.txt", b"1", parents=True)
    sb.write_file("/tmp/p/q.txt", "2", parents=True)
    sb.write_file("x/y/w.txt", b"3", parents=True)  # directories that exist are fine
    assert sb.exec("cat x/y/z.txt /tmp/p/q.txt x/y/w.txt; stat -c %a x x/y").stdout == (
        b"123755\n755\n"
    )
    sb.exec("ln -s /etc etc_link; ln -s ../.. up; echo f > file")
    for path in ("etc_link/d/f", "up/d/f", "../d/f", "/usr/d/f", "file/d/f"):
        with pytest.raises(dsec.PathError):
            sb.write_file(path, b"", parents=True)
    assert sb.exec("ls /usr/d /d 2>&1; ls").stdout.count(b"No such file") == 2
    with pytest.raises(dsec.PolicyError, match="parents must be a bool"):
        sb.write_file("a", b"", parents=1)


def _cpu_quota(pid: int) -> float | None:
    """CPUs the pid's cgroup may use per period (cfs quota / period, or cpu.max), None when
    unlimited or no cpu controller is mounted."""
    mounts, paths = cgroup_mounts(), cgroups_of(pid)
    if "cpu" in mounts and "cpu" in paths:
        d = Path(mounts["cpu"]) / paths["cpu"].lstrip("/")
        quota = int((d / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((d / "cpu.cfs_period_us").read_text())
    if "unified" in mounts and "unified" in paths:
        d = Path(mounts["unified"]) / paths["unified"].lstrip("/")
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    return None


def test_cpus_quota_is_set_and_slows_a_busy_loop(make_sandbox):
    """`cpus` is the CPU bandwidth limit (cfs quota on v1, cpu.max on v2). Behaviour, not
    timing: two busy processes under cpus=0.2 get at most about 0.2 CPU-seconds per second."""
    sb = make_sandbox(cpus=0.2, cpu_seconds=None)
    if not sb.limits["cpu_bandwidth_enforced"]:
        pytest.skip("no cgroup cpu controller on this host: cpus is not enforced")
    spin = sb.spawn("python3 -c 'while True: pass' & python3 -c 'while True: pass' & wait")
    pids = wait_for(
        lambda: (found := find_by_marker(sb.pid, "while True: pass")) and len(found) == 2 and found,
        "the spinners",
    )
    assert _cpu_quota(pids[0]) == pytest.approx(0.2)
    t0, cpu0 = time.monotonic(), sum(map(_cpu_seconds, pids))
    time.sleep(1.5)
    cpu, wall = sum(map(_cpu_seconds, pids)) - cpu0, time.monotonic() - t0
    spin.kill()
    # Unthrottled, the two spinners take up to 2 CPU-seconds per second; the quota allows
    # 0.2 (plus a period of slack): a loose bound that still tells the two apart.
    assert 0 < cpu <= 0.2 * wall + 0.35, (cpu, wall)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a host pid, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
