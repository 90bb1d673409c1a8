"""SANDBOX.md §3 B (cases 11-19b) and case 37: filesystem, /proc, /dev, UTS/IPC, the base image.

Plus the positive cases: python3, sh and coreutils work; files persist across calls in one
sandbox and never cross into another.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import textwrap
import threading
from pathlib import Path

import pytest
from sandbox_helpers import (
    HOST_SECRET,
    LIMITS,
    describe,
    find_by_marker,
    gone_or_zombie,
    py_json,
    sh,
    wait_for,
)

import dsec

# In-sandbox prelude: attempt(fn) -> "OK" or the errno name of the OSError it raised.
ATTEMPT = textwrap.dedent(
    """
    import ctypes, errno, json, os
    def attempt(fn, *args):
        try:
            fn(*args)
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return 'OK'
    def write(path, data=b'x'):
        with open(path, 'wb') as f:
            f.write(data)
    def read(path):
        with open(path, 'rb') as f:
            return f.read(64)
    libc = ctypes.CDLL(None, use_errno=True)
    def sc(fn, *args):
        if fn(*args) == -1:
            return errno.errorcode[ctypes.get_errno()]
        return 'OK'
    """
)


def probe(sb: dsec.Sandbox, body: str, **kw) -> dict:
    return py_json(sb, ATTEMPT + textwrap.dedent(body), **kw)


# ------------------------------------------------------------------------- positive cases


def test_python_sh_and_coreutils_work(sandbox):
    result = sh(sandbox, "echo hello | tr a-z A-Z; printf '%s\\n' a b c | wc -l; basename /a/b.txt")
    assert result.exit_code == 0, describe(result)
    assert result.stdout.decode().split() == ["HELLO", "3", "b.txt"]
    result = sandbox.exec(
        ["python3", "-c", "import sys, json; print(json.dumps(sys.version_info[:2]))"]
    )
    assert result.exit_code == 0 and result.stdout.startswith(b"[3, "), describe(result)
    result = sandbox.run_python("print(6 * 7)")
    assert (result.exit_code, result.stdout) == (0, b"42\n"), describe(result)
    result = sandbox.exec("pwd")  # a str runs through /bin/sh -c; cwd defaults to /workspace
    assert (result.exit_code, result.stdout) == (0, b"/workspace\n"), describe(result)


def test_files_persist_across_calls_not_across_sandboxes(make_sandbox):
    first, second = make_sandbox(), make_sandbox()
    assert sh(first, "echo from-exec > /workspace/a.txt && echo tmp > /tmp/b.txt").exit_code == 0
    first.write_file("/workspace/c.txt", b"from-host")
    assert sh(first, "cat /workspace/a.txt /tmp/b.txt /workspace/c.txt").stdout == (
        b"from-exec\ntmp\nfrom-host"
    )
    assert first.read_file("/workspace/a.txt") == b"from-exec\n"
    assert first.run_python("print(open('/workspace/c.txt').read())").stdout == b"from-host\n"
    result = sh(second, "ls -A /workspace /tmp; test ! -e /workspace/a.txt && test ! -e /tmp/b.txt")
    assert result.exit_code == 0, describe(result)
    with pytest.raises(dsec.SandboxError):
        second.read_file("/workspace/c.txt")


# ------------------------------------------------------------------------- §3 B


def test_11_allowed_root_is_readable(sandbox):
    result = sh(sandbox, "ls -l /bin/ | head -n 3 && ls /usr/lib >/dev/null && test -x /bin/sh")
    assert result.exit_code == 0, describe(result)
    assert result.stdout.startswith(b"total"), describe(result)


def test_12_writes_only_inside_writable_roots(sandbox):
    got = probe(
        sandbox,
        """
        print(json.dumps({p: attempt(write, p) for p in (
            '/etc/evil', '/usr/bin/evil', '/usr/lib/evil', '/evil', '/proc/evil',
            '/dev/null', '/workspace/ok', '/tmp/ok')}))
        """,
    )
    assert got == {
        "/etc/evil": "EROFS",
        "/usr/bin/evil": "EROFS",
        "/usr/lib/evil": "EROFS",
        "/evil": "EROFS",
        "/proc/evil": "ENOENT",  # procfs has no regular files to create
        "/dev/null": "OK",
        "/workspace/ok": "OK",
        "/tmp/ok": "OK",
    }
    result = sh(sandbox, "echo x > /etc/passwd")
    assert result.exit_code != 0 and b"Read-only file system" in result.stderr, describe(result)


def test_13_secrets_unreadable(sandbox, tmp_path):
    host_secret = tmp_path / "secret"
    host_secret.write_text(HOST_SECRET)
    host_secret.chmod(0)
    got = probe(
        sandbox,
        f"""
        os.makedirs('/workspace/locked', exist_ok=True)
        write('/workspace/locked/f', b'data'); os.chmod('/workspace/locked/f', 0)
        print(json.dumps({{
            'shadow': attempt(read, '/etc/shadow'),
            'gshadow': attempt(read, '/etc/gshadow'),
            'host_file': attempt(read, {str(host_secret)!r}),
            'host_root_home': attempt(os.listdir, '/root'),
            'mode_000_own_file': attempt(read, '/workspace/locked/f'),
        }}))
        """,
    )
    # The host's shadow files and its other directories are not in the image at all; a mode-000
    # file stays unreadable even for the sandbox's uid 0 (no CAP_DAC_OVERRIDE).
    assert got == {
        "shadow": "ENOENT",
        "gshadow": "ENOENT",
        "host_file": "ENOENT",
        "host_root_home": "ENOENT",
        "mode_000_own_file": "EACCES",
    }
    result = sh(sandbox, f"cat /etc/shadow {host_secret} 2>&1; grep -r {HOST_SECRET} /tmp /etc")
    assert HOST_SECRET.encode() not in result.stdout and b"root:" not in result.stdout


def test_14_symlink_replacement_cannot_redirect_the_file_api(fresh_sandbox):
    """No protected-metadata paths exist in this API; the closest real attack is the sandbox
    swapping a directory the host is about to use for a symlink to a host path."""
    sb = fresh_sandbox
    assert sh(sb, "mkdir /workspace/data").exit_code == 0
    sb.write_file("/workspace/data/notes.txt", b"v1")
    assert sh(sb, "rm -r /workspace/data && ln -s /etc /workspace/data").exit_code == 0
    with pytest.raises(dsec.PathError):
        sb.read_file("/workspace/data/passwd")
    with pytest.raises(dsec.PathError):
        sb.write_file("/workspace/data/dsec-evil", b"x")
    assert not Path("/etc/dsec-evil").exists()
    assert (
        sh(sb, "rm /workspace/data && ln -s ../../../../../../etc /workspace/data").exit_code == 0
    )
    with pytest.raises(dsec.PathError):
        sb.read_file("/workspace/data/hostname")
    with pytest.raises(dsec.PathError):
        sb.write_file("/workspace/data/dsec-evil", b"x")
    assert not Path("/etc/dsec-evil").exists()


MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096


def test_15_read_only_binds_cannot_be_remounted(sandbox):
    got = probe(
        sandbox,
        f"""
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        print(json.dumps({{
            'remount_usr': sc(libc.mount, None, b'/usr', None, {MS_REMOUNT | MS_BIND}, None),
            'remount_root': sc(libc.mount, None, b'/', None, {MS_REMOUNT | MS_BIND}, None),
            'bind_over_etc': sc(libc.mount, b'/workspace', b'/etc', None, {MS_BIND}, None),
            'write_after': attempt(write, '/usr/evil'),
        }}))
        """,
    )
    assert got == {
        "remount_usr": "EPERM",
        "remount_root": "EPERM",
        "bind_over_etc": "EPERM",
        "write_after": "EROFS",
    }
    result = sh(sandbox, "mount -o remount,rw /usr")
    assert result.exit_code != 0, describe(result)


def test_16_tmp_is_an_empty_size_limited_writable_tmpfs(fresh_sandbox):
    got = probe(
        fresh_sandbox,
        """
        st = os.statvfs('/tmp')
        before = sorted(os.listdir('/tmp'))
        print(json.dumps({'entries': before, 'size': st.f_blocks * st.f_frsize,
                          'write': attempt(write, '/tmp/f', b'y' * 4096)}))
        """,
    )
    assert got["entries"] == []
    assert 0 < got["size"] <= LIMITS["disk_bytes"]
    assert got["write"] == "OK"
    mounts = fresh_sandbox.exec(["cat", "/proc/self/mountinfo"]).stdout.decode().splitlines()
    tmp = [line.split(" - ")[1].split()[0] for line in mounts if line.split()[4] == "/tmp"]
    assert tmp and tmp[-1] == "tmpfs", mounts


def test_17_minimal_dev(sandbox):
    got = probe(
        sandbox,
        """
        import stat
        out = {}
        for name in sorted(os.listdir('/dev')):
            st = os.lstat('/dev/' + name)
            if stat.S_ISCHR(st.st_mode):
                out[name] = ['chr', os.major(st.st_rdev), os.minor(st.st_rdev)]
            elif stat.S_ISBLK(st.st_mode):
                out[name] = ['blk']
            elif stat.S_ISLNK(st.st_mode):
                out[name] = ['lnk', os.readlink('/dev/' + name)]
            elif stat.S_ISDIR(st.st_mode):
                out[name] = ['dir', len(os.listdir('/dev/' + name))]
            else:
                out[name] = ['other']
        def full():
            with open('/dev/full', 'wb', buffering=0) as f:
                f.write(b'x')
        out['use:write_full'] = attempt(full)
        out['use:zero'] = read('/dev/zero')[:4].hex()
        out['use:urandom'] = len(read('/dev/urandom'))
        out['use:tty'] = attempt(read, '/dev/tty')
        print(json.dumps(out))
        """,
    )
    devices = {name: v for name, v in got.items() if isinstance(v, list) and v[0] == "chr"}
    assert devices == {
        "null": ["chr", 1, 3],
        "zero": ["chr", 1, 5],
        "full": ["chr", 1, 7],
        "random": ["chr", 1, 8],
        "urandom": ["chr", 1, 9],
        "tty": ["chr", 5, 0],
    }
    others = {name: v for name, v in got.items() if isinstance(v, list) and v[0] != "chr"}
    # Beside the devices only the standard /proc/self/fd links, and /dev/shm: POSIX semaphores
    # (Python multiprocessing locks) need it.
    for name, v in others.items():
        assert (v[0] == "lnk" and name in ("fd", "stdin", "stdout", "stderr")) or (
            v[0] == "dir" and name == "shm"
        ), (name, v)
    assert (got["use:write_full"], got["use:zero"], got["use:urandom"]) == (
        "ENOSPC",
        "00000000",
        64,
    )
    assert got["use:tty"] == "ENXIO"  # no controlling terminal


def test_18_file_api_paths_stay_beneath_the_root(fresh_sandbox):
    sb = fresh_sandbox
    host_hostname = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else None
    for bad in ("../etc/hostname", "/workspace/../../etc/hostname", "/../../../etc/passwd"):
        with pytest.raises(dsec.PathError):
            sb.read_file(bad)
    for bad in ("../evil", "/workspace/../../../tmp/dsec-evil"):
        with pytest.raises(dsec.PathError):
            sb.write_file(bad, b"x")
    assert not Path("/tmp/dsec-evil").exists()
    setup = sh(
        sb,
        "ln -s /etc/hostname /workspace/abs && ln -s ../../../../../etc/hostname /workspace/rel"
        " && ln -s /proc/self/root /workspace/magic",
    )
    assert setup.exit_code == 0, describe(setup)
    for link in (
        "/workspace/abs",
        "/workspace/rel",
        "/workspace/magic/etc/hostname",
        "/proc/self/root/etc/hostname",
        "/proc/1/root/etc/hostname",
    ):
        try:
            data = sb.read_file(link)
        except dsec.PathError:
            continue
        pytest.fail(
            f"read_file({link!r}) escaped the root: {data[:80]!r} (host: {host_hostname!r})"
        )
    # Absolute paths are fine when they stay beneath the root.
    sb.write_file("/workspace/inside.txt", "ok")
    assert sb.read_file("/workspace/inside.txt") == b"ok"


def test_19_fresh_proc_shows_only_sandbox_pids(sandbox):
    host_pid = os.getpid()
    got = probe(
        sandbox,
        f"""
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        cmds = [open(f'/proc/{{p}}/cmdline', 'rb').read().decode(errors='replace') for p in pids
                if os.path.exists(f'/proc/{{p}}/cmdline')]
        print(json.dumps({{'pids': pids, 'cmds': cmds,
                          'host_pid_visible': os.path.exists('/proc/{host_pid}'),
                          'kill_host_pid': attempt(os.kill, {host_pid}, 0),
                          'kill_host_init': attempt(os.kill, {host_pid}, 9)}}))
        """,
    )
    assert max(got["pids"]) < host_pid and len(got["pids"]) < 10, got["pids"]
    assert not any("pytest" in c for c in got["cmds"]), got["cmds"]
    assert got["host_pid_visible"] is False
    assert got["kill_host_pid"] == "ESRCH" and got["kill_host_init"] == "ESRCH"


def test_19a_proc_and_sys_leaks_closed(sandbox):
    got = probe(
        sandbox,
        """
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        os.makedirs('/tmp/cg', exist_ok=True)
        me = int(os.readlink('/proc/self'))  # /proc may belong to an outer pid namespace
        others = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != me]
        def mem(pid):
            open(f'/proc/{pid}/mem', 'rb').close()
        def environ_text(pid):
            with open(f'/proc/{pid}/environ', 'rb') as f:
                return f.read().decode(errors='replace')
        seen_env = []
        for pid in others:
            try:
                seen_env.append(environ_text(pid))
            except OSError:
                pass
        print(json.dumps({
            'proc_sys_write': attempt(write, '/proc/sys/kernel/hostname', b'evil'),
            'sys_write': attempt(write, '/sys/kernel/uevent_helper', b'/evil'),
            'sysrq': attempt(write, '/proc/sysrq-trigger', b'h'),
            'kcore': attempt(read, '/proc/kcore'),
            'other_mem': sorted({attempt(mem, pid) for pid in others}),
            'env_texts': seen_env,
            'mount_cgroup_v1': sc(libc.mount, b'cgroup', b'/tmp/cg', b'cgroup', 0, b'memory'),
            'mount_cgroup2': sc(libc.mount, b'cgroup2', b'/tmp/cg', b'cgroup2', 0, None),
            'mount_proc': sc(libc.mount, b'proc', b'/tmp/cg', b'proc', 0, None),
        }))
        """,
    )
    assert got["proc_sys_write"] in ("EROFS", "EACCES"), got
    assert got["sys_write"] in ("EROFS", "ENOENT", "EACCES"), got
    assert got["sysrq"] in ("EROFS", "EACCES", "ENOENT"), got
    assert got["kcore"] in ("EACCES", "ENOENT", "EPERM"), got
    # No other process of the sandbox (its init, the warm worker) can be read or patched through
    # /proc/<pid>/mem, which needs no ptrace syscall.
    assert got["other_mem"] and set(got["other_mem"]) <= {"EACCES", "EPERM"}, got
    assert not any(HOST_SECRET in text for text in got["env_texts"])
    assert (got["mount_cgroup_v1"], got["mount_cgroup2"], got["mount_proc"]) == ("EPERM",) * 3


IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def test_19b_uts_and_ipc_isolation(sandbox):
    host_name = socket.gethostname()
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    assert shmid >= 0, errno.errorcode[ctypes.get_errno()]
    try:
        got = probe(
            sandbox,
            """
            libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            lines = open('/proc/sysvipc/shm').read().splitlines()[1:]
            print(json.dumps({'sethostname': sc(libc.sethostname, b'evil', 4),
                              'shm_ids': [int(l.split()[1]) for l in lines]}))
            """,
        )
        ipcs = sandbox.exec(["ipcs", "-m"])
    finally:
        libc.shmctl(shmid, IPC_RMID, None)
    assert got["sethostname"] == "EPERM"
    assert shmid not in got["shm_ids"] and got["shm_ids"] == []
    assert ipcs.exit_code == 0 and str(shmid).encode() not in ipcs.stdout.split(), describe(ipcs)
    result = sh(sandbox, "hostname evil")
    assert result.exit_code != 0, describe(result)
    assert socket.gethostname() == host_name


# ------------------------------------------------------------------------- §3 E 37


def test_37_sandbox_cannot_alter_the_image_seen_by_the_next(make_sandbox):
    python = Path("/usr/bin/python3").resolve()
    before = hashlib.sha256(python.read_bytes()).hexdigest()
    first = make_sandbox()
    got = probe(
        first,
        f"""
        write('/workspace/left-behind'); write('/tmp/left-behind')
        print(json.dumps({{
            'overwrite_python': attempt(write, {str(python)!r}, b'#!/bin/sh\\nexit 0\\n'),
            'unlink_env': attempt(os.unlink, '/usr/bin/env'),
            'chmod_sh': attempt(os.chmod, '/bin/sh', 0o777),
            'rename_passwd': attempt(os.rename, '/etc/passwd', '/etc/passwd.old'),
            'add_to_bin': attempt(write, '/usr/bin/python4'),
        }}))
        """,
    )
    # A file bind-mounted into /etc cannot be renamed either (EBUSY rather than EROFS).
    assert got.pop("rename_passwd") in ("EROFS", "EBUSY")
    assert got == {
        "overwrite_python": "EROFS",
        "unlink_env": "EROFS",
        "chmod_sh": "EROFS",
        "add_to_bin": "EROFS",
    }
    first.close()
    second = make_sandbox()
    result = sh(
        second,
        "test ! -e /workspace/left-behind && test ! -e /tmp/left-behind && "
        f"test ! -e /usr/bin/python4 && sha256sum {python}",
    )
    assert result.exit_code == 0, describe(result)
    assert result.stdout.split()[0].decode() == before
    assert hashlib.sha256(python.read_bytes()).hexdigest() == before


def _bounded(fn, limit: float = 20.0):
    """Run fn on a thread; ("hang", None) if it is still running after `limit` seconds."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return "hang", None
    return ("error", box["error"]) if "error" in box else ("value", box["value"])


def test_18_file_api_resists_hostile_files(fresh_sandbox):
    """Files the payload plants for the host-side file API: a FIFO (an open would block the
    caller forever), device nodes (endless reads), links into the read-only image, /proc/1/mem,
    a symlink loop, /proc/self (which must not mean the caller's process)."""
    sb = fresh_sandbox
    python = Path("/usr/bin/python3").resolve()
    before = hashlib.sha256(python.read_bytes()).hexdigest()
    setup = sh(
        sb,
        "cd /workspace && mkfifo fifo && ln -s ../dev/zero zero && ln -s ../proc/1/mem mem"
        f" && ln -s ..{python} python && ln -s loop loop",
    )
    assert setup.exit_code == 0, describe(setup)
    for path in (
        "/workspace/fifo",
        "/dev/zero",
        "/dev/urandom",
        "/workspace/zero",
        "/workspace/mem",
        "/workspace/loop",
        "/proc/1/environ",
        "/proc/1/mem",
    ):
        kind, got = _bounded(lambda p=path: sb.read_file(p))
        assert kind == "error" and isinstance(got, dsec.PathError), (path, kind, got)
    for path in (
        "/workspace/fifo",
        "/workspace/python",
        "/usr/bin/dsec-evil",
        "/etc/passwd",
        "/proc/sys/kernel/hostname",
        "/dev/zero",
    ):
        kind, got = _bounded(lambda p=path: sb.write_file(p, b"evil"))
        assert kind == "error" and isinstance(got, dsec.PathError), (path, kind, got)
    kind, got = _bounded(lambda: sb.read_file("/proc/self/environ"))
    assert kind != "hang"
    assert kind == "error" or HOST_SECRET.encode() not in got, "host environment leaked"
    assert hashlib.sha256(python.read_bytes()).hexdigest() == before
    assert not Path("/usr/bin/dsec-evil").exists()
    assert sb.exec(["echo", "alive"]).stdout == b"alive\n"


def test_37_pool_hands_out_no_state_of_the_previous_user():
    with dsec.SandboxPool(1, **LIMITS) as pool:
        with pool.sandbox() as first:
            done = sh(first, "echo secret > /workspace/answer; echo x > /tmp/x")
            assert done.exit_code == 0, describe(done)
            server = first.spawn(["sleep", "3737.5"])
            pids = wait_for(lambda: find_by_marker(first.pid, "3737.5"), "the background sleep")
        # The pool reuses the sandbox after a reset; the previous handle is dead.
        assert first.closed
        with pytest.raises(dsec.SandboxClosedError):
            server.poll()
        with pool.sandbox() as second:
            assert gone_or_zombie(pids)
            result = sh(second, "test ! -e /workspace/answer && test ! -e /tmp/x && echo clean")
            assert result.stdout == b"clean\n", describe(result)
