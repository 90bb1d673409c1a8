"""SANDBOX.md §3 D (cases 23-28): the seccomp policy.

bubblewrap's try-syscall pattern: programs/try_syscalls.py calls each syscall with a bad pointer,
fd or flag combination. The same program run on the host gives the kernel's answer (EFAULT,
EBADF, EINVAL, ENOTTY...); inside the sandbox the filter must answer first, with EPERM (ENOSYS for
clone3), so a differing errno proves the filter, not the argument, rejected the call.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from sandbox_helpers import (
    PROGRAMS,
    TRY_SYSCALLS,
    describe,
    host_syscall_probe,
    py_json,
    sh,
    syscall_probe,
)

NS = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")
DENIED = [
    "ptrace",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    *(f"clone_new{ns}" for ns in NS if ns != "time"),
    *(f"unshare_new{ns}" for ns in NS),
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "process_vm_readv",
    "process_vm_writev",
    "personality_addr_no_randomize",
    "personality_read_implies_exec",
    "ioctl_tiocsti",
    "ioctl_tiocsti_high_bits",
]


@pytest.fixture(scope="module")
def host_answers():
    return host_syscall_probe()


@pytest.fixture(scope="module")
def sandbox_answers(sandbox):
    return syscall_probe(sandbox)


def warm_probe(sandbox) -> dict[str, str]:
    """The same probes from the warm Python worker (run_python), which must be filtered too."""
    sandbox.write_file("/workspace/.try_syscalls.py", TRY_SYSCALLS)
    code = (
        "import runpy, sys; sys.argv = ['try_syscalls.py']; "
        "runpy.run_path('/workspace/.try_syscalls.py', run_name='__main__')"
    )
    return py_json(sandbox, code, warm=True)


def assert_filtered(name: str, got: dict, host: dict, expected: str = "EPERM") -> None:
    if host[name] == "ENOSYS":
        # This kernel is built without the syscall: nothing to prove beyond the denial itself.
        assert got[name] in (expected, "ENOSYS"), (name, got[name])
        return
    assert got[name] == expected, f"{name}: sandbox {got[name]}, host {host[name]}"
    assert host[name] != expected, (
        f"{name}: host answers {host[name]} too, the probe proves nothing"
    )


def test_23_ptrace_denied(sandbox, sandbox_answers, host_answers):
    assert_filtered("ptrace", sandbox_answers, host_answers)
    result = sandbox.exec(["strace", "-f", "-o", "/dev/null", "/bin/true"])
    assert result.exit_code != 0 and b"Operation not permitted" in result.stderr, describe(result)
    # strace itself works unsandboxed, so the failure above is the sandbox's.
    host = subprocess.run(["strace", "-o", "/dev/null", "/bin/true"], capture_output=True)
    assert host.returncode == 0, host.stderr


@pytest.mark.parametrize("name", [n for n in DENIED if n not in ("ptrace",)])
def test_24_dangerous_syscalls_denied(name, sandbox_answers, host_answers):
    assert_filtered(name, sandbox_answers, host_answers)


def test_24_warm_python_worker_is_filtered_too(sandbox, host_answers):
    got = warm_probe(sandbox)
    for name in DENIED:
        assert_filtered(name, got, host_answers)
    assert_filtered("clone3", got, host_answers, expected="ENOSYS")


def test_25_tiocsti_denied_including_high_bits(sandbox_answers, host_answers):
    # The kernel truncates the request to 32 bits, so (1 << 32) | TIOCSTI is TIOCSTI
    # (CVE-2019-10063): the filter must compare the low 32 bits only.
    assert host_answers["ioctl_tiocsti_high_bits"] == host_answers["ioctl_tiocsti"] == "ENOTTY"
    assert sandbox_answers["ioctl_tiocsti"] == "EPERM"
    assert sandbox_answers["ioctl_tiocsti_high_bits"] == "EPERM"


def test_26_clone3_is_enosys_and_libc_falls_back_to_clone(sandbox, sandbox_answers, host_answers):
    assert_filtered("clone3", sandbox_answers, host_answers, expected="ENOSYS")
    code = textwrap.dedent(
        """
        import json, os, subprocess, threading
        box = []
        t = threading.Thread(target=box.append, args=(1,)); t.start(); t.join()
        out = subprocess.run(['/bin/echo', 'child'], capture_output=True).stdout.decode()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print(json.dumps([box, out, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]))
        """
    )
    assert py_json(sandbox, code) == [[1], "child\n", 7]
    result = sh(sandbox, "sleep 0.01 & wait $!; (true) | cat; echo ok")
    assert (result.exit_code, result.stdout) == (0, b"ok\n"), describe(result)


STACKED = textwrap.dedent(
    """
    import ctypes, errno, json
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    class Insn(ctypes.Structure):
        _fields_ = [('code', ctypes.c_ushort), ('jt', ctypes.c_ubyte), ('jf', ctypes.c_ubyte),
                    ('k', ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.POINTER(Insn))]

    def install(insns):
        arr = (Insn * len(insns))(*[Insn(*i) for i in insns])
        prog = Prog(len(insns), arr)
        if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
            return errno.errorcode[ctypes.get_errno()]
        return 'OK'

    def sc(nr, *args):
        if libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)) == -1:
            return errno.errorcode[ctypes.get_errno()]
        return 'OK'

    LD_NR, JEQ, RET = 0x20, 0x15, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    UNAME, MOUNT, CLONE3 = 63, 165, 435
    out = {'uname_before': sc(UNAME, 1)}
    out['allow_all'] = install([(RET, 0, 0, ALLOW)])
    out['deny_uname'] = install(
        [(LD_NR, 0, 0, 0), (JEQ, 0, 1, UNAME), (RET, 0, 0, ERRNO | errno.ENOTBLK), (RET, 0, 0, ALLOW)]
    )
    out['uname_after'] = sc(UNAME, 1)
    out['mount_after'] = sc(MOUNT, 0, 1, 0, 0, 0)
    out['clone3_after'] = sc(CLONE3, 0, 0)
    status = dict(l.split(':', 1) for l in open('/proc/self/status'))
    out['filters'] = int(status['Seccomp_filters'])
    print(json.dumps(out))
    """
)


def test_27_stacked_filters_compose(sandbox):
    """A payload may add its own filters; the most restrictive answer wins, and an allow-all
    filter stacked on top cannot lift the sandbox's denials."""
    got = py_json(sandbox, STACKED)
    assert got["uname_before"] == "EFAULT"  # uname itself is allowed by the sandbox
    assert (got["allow_all"], got["deny_uname"]) == ("OK", "OK")
    assert got["uname_after"] == "ENOTBLK"
    assert got["mount_after"] == "EPERM"
    assert got["clone3_after"] == "ENOSYS"
    assert got["filters"] >= 3


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, bytes]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: case 28 needs it to build its two payloads")
    out = tmp_path_factory.mktemp("programs")
    binaries = {}
    for name in ("escape_attempts", "harmless"):
        subprocess.run(
            [gcc, "-O1", "-Wall", "-o", str(out / name), str(PROGRAMS / f"{name}.c")], check=True
        )
        binaries[name] = Path(out / name).read_bytes()
    return binaries


def test_28_malicious_binary_blocked_harmless_binary_runs(fresh_sandbox, compiled):
    """The filter answers EPERM rather than killing the process, so the payload can report each
    attempt; the sandbox (and its init, which the payload also tries to kill) keeps working."""
    sb = fresh_sandbox
    assert sh(sb, "mkdir /workspace/bin").exit_code == 0
    for name, data in compiled.items():
        sb.write_file(f"/workspace/bin/{name}", data)
    assert sh(sb, "chmod +x /workspace/bin/*").exit_code == 0
    harmless = sb.exec(["/workspace/bin/harmless"])
    assert harmless.exit_code == 0 and harmless.stdout.startswith(b"hello from pid "), describe(
        harmless
    )
    bad = sb.exec(["/workspace/bin/escape_attempts"])
    outcome = dict(line.split() for line in bad.stdout.decode().splitlines())
    assert outcome.pop("open_init_mem", None) in ("EACCES", "EPERM"), describe(bad)
    assert outcome.pop("mknod_disk", None) in ("EACCES", "EPERM"), describe(bad)  # landlock: EACCES
    assert outcome == {
        "unshare_user_mount": "EPERM",
        "remount_usr_rw": "EPERM",
        "ptrace_attach_init": "EPERM",
        "chroot": "EPERM",
    }, describe(bad)
    assert bad.exit_code == 0, describe(bad)
    assert sh(sb, "kill -9 1; echo still-here").stdout == b"still-here\n"
    assert sb.exec(["/workspace/bin/harmless"]).exit_code == 0
