"""The run directory: resolved config, msgpack trajectory batches, and ``metrics.jsonl``.

Layout::

    RUN_DIR/
      config.json                    the resolved config (a JSON object), written atomically
      metrics.jsonl                  one JSON object per line, appended and flushed per record
      trajectories/
        batch-00000.msgpack          one file per written batch
        batch-00001.msgpack
        ...

A batch file is a msgpack stream: first a header map, then one map per trajectory
(``Trajectory.to_dict()``)::

    {"schema_version": 1, "format": "dsec-rl/trajectories", "batch": 0, "count": 2,
     "group_ids": ["g0"]}
    {"id": ..., "task": ..., "group_id": "g0", ...}
    {"id": ..., "task": ..., "group_id": "g0", ...}

``schema_version`` is :data:`SCHEMA_VERSION`; a reader refuses a newer version it does not know.
Version history: 1 — the first version (the fields of ``rollout.types.Trajectory``).

Atomicity: a batch is written to a hidden ``*.tmp`` file in the same directory, fsynced, then
renamed into place (``os.replace``), so a crash leaves either the whole batch or a stray ``*.tmp``
file, which every reader ignores. A group is stored exactly once: the store keeps the set of
stored group ids (rebuilt from the batch headers on open, so it survives a restart) and
:meth:`RunStore.write_groups` skips groups already stored. Readers stream: they hold one
trajectory at a time, not a whole file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack

from rollout.types import Trajectory

__all__ = [
    "SCHEMA_VERSION",
    "RunStore",
    "iter_trajectories",
    "read_config",
    "read_metrics",
]

SCHEMA_VERSION = 1
FORMAT = "dsec-rl/trajectories"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TRAJECTORY_DIR = "trajectories"
_BATCH_RE = re.compile(r"^batch-(\d{5,})\.msgpack$")


def _default(obj: Any) -> Any:
    """msgpack hook: numpy arrays and scalars (and tensors) become plain lists and numbers."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store a value of type {type(obj).__name__}: {obj!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temp file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _batch_files(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete batch files of a run, in batch order (``*.tmp`` leftovers are not listed)."""
    tdir = run_dir / TRAJECTORY_DIR
    if not tdir.is_dir():
        return []
    found = []
    for p in tdir.iterdir():
        m = _BATCH_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _check_header(header: Any, path: Path) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trajectory batch file (bad header {header!r:.200})")
    version = header.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r} is not supported "
            f"(this reader knows versions 1..{SCHEMA_VERSION})"
        )
    return header


def _open_batch(path: Path) -> tuple[Any, msgpack.Unpacker, dict[str, Any]]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
    try:
        header = _check_header(next(unpacker), path)
    except StopIteration:
        f.close()
        raise ValueError(f"{path}: empty batch file") from None
    except BaseException:
        f.close()
        raise
    return f, unpacker, header


def _iter_batch(path: Path) -> Iterator[Trajectory]:
    f, unpacker, header = _open_batch(path)
    with f:
        n = 0
        for raw in unpacker:
            try:
                yield Trajectory.from_dict(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: trajectory {n} is invalid: {exc}") from exc
            n += 1
        if n != header.get("count"):
            raise ValueError(f"{path}: header says {header.get('count')} trajectories, found {n}")


def iter_trajectories(run_dir: str | os.PathLike[str]) -> Iterator[Trajectory]:
    """Every stored trajectory of a run, batch by batch, one at a time (streaming)."""
    for _, path in _batch_files(Path(run_dir)):
        yield from _iter_batch(path)


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's resolved config (``{}`` when none was written)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the config must be a JSON object, got {type(config).__name__}")
    return config


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in order. A last line cut off by a crash (no newline,
    not valid JSON) is ignored; any other bad line raises ``ValueError`` naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # the torn tail of an append interrupted by a crash
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i}: a metrics record must be a JSON object")
        records.append(record)
    return records


class RunStore:
    """One run directory, opened for writing (created if missing).

    ``stored_group_ids`` is rebuilt from the batch headers on open, so a store reopened after
    a crash or for ``--resume`` still skips the groups it already holds. One process writes a
    run directory at a time; any number may read it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a directory")
        (self.run_dir / TRAJECTORY_DIR).mkdir(parents=True, exist_ok=True)
        self._group_ids: set[str] = set()
        self._next_batch = 0
        for number, path in _batch_files(self.run_dir):
            f, _, header = _open_batch(path)
            f.close()
            ids = header.get("group_ids")
            if not isinstance(ids, list):
                raise ValueError(f"{path}: header has no group_ids list")
            self._group_ids.update(ids)
            self._next_batch = number + 1

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r}, groups={len(self._group_ids)})"

    @property
    def stored_group_ids(self) -> frozenset[str]:
        """Ids of the groups already stored."""
        return frozenset(self._group_ids)

    @property
    def num_batches(self) -> int:
        """Number of the next batch file (= batches written so far, counting from 0)."""
        return self._next_batch

    def has_group(self, group_id: str) -> bool:
        return group_id in self._group_ids

    # -- config and metrics -------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved config to ``config.json`` (atomically; replaces an older one)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping, got {type(config).__name__}")
        try:
            text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config is not JSON-serialisable: {exc}") from exc
        path = self.run_dir / CONFIG_FILE
        _write_atomic(path, (text + "\n").encode())
        return path

    def read_config(self) -> dict[str, Any]:
        return read_config(self.run_dir)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line of ``metrics.jsonl`` and flush it to disk."""
        if not isinstance(record, Mapping):
            raise ValueError(f"a metrics record must be a mapping, got {type(record).__name__}")
        try:
            line = json.dumps(dict(record), default=_default, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metrics record is not JSON-serialisable: {exc}") from exc
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)

    # -- trajectories -------------------------------------------------------------------------

    def write_groups(self, trajectories: Iterable[Trajectory]) -> list[str]:
        """Store the given trajectories as one batch, whole groups at a time.

        Trajectories are grouped by ``group_id``; a group already stored (by an earlier batch,
        or an earlier process on this directory) is skipped as a whole. Returns the skipped
        group ids, in input order. Writes nothing when every group was skipped. Raises
        ``ValueError`` for a non-Trajectory item or two trajectories of one group with the same
        ``sample_index``.
        """
        groups: dict[str, list[Trajectory]] = {}
        for t in trajectories:
            if not isinstance(t, Trajectory):
                raise ValueError(f"write_groups takes Trajectory objects, got {type(t).__name__}")
            groups.setdefault(t.group_id, []).append(t)
        skipped = [g for g in groups if g in self._group_ids]
        fresh = {g: ts for g, ts in groups.items() if g not in self._group_ids}
        for g, ts in fresh.items():
            seen: set[int] = set()
            for t in ts:
                if t.sample_index in seen:
                    raise ValueError(
                        f"group {g!r} has two trajectories with sample_index {t.sample_index}"
                    )
                seen.add(t.sample_index)
        if not fresh:
            return skipped
        records = [t for ts in fresh.values() for t in ts]
        header = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "batch": self._next_batch,
            "count": len(records),
            "group_ids": list(fresh),
        }
        packer = msgpack.Packer(default=_default, use_bin_type=True)
        chunks = [packer.pack(header)]
        for t in records:
            try:
                chunks.append(packer.pack(t.to_dict()))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"trajectory {t.id!r} cannot be stored: {exc}") from exc
        path = self.run_dir / TRAJECTORY_DIR / f"batch-{self._next_batch:05d}.msgpack"
        _write_atomic(path, b"".join(chunks))
        self._next_batch += 1
        self._group_ids.update(fresh)
        return skipped

    def batch_paths(self) -> list[Path]:
        """The complete batch files, in order."""
        return [p for _, p in _batch_files(self.run_dir)]

    def iter_trajectories(self) -> Iterator[Trajectory]:
        """Every stored trajectory, streaming (see :func:`iter_trajectories`)."""
        return iter_trajectories(self.run_dir)
