"""The next exec call's reaper is started ahead of it (a confined child waits for the command):
what it holds, and that a call still runs when that reaper or its child died meanwhile."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from sandbox_helpers import descendants, gone_or_zombie, wait_for


def warm_pair(init: int) -> tuple[int, int]:
    """Host pids of the waiting reaper and its child (the only processes of an idle sandbox)."""
    found = wait_for(lambda: len(d := descendants(init)) == 2 and d, "the waiting reaper")
    reaper = next(p for p in found if descendants(p))
    return reaper, descendants(reaper)[0]


def test_an_idle_sandbox_holds_a_waiting_reaper_with_only_its_call_pipes(sandbox):
    assert sandbox.exec("true").ok
    reaper, child = warm_pair(sandbox.pid)
    for pid in (reaper, child):
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [x for x in links if x.startswith("socket:")], links  # no control socket
        assert sum(x.startswith("pipe:") for x in links) == 5, links  # stdin/out/err, status, job
    # The command sees none of them: only its stdio.
    r = sandbox.exec(
        ["python3", "-c", "import os; print(sorted(map(int, os.listdir('/proc/self/fd'))))"]
    )
    assert r.stdout == b"[0, 1, 2, 3]\n", r  # 3: the listing's own directory


def test_a_call_runs_when_the_waiting_child_was_killed(fresh_sandbox):
    sb = fresh_sandbox
    for _ in range(3):
        reaper, child = warm_pair(sb.pid)
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: gone_or_zombie([child]), "the child gone")  # noqa: B023
        r = sb.exec(["sh", "-c", "cat; echo $0 ran"], stdin=b"in\n")
        assert (r.exit_code, r.stdout) == (0, b"in\nsh ran\n"), r
        assert gone_or_zombie([reaper])


def test_a_call_runs_when_the_waiting_reaper_was_killed(fresh_sandbox):
    sb = fresh_sandbox
    reaper, child = warm_pair(sb.pid)
    os.kill(reaper, signal.SIGKILL)
    wait_for(lambda: gone_or_zombie([reaper, child]), "the reaper's namespace gone")
    r = sb.exec("echo again")
    assert (r.exit_code, r.stdout) == (0, b"again\n"), r
    assert sb.run_python("print(3)").stdout == b"3\n"


def test_a_call_sent_to_a_reaper_whose_child_died_runs_again(fresh_sandbox):
    # The reaper is stopped, so it still looks alive when the call comes and takes the
    # command into its pipe; its child never took it (no `G` report), so the call runs again.
    sb = fresh_sandbox
    reaper, child = warm_pair(sb.pid)
    os.kill(reaper, signal.SIGSTOP)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: gone_or_zombie([child]), "the child gone")
    with ThreadPoolExecutor(1) as ex:
        call = ex.submit(sb.exec, "echo once")
        time.sleep(0.2)  # the call reaches the stopped reaper (if not, it starts a new one)
        os.kill(reaper, signal.SIGCONT)
        r = call.result(timeout=30)
    assert (r.exit_code, r.stdout, r.signal) == (0, b"once\n", None), r
