"""SANDBOX.md §3 A (cases 1-10): the posture of a sandboxed process, read from the host.

gVisor-style: a payload is started in a sandbox and its /proc/<host pid>/{status,ns,fd,limits,
uid_map,mountinfo} are compared with the expected posture. The suite runs as root; the sandboxed
side is the unprivileged variant (its uid maps to an unprivileged host uid), so there is no second
"run as an unprivileged user" pass.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandbox_helpers import (
    HOST_SECRET,
    HOST_SECRET_VAR,
    LIMITS,
    Background,
    as_nobody,
    descendants,
    find_by_marker,
    gone_or_zombie,
    new_sandbox,
    py_json,
    status_fields,
    wait_for,
)

NAMESPACES = ("mnt", "pid", "ipc", "uts", "net", "user", "cgroup")
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

# Top-level entries of the sandbox root: the image binds, the writable workspace, the small /tmp,
# a fresh /proc and a minimal /dev. /bin, /lib, /lib64 and /sbin are symlinks into /usr on some
# hosts and directories on others; either is fine.
ROOT_REQUIRED = {"usr", "bin", "lib", "etc", "tmp", "proc", "dev", "workspace"}
ROOT_OPTIONAL = {"lib64", "lib32", "libx32", "sbin"}
WRITABLE_MOUNTS = ("/workspace", "/tmp", "/dev", "/proc")


def host_ns(name: str) -> str:
    return os.readlink(f"/proc/self/ns/{name}")


def ns_of(pid: int, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def assert_locked_down(pid: int, where: str = "") -> None:
    """Capabilities empty, no_new_privs, seccomp filter mode, new namespaces (cases 1-3)."""
    fields = status_fields(pid)
    for cap in CAP_FIELDS:
        assert int(fields[cap], 16) == 0, f"{where} pid {pid}: {cap}={fields[cap]}"
    assert fields["NoNewPrivs"] == "1", f"{where} pid {pid}: NoNewPrivs={fields['NoNewPrivs']}"
    assert fields["Seccomp"] == "2", f"{where} pid {pid}: Seccomp={fields['Seccomp']}"
    assert int(fields.get("Seccomp_filters", "1")) >= 1
    for name in NAMESPACES:
        assert ns_of(pid, name) != host_ns(name), (
            f"{where} pid {pid}: {name} namespace is the host's"
        )


@pytest.fixture(scope="module")
def payload():
    """A `sleep` running in a sandbox of its own (calls on one sandbox are serialised): its host
    pid, inspected from the host, then killed."""
    with new_sandbox() as sb:
        job = Background(sb, ["sleep", "4417.25"], "4417.25", timeout=120)
        yield job.pid
        job.finish()


def test_01_capabilities_all_zero(payload, sandbox):
    fields = status_fields(payload)
    for cap in CAP_FIELDS:
        assert int(fields[cap], 16) == 0, f"{cap}={fields[cap]}"
    # The same seen from inside, for a fresh process and for the warm Python worker.
    code = (
        "import json; f = dict(l.split(':', 1) for l in open('/proc/self/status'));"
        f"print(json.dumps({{k: int(f[k], 16) for k in {CAP_FIELDS!r}}}))"
    )
    for warm in (False, True):
        assert py_json(sandbox, code, warm=warm) == dict.fromkeys(CAP_FIELDS, 0), f"warm={warm}"


def test_02_no_new_privs_and_seccomp_filter(payload, sandbox):
    fields = status_fields(payload)
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    code = (
        "import json; f = dict(l.split(':', 1) for l in open('/proc/self/status'));"
        "print(json.dumps([f['NoNewPrivs'].strip(), f['Seccomp'].strip()]))"
    )
    assert py_json(sandbox, code, warm=True) == ["1", "2"]


def test_03_every_namespace_is_new_time_is_inherited(payload, make_sandbox):
    for name in NAMESPACES:
        assert ns_of(payload, name) != host_ns(name), f"{name} namespace shared with the host"
    assert ns_of(payload, "time") == host_ns("time")
    # Two sandboxes never share a namespace either.
    other = make_sandbox()
    job = Background(other, ["sleep", "4418.25"], "4418.25", timeout=60)
    try:
        for name in NAMESPACES:
            assert ns_of(job.pid, name) != ns_of(payload, name), f"{name} shared by two sandboxes"
    finally:
        job.finish()


def test_04_uid_gid_map_never_host_root(payload):
    for kind in ("uid", "gid"):
        lines = Path(f"/proc/{payload}/{kind}_map").read_text().split("\n")
        ranges = [tuple(map(int, line.split())) for line in lines if line.strip()]
        assert ranges, f"empty {kind}_map"
        for _inside, outside, count in ranges:
            assert not outside <= 0 < outside + count, f"{kind} map {ranges} includes host root"
    fields = status_fields(payload)
    for kind in ("Uid", "Gid"):
        host_ids = [int(x) for x in fields[kind].split()]
        assert 0 not in host_ids, f"{kind}: {host_ids} (host view)"


def test_05_only_stdio_fds(payload):
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{payload}/fd"))
    assert fds == [0, 1, 2], {fd: os.readlink(f"/proc/{payload}/fd/{fd}") for fd in fds}
    stdin = os.stat(f"/proc/{payload}/fd/0")
    assert stat.S_ISCHR(stdin.st_mode) and stdin.st_rdev == os.makedev(1, 3), (
        "stdin is not /dev/null"
    )
    for fd in (1, 2):
        assert os.readlink(f"/proc/{payload}/fd/{fd}").startswith("pipe:"), f"fd {fd}"


def test_05_warm_python_call_sees_only_stdio_fds(sandbox):
    """A run_python call is a fork of the warm interpreter: none of the worker's own channels
    may be left open in it."""
    code = (
        "import json, os\n"
        "fds = [int(f) for f in os.listdir('/proc/self/fd')]\n"
        "live = {f: os.readlink(f'/proc/self/fd/{f}') for f in fds if os.path.exists(f'/proc/self/fd/{f}')}\n"
        "print(json.dumps(live))"
    )
    live = py_json(sandbox, code, warm=True)
    assert sorted(live) == ["0", "1", "2"], live  # the listing's own fd is closed by then
    assert live["0"] == "/dev/null"


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        parts = line[26:].split()
        out[line[:26].strip()] = (parts[0], parts[1])
    return out


def test_06_rlimits_equal_the_configured_values(payload):
    limits = _limits(payload)
    nofile = str(LIMITS["max_open_files"])
    assert limits["Max open files"] == (nofile, nofile)
    fsize = str(LIMITS["disk_bytes"])
    assert limits["Max file size"] == (fsize, fsize)
    nproc = str(LIMITS["max_pids"])
    assert limits["Max processes"] == (nproc, nproc)
    cpu = str(LIMITS["cpu_seconds"])
    assert limits["Max cpu time"][0] == cpu
    # Locked memory stays bounded (never unlimited) although no limit names it.
    assert "unlimited" not in limits["Max locked memory"]


def _mounts(pid: int) -> list[tuple[str, set[str]]]:
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out.append((fields[4], set(fields[5].split(","))))
    return out


def test_07_root_entries_and_mounts_are_the_configured_set(payload, sandbox):
    mounts = _mounts(payload)
    points = {point for point, _ in mounts}
    assert "/" in points
    for point, options in mounts:
        top = "/" + point.strip("/").split("/")[0]
        assert top.strip("/") in ROOT_REQUIRED | ROOT_OPTIONAL | {""}, f"unexpected mount {point}"
        if "rw" in options:
            assert any(point == w or point.startswith(w + "/") for w in WRITABLE_MOUNTS), (
                f"{point} is mounted read-write"
            )
    root_options = [options for point, options in mounts if point == "/"][-1]
    assert "ro" in root_options, f"root mounted {root_options}"
    # Listed from the host: the sandbox's landlock ruleset does not grant reading "/" itself.
    entries = sorted(os.listdir(f"/proc/{payload}/root"))
    assert set(entries) >= ROOT_REQUIRED, f"missing from /: {ROOT_REQUIRED - set(entries)}"
    assert set(entries) <= ROOT_REQUIRED | ROOT_OPTIONAL, f"unexpected in /: {sorted(entries)}"
    # The image binds and the root are read-only from inside too.
    code = textwrap.dedent(
        """
        import errno, json
        out = {}
        for path in ('/newfile', '/usr/newfile', '/etc/newfile', '/bin/newfile'):
            try:
                open(path, 'w').close(); out[path] = 'OK'
            except OSError as exc:
                out[path] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
    )
    assert py_json(sandbox, code) == {
        p: "EROFS" for p in ("/newfile", "/usr/newfile", "/etc/newfile", "/bin/newfile")
    }


def test_08_session_leader_environment_umask(payload, make_sandbox):
    stat_fields = Path(f"/proc/{payload}/stat").read_text().rsplit(")", 1)[1].split()
    pgrp, session = int(stat_fields[2]), int(stat_fields[3])
    assert (pgrp, session) == (payload, payload), "payload is not its own session and group leader"
    umask = int(status_fields(payload)["Umask"], 8)
    assert umask & 0o022 == 0o022, f"umask {umask:o} lets group/other write"

    sb = make_sandbox(env={"SANDBOX_VAR": "from-config"})
    env = dict(
        line.split("=", 1)
        for line in sb.exec(["/usr/bin/env"], env={"CALL_VAR": "per-call"})
        .stdout.decode()
        .splitlines()
    )
    assert env.get("SANDBOX_VAR") == "from-config"
    assert env.get("CALL_VAR") == "per-call"
    assert HOST_SECRET_VAR not in env and HOST_SECRET not in env.values()
    leaked = {k for k, v in env.items() if os.environ.get(k) == v and k not in ("PATH", "LANG")}
    assert not leaked - {"HOME", "TERM", "LC_ALL", "SHELL", "USER", "LOGNAME"}, f"host env {leaked}"
    # The same holds for the warm Python worker.
    env_py = py_json(sb, "import json, os; print(json.dumps(dict(os.environ)))", warm=True)
    assert HOST_SECRET_VAR not in env_py and HOST_SECRET not in env_py.values()


THREADS_AND_CHILDREN = textwrap.dedent(
    """
    import os, sys, threading, time
    for _ in range(3):
        threading.Thread(target=time.sleep, args=(300,), daemon=True).start()
    if os.fork() == 0:
        os.execvp('sleep', ['sleep', '4419.5'])
    time.sleep(300)
    """
)


def test_09_every_thread_and_child_has_the_same_posture(sandbox):
    job = Background(
        sandbox, ["python3", "-c", THREADS_AND_CHILDREN, "4419.25"], "4419.25", timeout=120
    )
    try:
        child = wait_for(lambda: [p for p in descendants(job.pid)], "the payload's child")[0]
        checked = 0
        for pid in (job.pid, child):
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert_locked_down(int(tid), f"thread {tid} of")
                checked += 1
        assert checked >= 5, f"only {checked} threads seen"
    finally:
        job.finish()


def test_09_posture_after_lifecycle_transitions(make_sandbox):
    """Re-take the snapshot after a timeout, a signal death and an OOM kill in one sandbox."""
    sb = make_sandbox(memory_bytes=64 << 20)
    assert sb.exec(["sleep", "30"], timeout=0.3).timed_out
    assert sb.exec(["/bin/sh", "-c", "kill -9 $$"]).signal == signal.SIGKILL
    assert sb.run_python("b = bytearray(1 << 30)", timeout=20).oom_killed
    job = Background(sb, ["sleep", "4420.25"], "4420.25", timeout=60)
    try:
        assert_locked_down(job.pid, "after transitions,")
    finally:
        job.finish()


OWNER = textwrap.dedent(
    """
    import sys, threading, time
    import dsec
    sb = dsec.Sandbox(memory_bytes=128 << 20, max_pids=32, timeout=120.0)
    threading.Thread(target=sb.exec, args=(['sleep', '4421.25'],), daemon=True).start()
    print(sb.pid, flush=True)
    time.sleep(300)
    """
)


def test_10_sandbox_does_not_outlive_its_owner():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        init = int(owner.stdout.readline())
        wait_for(lambda: find_by_marker(init, "4421.25"), "the payload of the owner's sandbox")
        tree = [init, *descendants(init)]
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        wait_for(lambda: gone_or_zombie(tree), f"sandbox processes {tree} to die with their owner")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


UNPRIVILEGED = textwrap.dedent(
    """
    import json
    import dsec
    try:
        with dsec.Sandbox(timeout=10.0) as sb:
            status = sb.exec(['cat', '/proc/self/status']).stdout.decode()
    except dsec.SandboxSetupError as exc:
        print(json.dumps({'refused': str(exc)}))
    else:
        f = dict(l.split(':', 1) for l in status.splitlines())
        print(json.dumps({k: f[k].strip() for k in ('CapEff', 'NoNewPrivs', 'Seccomp')}))
    """
)


def test_unprivileged_caller_is_sandboxed_or_refused():
    """The unprivileged variant (SANDBOX.md §3 preamble, requirement 12): started by uid 65534, a
    sandbox either holds the full posture or raises SandboxSetupError; it never runs the command
    unsandboxed. On these machines it is refused (no cgroup for that user)."""
    argv = as_nobody("-c", UNPRIVILEGED)
    if argv is None:
        pytest.skip("needs root, setpriv and a checkout readable by uid 65534")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "refused" in got:
        assert any(w in got["refused"] for w in ("cgroup", "namespace", "landlock")), got
    else:
        assert got == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
