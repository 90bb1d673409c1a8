"""Warm spares: sandboxes created ahead of time, so ``dsec.Sandbox()`` does not pay the start
(namespaces, root, cgroups) on the caller's path.

Automatic by default: once a process has created a sandbox with some keyword arguments (a limit
set), one spare of that set is kept, so the next ``dsec.Sandbox(**those)`` takes a live spare
and a background thread starts its replacement. Spares are kept for the four most recently used
limit sets (the oldest set's spares are closed when a fifth comes). :func:`auto_spares` sets
how many per set (0 turns it off), as does the environment variable ``DSEC_AUTO_SPARES``; the
argument ``spare=False`` creates a new sandbox regardless. :func:`keep_spares` keeps ``count``
spares of one limit set explicitly, before its first use and regardless of recent use.

A spare whose init died meanwhile is closed and skipped (counted as a failure); a failed
background start is counted and retried on the next take. Spares belong to the process that
made them (a forked child makes its own). :func:`stop_spares` closes them; they are closed at
interpreter exit too. A spare counts as one idle sandbox: its init, its cgroups, no workload.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import Any

_lock = threading.Lock()
_pools: dict[str, _Spares] = {}  # insertion order = least recently used first
_owner = os.getpid()
AUTO_SETS = 4  # limit sets with automatic spares
_auto: int | None = None  # spares per automatic set; None: from DSEC_AUTO_SPARES (default 1)
_exiting = False  # set at interpreter exit: no spare starts any more


def _key(kwargs: dict[str, Any]) -> str:
    return repr(
        sorted((k, sorted(v.items()) if isinstance(v, dict) else v) for k, v in kwargs.items())
    )


def _check_count(count: object, what: str) -> int:
    from dsec import PolicyError

    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
        raise PolicyError(f"{what} must be an int in [0, 64], got {count!r}")
    return count


def _auto_count() -> int:
    global _auto
    if _auto is None:
        raw = os.environ.get("DSEC_AUTO_SPARES", "1")
        try:
            value: object = int(raw)
        except ValueError:
            value = raw
        _auto = _check_count(value, "DSEC_AUTO_SPARES")
    return _auto


class _Spares:
    def __init__(self, count: int, kwargs: dict[str, Any], auto: bool) -> None:
        self.count = count
        self.kwargs = kwargs
        self.auto = auto
        self.ready: list[Any] = []
        self.starting = 0
        self.stats = {"taken": 0, "made": 0, "failures": 0}
        self.stopped = False

    def fill(self) -> None:
        """Starts background creations until `count` are ready or starting (lock held).

        Not daemon threads: interpreter exit waits for a creation in flight (bounded by the
        start-up timeout) before the exit handler closes the spares, instead of freezing a
        thread in the middle of starting a sandbox."""
        while not (self.stopped or _exiting) and len(self.ready) + self.starting < self.count:
            self.starting += 1
            threading.Thread(target=self._make, name="dsec-spare").start()

    def stop(self) -> list[Any]:
        """Stops replacing; returns the ready spares for the caller to close (lock held)."""
        self.stopped = True
        ready, self.ready = self.ready, []
        return ready

    def _make(self) -> None:
        from dsec import Sandbox

        sb = None
        with contextlib.suppress(Exception):  # counted below; the next take retries
            sb = Sandbox(spare=False, **self.kwargs)
        with _lock:
            self.starting -= 1
            if sb is None:
                self.stats["failures"] += 1
                return
            self.stats["made"] += 1
            if not self.stopped:
                self.ready.append(sb)
                sb = None
        if sb is not None:
            sb.close()


def _close(sandboxes: list[Any]) -> None:
    if os.getpid() == _owner:
        for sb in sandboxes:
            sb.close()


def keep_spares(count: int = 1, **sandbox_kwargs: Any) -> None:
    """Keeps `count` spare sandboxes for exactly these keyword arguments (0 stops)."""
    from dsec import PolicyError, Sandbox

    _check_count(count, "count")
    if "snapshot" in sandbox_kwargs:
        raise PolicyError("spares cannot be kept for sandboxes started from a snapshot")
    if count == 0:
        stop_spares(**sandbox_kwargs)
        return
    Sandbox(spare=False, **sandbox_kwargs).close()  # validates the kwargs now
    with _lock:
        pool = _pools.setdefault(_key(sandbox_kwargs), _Spares(count, dict(sandbox_kwargs), False))
        pool.count, pool.auto, pool.stopped = count, False, False
        pool.fill()


def auto_spares(count: int = 1) -> None:
    """Spares kept automatically for each recently used limit set (0: none; the current
    automatic spares are closed)."""
    global _auto
    _auto = _check_count(count, "count")
    with _lock:
        stale = []
        for key, pool in list(_pools.items()):
            if pool.auto:
                pool.count = count
                if count == 0:
                    stale.extend(_pools.pop(key).stop())
    _close(stale)


def take(kwargs: dict[str, Any]) -> Any | None:
    """A live spare for these kwargs (and a replacement started), or None."""
    if os.getpid() != _owner or not _pools:
        return None
    dead = []
    with _lock:
        key = _key(kwargs)
        pool = _pools.pop(key, None)
        if pool is None:
            return None
        _pools[key] = pool  # most recently used
        found = None
        while pool.ready and found is None:
            sb = pool.ready.pop(0)
            if not sb.closed and os.path.exists(f"/proc/{sb.pid}"):
                found = sb
            else:
                dead.append(sb)
                pool.stats["failures"] += 1
        if found is not None:
            pool.stats["taken"] += 1
        pool.fill()
    _close(dead)
    return found


def created(kwargs: dict[str, Any]) -> None:
    """After a sandbox was created without a spare: keep automatic spares for its limit set
    (and stop those of the least recently used set beyond :data:`AUTO_SETS`)."""
    count = _auto_count()
    if count == 0 or _exiting or os.getpid() != _owner:
        return
    stale = []
    with _lock:
        key = _key(kwargs)
        if key in _pools:
            return
        _pools[key] = pool = _Spares(count, dict(kwargs), True)
        pool.fill()
        auto = [k for k, p in _pools.items() if p.auto]
        for old in auto[: max(0, len(auto) - AUTO_SETS)]:
            stale.extend(_pools.pop(old).stop())
    _close(stale)


def spare_stats(**sandbox_kwargs: Any) -> dict[str, int]:
    """taken, made, failures, ready and starting for this limit set (zeros if none kept)."""
    with _lock:
        pool = _pools.get(_key(sandbox_kwargs))
        if pool is None:
            return {"taken": 0, "made": 0, "failures": 0, "ready": 0, "starting": 0}
        return {**pool.stats, "ready": len(pool.ready), "starting": pool.starting}


def stop_spares(**sandbox_kwargs: Any) -> None:
    """Closes the spares of this limit set (all sets when called without arguments) and
    stops replacing them; one still starting is closed when it is ready. Automatic spares
    start again on the next creation of a sandbox with that limit set."""
    with _lock:
        keys = [_key(sandbox_kwargs)] if sandbox_kwargs else list(_pools)
        ready = []
        for k in keys:
            if k in _pools:
                ready.extend(_pools.pop(k).stop())
    _close(ready)


def _forked() -> None:
    """In a forked child: the parent's spares (and its lock, which another parent thread may
    have held at the fork) stay the parent's; the child starts with none of its own."""
    global _lock, _pools, _owner
    _lock, _pools, _owner = threading.Lock(), {}, os.getpid()


os.register_at_fork(after_in_child=_forked)


def _at_exit() -> None:
    global _exiting
    _exiting = True
    stop_spares()


atexit.register(_at_exit)
