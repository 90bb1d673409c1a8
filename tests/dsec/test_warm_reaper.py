"""The next exec call's reaper is started ahead of it (a confined child waits for the command):
what it holds, that a call still runs when that reaper or its child died meanwhile, and that
a call is answered only once nothing it started runs, yet never run twice."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from sandbox_helpers import descendants, describe, find_by_marker, gone_or_zombie, sh, wait_for


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
    # command into its pipe; its child never took it, so the call runs again.
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


def test_nothing_a_call_started_runs_once_it_returned(sandbox):
    # The answer comes on the reaper's report, before the reaper's own exit is over: the reaper
    # kills and reaps what the command left in its namespace first. These leftovers hold none
    # of the call's pipes, so nothing else would make the answer wait for them.
    for script, marker in (
        ("sleep 4436.1 >/dev/null 2>&1 & exit 0", "4436.1"),
        ("setsid sleep 4436.2 </dev/null >/dev/null 2>&1 & exit 3", "4436.2"),
    ):
        r = sh(sandbox, script)
        assert not r.timed_out and r.exit_code in (0, 3), describe(r)
        assert not find_by_marker(sandbox.pid, marker), f"{script}: still running"


def test_a_call_cut_short_after_it_started_is_not_run_again(make_sandbox):
    # Four spinners reach the whole-call CPU budget (1 s) before any of them reaches its own
    # RLIMIT_CPU, so the host cancels the call and the init kills the reaper, which then
    # reports nothing. The command had started, so the call is answered, not retried.
    sb = make_sandbox(cpu_seconds=1)
    script = "echo ran >> /workspace/runs; for i in 1 2 3 4; do (while :; do :; done) & done; wait"
    r = sh(sb, script, timeout=60)
    assert r.signal == signal.SIGXCPU and not r.timed_out, describe(r)
    assert sb.read_file("runs") == b"ran\n"
    assert r.cpu_time < 2.5, f"cpu_time={r.cpu_time}"
