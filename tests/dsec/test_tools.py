"""The standard tools (dsec/tools.py): argument validation, and each tool's success, failure,
timeout and truncation rendering in a real sandbox."""

from __future__ import annotations

import json

import jsonschema
import pytest

import dsec
from dsec.tools import TOOL_SCHEMAS, ToolBox, ToolResult, execute, validate_call


@pytest.fixture(scope="module")
def sandbox():
    with dsec.Sandbox(timeout=30, max_output_bytes=64 * 1024) as sb:
        yield sb


@pytest.fixture()
def box(sandbox):
    return ToolBox(sandbox, max_output_chars=2_000, default_timeout=20)


# ------------------------------------------------------------------------------------------------
# Schemas and validation (no sandbox needed)
# ------------------------------------------------------------------------------------------------


def test_schemas_are_openai_functions_with_valid_json_schema():
    names = [t["function"]["name"] for t in TOOL_SCHEMAS]
    assert names == ["bash", "python", "read_file", "write_file"]
    for tool in TOOL_SCHEMAS:
        assert tool["type"] == "function"
        assert tool["function"]["description"]
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
        json.dumps(tool, ensure_ascii=False)  # serialisable as the encoder needs


@pytest.mark.parametrize(
    ("name", "arguments", "kind", "needle"),
    [
        ("rm_rf", "{}", "unknown_tool", "unknown tool 'rm_rf'; available tools: bash, python"),
        ("bash", '{"command": "ls"', "invalid_json", "not valid JSON"),
        ("bash", "[1, 2]", "invalid_json", "must be a JSON object"),
        ("bash", "{}", "invalid_arguments", "'command' is a required property"),
        ("bash", '{"command": 5}', "invalid_arguments", "command: 5 is not of type 'string'"),
        ("bash", '{"command": "ls", "timeout": 0}', "invalid_arguments", "timeout"),
        ("bash", '{"command": "ls", "timeout": 1e9}', "invalid_arguments", "timeout"),
        ("python", '{"code": "1", "cwd": "/"}', "invalid_arguments", "'cwd' was unexpected"),
        ("read_file", '{"path": "a", "offset": 0}', "invalid_arguments", "offset"),
        ("read_file", '{"path": "a", "limit": 1.5}', "invalid_arguments", "limit"),
        ("write_file", '{"path": "a"}', "invalid_arguments", "'content' is a required property"),
    ],
)
def test_invalid_calls_become_error_results(name, arguments, kind, needle):
    result = validate_call(name, arguments)
    assert isinstance(result, ToolResult)
    assert not result.ok and result.error_kind == kind
    assert result.text.startswith("error: ")
    assert needle in result.text


def test_valid_call_returns_arguments():
    assert validate_call("bash", '{"command": "ls", "timeout": 2}') == {
        "command": "ls",
        "timeout": 2,
    }
    assert validate_call("read_file", {"path": "x"}) == {"path": "x"}


def test_toolbox_rejects_bad_options(sandbox):
    with pytest.raises(ValueError, match="max_output_chars"):
        ToolBox(sandbox, max_output_chars=10)
    with pytest.raises(ValueError, match="default_timeout"):
        ToolBox(sandbox, default_timeout=0)


# ------------------------------------------------------------------------------------------------
# In a real sandbox
# ------------------------------------------------------------------------------------------------


def test_bash_success(box):
    r = box.execute("bash", json.dumps({"command": "echo hello; echo warn >&2"}))
    assert r.ok and r.error_kind is None
    lines = r.text.splitlines()
    assert lines[:5] == ["exit code: 0", "stdout:", "hello", "stderr:", "warn"]
    assert lines[5].startswith("time: ") and lines[5].endswith(" s cpu")
    assert r.exec_result.exit_code == 0
    assert r.wall_time > 0


def test_bash_failure(box):
    r = box.execute("bash", {"command": "exit 3"})
    assert not r.ok and r.error_kind == "exit_status"
    assert r.text.splitlines()[:2] == ["exit code: 3", "(no output)"]


def test_bash_timeout(box):
    r = box.execute("bash", {"command": "sleep 30", "timeout": 0.5})
    assert not r.ok and r.error_kind == "timeout"
    assert r.text.startswith("timed out after 0.5 s (the command was killed)")
    assert r.exec_result.timed_out
    assert r.wall_time < 20


def test_bash_output_capped_head_and_tail(box):
    r = box.execute("bash", {"command": "seq 1 5000"})
    assert r.ok and r.truncated
    assert "stdout:\n1\n2\n3\n" in r.text
    assert "characters omitted" in r.text and "5000" in r.text
    assert "[stdout truncated to fit the result]" in r.text
    assert len(r.text) < 2_000 + 300


def test_sandbox_output_limit_is_reported(box):
    r = box.execute("bash", {"command": "head -c 200000 /dev/zero | tr '\\0' a"})
    assert r.exec_result.stdout_truncated
    assert "[stdout truncated by the sandbox output limit; only its head and tail" in r.text


def test_python_success_and_exception(box):
    ok = box.execute("python", {"code": "print(sum(range(10)))"})
    assert ok.ok and ok.text.splitlines()[:3] == ["exit code: 0", "stdout:", "45"]
    bad = box.execute("python", {"code": "raise ValueError('boom')"})
    assert not bad.ok and bad.error_kind == "exit_status"
    assert "ValueError: boom" in bad.text and "stderr:" in bad.text


def test_python_timeout(box):
    r = box.execute("python", {"code": "while True: pass", "timeout": 0.5})
    assert r.error_kind == "timeout" and "timed out after 0.5 s" in r.text


def test_write_then_read(box):
    body = "".join(f"line {i}\n" for i in range(1, 11)) + "東京 <tag>\n"
    w = box.execute("write_file", {"path": "notes.txt", "content": body})
    assert w.ok and w.text == f"wrote {len(body.encode())} bytes to notes.txt"
    full = box.execute("read_file", {"path": "notes.txt"})
    assert full.ok and full.text == body
    part = box.execute("read_file", {"path": "notes.txt", "offset": 3, "limit": 2})
    assert part.text == "line 3\nline 4\n[lines 3-4 of 11; use offset and limit to read more]"
    nested = box.execute("write_file", {"path": "a/b/c.txt", "content": "deep"})
    assert nested.ok and box.execute("read_file", {"path": "a/b/c.txt"}).text == "deep"
    past = box.execute("read_file", {"path": "notes.txt", "offset": 50})
    assert past.text == "[offset 50 is past the end of the file (11 lines)]"
    seen = box.execute("bash", {"command": "tail -n 1 notes.txt"})
    assert "東京 <tag>" in seen.text


def test_read_binary_and_empty(box, sandbox):
    sandbox.write_file("blob.bin", b"\x00\x01\x02")
    assert box.execute("read_file", {"path": "blob.bin"}).text == "binary file (3 bytes); not shown"
    sandbox.write_file("empty.txt", b"")
    assert box.execute("read_file", {"path": "empty.txt"}).text == "(empty file)"


@pytest.mark.parametrize(
    ("tool", "path", "needle"),
    [
        ("read_file", "missing.txt", "No such file"),
        ("read_file", "../../../etc/shadow", "escapes the sandbox root"),
        ("read_file", "/proc/1/root/etc/passwd", "symlink"),
        ("read_file", ".", "directory"),
        ("write_file", "/usr/bin/evil", "read-only"),
        ("write_file", "/usr/lib/new-dir/evil", "Read-only"),
    ],
)
def test_bad_paths_are_tool_errors(box, tool, path, needle):
    r = box.execute(tool, {"path": path, **({"content": "x"} if tool == "write_file" else {})})
    assert not r.ok and r.error_kind == "path_error"
    assert r.text.startswith("error: ") and path in r.text and needle in r.text


def test_module_level_execute(sandbox):
    r = execute(sandbox, "bash", '{"command": "printf x"}', max_output_chars=500)
    assert r.ok and "stdout:\nx" in r.text
