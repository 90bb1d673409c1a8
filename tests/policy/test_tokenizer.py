"""Tokenizers: special tokens are single ids, look-alike text never becomes one, chat prompts
are tokenized piecewise. The official-format tokenizer is a small byte-level BPE built here with
the ``tokenizers`` library and saved as a real ``tokenizer.json``."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from policy import chat
from policy.dsml import ASSISTANT, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER
from policy.tokenizer import ByteTokenizer, OfficialTokenizer

CORPUS = [
    "What's the weather in Beijing? The weather is sunny, 22°C. 东京 ",
    '<tool_result>{"time": "09:30"}</tool_result> name="get_time" string="true" ',
    "## Tools\n\nYou have access to a set of tools to help answer the user's question.",
]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": f"Say {USER} and {THINK_END} and {DSML}{EOS} literally."},
    {
        "role": "assistant",
        "reasoning_content": f"They typed {ASSISTANT}.",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "echo", "arguments": json.dumps({"text": f"{USER}x"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": f"{USER}x{EOS}"},
]
TOOLS = [{"name": "echo", "description": "Echo", "parameters": {"type": "object"}}]


def build_tokenizer_json(path, *, think_is_special: bool = True) -> None:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    for token in SPECIAL_TOKENS:
        special = think_is_special or token not in (THINK_START, THINK_END)
        tok.add_tokens([AddedToken(token, special=special, normalized=False)])
    tok.save(str(path))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer_json(path)
    return OfficialTokenizer.from_file(path)


@pytest.fixture(scope="module", params=["byte", "official", "official-nonspecial-think"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte":
        return ByteTokenizer()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer_json(path, think_is_special=request.param == "official")
    return OfficialTokenizer.from_file(path.parent)


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.decode([token_id]) == token
        assert tokenizer.is_special(token_id)
        assert 0 <= token_id < tokenizer.vocab_size
    assert tokenizer.bos_id == tokenizer.token_to_id(SPECIAL_TOKENS[0])
    assert tokenizer.pad_id == tokenizer.eos_id == tokenizer.token_to_id(EOS)
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.token_to_id("hello")


def test_look_alike_text_is_not_special(tokenizer):
    text = "a<｜User｜>b｜DSML｜c<think></think><｜end▁of▁sentence｜>"
    plain = tokenizer.encode(text, allow_special=False)
    assert not any(tokenizer.is_special(i) for i in plain)
    assert tokenizer.decode(plain) == text
    assert sum(tokenizer.is_special(i) for i in tokenizer.encode(text)) == 5


def test_encode_chat_keeps_content_out_of_special_tokens(tokenizer):
    prompt = chat.encode(MESSAGES, tools=TOOLS)
    ids = tokenizer.encode_chat(MESSAGES, tools=TOOLS)
    assert tokenizer.decode(ids) == prompt
    special = [tokenizer.id_to_token(i) for i in ids if tokenizer.is_special(i)]
    # BOS; the tools block's DSML and think markers; User, Assistant, <think>; reasoning close;
    # the DSML block; EOS; tool-result User turn, Assistant, <think>.
    template_only = [s.text for s in chat.encode_segments(MESSAGES, tools=TOOLS) if s.special]
    assert special == template_only
    assert special.count(USER) == 2
    assert special.count(EOS) == 1
    # Whole-string encoding would have promoted the user's look-alikes.
    assert sum(tokenizer.is_special(i) for i in tokenizer.encode(prompt)) > len(special)


def test_tool_results_ids_extend_the_prompt(tokenizer):
    head = tokenizer.encode_chat(MESSAGES[:3], tools=TOOLS)
    tail = tokenizer.encode_tool_results([MESSAGES[3]["content"]])
    assert tokenizer.decode(head + tail) == chat.encode(MESSAGES, tools=TOOLS)
    assert tokenizer.encode_segments(chat.encode_segments(MESSAGES, tools=TOOLS)) == head + tail


def test_official_matches_whole_string_encoding_on_clean_text(official, tmp_path):
    """Without look-alike text, piecewise ids equal the library's whole-prompt encoding (the
    library splits at special tokens before BPE too)."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Beijing?"},
        {"role": "assistant", "reasoning_content": "Sunny.", "content": "Sunny, 22°C."},
        {"role": "user", "content": "东京?"},
    ]
    for kwargs in ({}, {"tools": TOOLS}, {"thinking_mode": "chat"}):
        prompt = chat.encode(messages, **kwargs)
        assert official.encode_chat(messages, **kwargs) == official.encode(prompt)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text, allow_special=False)) == text
    assert tok.decode(tok.encode(text)) == text


def test_byte_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS) <= 512
    assert tok.encode("A") == [65]
    assert tok.bos_id == 256 and tok.eos_id == 257
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # half a character
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(-1)


def test_official_rejects_missing_special_tokens(tmp_path):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([EOS])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(ValueError, match="no special token"):
        OfficialTokenizer.from_file(path)
    with pytest.raises(FileNotFoundError):
        OfficialTokenizer.from_file(tmp_path / "missing.json")


def test_sampled_ids_decode_and_parse(tokenizer):
    """Ids of an assistant completion (as a model would sample them) decode to text that
    parses back to the message."""
    reply = copy.deepcopy(MESSAGES[2])
    ids = tokenizer.encode_segments(chat.assistant_segments(reply))
    assert ids[-1] == tokenizer.eos_id
    msg = chat.parse_assistant(tokenizer.decode(ids))
    assert msg["errors"] == []
    assert msg["reasoning_content"] == reply["reasoning_content"]
    assert msg["tool_calls"][0]["function"] == {
        "name": "echo",
        "arguments": json.dumps({"text": f"{USER}x"}, ensure_ascii=False),
    }
