"""Helpers shared by the sandbox security suite (fixtures live in conftest.py).

Every test here runs real sandboxed processes. Helpers look at sandboxed processes from the host
side through /proc (the sandbox's init is `Sandbox.pid`, a host pid; everything it runs is a
descendant), and run small Python programs inside the sandbox that print JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dsec

PROGRAMS = Path(__file__).parent / "programs"

# A variable only the host has: it must never show up inside a sandbox (environment allow-list).
HOST_SECRET_VAR = "DSEC_TEST_HOST_SECRET"
HOST_SECRET = "host-secret-" + secrets.token_hex(8)
os.environ[HOST_SECRET_VAR] = HOST_SECRET

# Limits used by the suite unless a test needs others. Small enough to be hit quickly.
LIMITS: dict[str, Any] = dict(
    memory_bytes=256 << 20,
    max_pids=64,
    cpu_seconds=30,
    timeout=20.0,
    max_output_bytes=256 << 10,
    disk_bytes=32 << 20,
    max_open_files=256,
)

# Deadline for host-side polling (process appears / disappears). Generous: it bounds a wait, it
# does not decide any test.
POLL_DEADLINE = 15.0


def new_sandbox(**overrides: Any) -> dsec.Sandbox:
    return dsec.Sandbox(**{**LIMITS, **overrides})


def describe(result: dsec.ExecResult) -> str:
    return (
        f"exit_code={result.exit_code} signal={result.signal} timed_out={result.timed_out} "
        f"oom_killed={result.oom_killed}\nstdout={result.stdout[-2000:]!r}\n"
        f"stderr={result.stderr[-2000:]!r}"
    )


def sh(sb: dsec.Sandbox, script: str, **kw: Any) -> dsec.ExecResult:
    """Run a shell script in the sandbox."""
    return sb.exec(["/bin/sh", "-c", script], **kw)


def py_json(sb: dsec.Sandbox, code: str, *, warm: bool = False, **kw: Any) -> Any:
    """Run Python code in the sandbox that prints one JSON value last; return that value.

    warm=False runs a fresh `python3 -c` process (exec path); warm=True uses run_python (the warm
    interpreter path). Both must hold the same posture.
    """
    result = sb.run_python(code, **kw) if warm else sb.exec(["python3", "-c", code], **kw)
    assert result.exit_code == 0, describe(result)
    lines = result.stdout.decode().strip().splitlines()
    assert lines, describe(result)
    return json.loads(lines[-1])


# ---------------------------------------------------------------- host-side process inspection


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Host pids of every live descendant of `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def proc_state(pid: int) -> str | None:
    """The one-letter state of a host pid, None when it no longer exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def wait_for(predicate: Callable[[], Any], what: str, deadline: float = POLL_DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {deadline} s")
        time.sleep(0.02)


def workload(init: int) -> list[int]:
    """Descendants of a sandbox's init that run a program: not the init's own forks (the
    waiting reaper of the next exec call and its child), which share its command line."""
    own = cmdline(init)
    return [p for p in descendants(init) if cmdline(p) != own]


def find_by_marker(root: int, marker: str) -> list[int]:
    return [p for p in descendants(root) if marker in cmdline(p)]


def gone_or_zombie(pids: list[int]) -> bool:
    return all(proc_state(p) in (None, "Z") for p in pids)


class Background:
    """Run `sandbox.exec(cmd)` on a thread; `.pid` is the host pid of the process carrying
    `marker` in its argv, found among the sandbox init's descendants."""

    def __init__(self, sb: dsec.Sandbox, cmd: list[str], marker: str, **kw: Any):
        self.sb = sb
        self.result: dsec.ExecResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cmd, kw), daemon=True)
        self.thread.start()
        self.pid: int = wait_for(
            lambda: self._probe(marker), f"sandboxed process with {marker!r} in its argv"
        )

    def _probe(self, marker: str) -> int | None:
        found = find_by_marker(self.sb.pid, marker)
        if found:
            return found[0]
        if not self.thread.is_alive():
            self._died()
        return None

    def _run(self, cmd: list[str], kw: dict[str, Any]) -> None:
        try:
            self.result = self.sb.exec(cmd, **kw)
        except BaseException as exc:
            self.error = exc

    def _died(self) -> None:
        detail = describe(self.result) if self.result else repr(self.error)
        raise AssertionError(f"background command ended before it could be inspected: {detail}")

    def finish(self) -> dsec.ExecResult | None:
        """Kill the payload from the host (SIGKILL) and wait for the exec call to return."""
        if proc_state(self.pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        self.thread.join(POLL_DEADLINE)
        assert not self.thread.is_alive(), "exec did not return after its process was killed"
        return self.result


# ---------------------------------------------------------------- cgroups


def cgroup_mounts() -> dict[str, str]:
    """controller name (or "unified") -> mount point, from the host's mountinfo."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _source, options = post.split()[:3]
        point = pre.split()[4]
        if fstype == "cgroup2":
            out["unified"] = point
        elif fstype == "cgroup":
            for opt in options.split(","):
                out.setdefault(opt, point)
    return out


def cgroups_of(pid: int) -> dict[str, str]:
    """controller (or "unified") -> the pid's cgroup path, host view."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["unified"]:
            out[c] = path
    return out


def sandbox_cgroups() -> list[Path]:
    """The cgroup directories of this process's live sandboxes (named dsec-<pid>-<n>), in every
    hierarchy that holds them: what a leak test counts."""
    mounts, paths = cgroup_mounts(), cgroups_of(os.getpid())
    found: list[Path] = []
    for ctrl in ("memory", "pids", "cpu", "unified"):
        if ctrl not in mounts or ctrl not in paths:
            continue
        base = Path(mounts[ctrl]) / paths[ctrl].lstrip("/")
        if base.name == "dsec-host":  # cgroup v2: the caller moved into a leaf of its own
            base = base.parent
        found.extend(base.glob(f"dsec-{os.getpid()}-*"))
    return sorted(set(found))


# ---------------------------------------------------------------- syscall probes

TRY_SYSCALLS = (PROGRAMS / "try_syscalls.py").read_bytes()
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter the sandbox image provides


def syscall_probe(sb: dsec.Sandbox, names: list[str] | None = None, **kw: Any) -> dict[str, str]:
    """Run programs/try_syscalls.py in the sandbox; {syscall: "OK" | errno name}."""
    sb.write_file("/workspace/.try_syscalls.py", TRY_SYSCALLS)
    result = sb.exec(["python3", "/workspace/.try_syscalls.py", *(names or [])], **kw)
    assert result.exit_code == 0, describe(result)
    return json.loads(result.stdout)


def host_syscall_probe(names: list[str] | None = None) -> dict[str, str]:
    """The same probes unsandboxed, on the host: the kernel's own answer to the bad arguments."""
    result = subprocess.run(
        [SYSTEM_PYTHON, str(PROGRAMS / "try_syscalls.py"), *(names or [])],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


# ---------------------------------------------------------------- unprivileged callers

NOBODY = 65534


def as_nobody(*args: str) -> list[str] | None:
    """argv running `python args...` as uid/gid 65534 with no capabilities, or None where that is
    impossible here (not root, no setpriv, or the checkout is not readable by that user)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    probe = subprocess.run([*prefix, "-c", "import dsec"], capture_output=True, timeout=60)
    return None if probe.returncode != 0 else [*prefix, *args]
