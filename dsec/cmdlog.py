"""The command log: an append-only file of one trajectory's sandbox calls and their results.

A rollout that records its calls through :meth:`CommandLog.attach` can be resumed after a
preemption: a new worker opens the same log on a fresh sandbox started like the first one, and
the calls it repeats get their recorded results back instead of running again (see
:mod:`dsec.replay`).

File format: the line ``dsec-cmdlog/1``, then frames ``u32 length | u32 crc32 | payload``
(little-endian), each payload one msgpack map. The first frame is the header: the log's
identity (``task``, ``trajectory``) and a random ``id``. Every later frame is one record:
``step`` (the call's position in the trajectory, from 0), ``op`` (``exec``, ``run_python``,
``read_file``, ``write_file``, ``spawn``), ``digest`` (SHA-256 of the request, timeout excluded),
``timeout`` (the effective timeout of a command, else None) and either ``result`` or
``error`` (the exception the call raised). A record's checksum is seeded with the header's,
so a record copied in from another log fails it. A record for step ``s`` supersedes every
record of steps ``>= s`` written before it: after a resumed trajectory diverged at step
``s``, the old branch is dead without rewriting the file.

Durability: each record is written with one ``write(2)`` on an ``O_APPEND`` descriptor before
the call returns, so once a call has returned its record survives a crash (SIGKILL, OOM kill)
of the writing process: it is in the kernel's page cache. ``fsync`` decides what survives a
crash of the machine: ``"always"`` (default) syncs after every record, an int ``n`` after every
``n`` records, ``"never"`` leaves it to the kernel; :meth:`CommandLog.close` syncs the rest
unless ``"never"``. A process killed in the middle of a write, or a machine that lost the tail
of the file, leaves a torn last frame (short, failing its checksum, or zero-filled): it is dropped
when the log is opened (``dropped_bytes``) and the file is cut back to the last whole record.
A damaged frame with whole frames after it is not a torn write; opening raises
:class:`LogError` naming its offset. The checksums catch damage, not a forger: keep logs where
sandboxed code cannot write (any host directory). One process writes a log at a time
(``flock``).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

import msgpack

from dsec._native import PolicyError, SandboxError

if TYPE_CHECKING:
    from dsec.replay import LoggedSandbox

FORMAT = "dsec-cmdlog/1"
MAGIC = FORMAT.encode() + b"\n"
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
MAX_RECORD = 1 << 31  # a length beyond this is garbage (a torn or damaged frame)


class LogError(SandboxError):
    """A command log that cannot be used: another task's or trajectory's, damaged, or in use
    by another writer. The message names the file and what is wrong."""


def _frame(payload: bytes, seed: int) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload, seed)) + payload


def _check_fsync(fsync: str | int) -> str | int:
    if fsync in ("always", "never"):
        return fsync
    if isinstance(fsync, int) and not isinstance(fsync, bool) and fsync >= 1:
        return fsync
    raise PolicyError(f'fsync must be "always", "never" or an int >= 1, got {fsync!r}')


def _check_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{field} must be a non-empty str, got {value!r}")
    return value


class CommandLog:
    """The command log of one trajectory at `path`, created if it does not exist.

    ``task`` and ``trajectory`` name what the log belongs to; an existing log written for
    another task or trajectory is refused with :class:`LogError` naming both. ``fsync`` is the
    durability policy (module doc). The records already in the file are what a sandbox
    attached with :meth:`attach` replays; new calls are appended. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        task: str,
        trajectory: str,
        fsync: str | int = "always",
    ) -> None:
        self._path = os.fspath(path)
        self._task = _check_name("task", task)
        self._trajectory = _check_name("trajectory", trajectory)
        self._fsync = _check_fsync(fsync)
        self._lock = threading.Lock()
        self._unsynced = 0
        self._attached = False
        self.dropped_bytes = 0
        """Bytes of a torn tail dropped when the log was opened (0: none)."""
        try:
            self._fd = os.open(
                self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise LogError(f"cannot open command log {self._path!r}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogError(f"command log {self._path!r} is in use by another writer") from None
            self._records = self._load()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    # -- reading -------------------------------------------------------------------------

    def _load(self) -> list[dict[str, Any]]:
        """Reads the file: checks the header, collects the live records, cuts a torn tail."""
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read()
        torn = not data.strip(b"\0")  # empty, or created and lost before its bytes were on disk
        if not torn and not data.startswith(MAGIC[: len(data)]):
            raise LogError(f"{self._path!r} is not a command log (no {FORMAT} magic)")
        header, pos = (None, len(data)) if torn else self._read_frame(data, len(MAGIC), 0)
        if header is None and data[pos:].strip(b"\0"):
            raise LogError(f"command log {self._path!r}: its header is damaged (checksum)")
        if header is None:  # the writer died before its header was whole
            self._write_header(len(data))
            return []
        mine = (self._task, self._trajectory)
        if not isinstance(header, dict):
            header = {}
        theirs = (header.get("task"), header.get("trajectory"))
        if theirs != mine:
            raise LogError(
                f"command log {self._path!r} belongs to task {theirs[0]!r} trajectory "
                f"{theirs[1]!r}, not to task {mine[0]!r} trajectory {mine[1]!r}"
            )
        self._seed = zlib.crc32(data[len(MAGIC) + FRAME.size : pos])
        records: list[dict[str, Any]] = []
        while pos < len(data):
            rec, end = self._read_frame(data, pos, self._seed)
            if rec is None or not self._valid(rec, len(records)):
                if end < len(data) and data[end:].strip(b"\0"):
                    last = records[-1]["step"] if records else None
                    raise LogError(
                        f"command log {self._path!r}: the record at byte {pos} (after step "
                        f"{last}) is damaged (checksum, length or content) and is followed by "
                        f"{len(data) - end} more bytes: the file was changed or corrupted"
                    )
                self.dropped_bytes = len(data) - pos
                os.ftruncate(self._fd, pos)
                self._sync(force=True)
                break
            del records[rec["step"] :]  # a record for step s supersedes steps >= s
            records.append(rec)
            pos = end
        return records

    @staticmethod
    def _read_frame(data: bytes, pos: int, seed: int) -> tuple[Any, int]:
        """(payload decoded, end of frame) or (None, end of the bad frame: len(data) when its
        length cannot be trusted)."""
        if len(data) - pos < FRAME.size:
            return None, len(data)
        length, crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + length
        if length == 0:  # never written (a record is not empty): zeros, or a damaged length
            return None, pos + FRAME.size
        if length > MAX_RECORD or end > len(data):
            return None, len(data)
        payload = data[pos + FRAME.size : end]
        if zlib.crc32(payload, seed) != crc:
            return None, end
        try:
            return msgpack.unpackb(payload, raw=False), end
        except (ValueError, TypeError, msgpack.UnpackException):
            return None, end

    @staticmethod
    def _valid(rec: Any, count: int) -> bool:
        return (
            isinstance(rec, dict)
            and isinstance(rec.get("step"), int)
            and 0 <= rec["step"] <= count
            and isinstance(rec.get("op"), str)
            and isinstance(rec.get("digest"), bytes)
        )

    # -- writing -------------------------------------------------------------------------

    def _write_header(self, size: int) -> None:
        os.ftruncate(self._fd, 0)
        header = {
            "task": self._task,
            "trajectory": self._trajectory,
            "id": secrets.token_hex(16),
            "created": time.time(),
        }
        payload = msgpack.packb(header, use_bin_type=True)
        self._seed = zlib.crc32(payload)
        self._write(MAGIC + _frame(payload, 0))
        self.dropped_bytes = size
        self._sync(force=True)
        if self._fsync != "never":  # the file's name survives a machine crash too
            dir_fd = os.open(os.path.dirname(os.path.abspath(self._path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _write(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view) :]

    def _sync(self, force: bool = False) -> None:
        if self._fsync == "never":
            return
        self._unsynced += 1
        if force or self._fsync == "always" or self._unsynced >= self._fsync:
            os.fsync(self._fd)
            self._unsynced = 0

    def _append(self, record: dict[str, Any]) -> None:
        """Writes one record (the body of a logged call); it supersedes steps >= its step."""
        payload = msgpack.packb(record, use_bin_type=True)
        with self._lock:
            self._check_open()
            self._write(_frame(payload, self._seed))
            self._sync()
            del self._records[record["step"] :]
            self._records.append(record)

    # -- the public surface ----------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def task(self) -> str:
        return self._task

    @property
    def trajectory(self) -> str:
        return self._trajectory

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def records(self) -> list[dict[str, Any]]:
        """The live records in step order (copies): step, op, digest, timeout, result or
        error."""
        with self._lock:
            return [dict(r) for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def attach(self, sandbox: Any) -> LoggedSandbox:
        """A :class:`dsec.LoggedSandbox` that runs calls on `sandbox` through this log:
        recorded calls are replayed, new ones executed and appended. `sandbox` must start as
        the trajectory's first sandbox did (same snapshot or files, same limits). Once per
        log."""
        from dsec.replay import LoggedSandbox

        with self._lock:
            self._check_open()
            if self._attached:
                raise PolicyError(f"command log {self._path!r} is already attached to a sandbox")
            self._attached = True
        return LoggedSandbox(sandbox, self, [dict(r) for r in self._records])

    def _check_open(self) -> None:
        if self._fd < 0:
            raise LogError(f"command log {self._path!r} is closed")

    def close(self) -> None:
        """Syncs records not synced yet (unless ``fsync="never"``) and closes the file.
        Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self._fsync != "never" and self._unsynced:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> CommandLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} records"
        return f"<dsec.CommandLog {self._path!r} task={self._task!r} {state}>"
