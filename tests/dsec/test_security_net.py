"""SANDBOX.md §3 C (cases 20-22): no network by default, a private loopback, no side channels.

`ping` and `nc` are not installed on these machines: their equivalents are a raw ICMP socket and
a Python / bash `/dev/tcp` TCP connect. curl, wget, ssh and getent are real binaries of the image.
"""

from __future__ import annotations

import secrets
import socket
import textwrap
import threading

import pytest
from sandbox_helpers import describe, host_syscall_probe, py_json, sh, syscall_probe, wait_for

CONNECT = textwrap.dedent(
    """
    import errno, json, socket
    def connect(family, kind, addr, send=False):
        s = socket.socket(family, kind)
        s.settimeout(5)
        try:
            if send:
                s.sendto(b'x', addr)
            else:
                s.connect(addr)
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc))
        finally:
            s.close()
        return 'OK'
    def make(family, kind, proto=0):
        try:
            socket.socket(family, kind, proto).close()
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return 'OK'
    """
)


def host_external_ip() -> str:
    """The host's address on its outbound interface (a documentation address if it has none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("1.1.1.1", 80))
        return probe.getsockname()[0]
    except OSError:
        return "192.0.2.2"
    finally:
        probe.close()


def test_20_outbound_network_blocked(sandbox):
    host_ip = host_external_ip()
    got = py_json(
        sandbox,
        CONNECT
        + textwrap.dedent(
            f"""
            print(json.dumps({{
                'tcp_public': connect(socket.AF_INET, socket.SOCK_STREAM, ('1.1.1.1', 80)),
                'tcp_host_ip': connect(socket.AF_INET, socket.SOCK_STREAM, ({host_ip!r}, 22)),
                'udp_dns': connect(socket.AF_INET, socket.SOCK_DGRAM, ('8.8.8.8', 53), send=True),
                'tcp6': connect(socket.AF_INET6, socket.SOCK_STREAM, ('2606:4700::1111', 80)),
                'raw_icmp': make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                'packet': make(socket.AF_PACKET, socket.SOCK_RAW),
                'interfaces': sorted(l.split(':')[0].strip()
                                     for l in open('/proc/net/dev').readlines()[2:]),
            }}))
            """
        ),
    )
    # TCP connects meet the landlock TCP rules first (EACCES); without them the empty netns
    # answers ENETUNREACH. UDP is not covered by landlock: only the netns stops it.
    assert got["tcp_public"] in ("EACCES", "ENETUNREACH")
    assert got["tcp_host_ip"] in ("EACCES", "ENETUNREACH")
    assert got["udp_dns"] == "ENETUNREACH"
    assert got["tcp6"] in ("EACCES", "ENETUNREACH")
    assert got["raw_icmp"] == "EPERM"  # the `ping` case: no CAP_NET_RAW
    assert got["packet"] == "EPERM"
    assert got["interfaces"] == ["lo"]

    # The real clients fail too, each with its "could not connect" status.
    for cmd, code in (
        ("curl -sS --max-time 5 http://1.1.1.1/", 7),
        ("wget -q -T 5 -t 1 http://1.1.1.1/", 4),
        ("ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no 1.1.1.1 true", 255),
        ("getent ahosts example.com", 2),
    ):
        result = sh(sandbox, cmd, timeout=15)
        assert result.exit_code == code and not result.timed_out, f"{cmd}: {describe(result)}"
    result = sandbox.exec(["bash", "-c", "echo x > /dev/tcp/1.1.1.1/80"], timeout=15)
    assert result.exit_code == 1, describe(result)
    assert b"unreachable" in result.stderr or b"denied" in result.stderr, describe(result)


class HostServers:
    """A TCP server on the host's loopback and a host abstract unix socket, counting accepts."""

    def __init__(self):
        self.accepted = 0
        self.closed = False
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.abstract_name = "\0dsec-test-" + secrets.token_hex(6)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.abstract_name)
        self.unix.listen()
        for sock in (self.tcp, self.unix):
            sock.settimeout(0.2)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        while not self.closed:
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.closed = True
        self.tcp.close()
        self.unix.close()


@pytest.fixture
def host_servers():
    servers = HostServers()
    yield servers
    servers.close()


LOOPBACK_INSIDE = textwrap.dedent(
    """
    import json, multiprocessing, socket
    from multiprocessing.connection import Client, Listener

    def child(port):
        with Client(('127.0.0.1', port), authkey=b'k') as conn:
            conn.send(sum(range(10)))

    srv = socket.create_server(('127.0.0.1', 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(('127.0.0.1', port))
    peer, _ = srv.accept()
    cli.sendall(b'ping')
    tcp = peer.recv(4).decode()
    with Listener(('127.0.0.1', 0), authkey=b'k') as listener:
        proc = multiprocessing.get_context('fork').Process(target=child, args=(listener.address[1],))
        proc.start()
        with listener.accept() as conn:
            mp = conn.recv()
        proc.join()
    print(json.dumps({'tcp': tcp, 'multiprocessing': mp, 'exitcode': proc.exitcode}))
    """
)


def test_21_loopback_works_inside(sandbox):
    for warm in (False, True):
        got = py_json(sandbox, LOOPBACK_INSIDE, warm=warm)
        assert got == {"tcp": "ping", "multiprocessing": 45, "exitcode": 0}, f"warm={warm}"


def test_21_host_loopback_and_abstract_sockets_unreachable(sandbox, host_servers):
    name = host_servers.abstract_name
    got = py_json(
        sandbox,
        CONNECT
        + textwrap.dedent(
            f"""
            print(json.dumps({{
                'host_tcp': connect(socket.AF_INET, socket.SOCK_STREAM,
                                    ('127.0.0.1', {host_servers.port})),
                'host_abstract': connect(socket.AF_UNIX, socket.SOCK_STREAM, {name!r}),
            }}))
            """
        ),
    )
    # The host's loopback is another netns's: nothing listens on the sandbox's own loopback.
    assert got["host_tcp"] == "ECONNREFUSED", got
    assert got["host_abstract"] == "ECONNREFUSED", got
    result = sandbox.exec(["bash", "-c", f"echo x > /dev/tcp/127.0.0.1/{host_servers.port}"])
    assert result.exit_code == 1, describe(result)
    assert b"refused" in result.stderr or b"denied" in result.stderr, describe(result)
    # Sanity check of the servers themselves: reachable from the host.
    socket.create_connection(("127.0.0.1", host_servers.port)).close()
    host_client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_client.connect(name)
    host_client.close()
    wait_for(lambda: host_servers.accepted >= 2, "the host servers to accept the host's connects")
    assert host_servers.accepted == 2  # the two host connections, nothing from the sandbox


def test_22_vsock_and_io_uring_denied(sandbox):
    names = ["socket_vsock", "io_uring_setup", "io_uring_enter", "io_uring_register"]
    host = host_syscall_probe(names)
    got = syscall_probe(sandbox, names)
    # The host kernel has AF_VSOCK and io_uring, so these answers come from the filter.
    assert host["socket_vsock"] == "OK" and host["io_uring_setup"] == "EFAULT"
    assert got["socket_vsock"] in ("EPERM", "EACCES", "EAFNOSUPPORT"), got
    for name in names[1:]:
        assert got[name] in ("EPERM", "ENOSYS"), (name, got)
        assert got[name] != host[name], (name, got, host)
