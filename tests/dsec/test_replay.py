"""Command log and replay (`dsec.CommandLog`, `log.attach(sb)`): recorded results come back
without running, a divergence runs for real on the state the log implies, a crash leaves a
readable log, a foreign or damaged log is refused. Real sandboxes throughout."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandbox_helpers import LIMITS

import dsec
from dsec.tools import ToolBox

RANDOM = "python3 -c 'import random; print(random.random())'"


def open_log(path: Path, **kw) -> dsec.CommandLog:
    return dsec.CommandLog(path, task="task-1", trajectory="traj-1", **kw)


def trajectory(rs: dsec.LoggedSandbox) -> list:
    """Five calls: every operation, a random value and state built step by step."""
    out = [rs.exec(RANDOM), rs.run_python("import random; print(random.random())")]
    rs.write_file("notes/a.txt", "first\n", parents=True)
    out.append(rs.exec("echo second >> notes/a.txt && cat notes/a.txt"))
    out.append(rs.read_file("notes/a.txt"))
    return out


def fields(result) -> tuple:
    if isinstance(result, bytes):
        return (result,)
    return tuple(getattr(result, f) for f in dsec.replay.FIELDS)


@pytest.fixture
def recorded(tmp_path):
    """A log of `trajectory` and what it returned."""
    path = tmp_path / "traj.log"
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        first = trajectory(log.attach(sb))
    return path, first


def test_replay_returns_the_recorded_results_without_running(recorded):
    path, first = recorded
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        assert len(log) == 5 and log.dropped_bytes == 0
        rs = log.attach(sb)
        again = trajectory(rs)
        # byte-identical, random values and times included: nothing ran again
        assert [fields(r) for r in again] == [fields(r) for r in first]
        assert isinstance(again[0], dsec.RecordedResult) and again[0].ok
        assert rs.stats == {
            "replayed": 5,
            "executed": 0,
            "restored": 0,
            "restore_mismatches": 0,
            "diverged_at": None,
        }
        assert rs.replaying
        assert sb.exec("ls -A /workspace").stdout == b""  # the sandbox was never touched


def test_divergence_restores_the_implied_state_then_runs(recorded):
    path, first = recorded
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        assert rs.exec(RANDOM).stdout == first[0].stdout
        rs.run_python("import random; print(random.random())")
        rs.write_file("notes/a.txt", "first\n", parents=True)
        assert rs.exec("echo second >> notes/a.txt && cat notes/a.txt").stdout == first[2].stdout
        # step 4 differs from the log: steps 0-3 that change state run again first, once each
        diverged = rs.exec("echo third >> notes/a.txt && cat notes/a.txt")
        assert isinstance(diverged, dsec.ExecResult)
        assert diverged.stdout == b"first\nsecond\nthird\n"
        stats = rs.stats
        assert (stats["replayed"], stats["executed"], stats["restored"]) == (4, 1, 4)
        assert stats["diverged_at"] == 4 and not rs.replaying
        assert stats["restore_mismatches"] == 2  # the two random values differ on the re-run
        assert rs.read_file("notes/a.txt") == b"first\nsecond\nthird\n"
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        assert len(log) == 6  # the divergent step superseded the old step 4 and step 5 was added
        ops = [r["op"] for r in log.records()]
        assert ops == ["exec", "run_python", "write_file", "exec", "exec", "read_file"]
        rs = log.attach(sb)
        trajectory_so_far = [
            rs.exec(RANDOM),
            rs.run_python("import random; print(random.random())"),
        ]
        rs.write_file("notes/a.txt", "first\n", parents=True)
        rs.exec("echo second >> notes/a.txt && cat notes/a.txt")
        third = rs.exec("echo third >> notes/a.txt && cat notes/a.txt")
        assert third.stdout == b"first\nsecond\nthird\n" and rs.stats["executed"] == 0
        assert fields(trajectory_so_far[0]) == fields(first[0])
        # past the end of the log: the state is restored, then the call runs
        assert rs.exec("wc -l < notes/a.txt").stdout == b"3\n"
        assert rs.stats["diverged_at"] == 5 and rs.stats["restored"] == 5


def test_restore_on_demand_and_the_tools_on_a_logged_sandbox(tmp_path):
    path = tmp_path / "tools.log"
    calls = [("write_file", {"path": "src/m.py", "content": "print(6 * 7)\n"})]
    calls += [("bash", {"command": "python3 src/m.py"}), ("read_file", {"path": "src/m.py"})]
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        box = ToolBox(log.attach(sb))
        first = [box.execute(name, args).text for name, args in calls]
    assert "42" in first[1]
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        box = ToolBox(rs)
        assert [box.execute(name, args).text for name, args in calls] == first
        assert sb.exec("test -e src").exit_code == 1
        rs.restore()  # the sandbox now holds what the trajectory built
        assert sb.exec("python3 src/m.py").stdout == b"42\n"
        assert rs.replaying and rs.stats["restored"] == 3  # mkdir -p, write_file, bash


def test_a_changed_timeout_replays_only_when_the_recorded_run_would_finish(tmp_path):
    path = tmp_path / "timeouts.log"
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        fast = rs.exec(RANDOM, timeout=10)
        slow = rs.exec("sleep 30", timeout=0.3)
        assert slow.timed_out
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        assert rs.exec(RANDOM, timeout=5).stdout == fast.stdout  # finished well within 5 s
        assert rs.exec("sleep 30", timeout=0.3).wall_time == slow.wall_time  # same timeout
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        rs.exec(RANDOM, timeout=5)
        rerun = rs.exec("sleep 30", timeout=0.2)  # a new timeout on a timed-out run: runs
        assert isinstance(rerun, dsec.ExecResult) and rerun.timed_out
        assert rs.stats["diverged_at"] == 1


SPAWNED = "cat msg.txt; echo spawned >> msg.txt"


def test_a_spawn_ends_replay_on_the_restored_state(tmp_path):
    path = tmp_path / "spawn.log"
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        rs.write_file("msg.txt", "hello\n")
        first = rs.exec(RANDOM)
        proc = rs.spawn(SPAWNED)
        assert proc.wait(timeout=15) == 0 and proc.read_stdout() == b"hello\n"
        assert rs.exec("cat msg.txt").stdout == b"hello\nspawned\n"
        records = log.records()
        assert [r["op"] for r in records] == ["write_file", "exec", "spawn", "exec"]
        assert records[2]["result"] == proc.id
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        rs.write_file("msg.txt", "hello\n")
        assert rs.exec(RANDOM).stdout == first.stdout  # replayed: nothing ran yet
        assert sb.exec("test -e msg.txt").exit_code == 1
        # the spawn matches its record, yet runs for real, on the restored workspace
        proc = rs.spawn(SPAWNED)
        assert isinstance(proc, dsec.Process)
        assert proc.wait(timeout=15) == 0 and proc.read_stdout() == b"hello\n"
        assert rs.stats == {
            "replayed": 2,
            "executed": 1,
            "restored": 2,
            "restore_mismatches": 1,  # the random value differs on the re-run
            "diverged_at": 2,
        }
        # recorded at step 3, but after a spawn every call runs for real
        again = rs.exec("cat msg.txt")
        assert isinstance(again, dsec.ExecResult) and again.stdout == b"hello\nspawned\n"
        assert rs.stats["executed"] == 2 and not rs.replaying
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        assert [r["op"] for r in log.records()] == ["write_file", "exec", "spawn", "exec"]
        rs = log.attach(sb)
        rs.write_file("msg.txt", "hello\n")
        rs.exec(RANDOM)
        other = rs.spawn(["cat", "msg.txt"])  # another command at the spawn's step
        assert other.wait(timeout=15) == 0 and other.read_stdout() == b"hello\n"
        assert rs.stats["diverged_at"] == 2 and rs.stats["restored"] == 2
    with open_log(path) as log:
        assert [r["op"] for r in log.records()] == ["write_file", "exec", "spawn"]


def frame_ends(data: bytes) -> list[int]:
    """Where each frame of a log file ends (the header's first)."""
    ends, pos = [], len(dsec.cmdlog.MAGIC)
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 8 + length
        ends.append(pos)
    return ends


def test_a_torn_tail_is_dropped(recorded):
    path, first = recorded
    whole = path.read_bytes()
    ends = frame_ends(whole)
    assert len(ends) == 6 and ends[-1] == len(whole)
    size_of_last = ends[-1] - ends[-2]
    for cut in (1, 4, 8, 9, size_of_last // 2, size_of_last - 1):
        path.write_bytes(whole[: len(whole) - cut])
        with open_log(path) as log:
            assert (len(log), log.dropped_bytes) == (4, size_of_last - cut)
        assert path.stat().st_size == ends[-2]  # cut back to the last whole record
    for garbage in (b"\0" * 300, b"\x07" * 3):  # a zero-filled tail (lost pages), a short frame
        path.write_bytes(whole + garbage)
        with open_log(path) as log:
            assert (len(log), log.dropped_bytes) == (5, len(garbage))
    path.write_bytes(whole[: len(whole) - 3])
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        rs = log.attach(sb)
        again = trajectory(rs)  # the dropped step runs for real, on the restored state
        assert fields(again[0]) == fields(first[0]) and again[3] == b"first\nsecond\n"
        assert rs.stats["diverged_at"] == 4
    with open_log(path) as log:
        assert len(log) == 5 and log.dropped_bytes == 0
    path.write_bytes(b"\0" * 64)  # created, then lost before its first bytes reached the disk
    with open_log(path) as log:
        assert (len(log), log.dropped_bytes) == (0, 64)


WRITER = textwrap.dedent(
    """
    import sys
    import dsec
    sb = dsec.Sandbox(memory_bytes=128 << 20, max_pids=32, timeout=30.0)
    # fsync only matters for a machine crash: a killed process loses no returned call
    log = dsec.CommandLog(sys.argv[1], task="task-1", trajectory="traj-1", fsync="never")
    rs = log.attach(sb)
    i = 0
    while True:
        rs.exec(["echo", str(i)])
        print(i, flush=True)
        i += 1
    """
)


def test_a_writer_killed_mid_log_leaves_a_readable_log(tmp_path):
    path = tmp_path / "killed.log"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in writer.stdout:  # the number of each call that returned
            if int(line) == 10:
                break
        assert writer.poll() is None, "the writer exited before it was killed"
        writer.send_signal(signal.SIGKILL)  # wherever it is: mid-exec, mid-write, between
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        n = len(log)
        assert n >= 11  # every call that returned has its record
        rs = log.attach(sb)
        assert [rs.exec(["echo", str(i)]).stdout for i in range(n)] == [
            f"{i}\n".encode() for i in range(n)
        ]
        assert rs.stats["replayed"] == n and rs.stats["executed"] == 0


def test_a_log_of_another_task_or_trajectory_is_refused(recorded):
    path, _ = recorded
    before = path.read_bytes()
    with pytest.raises(dsec.LogError) as err:
        dsec.CommandLog(path, task="task-2", trajectory="traj-1")
    assert "'task-1' trajectory 'traj-1'" in str(err.value)
    assert "'task-2' trajectory 'traj-1'" in str(err.value)
    with pytest.raises(dsec.LogError, match="trajectory 'traj-9'"):
        dsec.CommandLog(path, task="task-1", trajectory="traj-9")
    assert path.read_bytes() == before  # a refused log is left as it was
    other = path.with_name("notes.txt")
    other.write_bytes(b"not a log at all\n")
    with pytest.raises(dsec.LogError, match="is not a command log"):
        dsec.CommandLog(other, task="task-1", trajectory="traj-1")
    assert other.read_bytes() == b"not a log at all\n"


def test_a_tampered_record_is_detected(recorded):
    path, first = recorded
    whole = bytearray(path.read_bytes())
    needle = first[2].stdout  # inside the fourth record (step 3)
    at = bytes(whole).index(needle)
    tampered = bytearray(whole)
    tampered[at] ^= 0x01
    path.write_bytes(tampered)
    with pytest.raises(dsec.LogError, match=r"record at byte \d+ \(after step 2\) is damaged"):
        open_log(path)
    tampered = bytearray(whole)
    tampered[len(dsec.cmdlog.MAGIC) + 20] ^= 0x01  # inside the header
    path.write_bytes(tampered)
    with pytest.raises(dsec.LogError, match="its header is damaged"):
        open_log(path)
    # a damaged last record cannot be told from a torn write: dropped, then run for real
    last = bytes(whole).rindex(b"first\nsecond\n")
    tampered = bytearray(whole)
    tampered[last] ^= 0x01
    path.write_bytes(tampered)
    with open_log(path) as log, dsec.Sandbox(**LIMITS) as sb:
        assert len(log) == 4 and log.dropped_bytes > 0
        again = trajectory(log.attach(sb))
        assert again[3] == b"first\nsecond\n"  # never the tampered bytes


def test_bad_arguments(tmp_path, fresh_sandbox):
    path = tmp_path / "bad.log"
    with pytest.raises(dsec.PolicyError, match=r"fsync must be .* got 'sometimes'"):
        open_log(path, fsync="sometimes")
    with pytest.raises(dsec.PolicyError, match=r"fsync must be .* got 0"):
        open_log(path, fsync=0)
    with pytest.raises(dsec.PolicyError, match="trajectory must be a non-empty str, got ''"):
        dsec.CommandLog(path, task="t", trajectory="")
    with open_log(path, fsync=3) as log:
        rs = log.attach(fresh_sandbox)
        with pytest.raises(dsec.PolicyError, match="already attached"):
            log.attach(fresh_sandbox)
        with pytest.raises(dsec.LogError, match="in use by another writer"):
            open_log(path)
        with pytest.raises(dsec.PolicyError, match="timeout must be a number of seconds"):
            rs.exec("true", timeout="soon")
        assert rs.exec("true").ok
    with pytest.raises(dsec.LogError, match="is closed"):
        rs.exec("true")
    assert os.path.getsize(path) > 0
