"""DeepSeek-V4 chat encoding: OpenAI-style messages to the exact official prompt string.

A port of the official ``encoding_dsv4.py`` behaviour (V4_SPEC.md §10), checked byte for byte
against the conformance files. Inputs are the official ones: a list of message dicts with roles
``system``, ``user``, ``assistant``, ``tool``, ``latest_reminder`` and ``developer``; tools are
attached to a system or developer message as ``tools`` (OpenAI function list); assistant
messages carry ``content``, ``reasoning_content``, ``tool_calls`` and optionally ``wo_eos``;
``task`` selects a quick-instruction token (§10.7); ``response_format`` sits on a system or
developer message.

Besides :func:`encode` the module offers what a token-in/token-out agent loop needs:
:func:`encode_tool_results` (the text appended after an assistant turn that called tools),
:func:`render_assistant` (the completion text of an assistant message), and the DSML helpers
:func:`render_tool_calls` and :func:`parse_assistant`. The ``*_segments`` variants return the same
text split into :class:`~policy.dsml.Segment` pieces so that a tokenizer can keep user and tool
text from ever turning into special tokens (see ``policy.tokenizer``).

Deliberate differences from the official encoder, all on inputs it does not accept or mishandles:
``arguments`` given as a dict is used as the argument object (the official encoder would wrap it
as a parameter named ``arguments``); tool schemas may be bare function dicts as well as
``{"type": "function", "function": ...}``; bad input (unknown role, non-text content, a
non-object ``arguments`` JSON, an unknown task) raises ``ValueError`` naming the value instead
of an assertion or a crash deep inside; ``task`` values are checked on every message.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from policy.dsml import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    Segment,
    SegmentBuilder,
    parse_assistant,
    render_tool_calls,
    to_json,
    tool_calls_segments,
)

__all__ = [
    "assistant_segments",
    "encode",
    "encode_segments",
    "encode_tool_results",
    "normalize_tools",
    "parse_assistant",
    "render_assistant",
    "render_tool_calls",
    "tool_results_segments",
]

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_TOOLS_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by \
writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete \
reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)
_RESPONSE_FORMAT_HEAD = (
    "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

_ROLES = ("system", "user", "assistant", "tool", "latest_reminder", "developer")
_THINKING_MODES = ("chat", "thinking")
_EFFORTS = (None, "high", "max")
_KEEP_WHEN_DROPPING = ("user", "system", "tool", "latest_reminder")


# ------------------------------------------------------------------------------------------------
# Input checks and normalisation
# ------------------------------------------------------------------------------------------------


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the OpenAI form ``{"type": "function", "function": {name, description,
    parameters}}``. Bare function dicts ``{name, description, parameters}`` are wrapped."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of function schemas, got {tools!r}")
    out = []
    for tool in tools:
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            wrapped = dict(tool)
        elif isinstance(tool, Mapping) and "name" in tool:
            wrapped = {"type": "function", "function": dict(tool)}
        else:
            raise ValueError(f"tool must be an OpenAI function schema, got {tool!r}")
        if not isinstance(wrapped["function"].get("name"), str):
            raise ValueError(f"tool function has no string 'name': {tool!r}")
        out.append(wrapped)
    return out


def _check_options(thinking_mode: str, reasoning_effort: str | None) -> None:
    if thinking_mode not in _THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in _EFFORTS:
        raise ValueError(
            f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}"
        )


def _check_message(i: int, msg: Any) -> None:
    if not isinstance(msg, Mapping):
        raise ValueError(f"message {i} must be a dict, got {msg!r}")
    role = msg.get("role")
    if role not in _ROLES:
        raise ValueError(f"message {i} has unknown role {role!r}; expected one of {_ROLES}")
    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(
            f"message {i} has unknown task {task!r}; expected one of {list(TASK_TOKENS)}"
        )
    content = msg.get("content")
    if role == "tool":
        if not isinstance(content, (str, list)) and "content" in msg:
            raise ValueError(f"message {i} (tool) content must be a str or a list, got {content!r}")
    elif role in ("user", "latest_reminder"):
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a str, got {content!r}")
    elif role == "developer":
        if not isinstance(content, str) or not content:
            raise ValueError(
                f"message {i} (developer) needs non-empty str content, got {content!r}"
            )
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"message {i} ({role}) content must be a str or None, got {content!r}")
    if role == "assistant":
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"message {i} reasoning_content must be a str, got {reasoning!r}")
        calls = msg.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise ValueError(f"message {i} tool_calls must be a list, got {calls!r}")


def _attach_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> None:
    """Attach ``tools`` to messages[0] when it is a system message, else prepend an empty one."""
    if messages and messages[0].get("role") == "system":
        if messages[0].get("tools"):
            raise ValueError("tools= given but the first system message already carries tools")
        messages[0]["tools"] = tools
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": tools})


# ------------------------------------------------------------------------------------------------
# Preprocessing (tool messages become user turns; history reasoning dropped)
# ------------------------------------------------------------------------------------------------


def _merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn ``tool`` messages into ``tool_result`` blocks of user turns; merge consecutive user
    turns (a user message carrying a ``task`` starts a turn that later user text does not join)."""
    merged: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        prev = merged[-1] if merged and merged[-1]["role"] == "user" else None
        if role == "tool":
            block = {
                "type": "tool_result",
                "id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if prev is not None:
                prev["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg["content"]}
            if prev is not None and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                turn = {"role": "user", "blocks": [block]}
                for key in ("task", "wo_eos"):
                    if key in msg:
                        turn[key] = msg[key]
                merged.append(turn)
        else:
            merged.append(dict(msg))
    return merged


def _call_id(call: Any) -> str:
    if not isinstance(call, Mapping):
        return ""
    fn = call.get("function")
    return call.get("id") or (fn.get("id", "") if isinstance(fn, Mapping) else "")


def _sort_tool_results(messages: list[dict[str, Any]]) -> None:
    """Reorder each user turn's tool results into the call order of the last assistant message
    with tool calls (ids not found sort as position 0; the sort is stable)."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {}
            for pos, call in enumerate(msg["tool_calls"]):
                if cid := _call_id(call):
                    order[cid] = pos
        elif msg["role"] == "user":
            results = [b for b in msg["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1 and order:
                it = iter(sorted(results, key=lambda b: order.get(b.get("id", ""), 0)))
                msg["blocks"] = [
                    next(it) if b["type"] == "tool_result" else b for b in msg["blocks"]
                ]


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_history_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user/developer message: assistant turns lose their reasoning and developer
    messages are removed."""
    last_user = _last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        if msg["role"] in _KEEP_WHEN_DROPPING or i >= last_user:
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _tool_result_text(block: Mapping[str, Any]) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                parts.append(f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    return str(content)


def _user_blocks(b: SegmentBuilder, blocks: list[dict[str, Any]]) -> None:
    for i, block in enumerate(blocks):
        if i:
            b.template("\n\n")
        if block["type"] == "text":
            b.content(block["text"])
        else:
            b.template("<tool_result>")
            b.content(_tool_result_text(block))
            b.template("</tool_result>")


def _tools_and_format(b: SegmentBuilder, msg: Mapping[str, Any]) -> None:
    tools = msg.get("tools")
    if tools:
        b.template("\n\n" + _TOOLS_HEAD)
        b.content("\n".join(to_json(t["function"]) for t in normalize_tools(tools)))
        b.template(_TOOLS_TAIL)
    if msg.get("response_format"):
        b.template(_RESPONSE_FORMAT_HEAD)
        b.content(to_json(msg["response_format"]))


def _assistant(
    b: SegmentBuilder, msg: Mapping[str, Any], thinking_mode: str, keep_reasoning: bool
) -> None:
    if thinking_mode == "thinking" and keep_reasoning:
        b.content(msg.get("reasoning_content") or "")
        b.template(THINK_END)
    b.content(msg.get("content") or "")
    if msg.get("tool_calls"):
        b.template("\n\n")
        b.extend(tool_calls_segments(msg["tool_calls"]))
    if not msg.get("wo_eos", False):
        b.template(EOS)


def _render(
    b: SegmentBuilder,
    msgs: list[dict[str, Any]],
    i: int,
    thinking_mode: str,
    drop: bool,
    last_user: int,
) -> None:
    """Append message ``i`` and, where due, the transition after it (generation prompt or task
    token). ``last_user`` is the index of the last user/developer message of ``msgs``."""
    msg, role = msgs[i], msgs[i]["role"]
    if role == "system":
        b.content(msg.get("content") or "")
        _tools_and_format(b, msg)
    elif role == "developer":
        b.template(USER)
        b.content(msg["content"])
        _tools_and_format(b, msg)
    elif role == "user":
        b.template(USER)
        _user_blocks(b, msg["blocks"])
    elif role == "latest_reminder":
        b.template(LATEST_REMINDER)
        b.content(msg["content"])
    else:  # assistant
        after_task = i > 0 and msgs[i - 1].get("task") is not None
        _assistant(b, msg, thinking_mode, not after_task and (not drop or i > last_user))

    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return
    task = msg.get("task")
    thinking = thinking_mode == "thinking"
    if task == "action":
        b.template(ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task])
    elif task is not None:
        b.template(TASK_TOKENS[task])
    elif role in ("user", "developer"):
        open_think = thinking and (not drop or i >= last_user)
        b.template(ASSISTANT + (THINK_START if open_think else THINK_END))


def encode_segments(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "thinking",
    *,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    add_bos: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[Segment]:
    """:func:`encode`, as segments (special tokens of the template vs ordinary text)."""
    _check_options(thinking_mode, reasoning_effort)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {messages!r}")
    for i, msg in enumerate(messages):
        _check_message(i, msg)
    msgs = [copy.deepcopy(dict(m)) for m in messages]
    if tools:
        _attach_tools(msgs, normalize_tools(tools))
    msgs = _merge_tool_messages(msgs)
    _sort_tool_results(msgs)
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking_mode == "thinking" and drop:
        msgs = _drop_history_thinking(msgs)

    b = SegmentBuilder()
    if add_bos:
        b.template(BOS)
    last_user = _last_user_index(msgs)
    for i in range(len(msgs)):
        if i == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
            b.template(REASONING_EFFORT_MAX)
        _render(b, msgs, i, thinking_mode, drop, last_user)
    return b.segments


def encode(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "thinking",
    *,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    add_bos: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The official V4 prompt for ``messages`` (V4_SPEC.md §10), byte for byte.

    ``thinking_mode`` is ``"thinking"`` or ``"chat"``; ``drop_thinking`` (default True) removes
    the reasoning of assistant turns before the last user message, and is forced off when any
    message carries tools; ``reasoning_effort="max"`` adds the Think-Max preamble (thinking mode
    only); ``add_bos`` starts the prompt with BOS.

    ``tools`` is a convenience for an OpenAI tool list (``{"type": "function", "function":
    {...}}`` items or bare function dicts): it is attached as ``tools`` to the first message when
    that is a system message (``ValueError`` if that message already has tools), otherwise a
    system message with empty content carrying the tools is inserted at the front, whose rendering
    is ``"\\n\\n"`` + the tools block right after BOS. ``messages`` is not modified.

    When the last message is a user (or developer) message, the prompt ends with the generation
    prompt ``<｜Assistant｜><think>`` (``</think>`` in chat mode).
    """
    segments = encode_segments(
        messages,
        thinking_mode,
        drop_thinking=drop_thinking,
        reasoning_effort=reasoning_effort,
        add_bos=add_bos,
        tools=tools,
    )
    return "".join(s.text for s in segments)


def tool_results_segments(
    results: Sequence[str | Mapping[str, Any]],
    thinking_mode: str = "thinking",
    *,
    user_content: str | None = None,
) -> list[Segment]:
    """:func:`encode_tool_results`, as segments."""
    _check_options(thinking_mode, None)
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or not results:
        raise ValueError(f"results must be a non-empty list, got {results!r}")
    blocks: list[dict[str, Any]] = []
    for i, result in enumerate(results):
        if isinstance(result, str):
            blocks.append({"type": "tool_result", "content": result})
        elif isinstance(result, Mapping) and isinstance(result.get("content"), (str, list)):
            blocks.append({"type": "tool_result", "content": result["content"]})
        else:
            raise ValueError(f"tool result {i} must be a str or a tool message, got {result!r}")
    if user_content is not None:
        if not isinstance(user_content, str):
            raise ValueError(f"user_content must be a str, got {user_content!r}")
        blocks.append({"type": "text", "text": user_content})
    b = SegmentBuilder()
    b.template(USER)
    _user_blocks(b, blocks)
    b.template(ASSISTANT + (THINK_START if thinking_mode == "thinking" else THINK_END))
    return b.segments


def encode_tool_results(
    results: Sequence[str | Mapping[str, Any]],
    thinking_mode: str = "thinking",
    *,
    user_content: str | None = None,
) -> str:
    """Text to append after an assistant turn (ending in EOS) that called tools.

    ``results`` are the tool outputs in call order (strings, or ``tool`` messages whose
    ``content`` is a str or a list of text parts); ``user_content`` is optional user text that
    joins the same turn. Returns ``<｜User｜><tool_result>…</tool_result>[\\n\\n…]`` followed by the
    next generation prompt ``<｜Assistant｜><think>`` (``</think>`` in chat mode). With tools
    declared, ``encode(history + tool messages) == encode(history) + encode_tool_results(...)``.
    """
    segments = tool_results_segments(results, thinking_mode, user_content=user_content)
    return "".join(s.text for s in segments)


def assistant_segments(
    message: Mapping[str, Any], thinking_mode: str = "thinking"
) -> list[Segment]:
    """:func:`render_assistant`, as segments."""
    _check_options(thinking_mode, None)
    _check_message(0, {**message, "role": "assistant"})
    b = SegmentBuilder()
    _assistant(b, message, thinking_mode, keep_reasoning=True)
    return b.segments


def render_assistant(message: Mapping[str, Any], thinking_mode: str = "thinking") -> str:
    """The completion text of an assistant message, as the model emits it after the generation
    prompt: ``reasoning</think>`` (thinking mode) + content + ``\\n\\n`` + DSML block (if tool
    calls) + EOS (unless ``wo_eos``). :func:`parse_assistant` inverts it."""
    return "".join(s.text for s in assistant_segments(message, thinking_mode))
