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
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from dsec import _native
from dsec import snapshot as _snapshot
from dsec._native import (
    ExecResult,
    PathError,
    PolicyError,
    Process,
    SandboxClosedError,
    SandboxError,
    SandboxSetupError,
)
from dsec.snapshot import Snapshot

__all__ = [
    "ExecResult",
    "PathError",
    "PolicyError",
    "Process",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxPool",
    "SandboxSetupError",
    "Snapshot",
    "check",
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
    call; it dies with the sandbox. Use as a context manager or call :meth:`close`. Thread-safe: calls on one sandbox are
    serialised, different sandboxes run in parallel; the GIL is released while waiting.
    """

    def __new__(cls, *, snapshot: Snapshot | None = None, **kwargs: Any) -> Sandbox:
        if snapshot is None:
            return super().__new__(cls, **kwargs)
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
    """A bounded pool of warm sandboxes with back-pressure.

    ``acquire()`` blocks while ``size`` sandboxes are in use; ``release(sb)`` closes the
    returned sandbox and starts a fresh one in its place, so nothing leaks between users.
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
        self._out: set[int] = set()
        self._closed = False
        self._idle.append(Sandbox(**sandbox_kwargs))  # validates the kwargs eagerly

    @property
    def size(self) -> int:
        """Maximum number of sandboxes handed out at once."""
        return self._size

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """Returns a fresh sandbox; blocks while ``size`` sandboxes are in use.

        Raises ``TimeoutError`` after ``timeout`` seconds, ``SandboxClosedError`` if closed.
        """
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or self._busy < self._size, timeout=timeout
            )
            if self._closed:
                raise SandboxClosedError("the pool is closed")
            if not ok:
                raise TimeoutError(f"no sandbox became free within {timeout} s")
            self._busy += 1
            sb = self._idle.popleft() if self._idle else None
        if sb is None:
            try:
                sb = Sandbox(**self._kwargs)
            except BaseException:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify()
                raise
        with self._cond:
            self._out.add(id(sb))
        return sb

    def release(self, sb: Sandbox) -> None:
        """Returns a sandbox: it is closed and replaced by a fresh one (no state leaks)."""
        with self._cond:
            if id(sb) not in self._out:
                raise PolicyError(f"{sb!r} was not acquired from this pool")
            self._out.discard(id(sb))
        sb.close()
        fresh = None
        if not self._closed:
            try:
                fresh = Sandbox(**self._kwargs)
            except SandboxError:
                fresh = None
        with self._cond:
            self._busy -= 1
            if fresh is not None and not self._closed:
                self._idle.append(fresh)
                fresh = None
            self._cond.notify()
        if fresh is not None:
            fresh.close()

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
