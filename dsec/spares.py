"""Warm spares: sandboxes created ahead of time, so ``dsec.Sandbox()`` does not pay the start
(on cgroup v1 hosts mostly the cgroup migration's RCU wait) on the caller's path.

Opt-in per limit set with :func:`keep_spares`: while ``count`` spares are kept for a set of
keyword arguments, ``dsec.Sandbox(**those)`` takes a live spare (already in its cgroup,
namespaces and root built) and a background thread starts its replacement. A spare whose init
died meanwhile is closed and skipped (counted as a failure); a failed background start is
counted and retried on the next take. Spares belong to the process that made them (a forked
child makes its own). :func:`stop_spares` closes them; they are closed at interpreter exit too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import Any

_lock = threading.Lock()
_pools: dict[str, _Spares] = {}
_owner = os.getpid()


def _key(kwargs: dict[str, Any]) -> str:
    return repr(
        sorted((k, sorted(v.items()) if isinstance(v, dict) else v) for k, v in kwargs.items())
    )


class _Spares:
    def __init__(self, count: int, kwargs: dict[str, Any]) -> None:
        self.count = count
        self.kwargs = kwargs
        self.ready: list[Any] = []
        self.starting = 0
        self.stats = {"taken": 0, "made": 0, "failures": 0}
        self.stopped = False

    def fill(self) -> None:
        """Starts background creations until `count` are ready or starting (lock held)."""
        while not self.stopped and len(self.ready) + self.starting < self.count:
            self.starting += 1
            threading.Thread(target=self._make, daemon=True, name="dsec-spare").start()

    def _make(self) -> None:
        from dsec import Sandbox

        sb = None
        with contextlib.suppress(Exception):  # counted below; the next take retries
            sb = Sandbox(_spare=False, **self.kwargs)
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


def keep_spares(count: int = 1, **sandbox_kwargs: Any) -> None:
    """Keeps `count` spare sandboxes for exactly these keyword arguments (0 stops)."""
    from dsec import PolicyError, Sandbox

    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
        raise PolicyError(f"count must be an int in [0, 64], got {count!r}")
    if "snapshot" in sandbox_kwargs:
        raise PolicyError("spares cannot be kept for sandboxes started from a snapshot")
    if count == 0:
        stop_spares(**sandbox_kwargs)
        return
    Sandbox(_spare=False, **sandbox_kwargs).close()  # validates the kwargs now
    with _lock:
        pool = _pools.setdefault(_key(sandbox_kwargs), _Spares(count, dict(sandbox_kwargs)))
        pool.count = count
        pool.stopped = False
        pool.fill()


def take(kwargs: dict[str, Any]) -> Any | None:
    """A live spare for these kwargs (and a replacement started), or None."""
    if os.getpid() != _owner or not _pools:
        return None
    dead = []
    with _lock:
        pool = _pools.get(_key(kwargs))
        if pool is None:
            return None
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
    for sb in dead:
        sb.close()
    return found


def spare_stats(**sandbox_kwargs: Any) -> dict[str, int]:
    """taken, made, failures, ready and starting for this limit set (zeros if none kept)."""
    with _lock:
        pool = _pools.get(_key(sandbox_kwargs))
        if pool is None:
            return {"taken": 0, "made": 0, "failures": 0, "ready": 0, "starting": 0}
        return {**pool.stats, "ready": len(pool.ready), "starting": pool.starting}


def stop_spares(**sandbox_kwargs: Any) -> None:
    """Closes the spares of this limit set (all sets when called without arguments) and
    stops replacing them; one still starting is closed when it is ready."""
    with _lock:
        keys = [_key(sandbox_kwargs)] if sandbox_kwargs else list(_pools)
        pools = [_pools.pop(k) for k in keys if k in _pools]
        ready = []
        for pool in pools:
            pool.stopped = True
            ready.extend(pool.ready)
            pool.ready.clear()
    if os.getpid() == _owner:
        for sb in ready:
            sb.close()


atexit.register(stop_spares)
