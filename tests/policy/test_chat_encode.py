"""Encoder behaviour beyond the conformance files: the tools= convenience, the append-only
property a token-in/token-out agent loop relies on, and clear errors on bad input."""

from __future__ import annotations

import copy
import json

import pytest

from policy import chat

FN = {
    "name": "get_time",
    "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}
TOOL = {"type": "function", "function": FN}


def tool_call(cid: str, tz: str) -> dict:
    fn = {"name": "get_time", "arguments": json.dumps({"tz": tz})}
    return {"id": cid, "type": "function", "function": fn}


def test_tools_argument_attaches_to_system_message():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    before = copy.deepcopy(messages)
    official = [{**messages[0], "tools": [TOOL]}, messages[1]]
    assert chat.encode(messages, tools=[TOOL]) == chat.encode(official)
    assert chat.encode(messages, tools=[FN]) == chat.encode(official)  # bare function dicts
    assert messages == before


def test_tools_argument_without_system_message_inserts_one():
    messages = [{"role": "user", "content": "q"}]
    got = chat.encode(messages, tools=[TOOL])
    assert got == chat.encode([{"role": "system", "content": "", "tools": [TOOL]}, *messages])
    assert got.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n")


def test_tools_argument_conflict_and_bad_tools():
    with pytest.raises(ValueError, match="already carries tools"):
        chat.encode([{"role": "system", "content": "S", "tools": [TOOL]}], tools=[TOOL])
    with pytest.raises(ValueError, match="OpenAI function schema"):
        chat.encode([{"role": "user", "content": "q"}], tools=["get_time"])
    with pytest.raises(ValueError, match="list of function schemas"):
        chat.encode([{"role": "user", "content": "q"}], tools="get_time")


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_agent_loop_only_appends(mode):
    """With tools declared: prompt(n+1) == prompt(n) + completion + tool results (+ prompt)."""
    history = [
        {"role": "system", "content": "S", "tools": [TOOL]},
        {"role": "user", "content": "q"},
    ]
    prompt = chat.encode(history, mode)
    turns = [
        ([tool_call("a", "Asia/Tokyo"), tool_call("b", "Europe/Paris")], ["RA", "RB"]),
        ([tool_call("c", "<Berlin>")], ["RC"]),
    ]
    for calls, results in turns:
        reply = {
            "role": "assistant",
            "reasoning_content": "think",
            "content": "",
            "tool_calls": calls,
        }
        completion = chat.render_assistant(reply, mode)
        assert chat.parse_assistant(completion, mode)["errors"] == []
        prompt += completion + chat.encode_tool_results(results, mode)
        history += [reply] + [
            {"role": "tool", "tool_call_id": c["id"], "content": r}
            for c, r in zip(reversed(calls), reversed(results), strict=True)  # out of order
        ]
        assert chat.encode(history, mode) == prompt
    final = {"role": "assistant", "reasoning_content": "done", "content": "It is 09:30."}
    history.append(final)
    prompt += chat.render_assistant(final, mode)
    history.append({"role": "user", "content": "thanks"})
    prompt += "<｜User｜>thanks<｜Assistant｜>" + ("<think>" if mode == "thinking" else "</think>")
    assert chat.encode(history, mode) == prompt


def test_tool_results_with_user_text_and_parts():
    text = chat.encode_tool_results(
        [
            "A",
            {
                "role": "tool",
                "content": [{"type": "text", "text": "B1"}, {"type": "text", "text": "B2"}],
            },
        ],
        user_content="next?",
    )
    assert text == (
        "<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B1\n\nB2</tool_result>\n\n"
        "next?<｜Assistant｜><think>"
    )
    assert chat.encode_tool_results(["x"], "chat").endswith("<｜Assistant｜></think>")
    with pytest.raises(ValueError, match="non-empty list"):
        chat.encode_tool_results([])
    with pytest.raises(ValueError, match="tool result 0"):
        chat.encode_tool_results([3])


def test_dict_arguments_are_the_argument_object():
    as_str = {"role": "assistant", "content": "", "tool_calls": [tool_call("a", "UTC")]}
    as_dict = copy.deepcopy(as_str)
    as_dict["tool_calls"][0]["function"]["arguments"] = {"tz": "UTC"}
    assert chat.render_assistant(as_dict) == chat.render_assistant(as_str)


def test_without_tools_history_reasoning_is_dropped():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "SECRET", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert "SECRET" not in chat.encode(messages)
    assert "SECRET" in chat.encode(messages, drop_thinking=False)
    assert "SECRET" in chat.encode(messages, tools=[TOOL])
    assert (
        chat.encode(messages, add_bos=False)
        == chat.encode(messages)[len("<｜begin▁of▁sentence｜>") :]
    )


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([{"role": "robot", "content": "x"}], {}, "unknown role 'robot'"),
        ([{"role": "user", "content": "x"}], {"thinking_mode": "fast"}, "thinking_mode"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "low"}, "reasoning_effort"),
        ([{"role": "developer", "content": ""}], {}, "developer"),
        ([{"role": "user", "content": "x", "task": "summarise"}], {}, "unknown task 'summarise'"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            {},
            "content must be a str",
        ),
        ([{"role": "user"}], {}, "content must be a str"),
        (["hello"], {}, "must be a dict"),
        ("hello", {}, "list of dicts"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            {},
            "JSON object",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], {}, "no function name"),
    ],
)
def test_bad_input_raises_clear_errors(messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        chat.encode(messages, **kwargs)
