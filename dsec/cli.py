"""`python -m dsec`: run one command in a fresh sandbox, or report which protections this kernel enforces.

    python -m dsec run [--memory 256M] [--pids N] [--timeout S] [--cpu S] [--output BYTES]
                       [--disk 64M] [--files N] [--network] -- CMD [ARG...]
    python -m dsec check

`run` writes the command's stdout and stderr through unchanged, then one summary line to stderr,
and exits with the command's exit code (128 + N when it died from signal N, 124 on timeout).
`check` prints a table of isolation features and exits 1 when the default policy cannot be
enforced, naming the kernel setting to change.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a byte count such as ``512``, ``64K``, ``256M``, ``1G`` or ``1.5GiB`` (binary units)."""
    match = _SIZE_RE.match(text)
    if match is None or ("i" in match.group(3).lower() and not match.group(2)):
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix "
            "(binary units, e.g. 256M or 1G)"
        )
    value = float(match.group(1)) * _SIZE_SCALE[match.group(2).lower()]
    if value < 1 or value != math.floor(value):
        raise ValueError(f"invalid size {text!r}: must be a whole number of bytes >= 1")
    return int(value)


def parse_seconds(text: str) -> float:
    """Parse a positive duration in seconds (``2``, ``0.5``)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: expected seconds, e.g. 10 or 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid duration {text!r}: must be a positive number of seconds")
    return value


def parse_count(text: str) -> int:
    """Parse a positive integer count (``64``)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid count {text!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"invalid count {text!r}: must be >= 1")
    return value


def _argtype(parse):
    """Wrap a parser so argparse reports its message verbatim."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsec", description="Run commands in a dsec sandbox."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,check}")

    run = sub.add_parser(
        "run",
        help="run one command in a fresh sandbox",
        description="Run CMD in a fresh sandbox and exit with its exit code "
        "(128+N for signal N, 124 on timeout).",
    )
    run.add_argument("--memory", type=_argtype(parse_size), help="memory limit, e.g. 256M")
    run.add_argument("--pids", type=_argtype(parse_count), help="maximum number of processes")
    run.add_argument("--timeout", type=_argtype(parse_seconds), help="wall-clock limit, seconds")
    run.add_argument("--cpu", type=_argtype(parse_seconds), help="CPU-time limit, seconds")
    run.add_argument("--output", type=_argtype(parse_size), help="bytes kept per output stream")
    run.add_argument("--disk", type=_argtype(parse_size), help="writable space, e.g. 64M")
    run.add_argument("--files", type=_argtype(parse_count), help="maximum open files")
    run.add_argument("--network", action="store_true", help="allow network access")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command and args")

    sub.add_parser(
        "check",
        help="report which isolation features this kernel enforces",
        description="Print the isolation features this kernel enforces; exit 1 if the default "
        "policy cannot be enforced.",
    )
    return parser


def _sandbox_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the limits given on the command line; the sandbox's defaults apply to the rest."""
    given = {
        "memory_bytes": args.memory,
        "max_pids": args.pids,
        "timeout": args.timeout,
        "cpu_seconds": args.cpu,
        "max_output_bytes": args.output,
        "disk_bytes": args.disk,
        "max_open_files": args.files,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    if args.network:
        kwargs["network"] = True
    return kwargs


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def summary_line(result: Any) -> str:
    """One line describing how the command ended and what it cost."""
    parts = []
    if result.timed_out:
        parts.append("timed out")
    if result.signal is not None:
        try:
            name = signal.Signals(result.signal).name
        except ValueError:
            name = f"signal {result.signal}"
        parts.append(f"killed by {name}")
    elif result.exit_code is not None:
        parts.append(f"exit {result.exit_code}")
    if result.oom_killed:
        parts.append("out of memory")
    parts.append(f"wall {result.wall_time:.3f}s")
    parts.append(f"cpu {result.cpu_time:.3f}s")
    parts.append(f"peak mem {_fmt_bytes(result.peak_memory)}")
    for stream in ("stdout", "stderr"):
        if getattr(result, f"{stream}_truncated"):
            parts.append(f"{stream} truncated")
    return "[dsec] " + ", ".join(parts)


def exit_status(result: Any) -> int:
    """The shell convention: 124 on timeout, 128+N for signal N, else the exit code."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.signal is not None:
        return 128 + int(result.signal)
    return int(result.exit_code)


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dsec

    cmd = list(args.cmd)
    if not cmd:
        parser.error("run: missing command after '--' (e.g. python -m dsec run -- echo hi)")
    try:
        with dsec.Sandbox(**_sandbox_kwargs(args)) as sandbox:
            result = sandbox.exec(cmd)
    except dsec.PolicyError as exc:
        parser.error(f"run: {exc}")
    except dsec.SandboxError as exc:
        print(f"[dsec] sandbox error: {exc}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.stderr and not result.stderr.endswith(b"\n"):
        sys.stderr.buffer.write(b"\n")
    sys.stderr.buffer.flush()
    print(summary_line(result), file=sys.stderr)
    return exit_status(result)


# What to change when a feature is missing, keyed by the name `dsec.check()` reports.
_REMEDIES = {
    "user_ns": "enable user namespaces: sysctl user.max_user_namespaces=15000 (and, on Ubuntu, "
    "kernel.apparmor_restrict_unprivileged_userns=0); kernel option CONFIG_USER_NS",
    "pid_ns": "kernel option CONFIG_PID_NS",
    "mount_ns": "a kernel with mount namespaces (CONFIG_NAMESPACES); in a container, allow unshare",
    "net_ns": "kernel option CONFIG_NET_NS; sysctl user.max_net_namespaces > 0",
    "ipc_ns": "kernel option CONFIG_IPC_NS; sysctl user.max_ipc_namespaces > 0",
    "uts_ns": "kernel option CONFIG_UTS_NS; sysctl user.max_uts_namespaces > 0",
    "cgroup_ns": "kernel option CONFIG_CGROUPS; sysctl user.max_cgroup_namespaces > 0",
    "seccomp": "kernel option CONFIG_SECCOMP_FILTER",
    "landlock_enforced": "enable landlock: add 'landlock' to the lsm= kernel boot parameter "
    "(kernel option CONFIG_SECURITY_LANDLOCK)",
    "cgroup": "mount cgroup v2 with the memory and pids controllers delegated "
    "(cgroup.subtree_control), or cgroup v1 memory and pids hierarchies writable by this user",
}
_CGROUP_DENIED = (
    "give this user a cgroup of its own: run as root, or delegate a subtree (cgroup v2: chown the "
    "directory and its cgroup.procs, enable memory and pids in the parent's cgroup.subtree_control; "
    "cgroup v1: chown a directory in the memory and pids hierarchies)"
)


def remedies(report: dict[str, Any], problems: list[str]) -> list[str]:
    """What to change, one line per missing feature, named after the setting that controls it."""
    out = []
    cgroup_denied = any("cgroup" in p and "ermission denied" in p for p in problems)
    if cgroup_denied:
        out.append(_CGROUP_DENIED)
    for key, remedy in _REMEDIES.items():
        if key not in report or report[key] not in (False, None):
            continue
        if key == "landlock_enforced" and report.get("landlock_abi"):
            if not cgroup_denied:
                out.append(
                    f"landlock is available (ABI {report['landlock_abi']}) but a test sandbox "
                    "could not confirm it is enforced: see the problems above"
                )
            continue
        if key == "cgroup" and cgroup_denied:
            continue
        out.append(f"{_LABELS[key]}: {remedy}")
    return out


_LABELS = {
    "user_ns": "user namespace",
    "pid_ns": "pid namespace",
    "mount_ns": "mount namespace",
    "net_ns": "network namespace",
    "ipc_ns": "ipc namespace",
    "uts_ns": "uts namespace",
    "cgroup_ns": "cgroup namespace",
    "seccomp": "seccomp filter",
    "landlock_abi": "landlock ABI",
    "landlock_enforced": "landlock enforced",
    "cgroup": "cgroup limits",
    "hardening": "host-dependent hardening",
    "enforced": "default policy enforceable",
}


def _fmt_value(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False or value is None:
        return "NO"
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def cmd_check() -> int:
    import dsec

    report = dict(dsec.check())
    problems = [str(p) for p in report.pop("problems", [])]
    warnings = [str(w) for w in report.pop("warnings", [])]
    enforced = bool(report.get("enforced"))
    width = max(len(_LABELS.get(k, k)) for k in report) if report else 0
    print(f"{'feature':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in report.items():
        if key == "enforced":
            continue
        print(f"{_LABELS.get(key, key):<{width}}  {_fmt_value(value)}")
    print(f"{_LABELS['enforced']:<{width}}  {_fmt_value(enforced)}")
    for warning in warnings:
        print(f"note: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    for remedy in remedies(report, problems):
        print(f"to fix: {remedy}", file=sys.stderr)
    if not enforced:
        print("the default sandbox policy cannot be enforced on this host", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command, verbatim (even words that look like options).
    tail: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, tail = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    if args.command == "run":
        args.cmd = list(args.cmd) + tail
    elif tail:
        parser.error(f"check takes no command, got {' '.join(tail)!r}")
    if args.command == "run":
        return cmd_run(args, parser)
    return cmd_check()
