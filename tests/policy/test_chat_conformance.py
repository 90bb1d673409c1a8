"""The V4 encoder and parser against the conformance folder (shared/conformance/dsml).

The folder lives beside the project root (``../shared/conformance/dsml``); the environment
variable DSEC_CONFORMANCE_DIR overrides it. A missing folder is a failure, not a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from policy import chat

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance" / "dsml"
CONFORMANCE_DIR = Path(os.environ.get("DSEC_CONFORMANCE_DIR", _DEFAULT_DIR))


def _load(name: str):
    path = CONFORMANCE_DIR / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


MANIFEST = _load("manifest.json") or {"cases": []}
EXTRA = _load("extra_cases.json") or {"encode_cases": [], "parse_cases": []}


def test_conformance_folder_present():
    missing = [
        n
        for n in ("manifest.json", "extra_cases.json", "README.md")
        if not (CONFORMANCE_DIR / n).is_file()
    ]
    if missing:
        pytest.fail(
            f"conformance files {missing} not found in {CONFORMANCE_DIR}; put the shared folder "
            "beside the project root or set DSEC_CONFORMANCE_DIR"
        )
    assert len(MANIFEST["cases"]) == 4
    assert len(EXTRA["encode_cases"]) == 15
    assert len(EXTRA["parse_cases"]) == 9


def test_golden_files_unmodified():
    """The README's SHA-256 table matches the files (guards against added trailing newlines)."""
    readme = (CONFORMANCE_DIR / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"\| (test_\w+\.(?:json|txt)) \| ([0-9a-f]{64}) \|", readme))
    assert len(table) == 8
    for name, digest in table.items():
        assert hashlib.sha256((CONFORMANCE_DIR / name).read_bytes()).hexdigest() == digest, name


def _golden_messages(case: dict) -> list[dict]:
    data = json.loads((CONFORMANCE_DIR / case["input"]).read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: tools are attached to the system message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
        return messages
    return data


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["name"])
def test_golden_encode(case):
    expected = (CONFORMANCE_DIR / case["expected"]).read_bytes().decode("utf-8")
    got = chat.encode(_golden_messages(case), case["thinking_mode"])
    assert got == expected


def _segment(prompt: str, spec: str) -> str:
    marker = "<｜Assistant｜><think>"
    if spec.startswith("text after the FIRST occurrence"):
        start = prompt.index(marker) + len(marker)
        return prompt[start : prompt.index("<｜User｜>", start)]
    if spec.startswith("text after the LAST occurrence"):
        return prompt[prompt.rindex(marker) + len(marker) :]
    raise AssertionError(f"unknown segment description {spec!r}")


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["name"])
def test_golden_parse_checks(case):
    prompt = (CONFORMANCE_DIR / case["expected"]).read_bytes().decode("utf-8")
    for check in case["parse_checks"]:
        expect = check["expect"]
        if check["segment"] == "whole encoded prompt":
            assert expect["not_contains"] not in prompt
            continue
        msg = chat.parse_assistant(_segment(prompt, check["segment"]), check["thinking_mode"])
        assert msg["errors"] == []
        assert msg["reasoning_content"] == expect["reasoning_content"]
        if "content" in expect:
            assert msg["content"] == expect["content"]
        if "content_contains" in expect:
            assert expect["content_contains"] in msg["content"]
        assert len(msg["tool_calls"]) == expect["tool_calls_count"]
        if "tool_call_0_name" in expect:
            fn = msg["tool_calls"][0]["function"]
            assert fn["name"] == expect["tool_call_0_name"]
            assert json.loads(fn["arguments"]) == expect["tool_call_0_arguments_json"]


@pytest.mark.parametrize("case", EXTRA["encode_cases"], ids=lambda c: c["name"])
def test_extra_encode(case):
    got = chat.encode(case["messages"], case["thinking_mode"], **case["options"])
    assert got == case["expected_prompt"]


@pytest.mark.parametrize("case", EXTRA["parse_cases"], ids=lambda c: c["name"])
def test_extra_parse(case):
    msg = chat.parse_assistant(case["completion"], case["thinking_mode"])
    errors = msg.pop("errors")
    if case["expect_error"]:
        assert errors, "expected a parse error"
        assert all(isinstance(e, str) and e for e in errors)
    else:
        assert errors == []
        assert msg == case["expected"]


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["name"])
def test_golden_segments_join_to_prompt(case):
    """The segment form used by tokenizers joins to the same bytes, and every special segment
    is exactly one special token."""
    from policy.dsml import SPECIAL_TOKENS

    segments = chat.encode_segments(_golden_messages(case), case["thinking_mode"])
    expected = (CONFORMANCE_DIR / case["expected"]).read_bytes().decode("utf-8")
    assert "".join(s.text for s in segments) == expected
    assert all(s.text in SPECIAL_TOKENS for s in segments if s.special)
