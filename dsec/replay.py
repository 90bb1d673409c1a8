"""Replay of a command log: resuming a preempted trajectory without re-running its commands.

``log.attach(sb)`` (:meth:`dsec.CommandLog.attach`) wraps a sandbox in a
:class:`LoggedSandbox` with the calls the agent tools use (``exec``, ``run_python``,
``read_file``, ``write_file``, the async variants, and ``spawn``). Each call is step ``n`` of the
trajectory. While the calls match the log's records step by step (same operation, same
request digest and a compatible timeout), the recorded result is returned (an
:class:`RecordedResult` for commands, the recorded bytes for ``read_file``, the recorded
``PathError`` / ``PolicyError`` / ``OSError`` re-raised) and nothing runs in the sandbox. The
first call that does not match, or that goes past the end of the log, is a divergence: from it
on every call runs for real and is appended to the log (its record supersedes the old branch).

Restoring the state the log implies. The replayed calls did not run, so at the divergence the
sandbox still holds its starting state. Before the divergent call runs, every replayed call
that can change state (``exec``, ``run_python``, ``write_file``; not ``read_file``) is run
again, in order, with the arguments the caller gave, and its result discarded: the sandbox then
holds what the trajectory built so far. This is why the sandbox given to ``attach`` must start
as the first one did (the same snapshot or files, the same limits). A command whose output is
not deterministic (a random number, the time) can leave a different state than the first run
did; such re-runs are counted in ``stats["restore_mismatches"]`` (exit status, signal or output
differ), while the results the caller already saw stay the recorded ones. :meth:`restore` does
the same on demand (before reading the sandbox directly, or before a reward check).

A spawn ends replay. ``spawn`` (a background :class:`dsec.Process`) is a step of the trajectory
like any call (its request digest: the command, ``env`` and ``cwd``), but a live process cannot
be replayed from a record: when a replayed trajectory reaches a spawn, matching its record or
not, it is a divergence. The replayed calls that change state run again in order, the process
is started for real on the restored sandbox, and every later call runs for real and is appended
(the records after the spawn's step are superseded). A log is thus replayed only up to its first
spawn; the spawn's record holds the process's id in the sandbox.

A command's timeout is not part of its digest (a resumed rollout has less time left, so its
calls get other timeouts): a recorded command result is reused when the timeout is the same,
or when the recorded run finished without timing out in less time than the new timeout, that
is, when running it again would have finished too. Otherwise it is a divergence.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from dsec._native import PathError, PolicyError
from dsec.cmdlog import CommandLog

FIELDS = (
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "timed_out",
    "oom_killed",
    "stdout_truncated",
    "stderr_truncated",
    "stdout_total",
    "stderr_total",
    "wall_time",
    "cpu_time",
    "peak_memory",
)
COMMANDS = ("exec", "run_python")
CHANGES_STATE = ("exec", "run_python", "write_file")
RECORDED_ERRORS = (PathError, PolicyError, OSError)  # deterministic failures of a request


class RecordedResult:
    """An :class:`dsec.ExecResult` read back from a command log: the same attributes with the
    values of the run that was recorded (``wall_time`` and ``cpu_time`` included)."""

    __slots__ = FIELDS

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    oom_killed: bool
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_total: int
    stderr_total: int
    wall_time: float
    cpu_time: float
    peak_memory: int

    def __init__(self, fields: dict[str, Any]) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, fields[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RecordedResult is read-only ({name})")

    @property
    def ok(self) -> bool:
        """exit_code == 0 and not timed_out."""
        return self.exit_code == 0 and not self.timed_out

    def __reduce__(self) -> tuple[Any, ...]:
        return RecordedResult, ({name: getattr(self, name) for name in FIELDS},)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r:.80}" for name in FIELDS)
        return f"RecordedResult({shown})"


def _as_bytes(value: Any) -> Any:
    """The bytes a str / bytearray argument stands for (the digest's canonical form)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def _digest(op: str, request: list[Any]) -> bytes:
    try:
        packed = msgpack.packb([op, *request], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PolicyError(f"cannot log this {op} call, an argument is not loggable: {exc}") from exc
    return hashlib.sha256(packed).digest()


def _error_fields(exc: BaseException) -> list[Any]:
    if isinstance(exc, PathError):
        return ["PathError", str(exc)]
    if isinstance(exc, PolicyError):
        return ["PolicyError", str(exc)]
    assert isinstance(exc, OSError)
    name = exc.filename
    name = name if name is None or isinstance(name, (str, bytes)) else os.fspath(name)
    return ["OSError", exc.errno, exc.strerror or str(exc), name]


def _raise_recorded(error: list[Any]) -> None:
    kind = error[0]
    if kind == "PathError":
        raise PathError(error[1])
    if kind == "PolicyError":
        raise PolicyError(error[1])
    _, errno, strerror, filename = error
    raise OSError(errno, strerror, filename) if errno is not None else OSError(strerror)


def _outcome(run: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """(value, None), or (None, the exception) for a deterministic failure; anything else (a
    closed or broken sandbox, Ctrl-C) propagates and is not logged."""
    try:
        return run(), None
    except RECORDED_ERRORS as exc:
        return None, exc


class LoggedSandbox:
    """A sandbox whose calls go through a :class:`dsec.CommandLog` (made by
    :meth:`CommandLog.attach`): replayed from the log while they match it, executed and
    appended from the first divergence on (module doc). Thread-safe: calls are serialised.
    """

    def __init__(self, sandbox: Any, log: CommandLog, records: list[dict[str, Any]]) -> None:
        self._sandbox = sandbox
        self._log = log
        self._records = records
        self._lock = threading.RLock()
        self._step = 0
        self._replaying = True
        self._pending: deque[tuple[str, Callable[[], Any], dict[str, Any]]] = deque()
        self._default_timeout: float | None = None
        self._stats: dict[str, Any] = {
            "replayed": 0,
            "executed": 0,
            "restored": 0,
            "restore_mismatches": 0,
            "diverged_at": None,
        }

    @property
    def sandbox(self) -> Any:
        """The wrapped sandbox (it holds the state the log implies only after :meth:`restore`
        or a divergence)."""
        return self._sandbox

    @property
    def log(self) -> CommandLog:
        return self._log

    @property
    def step(self) -> int:
        """Calls made so far (the next call's step)."""
        return self._step

    @property
    def replaying(self) -> bool:
        """True until the first divergence: the next call is looked up in the log."""
        return self._replaying

    @property
    def stats(self) -> dict[str, Any]:
        """replayed, executed, restored (replayed calls run again at the divergence),
        restore_mismatches, diverged_at (the step of the first call not replayed: a mismatch,
        a spawn, or past the end of the log; None while replaying)."""
        with self._lock:
            return dict(self._stats)

    # -- the calls -------------------------------------------------------------------------

    def exec(
        self,
        cmd: str | list[str] | tuple[str, ...],
        *,
        timeout: float | None = None,
        stdin: bytes | bytearray | str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Any:
        """:meth:`dsec.Sandbox.exec`, replayed or recorded."""
        form = ["sh", cmd] if isinstance(cmd, str) else ["argv", cmd]
        pairs = sorted(env.items()) if isinstance(env, dict) else env
        request = [form, _as_bytes(stdin), pairs, cwd]

        def run() -> Any:
            return self._sandbox.exec(cmd, timeout=timeout, stdin=stdin, env=env, cwd=cwd)

        return self._call("exec", request, timeout, run)

    def run_python(self, code: str | bytes, *, timeout: float | None = None) -> Any:
        """:meth:`dsec.Sandbox.run_python`, replayed or recorded."""
        run = lambda: self._sandbox.run_python(code, timeout=timeout)  # noqa: E731
        return self._call("run_python", [_as_bytes(code)], timeout, run)

    def read_file(self, path: str | os.PathLike[str], *, max_bytes: int | None = None) -> bytes:
        """:meth:`dsec.Sandbox.read_file`, replayed or recorded."""
        run = lambda: bytes(self._sandbox.read_file(path, max_bytes=max_bytes))  # noqa: E731
        return self._call("read_file", [os.fspath(path), max_bytes], None, run)

    def write_file(
        self, path: str | os.PathLike[str], data: bytes | bytearray | str, *, parents: bool = False
    ) -> None:
        """:meth:`dsec.Sandbox.write_file`, replayed or recorded."""
        run = lambda: self._sandbox.write_file(path, data, parents=parents)  # noqa: E731
        self._call("write_file", [os.fspath(path), _as_bytes(data), parents], None, run)

    async def exec_async(self, cmd: str | list[str], **kwargs: Any) -> Any:
        """:meth:`exec` for asyncio (runs in the loop's default executor)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.exec(cmd, **kwargs))

    async def run_python_async(self, code: str | bytes, *, timeout: float | None = None) -> Any:
        """:meth:`run_python` for asyncio."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.run_python(code, timeout=timeout))

    def spawn(
        self,
        cmd: str | list[str] | tuple[str, ...],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Any:
        """:meth:`dsec.Sandbox.spawn`, recorded and always run for real: it ends replay (on the
        restored state) and every later call runs for real (module doc)."""
        form = ["sh", cmd] if isinstance(cmd, str) else ["argv", cmd]
        pairs = sorted(env.items()) if isinstance(env, dict) else env
        run = lambda: self._sandbox.spawn(cmd, env=env, cwd=cwd)  # noqa: E731
        return self._call("spawn", [form, pairs, cwd], None, run, replayable=False)

    def restore(self) -> None:
        """Runs the replayed calls that can change state again, in order (each once), so the
        sandbox holds the state the log implies up to the current step. Done automatically
        before the first divergent call."""
        with self._lock:
            while self._pending:
                op, run, rec = self._pending[0]
                value, error = _outcome(run)
                self._pending.popleft()
                self._stats["restored"] += 1
                if not _same(op, rec, value, error):
                    self._stats["restore_mismatches"] += 1

    # -- replay or record ------------------------------------------------------------------

    def _timeout(self, op: str, timeout: Any) -> float | None:
        if op not in COMMANDS:
            return None
        if timeout is None:
            if self._default_timeout is None:
                self._default_timeout = float(self._sandbox.limits["timeout"])
            return self._default_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise PolicyError(f"timeout must be a number of seconds, got {timeout!r}")
        return float(timeout)

    def _call(
        self,
        op: str,
        request: list[Any],
        timeout: Any,
        run: Callable[[], Any],
        *,
        replayable: bool = True,
    ) -> Any:
        with self._lock:
            self._log._check_open()
            digest = _digest(op, request)
            effective = self._timeout(op, timeout)
            step = self._step
            if self._replaying:
                rec = self._records[step] if step < len(self._records) else None
                if replayable and rec is not None and _matches(rec, op, digest, effective):
                    self._step += 1
                    self._stats["replayed"] += 1
                    if op in CHANGES_STATE:
                        self._pending.append((op, run, rec))
                    return _recorded(rec)
                self._replaying = False
                self._records = []
                self._stats["diverged_at"] = step
            self.restore()  # no-op unless replayed calls are still to be re-run
            value, error = _outcome(run)
            record: dict[str, Any] = {"step": step, "op": op, "digest": digest}
            record["timeout"] = effective
            if error is not None:
                record["error"] = _error_fields(error)
            else:
                record["result"] = _result(op, value)
            self._log._append(record)
            self._step += 1
            self._stats["executed"] += 1
            if error is not None:
                raise error
            return value

    def __repr__(self) -> str:
        mode = "replaying" if self._replaying else "recording"
        return f"<dsec.LoggedSandbox step={self._step} {mode} log={self._log.path!r}>"


def _matches(rec: dict[str, Any], op: str, digest: bytes, timeout: float | None) -> bool:
    if rec["op"] != op or rec["digest"] != digest:
        return False
    if op not in COMMANDS or rec.get("timeout") == timeout:
        return True
    result = rec.get("result")  # else a recorded error: only under the same timeout
    return (
        result is not None
        and timeout is not None
        and not result["timed_out"]
        and result["wall_time"] < timeout
    )


def _result(op: str, value: Any) -> Any:
    """What a record keeps of a call's value."""
    if op in COMMANDS:
        return {f: getattr(value, f) for f in FIELDS}
    if op == "spawn":
        return value.id  # a process is never replayed: its id tells a reader which it was
    return value


def _recorded(rec: dict[str, Any]) -> Any:
    if rec.get("error") is not None:
        _raise_recorded(rec["error"])
    if rec["op"] in COMMANDS:
        return RecordedResult(rec["result"])
    return rec.get("result")


def _same(op: str, rec: dict[str, Any], value: Any, error: BaseException | None) -> bool:
    """Whether a re-run during restore did what the recorded run did (times aside)."""
    if (error is None) != (rec.get("error") is None):
        return False
    if error is not None or op not in COMMANDS:
        return True
    then = rec["result"]
    return all(
        getattr(value, f) == then[f]
        for f in ("exit_code", "signal", "stdout", "stderr", "timed_out")
    )
