"""Snapshots of /workspace and copy-on-write forks (`Sandbox.snapshot`, `Sandbox(snapshot=)`,
`Snapshot.fork/save/load`). Real sandboxes throughout; leaks are counted from the host."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path

import pytest
from sandbox_helpers import LIMITS, descendants, sandbox_cgroups, wait_for

import dsec

SETUP = (
    "mkdir -p repo/src && echo base > repo/src/a.txt && chmod 640 repo/src/a.txt"
    " && printf '#!/bin/sh\\necho run\\n' > repo/run.sh && chmod 755 repo/run.sh"
    " && ln -s src/a.txt repo/link && mkfifo repo/fifo && mkdir repo/empty && chmod 700 repo/empty"
)


@pytest.fixture(scope="module")
def snap():
    with dsec.Sandbox(**LIMITS) as sb:
        assert sb.exec(SETUP).ok
        s = sb.snapshot()
    yield s
    s.close()


def tree(sb: dsec.Sandbox) -> str:
    return sb.exec("cd repo && find . | sort | xargs stat -c '%n %A %s %N'").stdout.decode()


def test_snapshot_keeps_files_modes_and_symlinks(snap):
    assert snap.info == {"dirs": 3, "files": 2, "symlinks": 1, "bytes": 5 + 19, "skipped": 1}
    with dsec.Sandbox(snapshot=snap, **LIMITS) as sb:
        listing = tree(sb)
        assert "./src/a.txt -rw-r----- 5" in listing
        assert "./run.sh -rwxr-xr-x" in listing
        assert "./empty drwx------" in listing
        assert "'./link' -> 'src/a.txt'" in listing
        assert "fifo" not in listing  # fifos, sockets and devices are left out
        assert sb.exec("repo/run.sh; cat repo/link; stat -c '%u %a' . repo").stdout == (
            b"run\nbase\n0 755\n0 755\n"
        )
        assert sb.read_file("repo/src/a.txt") == b"base\n"


def test_fork_writes_are_invisible_to_siblings_and_to_the_snapshot(snap):
    a, b = snap.fork(2, **LIMITS)
    with a, b:
        assert a.exec("echo A >> repo/src/a.txt && rm repo/run.sh && echo new > repo/new").ok
        a.write_file("repo/src/w.txt", b"api")
        assert b.exec("cat repo/src/a.txt; ls repo").stdout == b"base\nempty\nlink\nrun.sh\nsrc\n"
        assert a.exec("cat repo/src/a.txt; ls repo").stdout == b"base\nA\nempty\nlink\nnew\nsrc\n"
        assert b.exec("test -e repo/src/w.txt").exit_code == 1
    host = Path(snap.path)
    assert (host / "repo/src/a.txt").read_bytes() == b"base\n"
    assert sorted(os.listdir(host / "repo")) == ["empty", "link", "run.sh", "src"]
    # A snapshot of a fork holds the fork's view, and forks again.
    with dsec.Sandbox(snapshot=snap, **LIMITS) as c:
        c.exec("echo C > repo/c.txt")
        with c.snapshot() as s2, dsec.Sandbox(snapshot=s2, **LIMITS) as d:
            assert d.exec("cat repo/c.txt repo/src/a.txt").stdout == b"C\nbase\n"


def test_fork_of_16_shares_one_snapshot_and_leaves_nothing(snap):
    before = sandbox_cgroups()
    forks = snap.fork(16, **LIMITS)
    inits = [sb.pid for sb in forks]
    try:
        for i, sb in enumerate(forks):
            sb.exec(f"echo {i} > repo/mine")
        for i, sb in enumerate(forks):
            assert sb.exec("cat repo/mine repo/src/a.txt").stdout == f"{i}\nbase\n".encode()
    finally:
        for sb in forks:
            sb.close()
    wait_for(lambda: all(not Path(f"/proc/{p}").exists() for p in inits), "fork inits gone")
    assert all(descendants(p) == [] for p in inits)
    wait_for(lambda: sandbox_cgroups() == before, "fork cgroups removed")


def test_fork_writes_stay_within_disk_bytes(snap):
    with dsec.Sandbox(**{**LIMITS, "disk_bytes": 4 << 20}) as sb:
        sb.exec("head -c 3000000 /dev/zero > big")
        big = sb.snapshot()
    with big, dsec.Sandbox(snapshot=big, **{**LIMITS, "disk_bytes": 4 << 20}) as f:
        r = f.exec("head -c 2500000 /dev/zero > m1 && head -c 2500000 /dev/zero > m2")
        assert r.exit_code != 0 and b"No space" in r.stderr, r
        f.exec("rm m1 m2")
        # Copying up a file of the lower layer counts too (1.5 MB + 3 MB > 4 MiB).
        r = f.exec("head -c 1500000 /dev/zero > other && echo x >> big")
        assert r.exit_code != 0 and b"No space" in r.stderr, r


def test_save_load_round_trip_and_tampering(snap, tmp_path):
    saved = tmp_path / "saved"
    snap.save(saved)
    loaded = dsec.Snapshot.load(saved)
    with loaded, dsec.Sandbox(snapshot=loaded, **LIMITS) as sb:
        assert "./src/a.txt -rw-r----- 5" in tree(sb)
        assert sb.exec("cat repo/link").stdout == b"base\n"
    assert loaded.path != snap.path
    with pytest.raises(dsec.PolicyError, match="not an empty directory"):
        snap.save(saved)

    def tampered(change) -> str:
        copy = tmp_path / f"t{len(os.listdir(tmp_path))}"
        snap.save(copy)
        change(copy / "tree", copy)
        with pytest.raises(dsec.SandboxError) as info:
            dsec.Snapshot.load(copy)
        return str(info.value)

    assert "'repo/src/a.txt' was changed" in tampered(
        lambda t, _: (t / "repo/src/a.txt").write_bytes(b"evil\n")
    )
    assert "'repo/run.sh' was changed" in tampered(lambda t, _: os.chmod(t / "repo/run.sh", 0o777))
    assert "'repo/link' was changed" in tampered(
        lambda t, _: ((t / "repo/link").unlink(), (t / "repo/link").symlink_to("/etc/passwd"))
    )
    assert "'repo/extra' is not in the manifest" in tampered(
        lambda t, _: (t / "repo/extra").write_bytes(b"")
    )
    assert "'repo/src/a.txt' is missing" in tampered(lambda t, _: (t / "repo/src/a.txt").unlink())

    def edit_manifest(_t, d):
        m = json.loads((d / "manifest.json").read_text())
        m["entries"][-1][3] += 1
        (d / "manifest.json").write_text(json.dumps(m))

    assert "does not match its digest" in tampered(edit_manifest)
    with pytest.raises(dsec.SandboxError, match="no readable snapshot manifest"):
        dsec.Snapshot.load(tmp_path / "nothing-here")


def test_snapshot_lifetime_and_bad_input(tmp_path):
    store = [p for p in os.listdir(dsec.snapshot.store_dir()) if p.startswith("dsec-snapshot-")]
    sb = dsec.Sandbox(**LIMITS)
    sb.exec("echo v > f")
    s = sb.snapshot()
    sb.close()  # the snapshot does not depend on its source
    with pytest.raises(dsec.SandboxClosedError):
        sb.snapshot()
    fork = dsec.Sandbox(snapshot=s, **LIMITS)
    s.close()
    assert Path(s.path).is_dir()  # a live fork keeps the tree
    assert fork.exec("cat f").stdout == b"v\n"
    with pytest.raises(dsec.SandboxClosedError, match="snapshot is closed"):
        s.fork(1)
    with pytest.raises(dsec.SandboxClosedError):
        dsec.Sandbox(snapshot=s)
    fork.close()
    path = s.path
    del fork, s
    wait_for(
        lambda: gc.collect() >= 0 and not Path(path).exists(), "the snapshot's directory removed"
    )
    left = [p for p in os.listdir(dsec.snapshot.store_dir()) if p.startswith("dsec-snapshot-")]
    assert sorted(left) == sorted(store)
    with pytest.raises(dsec.PolicyError, match=r"snapshot must be a dsec\.Snapshot"):
        dsec.Sandbox(snapshot=str(tmp_path))
    with pytest.raises(TypeError):
        dsec.Snapshot(tmp_path, {})


def test_snapshot_is_usable_from_several_threads(snap):
    results: list[bytes] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for sb in snap.fork(2, **LIMITS):
                with sb:
                    sb.exec(f"echo {i} >> repo/src/a.txt")
                    results.append(sb.exec("cat repo/src/a.txt").stdout)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == sorted(f"base\n{i}\n".encode() for i in range(4) for _ in range(2))
    with pytest.raises(dsec.PolicyError, match="n must be"):
        snap.fork(0)
