"""Bad input from the caller: each case raises a clear exception naming the bad value."""

from __future__ import annotations

import math

import pytest

import dsec


@pytest.fixture(scope="module")
def sb():
    with dsec.Sandbox(timeout=20.0) as s:
        yield s


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_bytes", -1),
        ("memory_bytes", 0),
        ("memory_bytes", 1 << 60),
        ("memory_bytes", "512M"),
        ("memory_bytes", 1.5e9),
        ("memory_bytes", True),
        ("max_pids", 0),
        ("max_pids", -5),
        ("max_pids", 10**30),
        ("cpu_seconds", 0),
        ("cpu_seconds", -1.0),
        ("cpu_seconds", math.inf),
        ("timeout", 0),
        ("timeout", -3),
        ("timeout", math.nan),
        ("timeout", 10**9),
        ("timeout", "30"),
        ("max_output_bytes", 0),
        ("max_output_bytes", 1 << 40),
        ("max_output_bytes", 512 << 20),
        ("disk_bytes", 10),
        ("max_open_files", 1),
        ("max_open_files", 1 << 40),
        ("network", "yes"),
        ("network", 1),
        ("env", ["A=1"]),
        ("env", {"A=B": "1"}),
        ("env", {"": "1"}),
        ("env", {"A": "x\x00y"}),
        ("env", {"A": 1}),
        ("image", "relative/dir"),
        ("require_landlock", "no"),
    ],
)
def test_invalid_limits_raise_policy_error_naming_the_field(field, value):
    with pytest.raises(dsec.PolicyError, match=field) as info:
        dsec.Sandbox(**{field: value})
    assert isinstance(info.value, ValueError)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        dsec.Sandbox(memory=1 << 30)


def test_missing_image_is_a_setup_error():
    with pytest.raises(dsec.SandboxSetupError, match="no-such-image"):
        dsec.Sandbox(image="/no-such-image")


@pytest.mark.parametrize(
    ("cmd", "needle"),
    [
        ("echo a\x00b", "cmd"),
        (["echo", "a\x00b"], r"cmd\[1\]"),
        (["echo", "\udcff"], r"cmd\[1\]"),
        (["echo", b"\xff\xfe"], r"cmd\[1\]"),
        ([], "cmd"),
        (42, "cmd"),
        (["echo", 3], r"cmd\[1\]"),
    ],
)
def test_bad_commands(sb, cmd, needle):
    with pytest.raises(dsec.PolicyError, match=needle):
        sb.exec(cmd)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"env": {"K": "a\x00"}}, "env"),
        ({"env": {"K=V": "a"}}, "env"),
        ({"cwd": "a\x00b"}, "cwd"),
        ({"stdin": 12}, "stdin"),
        ({"stdin": "\udcff"}, "stdin"),
    ],
)
def test_bad_call_arguments(sb, kw, needle):
    with pytest.raises(dsec.PolicyError, match=needle):
        sb.exec("true", **kw)


def test_bad_python_arguments(sb):
    with pytest.raises(dsec.PolicyError, match="code"):
        sb.run_python(123)
    with pytest.raises(dsec.PolicyError, match="timeout"):
        sb.run_python("pass", timeout=-1)


@pytest.mark.parametrize("path", ["a\x00b", "", "../escape", "/workspace/../../etc/passwd", 7])
def test_bad_paths_raise_path_error(sb, path):
    with pytest.raises(dsec.PathError):
        sb.read_file(path)
    with pytest.raises(dsec.PathError):
        sb.write_file(path, b"x")


def test_path_error_names_the_path(sb):
    with pytest.raises(dsec.PathError, match="escape-me"):
        sb.read_file("../../escape-me")
    with pytest.raises(dsec.PathError, match="read-only"):
        sb.write_file("/usr/evil", b"x")
    with pytest.raises(dsec.PathError, match="directory"):
        sb.read_file("/workspace")


def test_bad_file_data(sb):
    with pytest.raises(dsec.PolicyError, match="data"):
        sb.write_file("x", 3.5)


def test_huge_stdin_is_streamed_without_deadlock(sb):
    data = b"x" * (48 << 20)
    r = sb.exec("wc -c", stdin=data)
    assert r.exit_code == 0 and r.stdout.strip() == str(len(data)).encode()
    # A program that never reads its stdin returns promptly.
    r = sb.exec("true", stdin=data)
    assert r.exit_code == 0 and not r.timed_out


def test_huge_output_and_file_round_trip(sb):
    blob = bytes(range(256)) * (16 << 10)  # 4 MiB
    sb.write_file("blob.bin", blob)
    assert sb.read_file("blob.bin") == blob


def test_disk_limit_is_a_path_error_not_a_crash():
    with dsec.Sandbox(disk_bytes=1 << 20) as s:
        with pytest.raises(dsec.PathError, match=r"space|large"):
            s.write_file("big", b"x" * (2 << 20))
        assert s.exec("echo still alive").stdout == b"still alive\n"


def test_closed_sandbox_raises_closed_error():
    s = dsec.Sandbox()
    s.close()
    with pytest.raises(dsec.SandboxClosedError):
        s.exec("true")
    with pytest.raises(dsec.SandboxClosedError):
        s.run_python("pass")
    with pytest.raises(dsec.SandboxClosedError):
        s.write_file("x", "y")


def test_pool_arguments():
    for bad in (0, -1, "2", True, 10**6):
        with pytest.raises(dsec.PolicyError, match="size"):
            dsec.SandboxPool(bad)
    with pytest.raises(dsec.PolicyError, match="memory_bytes"):
        dsec.SandboxPool(1, memory_bytes=-1)
    with dsec.SandboxPool(1) as pool:
        stranger = dsec.Sandbox()
        with pytest.raises(dsec.PolicyError, match="not acquired"):
            pool.release(stranger)
        stranger.close()
