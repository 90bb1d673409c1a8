"""The standard agent tools, run in a sandbox: ``bash``, ``python``, ``read_file``, ``write_file``.

Each tool is an OpenAI function with a JSON Schema (:data:`TOOL_SCHEMAS`, usable as ``tools=`` of
``policy.chat.encode``). :class:`ToolBox` validates a call's arguments against the schema, runs
it through the public :class:`dsec.Sandbox` API and renders the outcome as the text the model
sees in its next ``<tool_result>``. A tool error (unknown tool, arguments that are not a JSON
object, a schema violation, a path outside the sandbox, a refused operation, a timeout, a
non-zero exit) comes back as a :class:`ToolResult` with ``ok=False`` and an ``error_kind``; it is
never raised. A sandbox that can no longer work (closed, failed set-up: any other
:class:`dsec.SandboxError`) is raised, so that the rollout can drop the trajectory.

Rendering of a command's outcome (``bash`` and ``python``)::

    exit code: 0                          (or: killed by signal 9 / timed out after 5 s /
                                           out of memory, plus the exit code when there is one)
    stdout:
    <text>
    [stdout truncated: ...]               (when the sandbox or the character cap cut it)
    stderr:
    <text>
    time: 0.012 s wall, 0.010 s cpu

Streams are decoded as UTF-8 (invalid bytes become U+FFFD); an empty stream is left out, and a
run with no output at all says ``(no output)``. Each stream is capped at ``max_output_chars``
characters, keeping the head and the tail.

``read_file`` takes ``offset`` (first line, counted from 1, default 1) and ``limit`` (number of
lines, default ``read_limit_lines``); lines are returned verbatim, followed by a note
``[lines A-B of N; ...]`` when the file has more lines than were shown. A file containing NUL
bytes is reported as binary and not shown. ``write_file`` writes UTF-8 text, replacing the file
and creating missing parent directories (``mkdir -p`` in the sandbox).

This module uses only the public ``dsec`` API and the standard library plus ``jsonschema``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

import dsec

__all__ = ["TOOL_SCHEMAS", "ToolBox", "ToolResult", "execute", "validate_call"]

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command (/bin/sh -c) in the sandbox and return its exit "
            "code, stdout and stderr. State (files, working directory contents) persists "
            "between calls; the network is off.",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line to run."},
                    "timeout": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": MAX_TIMEOUT,
                        "description": f"Seconds before the command is killed "
                        f"(default {DEFAULT_TIMEOUT:g}).",
                    },
                },
                "required": ["command"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run a Python program in the sandbox and return its exit code, "
            "stdout and stderr. Print what you want to see.",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The Python source to run."},
                    "timeout": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": MAX_TIMEOUT,
                        "description": f"Seconds before the program is killed "
                        f"(default {DEFAULT_TIMEOUT:g}).",
                    },
                },
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file from the sandbox, optionally a range of lines.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path of the file."},
                    "offset": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "First line to return, counted from 1 (default 1).",
                    },
                    "limit": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Maximum number of lines to return.",
                    },
                },
                "required": ["path"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write text to a file in the sandbox, replacing its contents.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path of the file."},
                    "content": {"type": "string", "description": "The full new contents."},
                },
                "required": ["path", "content"],
                "additionalProperties": False,
            },
        },
    },
]

_VALIDATORS = {
    t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"])
    for t in TOOL_SCHEMAS
}


@dataclass(frozen=True)
class ToolResult:
    """Outcome of one tool call.

    ``text`` is what the model sees. ``error_kind`` is None on success, else one of
    ``"unknown_tool"``, ``"invalid_json"``, ``"invalid_arguments"``, ``"path_error"``,
    ``"policy_error"``, ``"timeout"``, ``"oom"``, ``"exit_status"`` (non-zero exit or a signal).
    ``exec_result`` is the sandbox's ``ExecResult`` for ``bash`` and ``python``; ``wall_time`` is
    the seconds the whole call took, validation included.
    """

    name: str
    text: str
    ok: bool
    error_kind: str | None = None
    arguments: dict[str, Any] | None = None
    exec_result: Any = None
    truncated: bool = False
    wall_time: float = 0.0


def _error(name: str, kind: str, message: str, arguments: dict | None = None) -> ToolResult:
    return ToolResult(
        name=name, text=f"error: {message}", ok=False, error_kind=kind, arguments=arguments
    )


def validate_call(name: str, arguments: str | Mapping[str, Any]) -> dict[str, Any] | ToolResult:
    """The argument dict of a well-formed call, or the error :class:`ToolResult` to return.

    ``arguments`` is the JSON object string of a parsed tool call, or a dict."""
    if name not in _VALIDATORS:
        known = ", ".join(_VALIDATORS)
        return _error(name, "unknown_tool", f"unknown tool {name!r}; available tools: {known}")
    if isinstance(arguments, str):
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return _error(name, "invalid_json", f"arguments are not valid JSON ({exc.msg})")
    else:
        args = copy.deepcopy(dict(arguments)) if isinstance(arguments, Mapping) else arguments
    if not isinstance(args, dict):
        return _error(name, "invalid_json", "arguments must be a JSON object")
    problems = sorted(_VALIDATORS[name].iter_errors(args), key=lambda e: list(e.absolute_path))
    if problems:
        msgs = []
        for p in problems[:3]:
            where = "/".join(str(x) for x in p.absolute_path)
            msgs.append(f"{where}: {p.message}" if where else p.message)
        return _error(
            name, "invalid_arguments", f"invalid arguments for {name}: " + "; ".join(msgs), args
        )
    return args


def _cap(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail of ``text`` within ``limit`` characters."""
    if len(text) <= limit:
        return text, False
    head = limit // 2
    tail = limit - head
    omitted = len(text) - limit
    return (
        f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[len(text) - tail :]}",
        True,
    )


def _status_line(res: Any, timeout: float) -> tuple[str, str | None]:
    if res.timed_out:
        return f"timed out after {timeout:g} s (the command was killed)", "timeout"
    if res.oom_killed:
        return "out of memory (the command was killed)", "oom"
    if res.signal:
        return f"killed by signal {res.signal}", "exit_status"
    kind = None if res.exit_code == 0 else "exit_status"
    return f"exit code: {res.exit_code}", kind


class ToolBox:
    """The standard tools bound to one sandbox (one trajectory's sandbox, for its whole life).

    ``max_output_chars`` caps each of stdout and stderr (and a file read) in the rendered text;
    ``default_timeout`` applies when a call gives none; ``read_limit_lines`` is ``read_file``'s
    default ``limit``.
    """

    schemas = TOOL_SCHEMAS

    def __init__(
        self,
        sandbox: Any,
        *,
        max_output_chars: int = 16_000,
        default_timeout: float = DEFAULT_TIMEOUT,
        read_limit_lines: int = 2_000,
    ) -> None:
        if max_output_chars < 100:
            raise ValueError(f"max_output_chars must be >= 100, got {max_output_chars}")
        if not 0 < default_timeout <= MAX_TIMEOUT:
            raise ValueError(
                f"default_timeout must be in (0, {MAX_TIMEOUT:g}], got {default_timeout}"
            )
        if read_limit_lines < 1:
            raise ValueError(f"read_limit_lines must be >= 1, got {read_limit_lines}")
        self.sandbox = sandbox
        self.max_output_chars = max_output_chars
        self.default_timeout = float(default_timeout)
        self.read_limit_lines = read_limit_lines

    def execute(self, name: str, arguments: str | Mapping[str, Any]) -> ToolResult:
        """Validate and run one call; tool errors come back as results (see the module doc)."""
        start = time.perf_counter()
        args = validate_call(name, arguments)
        if isinstance(args, ToolResult):
            result = args
        else:
            try:
                result = getattr(self, f"_{name}")(args)
            except dsec.PathError as exc:
                result = _error(name, "path_error", str(exc), args)
            except dsec.PolicyError as exc:
                result = _error(name, "policy_error", str(exc), args)
            except OSError as exc:  # a file that is missing, a directory, ... (file tools)
                if name not in ("read_file", "write_file"):
                    raise
                result = _error(name, "path_error", f"{args['path']}: {exc.strerror or exc}", args)
        wall = time.perf_counter() - start
        return dataclasses.replace(result, wall_time=wall)

    # -- the tools ---------------------------------------------------------------------------

    def _render_exec(self, name: str, args: dict, res: Any, timeout: float) -> ToolResult:
        status, kind = _status_line(res, timeout)
        lines = [status]
        if kind in ("timeout", "oom") and res.exit_code is not None and not res.signal:
            lines.append(f"exit code: {res.exit_code}")
        truncated = False
        for label, data, cut in (
            ("stdout", res.stdout, res.stdout_truncated),
            ("stderr", res.stderr, res.stderr_truncated),
        ):
            text = bytes(data).decode("utf-8", errors="replace")
            if not text and not cut:
                continue
            text, capped = _cap(text, self.max_output_chars)
            lines.append(f"{label}:")
            lines.append(text.removesuffix("\n"))
            if cut or capped:
                truncated = True
                why = (
                    "by the sandbox output limit; only its head and tail were kept"
                    if cut
                    else "to fit the result"
                )
                lines.append(f"[{label} truncated {why}]")
        if not res.stdout and not res.stderr:
            lines.append("(no output)")
        lines.append(f"time: {res.wall_time:.3f} s wall, {res.cpu_time:.3f} s cpu")
        return ToolResult(
            name=name,
            text="\n".join(lines),
            ok=kind is None,
            error_kind=kind,
            arguments=args,
            exec_result=res,
            truncated=truncated,
        )

    def _bash(self, args: dict) -> ToolResult:
        timeout = float(args.get("timeout", self.default_timeout))
        res = self.sandbox.exec(args["command"], timeout=timeout)
        return self._render_exec("bash", args, res, timeout)

    def _python(self, args: dict) -> ToolResult:
        timeout = float(args.get("timeout", self.default_timeout))
        res = self.sandbox.run_python(args["code"], timeout=timeout)
        return self._render_exec("python", args, res, timeout)

    def _read_file(self, args: dict) -> ToolResult:
        data = bytes(self.sandbox.read_file(args["path"]))
        if b"\x00" in data:
            text = f"binary file ({len(data)} bytes); not shown"
            return ToolResult("read_file", text, ok=True, arguments=args)
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        first = args.get("offset", 1)
        limit = args.get("limit", self.read_limit_lines)
        shown = lines[first - 1 : first - 1 + limit]
        text, capped = _cap("".join(shown), self.max_output_chars)
        if not lines:
            text = "(empty file)"
        elif not shown:
            text = f"[offset {first} is past the end of the file ({len(lines)} lines)]"
        elif len(shown) < len(lines) or capped:
            last = first - 1 + len(shown)
            text = f"{text.removesuffix(chr(10))}\n[lines {first}-{last} of {len(lines)}"
            text += "; characters omitted" if capped else ""
            text += "; use offset and limit to read more]"
        return ToolResult("read_file", text, ok=True, arguments=args, truncated=capped)

    def _write_file(self, args: dict) -> ToolResult:
        data = args["content"].encode("utf-8")
        parent = posixpath.dirname(args["path"])
        if parent not in ("", "/", "."):
            made = self.sandbox.exec(["mkdir", "-p", "--", parent], timeout=self.default_timeout)
            if made.exit_code != 0:
                err = bytes(made.stderr).decode("utf-8", errors="replace").strip()
                msg = f"path {args['path']!r}: cannot create its directory: {err}"
                return _error("write_file", "path_error", msg, args)
        self.sandbox.write_file(args["path"], data)
        text = f"wrote {len(data)} bytes to {args['path']}"
        return ToolResult("write_file", text, ok=True, arguments=args)


def execute(
    sandbox: Any, name: str, arguments: str | Mapping[str, Any], **options: Any
) -> ToolResult:
    """``ToolBox(sandbox, **options).execute(name, arguments)``."""
    return ToolBox(sandbox, **options).execute(name, arguments)
