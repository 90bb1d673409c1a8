"""parse_assistant: round trips (hypothesis), malformed output, and seeded random mutations.

The mutation test compares the parser with an independent oracle: a set of regular expressions
written from the grammar of V4_SPEC.md §10.3 plus the parser's documented extra checks. On every
input the parser must not raise, must report errors exactly when the oracle rejects the text, and
must return the oracle's reading when it accepts it.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.chat import parse_assistant, render_assistant, render_tool_calls
from policy.dsml import BOS, DSML, EOS, THINK_END, THINK_START

D = DSML
FORBIDDEN = (BOS, EOS, THINK_START, THINK_END, DSML)


def call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def completion(calls=(), content="", reasoning="r", mode="thinking") -> str:
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        msg["tool_calls"] = list(calls)
    return render_assistant(msg, mode)


# ------------------------------------------------------------------------------------------------
# Oracle
# ------------------------------------------------------------------------------------------------

_TEXT = "(?:(?!" + "|".join(re.escape(t) for t in FORBIDDEN) + ").)*"
_TURN = {
    "thinking": re.compile(
        f"(?P<r>{_TEXT}){re.escape(THINK_END)}(?P<c>{_TEXT})"
        f"(?:\n\n<{D}tool_calls>\n(?P<b>.*)</{D}tool_calls>)?{re.escape(EOS)}",
        re.S,
    ),
    "chat": re.compile(
        f"(?P<r>)(?P<c>{_TEXT})(?:\n\n<{D}tool_calls>\n(?P<b>.*)</{D}tool_calls>)?{re.escape(EOS)}",
        re.S,
    ),
}
_NOT_STOP = f"(?:(?!/{D}parameter).)*"
_PARAM = f'<{D}parameter name="({_NOT_STOP}?)" string="(true|false)">({_NOT_STOP})</{D}parameter>\n'
_INVOKE = re.compile(f'<{D}invoke\\s*name="([^"<>\n]+)">\n\n?((?:{_PARAM})*)</{D}invoke>\n', re.S)


def _strict_json(text: str) -> bool:
    try:
        json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError:
        return False
    return True


def oracle(text: str, mode: str):
    """(content, reasoning, [(name, arguments)]) when the turn is valid, else None."""
    m = _TURN[mode].fullmatch(text)
    if m is None:
        return None
    calls = []
    block = m.group("b") or ""
    pos = 0
    while pos < len(block):
        inv = _INVOKE.match(block, pos)
        if inv is None:
            return None
        pos = inv.end()
        pairs, seen = [], set()
        for key, is_str, value in re.findall(_PARAM, inv.group(2), re.S):
            if key in seen or (is_str == "false" and not _strict_json(value)):
                return None
            seen.add(key)
            value = json.dumps(value, ensure_ascii=False) if is_str == "true" else value
            pairs.append(f"{json.dumps(key, ensure_ascii=False)}: {value}")
        calls.append((inv.group(1), "{" + ", ".join(pairs) + "}"))
    return m.group("c"), m.group("r"), calls


def check_against_oracle(text: str, mode: str) -> bool:
    msg = parse_assistant(text, mode)
    assert set(msg) == {"role", "content", "reasoning_content", "tool_calls", "errors"}
    assert all(isinstance(e, str) and e for e in msg["errors"])
    want = oracle(text, mode)
    if want is None:
        assert msg["errors"], f"invalid text accepted: {text!r}"
        return False
    assert msg["errors"] == [], f"valid text rejected: {text!r}: {msg['errors']}"
    content, reasoning, calls = want
    assert msg["content"] == content
    assert msg["reasoning_content"] == reasoning
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
    assert got == calls
    return True


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

_PIECES = ["<", ">", '"', "'", "\n", "\\", "</", "/>", "東京", "é", "🙂", " ", "{", "}", "&amp;"]
_PIECES += [EOS, BOS, THINK_START, THINK_END, DSML, f"<{D}invoke", f"</{D}tool_calls>", "\x00"]
_tricky_text = st.lists(st.sampled_from(_PIECES) | st.text(max_size=8), max_size=12).map("".join)
_value_text = (st.text() | _tricky_text).filter(lambda s: f"/{D}parameter" not in s)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _value_text,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.text(max_size=12).filter(lambda s: '"' not in s)
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
_args = st.dictionaries(_keys, _json_values, max_size=5)
_plain = st.text().filter(lambda s: not any(t in s for t in FORBIDDEN))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(st.tuples(_names, _args), max_size=4),
    content=_plain,
    reasoning=_plain,
    mode=st.sampled_from(["thinking", "chat"]),
)
def test_round_trip(calls, content, reasoning, mode):
    rendered = [call(name, args) for name, args in calls]
    text = completion(rendered, content=content, reasoning=reasoning, mode=mode)
    msg = parse_assistant(text, mode)
    assert msg["errors"] == []
    assert msg["content"] == content
    assert msg["reasoning_content"] == (reasoning if mode == "thinking" else "")
    assert len(msg["tool_calls"]) == len(calls)
    for got, (name, args) in zip(msg["tool_calls"], calls, strict=True):
        assert got["type"] == "function"
        assert got["function"]["name"] == name
        assert got["function"]["arguments"] == json.dumps(args, ensure_ascii=False)
        assert json.loads(got["function"]["arguments"]) == args
    check_against_oracle(text, mode)


def test_round_trip_long_and_empty_values():
    big = 'x<y>"z"\n' * 20_000
    args = {"big": big, "empty": "", "nested": {"a": [1, {"b": [None, True, "</think>"]}]}}
    text = completion([call("f", args), call("g", {})])
    msg = parse_assistant(text)
    assert msg["errors"] == []
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [args, {}]


def test_non_string_values_are_kept_verbatim():
    text = completion([call("stats", {"v": [1, 2]})]).replace("[1, 2]", "[1,2]")
    msg = parse_assistant(text)
    assert msg["errors"] == []
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"v": [1,2]}'


def test_render_tool_calls_bytes():
    block = render_tool_calls([call("now", {}), call("f", {"a": "x", "b": 1.5})])
    assert block == (
        f'<{D}tool_calls>\n<{D}invoke name="now">\n\n</{D}invoke>\n<{D}invoke name="f">\n'
        f'<{D}parameter name="a" string="true">x</{D}parameter>\n'
        f'<{D}parameter name="b" string="false">1.5</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
    )


# ------------------------------------------------------------------------------------------------
# Malformed output
# ------------------------------------------------------------------------------------------------

GOOD = completion(
    [call("calc", {"expr": "1+1"}), call("stats", {"values": [1, 2], "strict": True})],
    content="Checking.",
)


def errors_of(text: str, mode: str = "thinking", **kw) -> list[str]:
    return parse_assistant(text, mode, **kw)["errors"]


def test_good_block_is_clean():
    assert errors_of(GOOD) == []
    assert check_against_oracle(GOOD, "thinking")


@pytest.mark.parametrize("cut", range(1, 200, 7))
def test_truncated_output_reports(cut):
    text = GOOD[: len(GOOD) - cut]
    msg = parse_assistant(text)
    assert msg["errors"]
    assert not check_against_oracle(text, "thinking")


def test_unterminated_block_message():
    text = GOOD[: GOOD.index(f"</{D}tool_calls>")]
    assert "unterminated tool_calls block" in errors_of(text)


def test_unknown_tool_with_tools_list():
    msg = parse_assistant(GOOD, tools=[{"type": "function", "function": {"name": "calc"}}])
    assert msg["errors"] == ["tool call 2: unknown tool 'stats'"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["calc"]
    assert parse_assistant(GOOD, tools=["calc", "stats"])["errors"] == []
    with pytest.raises(ValueError, match="tool must be"):
        parse_assistant(GOOD, tools=[3])


def test_bad_json_value():
    text = GOOD.replace("[1, 2]", "[1, 2")
    msg = parse_assistant(text)
    assert len(msg["errors"]) == 1 and "not valid JSON" in msg["errors"][0]
    assert msg["errors"][0].startswith("tool call 2:")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["calc"]
    assert errors_of(GOOD.replace("[1, 2]", "NaN"))


def test_duplicate_parameter():
    dup = f'<{D}parameter name="expr" string="true">1+1</{D}parameter>\n'
    text = GOOD.replace(dup, dup + dup)
    assert errors_of(text) == ["tool call 1: duplicate parameter 'expr'"]


@pytest.mark.parametrize(
    "stray",
    [DSML, f"<{D}invoke", f"</{D}tool_calls>", THINK_START, THINK_END, BOS, f"<{D}tool_calls>"],
)
def test_stray_special_tokens_in_content(stray):
    text = completion(content=f"a {stray} b")
    assert errors_of(text)
    assert errors_of(completion(reasoning=f"x{stray}y"))


def test_missing_think_end_keeps_text_as_reasoning():
    msg = parse_assistant("still thinking when the budget ran out")
    assert msg["reasoning_content"] == "still thinking when the budget ran out"
    assert msg["errors"] == [
        "missing </think> after the reasoning",
        "missing end-of-sentence token (output cut off?)",
    ]


def test_bad_tool_names():
    assert "invalid tool name" in errors_of(GOOD.replace('name="calc"', 'name=""'))[0]
    assert "invalid tool name" in errors_of(GOOD.replace('name="calc"', 'name="a"b"'))[0]
    assert "malformed invoke header" in errors_of(GOOD.replace('name="calc"', "name=calc"))[0]


def test_text_after_eos():
    assert errors_of(completion(content="hi") + "more")


def test_bad_arguments():
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_assistant("x", "fast")
    with pytest.raises(TypeError):
        parse_assistant(b"x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Seeded random mutations
# ------------------------------------------------------------------------------------------------

_SEEDS = [
    (GOOD, "thinking"),
    (completion([call("now", {})], content="", reasoning=""), "thinking"),
    (completion([call("f", {"a": "<b>", "c": {"d": [1, "é"]}})], mode="chat"), "chat"),
    (completion(content="plain answer"), "thinking"),
]
_INSERTS = [
    DSML, EOS, BOS, THINK_START, THINK_END, ">", "<", "\n", "\n\n", '"', "/", " ", "=", "x",
    f"<{D}invoke", f"</{D}invoke>", f"<{D}parameter", f"</{D}parameter>", f"<{D}tool_calls>",
    f"</{D}tool_calls>", ' name="', '" string="true">', '" string="false">', "[", "}", "1",
]  # fmt: skip


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(1, 12))
        op = rng.randrange(5)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + rng.choice(_INSERTS) + text[i:]
        elif op == 2:
            text = text[:i] + text[i:j] + text[i:]
        elif op == 3:
            text = text[:i]
        else:
            k = rng.randrange(len(text) + 1)
            text = text[:k] + text[i:j] + text[k:]
    return text


def test_ten_thousand_mutations():
    rng = random.Random(20260101)
    valid = 0
    for n in range(10_000):
        seed, mode = _SEEDS[n % len(_SEEDS)]
        valid += check_against_oracle(_mutate(rng, seed), mode)
    assert 0 < valid < 10_000  # both sides of the oracle were exercised


def test_many_invokes_and_parameters():
    args = {f"k{i}": i for i in range(500)}
    calls = [call(f"f{j}", args) for j in range(10)]
    msg = parse_assistant(completion(calls))
    assert msg["errors"] == []
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [args] * 10
