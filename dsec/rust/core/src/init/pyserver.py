# The warm Python fork server of a dsec sandbox. It runs confined (caps, seccomp, landlock,
# rlimits already applied) as pid 1 of its own pid namespace, reads calls from fd 3 (header
# "<IQQ": code length, timeout ms, cpu seconds; the stdout/stderr pipe ends arrive as
# SCM_RIGHTS), forks one child per call, and after the call kills every other process in its
# namespace, so nothing a call started survives it.
import contextlib
import os
import select
import signal
import socket
import struct
import sys
import traceback

signal.signal(signal.SIGINT, signal.SIG_IGN)
_sock = socket.socket(fileno=3)
_hdr = struct.Struct("<IQQ")


def _recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = _sock.recv(n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf


def _reap():
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _child(code, out, err, cpu):
    os.setsid()
    os.dup2(out, 1)
    os.dup2(err, 2)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, 1 << 16)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if cpu:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    rc = 0
    try:
        exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code is None:
            rc = 0
        elif isinstance(e.code, int):
            rc = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            s.flush()
    os._exit(rc)


def _serve():
    while True:
        msg, fds, _, _ = socket.recv_fds(_sock, _hdr.size, 2)
        if not msg:
            os._exit(0)
        if len(msg) < _hdr.size:
            msg += _recv_exact(_hdr.size - len(msg))
        n, timeout_ms, cpu = _hdr.unpack(msg)
        code = _recv_exact(n) if n else b""
        pid = os.fork()
        if pid == 0:
            try:
                _sock.close()
                _child(code, fds[0], fds[1], cpu)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        timed_out = 0
        pfd = os.pidfd_open(pid)
        ready, _, _ = select.select([pfd], [], [], timeout_ms / 1000.0)
        os.close(pfd)
        if not ready:
            timed_out = 1
            os.kill(-1, signal.SIGKILL)
        _, status, ru = os.wait4(pid, 0)
        _reap()
        cpu_ns = int((ru.ru_utime + ru.ru_stime) * 1e9)
        _sock.sendall(struct.pack("<iBQ", status, timed_out, cpu_ns))


_serve()
