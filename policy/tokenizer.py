"""Tokenizers for the V4 policy: the official ``tokenizer.json`` and a byte-level one for small
models, both with the V4 special tokens (policy.dsml.SPECIAL_TOKENS) as single ids.

The special-token rule. A special token can only come from the chat template, never from text
the template wraps (user messages, tool output, reasoning, tool-call values). Hence:

- ``encode(text)`` (``allow_special=True``) turns every special-token string in ``text`` into its
  special id. Use it only for trusted template text.
- ``encode(text, allow_special=False)`` encodes everything as ordinary text: ``"<｜User｜>"``
  typed by a user becomes a handful of ordinary tokens.
- ``encode_chat(messages, ...)``, ``encode_tool_results(...)`` and ``encode_segments(...)`` build
  ids piecewise from the encoder's segments (policy.chat): each special token placed by the
  template becomes its id and every text run between two of them is encoded with
  ``allow_special=False``. For text without special-token strings this gives exactly the ids of
  encoding the whole prompt string with the official tokenizer (which also splits at special
  tokens before running BPE); for text with them it differs on purpose.

``decode(ids)`` renders special ids as their strings, so ``parse_assistant(decode(ids))`` works
on sampled tokens. Ids are plain Python ints.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from policy.dsml import BOS, EOS, SPECIAL_TOKENS, Segment

# Tokens every V4 tokenizer must have; the others (task tokens, latest_reminder) are optional.
REQUIRED_SPECIAL_TOKENS = SPECIAL_TOKENS[:7]


class Tokenizer(ABC):
    """Common interface. ``special_tokens`` maps each special-token string to its id."""

    special_tokens: dict[str, int]
    _special_ids: frozenset[int] = frozenset()

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the model's embedding rows must be at least this many)."""

    @abstractmethod
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Ids of ``text``; special-token strings become special ids only if ``allow_special``."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids decode to their strings."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token string of one id (for byte-level vocabularies, its raw form)."""

    def token_to_id(self, token: str) -> int:
        """Id of a special token."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token of this tokenizer") from None

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def pad_id(self) -> int:
        """Padding id: EOS, as in the official ``tokenizer_config.json``."""
        return self.eos_id

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _set_special_tokens(self, mapping: dict[str, int]) -> None:
        self.special_tokens = dict(mapping)
        self._special_ids = frozenset(mapping.values())

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Ids of encoder segments: template special tokens become their ids, all other text
        (merged between special tokens) is encoded with ``allow_special=False``."""
        ids: list[int] = []
        run: list[str] = []
        for seg in segments:
            if seg.special:
                if run:
                    ids += self.encode("".join(run), allow_special=False)
                    run = []
                ids.append(self.token_to_id(seg.text))
            else:
                run.append(seg.text)
        if run:
            ids += self.encode("".join(run), allow_special=False)
        return ids

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any
    ) -> list[int]:
        """Ids of ``policy.chat.encode(messages, ...)`` (same arguments), built piecewise."""
        from policy import chat

        return self.encode_segments(chat.encode_segments(messages, *args, **kwargs))

    def encode_tool_results(self, results: Sequence[Any], *args: Any, **kwargs: Any) -> list[int]:
        """Ids of ``policy.chat.encode_tool_results(results, ...)``, built piecewise."""
        from policy import chat

        return self.encode_segments(chat.tool_results_segments(results, *args, **kwargs))


class OfficialTokenizer(Tokenizer):
    """The official byte-level BPE tokenizer, read from a local ``tokenizer.json``."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        # A copy in which every added token is special and special tokens are encoded as text:
        # the library otherwise matches added tokens anywhere in raw text.
        data = json.loads(tokenizer_json)
        for added in data.get("added_tokens", []):
            added["special"] = True
        self._plain = HFTokenizer.from_str(json.dumps(data))
        self._plain.encode_special_tokens = True
        specials: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                if token in REQUIRED_SPECIAL_TOKENS:
                    raise ValueError(f"tokenizer has no special token {token!r}")
                continue
            if self._tok.encode(token, add_special_tokens=False).ids != [token_id]:
                raise ValueError(f"special token {token!r} does not encode to its single id")
            specials[token] = token_id
        self._set_special_tokens(specials)
        for token, token_id in self.special_tokens.items():
            if set(self.encode(token, allow_special=False)) & self._special_ids:
                raise ValueError(f"plain text {token!r} encodes to a special id {token_id}")

    @classmethod
    def from_file(cls, path: str | Path) -> OfficialTokenizer:
        """Load a local ``tokenizer.json`` (no download)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(path.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is out of range")
        return token


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are the UTF-8 bytes; ids 256.. are the V4 special tokens in the order of
    ``policy.dsml.SPECIAL_TOKENS`` (BOS 256, EOS 257, ...). ``vocab_size`` is 271."""

    def __init__(self) -> None:
        self._set_special_tokens({t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})
        self._by_id = {i: t for t, i in self.special_tokens.items()}
        alternatives = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            else:
                ids += part.encode("utf-8")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Invalid UTF-8 (for example a character cut in half) decodes to U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for token_id in ids:
            if 0 <= token_id < 256:
                buf.append(token_id)
                continue
            if token_id not in self._by_id:
                raise ValueError(f"token id {token_id} is out of range 0..{self.vocab_size - 1}")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(self._by_id[token_id])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return bytes([token_id]).decode("latin-1")
        if token_id in self._by_id:
            return self._by_id[token_id]
        raise ValueError(f"token id {token_id} is out of range 0..{self.vocab_size - 1}")
