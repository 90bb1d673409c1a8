"""DeepSeek-V4 special tokens and the DSML tool-call format: rendering and tolerant parsing.

The byte-level rules are those of the official encoder (``encoding_dsv4.py``), summarised in
V4_SPEC.md §10.3. Two layers:

- Rendering works on *segments* (:class:`Segment`): text pieces tagged as either template text,
  whose special-token strings are real special tokens, or content (user text, tool output,
  reasoning, tool-call values), which is always ordinary text even when it happens to spell a
  special token. ``"".join(s.text for s in segments)`` is the official prompt string; a tokenizer
  turns the segments into ids without ever promoting content into a special token.
- :func:`parse_assistant` turns a sampled completion back into an OpenAI-style message. It never
  raises on model output: every defect becomes a short message in ``errors`` that an agent loop
  can send back to the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
EXTRACTED_URL = "<｜extracted_url｜>"

TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# Every special token the encoder can emit, in a fixed order (the byte tokenizer numbers them in
# this order). ``<tool_result>`` is ordinary text in V4, not a special token (V4_SPEC §10.1).
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    THINK_START,
    THINK_END,
    DSML,
    LATEST_REMINDER,
    *TASK_TOKENS.values(),
    EXTRACTED_URL,
)

# The tokens that may not appear inside parsed content or reasoning (official parser contract).
_FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)

BLOCK_NAME = "tool_calls"
BLOCK_OPEN = f"<{DSML}{BLOCK_NAME}>"
BLOCK_CLOSE = f"</{DSML}{BLOCK_NAME}>"
BLOCK_START = f"\n\n<{DSML}{BLOCK_NAME}"  # where content stops and the block begins
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_STOP = f"/{DSML}parameter"

_SPECIAL_RE = re.compile(
    "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
)


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt.

    ``special`` is True for exactly one special token emitted by the template; everything else
    (template prose and all content) is ordinary text.
    """

    text: str
    special: bool = False


class SegmentBuilder:
    """Collects segments; template text is split on special tokens, content never is."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def template(self, text: str) -> None:
        """Append template text: any special-token string inside it is a real special token."""
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                self.segments.append(Segment(text[pos : m.start()]))
            self.segments.append(Segment(m.group(), special=True))
            pos = m.end()
        if pos < len(text):
            self.segments.append(Segment(text[pos:]))

    def content(self, text: str) -> None:
        """Append content: ordinary text whatever it contains."""
        if text:
            self.segments.append(Segment(text))

    def extend(self, segments: Iterable[Segment]) -> None:
        self.segments.extend(segments)

    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def to_json(value: Any) -> str:
    """JSON as the official encoder writes it: ``ensure_ascii=False``, default separators."""
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def call_name_and_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and argument dict of one tool call.

    Accepts the OpenAI form ``{"type": "function", "function": {"name", "arguments"}}`` or the
    bare ``{"name", "arguments"}``. ``arguments`` is a JSON object string (the official input) or,
    as a convenience, a dict. A string that is not valid JSON is wrapped as
    ``{"arguments": raw}``, exactly like the official encoder.
    """
    if not isinstance(call, Mapping):
        raise ValueError(f"tool call must be a dict, got {call!r}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tool call has no function name: {call!r}")
    raw = fn.get("arguments", "{}")
    if isinstance(raw, Mapping):
        return fn["name"], dict(raw)
    if not isinstance(raw, str):
        raise ValueError(f"tool call arguments must be a JSON string or a dict, got {raw!r}")
    try:
        args = json.loads(raw)
    except json.JSONDecodeError:
        return fn["name"], {"arguments": raw}
    if not isinstance(args, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {raw!r}")
    return fn["name"], args


def tool_calls_segments(calls: Sequence[Mapping[str, Any]]) -> list[Segment]:
    """Segments of one ``<｜DSML｜tool_calls>`` block (no leading blank line, no EOS)."""
    b = SegmentBuilder()
    b.template(BLOCK_OPEN + "\n")
    for i, call in enumerate(calls):
        name, args = call_name_and_arguments(call)
        if i:
            b.template("\n")
        b.template(f'{INVOKE_OPEN} name="')
        b.content(name)
        b.template('">\n')
        for j, (key, value) in enumerate(args.items()):
            is_str = isinstance(value, str)
            if j:
                b.template("\n")
            b.template(f'{PARAM_OPEN} name="')
            b.content(str(key))
            b.template(f'" string="{"true" if is_str else "false"}">')
            b.content(value if is_str else to_json(value))
            b.template(f"<{PARAM_STOP}>")
        b.template(f"\n{INVOKE_CLOSE}>")
    b.template("\n" + BLOCK_CLOSE)
    return b.segments


def render_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block the model emits for ``calls`` (V4_SPEC §10.3), without the leading
    ``"\\n\\n"`` that separates it from the content and without EOS."""
    return "".join(s.text for s in tool_calls_segments(calls))


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

_HEADER_RE = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAM_RE = re.compile(r' name="(.*?)" string="(true|false)">(.*)<', re.DOTALL)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _is_json(text: str) -> bool:
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError is a ValueError; so is NaN/Infinity here
        return False
    return True


def _first(text: str, pos: int, stops: Sequence[str]) -> tuple[int, str | None]:
    """Position and identity of the earliest of ``stops`` at or after ``pos``."""
    best, which = len(text), None
    for stop in stops:
        at = text.find(stop, pos)
        if at != -1 and at < best:
            best, which = at, stop
    return best, which


class _Finder:
    """``str.find`` for a few fixed stop strings with a cursor that only moves forward: each
    stop's next occurrence is remembered, so scanning a whole block costs O(len(text)) per stop
    string however many parameters it has."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.next: dict[str, int] = {}

    def find(self, stop: str, pos: int) -> int:
        at = self.next.get(stop)
        if at is None or (at != -1 and at < pos):
            at = self.text.find(stop, pos)
            self.next[stop] = at
        return at

    def first(self, pos: int, stops: Sequence[str]) -> tuple[int, str | None]:
        best, which = len(self.text), None
        for stop in stops:
            at = self.find(stop, pos)
            if at != -1 and at < best:
                best, which = at, stop
        return best, which


class _BlockParser:
    """Parses the tool-call block that starts at ``pos`` (just after ``BLOCK_START``)."""

    def __init__(self, text: str, pos: int, errors: list[str]) -> None:
        self.text, self.pos, self.errors = text, pos, errors
        self.finder = _Finder(text)
        self.calls: list[tuple[int, dict[str, Any]]] = []  # (position in the block from 1, call)
        self.closed = False

    def expect_gap(self, end: int, where: str) -> None:
        gap = self.text[self.pos : end]
        if gap != ">\n":
            self.errors.append(f"expected '>\\n' {where}, got {_short(gap)}")

    def run(self) -> int:
        n = 0
        while True:
            at, stop = self.finder.first(self.pos, (INVOKE_OPEN, BLOCK_CLOSE))
            if stop is None:
                self.errors.append("unterminated tool_calls block")
                return len(self.text)
            self.expect_gap(at, "before the next invoke" if n else "after <｜DSML｜tool_calls")
            self.pos = at + len(stop)
            if stop == BLOCK_CLOSE:
                self.closed = True
                return self.pos
            n += 1
            if not self.invoke(n):
                return len(self.text)

    def invoke(self, n: int) -> bool:
        """Parse one invoke; False when the text ends inside it."""
        text = self.text
        at, stop = self.finder.first(self.pos, (PARAM_OPEN, INVOKE_CLOSE))
        if stop is None:
            self.errors.append(f"tool call {n}: unterminated invoke")
            return False
        ok = True
        m = _HEADER_RE.fullmatch(text, self.pos, at)
        name = m.group(1) if m else ""
        if m is None:
            self.errors.append(
                f"tool call {n}: malformed invoke header {_short(text[self.pos : at])}"
            )
            ok = False
        elif not name or any(c in name for c in '"<>\n'):
            self.errors.append(f"tool call {n}: invalid tool name {_short(name)}")
            ok = False
        self.pos = at + len(stop)
        params: dict[str, tuple[str, bool]] = {}
        while stop == PARAM_OPEN:
            end = self.finder.find(PARAM_STOP, self.pos)
            if end == -1:
                self.errors.append(f"tool call {n}: unterminated parameter")
                return False
            pm = _PARAM_RE.fullmatch(text, self.pos, end) if text[end - 1] == "<" else None
            if pm is None:
                self.errors.append(
                    f"tool call {n}: malformed parameter {_short(text[self.pos : end])}"
                )
                ok = False
            else:
                key, is_str, value = pm.group(1), pm.group(2) == "true", pm.group(3)
                if key in params:
                    self.errors.append(f"tool call {n}: duplicate parameter {key!r}")
                    ok = False
                elif not is_str and not _is_json(value):
                    self.errors.append(
                        f'tool call {n}: parameter {key!r} has string="false" but its value is'
                        f" not valid JSON: {_short(value)}"
                    )
                    ok = False
                params.setdefault(key, (value, is_str))
            self.pos = end + len(PARAM_STOP)
            at, stop = self.finder.first(self.pos, (PARAM_OPEN, INVOKE_CLOSE))
            if stop is None:
                self.errors.append(f"tool call {n}: unterminated invoke")
                return False
            before = len(self.errors)
            self.expect_gap(at, "after a parameter")
            if len(self.errors) > before:
                self.errors[-1] = f"tool call {n}: {self.errors[-1]}"
                ok = False
            self.pos = at + len(stop)
        if ok:
            pairs = (
                f"{to_json(k)}: {to_json(v) if is_str else v}" for k, (v, is_str) in params.items()
            )
            arguments = "{" + ", ".join(pairs) + "}"
            call = {"type": "function", "function": {"name": name, "arguments": arguments}}
            self.calls.append((n, call))
        return True


def _tool_names(tools: Iterable[Any]) -> set[str]:
    names = set()
    for tool in tools:
        if isinstance(tool, str):
            names.add(tool)
        elif isinstance(tool, Mapping):
            fn = tool.get("function", tool)
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
                continue
            raise ValueError(f"tool has no name: {tool!r}")
        else:
            raise ValueError(f"tool must be a name or a schema dict, got {tool!r}")
    return names


def parse_assistant(
    text: str, thinking_mode: str = "thinking", *, tools: Iterable[Any] | None = None
) -> dict[str, Any]:
    """Parse one sampled assistant turn into an OpenAI-style message plus ``errors``.

    ``text`` is the completion after the generation prompt (after ``<｜Assistant｜><think>`` in
    thinking mode, ``<｜Assistant｜></think>`` in chat mode), including the final EOS if the model
    emitted it. After a task prompt (``<｜action｜>`` and friends) the answer has no reasoning
    part: parse it with ``thinking_mode="chat"``. Returns ``{"role": "assistant", "content",
    "reasoning_content", "tool_calls": [{"type": "function", "function": {"name",
    "arguments"}}], "errors": [str, ...]}``;
    ``arguments`` is a JSON object string (string values re-quoted, other values verbatim).

    On well-formed output the message equals the official parser's. It never raises on model
    output: defects are reported in ``errors`` (empty exactly when the turn is well formed) and
    the rest is recovered as far as possible. A tool call with a defect (malformed markup,
    duplicate parameter, a ``string="false"`` value that is not JSON, an unknown tool) is left
    out of ``tool_calls``; ``tool call N`` in a message counts invokes from 1 in block order.
    Stricter than the official parser: a block or turn cut off before ``</｜DSML｜tool_calls>`` or
    EOS, a non-JSON ``string="false"`` value and an empty or quoted tool name are errors.

    Unknown tool names are reported only when ``tools`` is given (names, or OpenAI / bare
    function schemas); otherwise the tool layer reports them.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    known = _tool_names(tools) if tools is not None else None
    errors: list[str] = []
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        at, stop = _first(text, 0, (THINK_END, BLOCK_START, EOS))
        if stop == THINK_END:
            reasoning, pos = text[:at], at + len(THINK_END)
        else:
            errors.append("missing </think> after the reasoning")
            reasoning, pos = text[:at], at
    at, stop = _first(text, pos, (EOS, BLOCK_START))
    content = text[pos:at]
    numbered: list[tuple[int, dict[str, Any]]] = []
    if stop is None:
        errors.append("missing end-of-sentence token (output cut off?)")
    elif stop == EOS:
        if at + len(EOS) != len(text):
            errors.append(f"unexpected text after the end-of-sentence token: {_short(text[at:])}")
    else:
        block = _BlockParser(text, at + len(BLOCK_START), errors)
        end = block.run()
        numbered = block.calls
        if block.closed:
            rest = text[end:]
            if rest == "":
                errors.append("missing end-of-sentence token after the tool_calls block")
            elif rest != EOS:
                errors.append(f"unexpected text after the tool_calls block: {_short(rest)}")
    for token in _FORBIDDEN_IN_TEXT:
        if token in content:
            errors.append(f"unexpected special token {token!r} in content")
        if token in reasoning:
            errors.append(f"unexpected special token {token!r} in reasoning")
    calls = []
    for n, call in numbered:
        name = call["function"]["name"]
        if known is None or name in known:
            calls.append(call)
        else:
            errors.append(f"tool call {n}: unknown tool {name!r}")
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": calls,
        "errors": errors,
    }
