"""dsec: a namespace sandbox for running untrusted commands and Python code.

Each :class:`Sandbox` is a small init process inside fresh user, pid, mount, net, ipc, uts and
cgroup namespaces, on a read-only root with a writable ``/workspace`` and ``/tmp``. Every
command it runs has no capabilities, ``no_new_privs``, a seccomp deny-list, a landlock ruleset
and rlimits; the sandbox has its own cgroup. A failing program is data (:class:`ExecResult`);
a sandbox that cannot do what was asked raises a :class:`SandboxError`.

>>> with dsec.Sandbox(timeout=5) as sb:
...     sb.exec("echo hi").stdout
b'hi\\n'
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from dsec import _native
from dsec import snapshot as _snapshot
from dsec import spares as _spares
from dsec._native import (
    ExecResult,
    PathError,
    PolicyError,
    Process,
    SandboxClosedError,
    SandboxError,
    SandboxSetupError,
)
from dsec.cmdlog import CommandLog, LogError
from dsec.replay import LoggedSandbox, RecordedResult
from dsec.snapshot import Snapshot
from dsec.spares import auto_spares, keep_spares, spare_stats, stop_spares

__all__ = [
    "CommandLog",
    "ExecResult",
    "LogError",
    "LoggedSandbox",
    "PathError",
    "PolicyError",
    "Process",
    "RecordedResult",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxPool",
    "SandboxSetupError",
    "Snapshot",
    "auto_spares",
    "check",
    "keep_spares",
    "spare_stats",
    "stop_spares",
]


class Sandbox(_native.Sandbox):
    """A persistent sandbox; files and state persist across calls until :meth:`close`.

    Keyword arguments (all optional; defaults in parentheses):

    - ``memory_bytes`` (512 MiB): memory limit of the whole sandbox (its cgroup), tmpfs, SysV
      shared memory and (cgroup v1: a quarter of it) TCP socket buffers included.
    - ``max_pids`` (256): tasks in the sandbox (cgroup ``pids.max`` and ``RLIMIT_NPROC``).
    - ``cpu_seconds`` (None = unlimited): CPU seconds one call may use, all its processes
      together; a call that uses them is killed and reports ``signal`` SIGXCPU (each process
      also gets ``RLIMIT_CPU``).
    - ``cpus`` (1.0): CPU bandwidth of the whole sandbox, in CPUs: the cgroup cpu quota
      (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on v1, ``cpu.max`` on v2), background
      processes included; ``limits["cpu_bandwidth_enforced"]`` says whether the host has a
      cpu controller to enforce it.
    - ``uid_range`` ((1800000000, 65536)): host uids sandboxes map to; each live sandbox
      holds one of its own (per-user kernel budgets are not shared), reused after close.
    - ``timeout`` (30.0): default wall-clock limit of a call, seconds.
    - ``max_output_bytes`` (1 MiB): bytes kept per stream; head and tail halves are kept.
    - ``disk_bytes`` (256 MiB): size of ``/workspace`` and of ``/tmp`` (each), ``RLIMIT_FSIZE``;
      capped so that files, ``/dev/shm`` and SysV shared memory together leave headroom in
      ``memory_bytes`` (the effective sizes are in ``limits["tmpfs_bytes"]``).
    - ``max_open_files`` (1024): ``RLIMIT_NOFILE``.
    - ``network`` (False): share the host network; False gives a private loopback-only netns.
    - ``image`` (None): a directory used instead of ``/`` as the read-only image
      (its ``usr``, ``bin``, ``lib*`` and a few ``etc`` files).
    - ``env`` (None): extra environment variables (dict of str to str).
    - ``require_landlock`` (True): refuse to start when the kernel cannot enforce landlock.
    - ``snapshot`` (None): a :class:`Snapshot` whose files ``/workspace`` starts with,
      copy-on-write (overlay; writes bounded by ``disk_bytes``).

    :meth:`spawn` starts a background :class:`Process` (a server, a watcher) that outlives the
    call; it dies with the sandbox. Creating a sandbox takes a pre-started spare of the same
    keyword arguments when one is ready, and keeps one ready for the next (``spare=False``:
    always start a new one; :func:`auto_spares` and :func:`keep_spares` set how many; see
    :mod:`dsec.spares`).
    ``CommandLog(path, task=..., trajectory=...).attach(sb)`` records a trajectory's calls and
    replays them on a resumed trajectory (see :mod:`dsec.replay`).

    Use as a context manager or call :meth:`close`. Thread-safe: calls on one sandbox are
    serialised, different sandboxes run in parallel; the GIL is released while waiting.
    """

    def __new__(
        cls, *, snapshot: Snapshot | None = None, spare: bool = True, **kwargs: Any
    ) -> Sandbox:
        if not isinstance(spare, bool):
            raise PolicyError(f"spare must be True or False, got {spare!r}")
        if snapshot is None:
            if not spare or cls is not Sandbox or "_handoff" in kwargs:
                return super().__new__(cls, **kwargs)
            found = _spares.take(kwargs)
            if found is not None:
                return found
            sb = super().__new__(cls, **kwargs)
            _spares.created(kwargs)  # spares for this limit set from now on
            return sb
        if not isinstance(snapshot, Snapshot):
            raise PolicyError(f"snapshot must be a dsec.Snapshot, got {type(snapshot).__name__}")
        snapshot._check_open()
        self = super().__new__(cls, snapshot=snapshot.path, **kwargs)
        self._snapshot = snapshot  # its tree is this sandbox's lower layer: keep it alive
        try:
            snapshot._attach(self)
        except BaseException:
            self.close()
            raise
        return self

    def snapshot(self) -> Snapshot:
        """Freezes ``/workspace`` (directories, files, symlinks, modes) into a :class:`Snapshot`.

        No call runs while it is copied; background processes keep running, so what they
        write meanwhile may or may not be in it. Needs host root (it reads the workspace
        through ``/proc/<pid>/root``).
        """
        return _snapshot.take(self)

    async def exec_async(
        self,
        cmd: str | list[str],
        *,
        timeout: float | None = None,
        stdin: bytes | str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """:meth:`exec` for asyncio: runs in the loop's default executor (GIL released)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: self.exec(cmd, timeout=timeout, stdin=stdin, env=env, cwd=cwd)
        )

    async def run_python_async(
        self, code: str | bytes, *, timeout: float | None = None
    ) -> ExecResult:
        """:meth:`run_python` for asyncio."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.run_python(code, timeout=timeout))


def check() -> dict[str, Any]:
    """Which isolation features this kernel enforces; creates one real sandbox to verify.

    Keys: ``user_ns pid_ns mount_ns net_ns ipc_ns uts_ns cgroup_ns seccomp`` (bool),
    ``landlock_abi`` (int), ``landlock_enforced`` (bool), ``cgroup`` ("v1" | "v2" | None),
    ``controllers`` (dict), ``posture`` (status lines of a sandboxed process), ``enforced``
    (bool: the default policy is enforced), ``problems`` (list of str naming what to change),
    ``hardening`` (dict of bool: the host-dependent protections ``cpu_bandwidth``,
    ``tcp_memory``, ``memory_release``, ``init_oom_protected``) and ``warnings`` (list of str:
    what each missing one weakens).
    """
    return _native.check()


class SandboxPool:
    """A bounded pool of warm sandboxes with back-pressure, reused between users.

    ``acquire()`` blocks while ``size`` sandboxes are in use. ``release(sb)`` resets the
    sandbox (:meth:`Sandbox.reset`: every process killed, ``/workspace``, ``/tmp`` and
    ``/dev/shm`` emptied, System V IPC objects removed; cgroup, namespaces and uid kept) and
    keeps it for the next user, who gets a new handle: the released one reads as closed and
    refuses every call, so nothing passes between users. A sandbox that is broken (its init
    died) or cannot be reset is closed and replaced by a fresh one; one started from a
    ``snapshot`` is closed and forked again (its workspace returns to the snapshot's).
    :meth:`metrics` counts creations, resets, failures and the wait in ``acquire``.
    As a context manager, ``with pool.sandbox() as sb:`` acquires and releases.
    """

    def __init__(self, size: int, **sandbox_kwargs: Any) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size > 4096:
            raise PolicyError(f"size must be an int in [1, 4096], got {size!r}")
        self._size = size
        self._kwargs = sandbox_kwargs
        self._cond = threading.Condition()
        self._idle: deque[Sandbox] = deque()
        self._busy = 0
        self._out: dict[int, Sandbox] = {}
        self._closed = False
        self._counts = {"creations": 0, "resets": 0, "failures": 0, "acquires": 0}
        self._waits: deque[float] = deque(maxlen=4096)
        self._idle.append(self._create())  # validates the kwargs eagerly

    @property
    def size(self) -> int:
        """Maximum number of sandboxes handed out at once."""
        return self._size

    def _create(self) -> Sandbox:
        sb = Sandbox(**self._kwargs)
        with self._cond:
            self._counts["creations"] += 1
        return sb

    def _fail(self) -> None:
        with self._cond:
            self._counts["failures"] += 1

    @staticmethod
    def _alive(sb: Sandbox) -> bool:
        return not sb.closed and os.path.exists(f"/proc/{sb.pid}")

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """Returns a clean sandbox; blocks while ``size`` sandboxes are in use.

        Raises ``TimeoutError`` after ``timeout`` seconds, ``SandboxClosedError`` if closed.
        """
        start = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or self._busy < self._size, timeout=timeout
            )
            if self._closed:
                raise SandboxClosedError("the pool is closed")
            if not ok:
                raise TimeoutError(f"no sandbox became free within {timeout} s")
            self._busy += 1
            idle = list(self._idle)
            self._idle.clear()
        sb = None
        for i, candidate in enumerate(idle):
            if sb is None and self._alive(candidate):
                sb = candidate
                continue
            if sb is None:  # broken while idle: replace it
                candidate.close()
                self._fail()
            else:
                with self._cond:
                    self._idle.extend(idle[i:])
                break
        if sb is None:
            try:
                sb = self._create()
            except BaseException:
                self._fail()
                with self._cond:
                    self._busy -= 1
                    self._cond.notify()
                raise
        with self._cond:
            self._out[id(sb)] = sb
            self._counts["acquires"] += 1
            self._waits.append(time.monotonic() - start)
        return sb

    def _recycle(self, sb: Sandbox) -> Sandbox | None:
        """The sandbox's clean successor for the next user (None: none could be made)."""
        if self._alive(sb) and getattr(sb, "_snapshot", None) is None:
            try:
                sb.reset()
                fresh = Sandbox(_handoff=sb)
                with self._cond:
                    self._counts["resets"] += 1
                return fresh
            except SandboxError:
                pass
        if not self._alive(sb):
            self._fail()
        sb.close()
        try:
            return self._create()
        except SandboxError:
            self._fail()
            return None

    def release(self, sb: Sandbox) -> None:
        """Returns a sandbox: it is reset (or replaced) for the next user; the handle given
        back is closed from then on."""
        with self._cond:
            if self._out.get(id(sb)) is not sb:
                raise PolicyError(f"{sb!r} was not acquired from this pool")
            del self._out[id(sb)]
        fresh = None if self._closed else self._recycle(sb)
        if fresh is None:
            sb.close()
        with self._cond:
            self._busy -= 1
            if fresh is not None and not self._closed:
                self._idle.append(fresh)
                fresh = None
            self._cond.notify()
        if fresh is not None:
            fresh.close()

    def metrics(self) -> dict[str, float]:
        """creations, resets, failures (broken or unresettable sandboxes replaced, failed
        creations), acquires, in_use, idle, and the wait in acquire: queue_wait_p50_ms,
        queue_wait_p99_ms, queue_wait_max_ms (last 4096 acquires)."""
        with self._cond:
            out: dict[str, float] = dict(self._counts)
            out["in_use"], out["idle"] = self._busy, len(self._idle)
            waits = sorted(self._waits)
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            out[f"queue_wait_{name}_ms"] = (
                waits[min(len(waits) - 1, round(q * (len(waits) - 1)))] * 1e3 if waits else 0.0
            )
        out["queue_wait_max_ms"] = waits[-1] * 1e3 if waits else 0.0
        return out

    @contextlib.contextmanager
    def sandbox(self, timeout: float | None = None) -> Iterator[Sandbox]:
        """``with pool.sandbox() as sb:`` acquires a sandbox and releases it afterwards."""
        sb = self.acquire(timeout)
        try:
            yield sb
        finally:
            self.release(sb)

    def close(self) -> None:
        """Closes every idle sandbox; sandboxes in use are closed when released."""
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._cond.notify_all()
        for sb in idle:
            sb.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
