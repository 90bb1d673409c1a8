"""`python -m dsec run|check`, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sandbox_helpers import as_nobody

from dsec.cli import parse_count, parse_seconds, parse_size


def dsec_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsec", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def summary(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert lines and lines[-1].startswith("[dsec] "), proc.stderr
    return lines[-1]


def test_run_passes_output_through_and_exits_with_the_code():
    proc = dsec_cli("run", "--", "sh", "-c", "printf 'a\\0b'; printf err >&2; exit 3")
    assert proc.returncode == 3
    assert proc.stdout == b"a\0b"
    assert proc.stderr.startswith(b"err\n[dsec] ")
    line = summary(proc)
    assert "exit 3" in line and "wall " in line and "cpu " in line and "peak mem " in line


def test_run_success_and_options_that_look_like_flags():
    proc = dsec_cli("run", "--pids", "16", "--files", "64", "--", "ls", "-d", "/workspace")
    assert (proc.returncode, proc.stdout) == (0, b"/workspace\n"), proc.stderr
    assert "exit 0" in summary(proc)


def test_run_signal_death_is_128_plus_signal():
    proc = dsec_cli("run", "--", "sh", "-c", "kill -KILL $$")
    assert proc.returncode == 137
    assert "killed by SIGKILL" in summary(proc)


def test_run_timeout_is_124():
    proc = dsec_cli("run", "--timeout", "0.5", "--", "sleep", "30")
    assert proc.returncode == 124
    assert "timed out" in summary(proc)


def test_run_output_cap_and_memory_limit():
    proc = dsec_cli("run", "--output", "1K", "--", "seq", "1", "100000")
    assert proc.returncode == 0
    assert len(proc.stdout) <= 2048 and proc.stdout.startswith(b"1\n2\n")
    assert "stdout truncated" in summary(proc)
    bomb = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))"
    proc = dsec_cli("run", "--memory", "48M", "--", "python3", "-c", bomb)
    assert proc.returncode == 137
    assert "out of memory" in summary(proc)


def test_run_network_flag_is_accepted():
    proc = dsec_cli("run", "--network", "--disk", "8M", "--cpu", "5", "--", "true")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--memory", "12X", "--", "true"], "invalid size '12X'"),
        (["run", "--disk", "0", "--", "true"], "invalid size '0'"),
        (["run", "--timeout", "soon", "--", "true"], "invalid duration 'soon'"),
        (["run", "--pids", "-3", "--", "true"], "invalid count '-3'"),
        (["run"], "missing command"),
        (["run", "--"], "missing command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message):
    proc = dsec_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr.decode(), proc.stderr


def test_size_duration_and_count_parsing():
    assert parse_size("512") == 512
    assert parse_size("64k") == 64 << 10
    assert parse_size("256M") == 256 << 20
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_seconds("0.25") == 0.25
    assert parse_count("7") == 7
    for bad in ("", "M", "1X", "-1M", "0", "0.5", "1.5", "1 GiBs", "1iB"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_seconds(bad)
    with pytest.raises(ValueError, match="invalid count"):
        parse_count("2.5")


def test_check_reports_every_default_protection_enforced():
    proc = dsec_cli("check")
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    for label in (
        "user namespace",
        "network namespace",
        "seccomp filter",
        "landlock ABI",
        "landlock enforced",
        "cgroup limits",
        "default policy enforceable",
    ):
        line = next((line for line in out.splitlines() if line.startswith(label)), None)
        assert line is not None and not line.rstrip().endswith("NO"), (label, out)


def test_check_as_an_unprivileged_user_names_what_to_change():
    argv = as_nobody("-m", "dsec", "check")
    if argv is None:
        pytest.skip("needs root, setpriv and a checkout readable by uid 65534")
    proc = subprocess.run(argv, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    if proc.returncode == 0:
        # A host that delegates cgroups to everyone can sandbox unprivileged callers.
        assert "default policy enforceable  yes" in proc.stdout.decode()
        return
    assert proc.returncode == 1, err
    assert "to fix: " in err and "cannot be enforced" in err, err
    assert "cgroup" in err, err  # on these machines: no cgroup for an unprivileged user
