"""Snapshots of a sandbox's ``/workspace`` and copy-on-write forks from them.

``sb.snapshot()`` copies the workspace once (directories, regular files, symlinks and their
modes) into a private host directory; ``Sandbox(snapshot=snap)`` and ``snap.fork(n)`` start
sandboxes whose ``/workspace`` is an overlay with that copy as its read-only lower layer, so
starting one copies nothing and each fork's writes stay its own (bounded by ``disk_bytes``).
A snapshot never changes; it can be used from several threads, saved to a directory and
loaded again (on another machine: a Ray worker), every file checked against the manifest's
SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsec._native import PolicyError, SandboxClosedError, SandboxError

if TYPE_CHECKING:
    from dsec import Sandbox

FORMAT = "dsec-snapshot/1"
MANIFEST = "manifest.json"
TREE = "tree"


def store_dir() -> str:
    """Where private snapshot copies live: ``$DSEC_SNAPSHOT_DIR`` or the temp directory. Its
    file system must support idmapped mounts (tmpfs, ext4, xfs, btrfs)."""
    return os.environ.get("DSEC_SNAPSHOT_DIR") or tempfile.gettempdir()


def _new_private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dsec-snapshot-", dir=store_dir()))


def _entries(tree: Path) -> list[list[Any]]:
    """[path, kind, mode, size, sha256 or link target] of every entry under `tree`, sorted;
    never follows a symlink."""
    out: list[list[Any]] = []
    root_mode = stat.S_IMODE(os.lstat(tree).st_mode)
    out.append([".", "dir", root_mode, 0, ""])
    for dirpath, dirnames, filenames in os.walk(tree, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, tree)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out.append([rel, "dir", mode, 0, ""])
            elif stat.S_ISLNK(st.st_mode):
                out.append([rel, "symlink", 0, 0, os.readlink(full)])
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb", buffering=0) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out.append([rel, "file", mode, st.st_size, h.hexdigest()])
            else:
                out.append([rel, "other", mode, 0, ""])
    out.sort(key=lambda e: e[0])
    return out


def _digest(entries: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


class Snapshot:
    """A frozen copy of a sandbox's ``/workspace``; start sandboxes from it with
    ``dsec.Sandbox(snapshot=snap)`` or ``snap.fork(n)``.

    Made by :meth:`dsec.Sandbox.snapshot` or :meth:`Snapshot.load`, never changed afterwards.
    Its private directory is removed when the snapshot is closed and no sandbox started from
    it is alive any more (each holds a reference), or at interpreter exit.
    """

    def __init__(self, tree: Path, counts: dict[str, int], *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use Sandbox.snapshot() or Snapshot.load(directory)")
        self._tree = tree
        self._counts = dict(counts)
        self._closed = False
        self._lock = threading.Lock()
        self._forks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._finalizer = weakref.finalize(self, shutil.rmtree, tree.parent, True)

    @property
    def path(self) -> str:
        """Host directory of the tree (read-only by convention; never write to it)."""
        return str(self._tree)

    @property
    def files(self) -> int:
        """Regular files in the snapshot."""
        return self._counts["files"]

    @property
    def bytes(self) -> int:
        """Bytes of its regular files."""
        return self._counts["bytes"]

    @property
    def info(self) -> dict[str, int]:
        """Counts: dirs, files, symlinks, bytes, skipped (fifos, sockets, device nodes)."""
        return dict(self._counts)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError("the snapshot is closed")

    def fork(self, n: int, **sandbox_kwargs: Any) -> list[Sandbox]:
        """Starts `n` sandboxes from this snapshot (keyword arguments as for
        :class:`dsec.Sandbox`). Nothing is copied; each fork's writes are its own. If one
        cannot start, those already started are closed and the error is raised."""
        import dsec

        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise PolicyError(f"n must be an int in [1, 4096], got {n!r}")
        if "snapshot" in sandbox_kwargs:
            raise PolicyError("fork() takes no snapshot argument: it forks this snapshot")
        made: list[Sandbox] = []
        try:
            for _ in range(n):
                made.append(dsec.Sandbox(snapshot=self, **sandbox_kwargs))
        except BaseException:
            for sb in made:
                sb.close()
            raise
        return made

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes the snapshot to `directory` (created; must not exist or be empty): the tree
        plus a manifest with every entry's kind, mode, size and SHA-256."""
        self._check_open()
        dest = Path(directory)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise PolicyError(f"directory {str(dest)!r} exists and is not an empty directory")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self._tree, dest / TREE, symlinks=True)
        os.chmod(dest / TREE, os.lstat(self._tree).st_mode)
        entries = _entries(dest / TREE)
        manifest = {
            "format": FORMAT,
            "counts": self._counts,
            "entries": entries,
            "digest": _digest(entries),
        }
        tmp = dest / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, dest / MANIFEST)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Snapshot:
        """Loads a snapshot written by :meth:`save`. The tree is copied into a private
        directory and that copy is checked entry by entry against the manifest (so a later
        change to `directory` cannot reach a fork); a missing, extra or changed entry raises
        ``SandboxError`` naming it."""
        src = Path(directory)
        try:
            manifest = json.loads((src / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{str(src)!r} holds no readable snapshot manifest: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SandboxError(f"{str(src)!r}: not a {FORMAT} snapshot")
        expected = manifest.get("entries")
        if not isinstance(expected, list) or manifest.get("digest") != _digest(expected):
            raise SandboxError(f"{str(src)!r}: the manifest does not match its digest")
        private = _new_private_dir()
        try:
            tree = private / TREE
            shutil.copytree(src / TREE, tree, symlinks=True)
            os.chmod(tree, os.lstat(src / TREE).st_mode)
            found = {e[0]: e for e in _entries(tree)}
            want = {e[0]: e for e in expected}
            for path in sorted(want.keys() | found.keys()):
                if path not in found:
                    raise SandboxError(f"snapshot {str(src)!r}: {path!r} is missing")
                if path not in want:
                    raise SandboxError(f"snapshot {str(src)!r}: {path!r} is not in the manifest")
                if found[path] != want[path]:
                    raise SandboxError(
                        f"snapshot {str(src)!r}: {path!r} was changed (checksum, size, mode "
                        f"or link target differ from the manifest)"
                    )
            counts = manifest.get("counts") or {}
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        return cls(tree, counts, _token=_PRIVATE)

    def _attach(self, sb: Any) -> None:
        """Records a sandbox started from this snapshot (it keeps the snapshot alive)."""
        with self._lock:
            self._check_open()
            self._forks.add(sb)

    def close(self) -> None:
        """No new sandboxes from it; its directory is removed now if every sandbox started
        from it is closed, else once the last of them is gone."""
        with self._lock:
            self._closed = True
            if all(sb.closed for sb in self._forks):
                self._finalizer()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.files} files, {self.bytes} bytes"
        return f"<dsec.Snapshot {state}>"


_PRIVATE = object()


def take(sb: Any) -> Snapshot:
    """Snapshot of `sb`'s /workspace (the body of Sandbox.snapshot)."""
    private = _new_private_dir()
    try:
        tree = private / TREE
        tree.mkdir(mode=0o700)
        counts = sb._export_workspace(str(tree))
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return Snapshot(tree, counts, _token=_PRIVATE)
