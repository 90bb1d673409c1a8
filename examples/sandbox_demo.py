"""A short tour of the dsec sandbox: commands, Python, files, a timeout and a blocked network call.

Run it with `make demo` (or `python examples/sandbox_demo.py`). Every call below runs in a real
sandbox: new namespaces, a read-only image, seccomp, landlock, no capabilities, cgroup limits.
"""

from __future__ import annotations

import dsec


def show(title: str, result: dsec.ExecResult) -> None:
    """Print one call's outcome (long output shortened to its first and last lines) and every
    field of its result."""
    print(f"\n== {title}")
    for stream in ("stdout", "stderr"):
        lines = getattr(result, stream).decode(errors="replace").rstrip().splitlines()
        if len(lines) > 8:
            lines = [*lines[:3], f"... ({len(lines) - 6} more lines) ...", *lines[-3:]]
        if lines:
            print(f"   {stream}: " + "\n           ".join(lines))
    print(
        f"   exit_code={result.exit_code} signal={result.signal} timed_out={result.timed_out} "
        f"oom_killed={result.oom_killed}\n"
        f"   stdout_truncated={result.stdout_truncated} stderr_truncated={result.stderr_truncated}"
        f"\n   wall_time={result.wall_time * 1000:.1f} ms cpu_time={result.cpu_time * 1000:.1f} ms "
        f"peak_memory={result.peak_memory / 2**20:.1f} MiB"
    )


def main() -> None:
    limits = dict(memory_bytes=256 << 20, max_pids=64, timeout=10.0, max_output_bytes=64 << 10)
    with dsec.Sandbox(**limits) as sandbox:
        show(
            "a shell command: root of its own user namespace, an unprivileged uid on the host",
            sandbox.exec("id; pwd"),
        )
        show(
            "Python code, served by a warm interpreter", sandbox.run_python("print(sum(range(10)))")
        )

        sandbox.write_file("/workspace/notes.txt", "written from the host\n")
        show("files persist between calls", sandbox.exec("cat notes.txt; echo more >> notes.txt"))
        print(f"   read back from the host: {sandbox.read_file('/workspace/notes.txt')!r}")

        show(
            "a 0.5 s timeout stops `sleep 30` and its whole tree",
            sandbox.exec("sleep 30", timeout=0.5),
        )
        show(
            "the network is off: connecting out fails",
            sandbox.run_python(
                "import socket\n"
                "try:\n"
                "    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
                "except OSError as exc:\n"
                "    print('blocked:', exc)\n"
            ),
        )
        show("the host is out of reach", sandbox.exec("cat /etc/shadow; ls /root; echo status $?"))
        show("output is capped at 64 KiB, head and tail kept", sandbox.exec("seq 1 100000"))

    try:
        dsec.Sandbox(memory_bytes=0)
    except dsec.PolicyError as exc:
        print(f"\n== bad limits are refused before anything runs\n   PolicyError: {exc}")


if __name__ == "__main__":
    main()
