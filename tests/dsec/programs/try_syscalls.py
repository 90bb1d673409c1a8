"""Issue dangerous syscalls with arguments that make them harmless, print how each one failed.

Usage: python3 try_syscalls.py [NAME ...]   (no names: all)   ->   one JSON object {name: result}
where result is "OK" or the errno name (e.g. "EPERM").

The pattern is bubblewrap's try-syscall: every call gets a bad pointer, a bad fd or an invalid flag
combination, so where the kernel itself handles it the call fails with EFAULT / EBADF / EINVAL /
ENOTTY and has no side effect. A seccomp filter answers before the kernel looks at the arguments,
so a different errno (EPERM, or ENOSYS for clone3) proves the filter rejected the call. Run on the
host to get the unfiltered baseline. Only x86-64 syscall numbers are listed.
"""

import ctypes
import errno
import json
import os
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

BAD = 1  # an unmapped address: any copy from or to it fails with EFAULT

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_THREAD = 0x00010000
CLONE_IO = 0x80000000  # not accepted by unshare: the kernel answers EINVAL after the filter
TIOCSTI = 0x5412
ADDR_NO_RANDOMIZE = 0x0040000
READ_IMPLIES_EXEC = 0x0400000

NAMESPACES = {
    "user": CLONE_NEWUSER,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}


def sc(nr, *args):
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return "OK" if result != -1 else errno.errorcode[ctypes.get_errno()]


def try_socket(family, kind):
    try:
        socket.socket(family, kind).close()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "OK"


def try_personality(flags):
    old = libc.personality(ctypes.c_ulong(0xFFFFFFFF))
    result = sc(135, flags)
    if result == "OK":
        libc.personality(ctypes.c_ulong(old))
    return result


CALLS = {
    "ptrace": lambda: sc(101, 2, -1, BAD, BAD),  # PTRACE_PEEKDATA of no process: ESRCH
    "mount": lambda: sc(165, 0, BAD, 0, 0, 0),
    "umount2": lambda: sc(166, BAD, 0),
    "pivot_root": lambda: sc(155, BAD, BAD),
    "chroot": lambda: sc(161, BAD),
    "setns": lambda: sc(308, -1, 0),
    # clone with CLONE_THREAD but not CLONE_SIGHAND is EINVAL in the kernel: never creates a child.
    **{
        f"clone_new{ns}": (lambda f=f: sc(56, f | CLONE_THREAD, 0, 0, 0, 0))
        for ns, f in NAMESPACES.items()
        if ns != "time"  # only unshare and clone3 take CLONE_NEWTIME; in clone 0x80 is a signal
    },
    **{f"unshare_new{ns}": (lambda f=f: sc(272, f | CLONE_IO)) for ns, f in NAMESPACES.items()},
    "clone3": lambda: sc(435, 0, 0),  # size 0 is EINVAL in the kernel
    "keyctl": lambda: sc(250, 0xFFFF, 0, 0, 0, 0),  # unknown operation: EOPNOTSUPP
    "add_key": lambda: sc(248, BAD, BAD, 0, 0, 0),
    "request_key": lambda: sc(249, BAD, BAD, 0, 0),
    "bpf": lambda: sc(321, 0xFFFF, 0, 0),
    "perf_event_open": lambda: sc(298, BAD, 0, -1, -1, 0),
    "userfaultfd": lambda: sc(323, 0xFFFFFFFF),
    "kexec_load": lambda: sc(246, 0, 0, 0, 0xFFFFFFFF),
    "kexec_file_load": lambda: sc(320, -1, -1, 0, BAD, 0xFFFFFFFF),
    "init_module": lambda: sc(175, BAD, 0, BAD),  # length 0: ENOEXEC, nothing is loaded
    "finit_module": lambda: sc(313, -1, BAD, 0),
    "delete_module": lambda: sc(176, BAD, 0),
    "open_by_handle_at": lambda: sc(304, -1, BAD, 0),
    "process_vm_readv": lambda: sc(310, os.getpid(), BAD, 1, BAD, 1, 0),
    "process_vm_writev": lambda: sc(311, os.getpid(), BAD, 1, BAD, 1, 0),
    "personality_addr_no_randomize": lambda: try_personality(ADDR_NO_RANDOMIZE),
    "personality_read_implies_exec": lambda: try_personality(READ_IMPLIES_EXEC),
    "ioctl_tiocsti": lambda: sc(16, 0, TIOCSTI, BAD),  # stdin is /dev/null: ENOTTY
    "ioctl_tiocsti_high_bits": lambda: sc(16, 0, (1 << 32) | TIOCSTI, BAD),
    "io_uring_setup": lambda: sc(425, 1, BAD),
    "io_uring_enter": lambda: sc(426, -1, 0, 0, 0, 0, 0),
    "io_uring_register": lambda: sc(427, -1, 0, 0, 0),
    "socket_vsock": lambda: try_socket(40, socket.SOCK_STREAM),  # AF_VSOCK
}


def main(names):
    unknown = [n for n in names if n not in CALLS]
    if unknown:
        sys.exit(f"unknown syscall probe(s): {unknown}")
    print(json.dumps({name: CALLS[name]() for name in names or CALLS}))


if __name__ == "__main__":
    main(sys.argv[1:])
