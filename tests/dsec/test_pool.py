"""SandboxPool reuses sandboxes between users: `Sandbox.reset` leaves no file, process, IPC
object or handle of the previous user; broken sandboxes are replaced; metrics count it all."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from sandbox_helpers import (
    LIMITS,
    find_by_marker,
    gone_or_zombie,
    sandbox_cgroups,
    wait_for,
)

import dsec

DIRTY = r"""
set -e
echo secret > /workspace/answer; echo h > /workspace/.hidden; echo t > /tmp/t; echo s > /dev/shm/s
mkdir -p /workspace/locked/deep && echo x > /workspace/locked/deep/f && chmod 000 /workspace/locked
mkdir /tmp/sticky && chmod 1777 /tmp/sticky && ln -s /etc/passwd /workspace/link
echo 'export LEAK=1' > /workspace/.profile
"""

SYSV = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget(0x1234, 4096, 0o1666)
sem = libc.semget(0x1235, 1, 0o1666)
msg = libc.msgget(0x1236, 0o1666)
print(shm >= 0 and sem >= 0 and msg >= 0)
"""

# A POSIX message queue, where the sandbox may create one (Landlock hosts refuse it: EACCES).
MQUEUE = r"""
import ctypes, os
rt = ctypes.CDLL("librt.so.1", use_errno=True)
print(rt.mq_open(b"/leak", 0o102, 0o600, None) >= 0 or os.strerror(ctypes.get_errno()))
"""

MQUEUE_GONE = r"""
import ctypes, os
rt = ctypes.CDLL("librt.so.1", use_errno=True)
print(rt.mq_open(b"/leak", 0, 0, None) < 0 and os.strerror(ctypes.get_errno()))
"""

CLEAN = (
    "ls -A /workspace /tmp /dev/shm; stat -c '%a' /workspace /tmp /dev/shm;"
    " tail -n +2 /proc/sysvipc/shm /proc/sysvipc/sem /proc/sysvipc/msg | grep -v '^==' | grep ."
    " ; echo LEAK=$LEAK"
)


def test_reset_leaves_no_file_process_ipc_or_handle_behind():
    before = sandbox_cgroups()
    with dsec.SandboxPool(1, **LIMITS) as pool:
        first = pool.acquire()
        init = first.pid
        assert first.exec(DIRTY).ok
        assert first.exec(["python3", "-c", SYSV]).stdout == b"True\n"
        made_mq = first.exec(["python3", "-c", MQUEUE]).stdout
        assert made_mq in (b"True\n", b"Permission denied\n"), made_mq
        assert first.run_python("print(1)").stdout == b"1\n"  # a warm interpreter
        bg = first.spawn(["sleep", "4242.5"])
        marker = wait_for(lambda: find_by_marker(init, "4242.5"), "the background sleep")
        pool.release(first)
        assert first.closed
        with pytest.raises(dsec.SandboxClosedError, match="released to its pool"):
            first.exec("true")
        with pytest.raises(dsec.SandboxClosedError):
            bg.poll()  # the process is gone with the reset
        first.close()  # a no-op on a handed-on handle: the sandbox lives on
        second = pool.acquire()
        assert second.pid == init  # the same sandbox (cgroup and namespaces reused)
        assert gone_or_zombie(marker)
        r = second.exec(["/bin/sh", "-c", CLEAN])
        assert r.stdout == (b"/dev/shm:\n\n/tmp:\n\n/workspace:\n755\n1777\n1777\nLEAK=\n"), r
        gone = second.exec(["python3", "-c", MQUEUE_GONE]).stdout
        assert gone == (b"No such file or directory\n" if made_mq == b"True\n" else made_mq)
        assert second.run_python("print(2)").stdout == b"2\n"
        pool.release(second)
        m = pool.metrics()
        assert (m["creations"], m["resets"], m["failures"], m["acquires"]) == (1, 2, 0, 2)
    wait_for(lambda: not os.path.exists(f"/proc/{init}"), "the pool's sandbox closed")
    dsec.stop_spares()  # the spare its limit set started
    wait_for(lambda: sandbox_cgroups() == before, "the pool's cgroups removed")


def test_broken_sandboxes_are_replaced():
    with dsec.SandboxPool(1, **LIMITS) as pool:
        sb = pool.acquire()
        os.kill(sb.pid, signal.SIGKILL)  # the init dies while a user holds it
        pool.release(sb)
        again = pool.acquire()
        assert again.exec("echo ok").stdout == b"ok\n"
        pool.release(again)
        m = pool.metrics()
        assert (m["failures"], m["creations"], m["resets"]) == (1, 2, 1), m

    with dsec.SandboxPool(1, **LIMITS) as pool:
        sb = pool.acquire()
        pool.release(sb)
        idle = pool._idle[0]
        os.kill(idle.pid, signal.SIGKILL)  # dies while idle
        wait_for(lambda: gone_or_zombie([idle.pid]), "the idle init gone")
        fresh = pool.acquire()
        assert fresh.exec("echo ok").stdout == b"ok\n"
        pool.release(fresh)
        m = pool.metrics()
        assert m["failures"] == 1 and m["creations"] == 2, m


def test_pool_of_snapshot_forks_returns_to_the_snapshot_and_reports_queue_wait():
    with dsec.Sandbox(**LIMITS) as sb:
        sb.exec("echo base > f")
        snap = sb.snapshot()
    results: list[bytes] = []
    with snap, dsec.SandboxPool(2, snapshot=snap, **LIMITS) as pool:

        def user(i: int) -> None:
            with pool.sandbox(timeout=60) as s:
                results.append(s.exec(f"cat f; echo {i} > f").stdout)

        threads = [threading.Thread(target=user, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        m = pool.metrics()
    assert results == [b"base\n"] * 6
    # Each release forks afresh (no reset); one more creation when a user found none idle.
    assert m["acquires"] == 6 and m["resets"] == 0 and 7 <= m["creations"] <= 8, m
    assert 0 <= m["queue_wait_p50_ms"] <= m["queue_wait_p99_ms"] <= m["queue_wait_max_ms"]
