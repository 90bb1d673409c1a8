"""The init launcher: one small process per host process forks each sandbox's outer init (no
exec per sandbox). It is replaced when it dies, a forked host process gets its own, and
closing a sandbox waits until every sandbox process is gone and its cgroups are removed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading

from sandbox_helpers import LIMITS, _ppid, proc_state, sandbox_cgroups, wait_for

import dsec


def launcher_of(sb: dsec.Sandbox) -> tuple[int, int]:
    """(outer init pid, launcher pid) of a live sandbox, host view."""
    outer = _ppid(sb.pid)
    assert outer is not None
    launcher = _ppid(outer)
    assert launcher is not None
    return outer, launcher


def test_sandboxes_share_one_launcher_and_close_waits_for_the_outer_init():
    with dsec.Sandbox(**LIMITS) as a, dsec.Sandbox(**LIMITS) as b:
        outer_a, launcher = launcher_of(a)
        outer_b, launcher_b = launcher_of(b)
        assert launcher == launcher_b and outer_a != outer_b
        assert _ppid(launcher) == os.getpid()
    # close() returned only after each outer init reaped its sandbox and exited (the kernel
    # reaps it for the launcher: no zombie either).
    assert proc_state(outer_a) is None and proc_state(outer_b) is None
    assert proc_state(launcher) not in (None, "Z")


def test_a_killed_launcher_is_replaced_and_live_sandboxes_keep_working():
    with dsec.Sandbox(**LIMITS) as old:
        _, launcher = launcher_of(old)
        os.kill(launcher, signal.SIGKILL)
        wait_for(lambda: proc_state(launcher) in (None, "Z"), "the launcher to die")
        assert old.exec(["echo", "still"]).stdout == b"still\n"
        with dsec.Sandbox(**LIMITS) as new:
            _, replacement = launcher_of(new)
            assert replacement != launcher
            assert new.exec(["echo", "new"]).stdout == b"new\n"
    assert proc_state(launcher) is None  # the dead launcher was reaped, not left a zombie


def test_a_forked_host_process_starts_its_own_launcher():
    with dsec.Sandbox(**LIMITS) as sb:
        _, parent_launcher = launcher_of(sb)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(r)
                with dsec.Sandbox(**LIMITS) as mine:
                    ok = mine.exec(["echo", "child"]).stdout == b"child\n"
                    own = launcher_of(mine)[1]
                    os.write(w, f"{int(ok)} {own}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        got = os.read(r, 100).decode().split()
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert got[0] == "1"
        assert int(got[1]) != parent_launcher
        # The parent's launcher still serves the parent.
        with dsec.Sandbox(**LIMITS) as again:
            assert launcher_of(again)[1] == parent_launcher
            assert sb.exec(["true"]).exit_code == 0


def fork_and_create() -> bytes:
    """A forked child creates a sandbox and runs a command in it; its answer, or b"" when it
    gave none within 30 s (it is killed then)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            with dsec.Sandbox(**LIMITS) as sb:
                os.write(w, sb.exec(["echo", "child"]).stdout)
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 30)
    got = os.read(r, 100) if ready else b""
    os.close(r)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return got


def test_a_fork_while_other_threads_start_sandboxes_works_in_the_child():
    # Another thread keeps starting sandboxes (as warm spares do): a fork may copy its locks
    # held, and the child, which has no such thread, must neither wait for them nor use them.
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            dsec.Sandbox(spare=False, **LIMITS).close()

    t = threading.Thread(target=churn)
    t.start()
    try:
        answers = [fork_and_create() for _ in range(12)]
    finally:
        stop.set()
        t.join()
    assert answers == [b"child\n"] * 12


def test_cgroups_left_by_a_dead_process_are_removed_by_the_next_one():
    # A process killed between creating a sandbox's cgroups and handing them to its outer init
    # leaves them behind; the next process that starts a sandbox removes them.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    with dsec.Sandbox(**LIMITS):
        parents = {p.parent for p in sandbox_cgroups()}
    stale = [p / f"dsec-{dead_pid}-7" for p in parents]
    alive = [p / "dsec-1-7" for p in parents]  # pid 1 lives: its cgroups are not stale
    for d in stale + alive:
        d.mkdir()
    try:
        starter = "import dsec; dsec.Sandbox(spare=False).close()"
        subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)
        assert [d for d in stale if d.exists()] == []
        assert all(d.exists() for d in alive)
    finally:
        for d in stale + alive:
            if d.exists():
                d.rmdir()
