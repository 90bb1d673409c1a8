"""Inference backends: the one small async interface the agent loop talks to.

A backend holds *sessions*: a token context that only grows by appending (or shrinks by an
explicit rollback). The agent loop opens a session with the prompt ids, asks for one assistant
turn at a time with :meth:`Backend.generate` (the sampled tokens are appended to the session) and
appends the encoded tool results with :meth:`Backend.append`. Nothing is ever re-tokenized.

- :class:`EngineBackend` wraps the in-process ``policy.AsyncEngine`` (the default).
- :class:`ScriptedBackend` replays given completion texts, or the texts a callable returns, for
  tests and for debugging tasks without a model.

The interface is deliberately narrow (ids in, :class:`policy.Generation` out) so that a remote
OpenAI-compatible backend can implement it later.
"""

from __future__ import annotations

import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from policy.engine import Generation, SamplingParams
from policy.tokenizer import Tokenizer

__all__ = [
    "Backend",
    "EngineBackend",
    "ScriptedBackend",
    "ScriptedSession",
    "ScriptedTurn",
    "Session",
]


class Session(Protocol):
    """What a backend hands out: an opaque handle with an ``id`` and the context ``length``."""

    @property
    def id(self) -> int: ...

    @property
    def length(self) -> int: ...


class Backend(ABC):
    """The async interface of an inference backend (see the module doc).

    ``max_context`` is the most tokens a session may hold (None: no limit of its own); the agent
    loop keeps every session within it.
    """

    max_context: int | None = None

    @abstractmethod
    async def open(self, prompt_ids: Sequence[int]) -> Session:
        """A new session holding ``prompt_ids`` (prefilled where that means something)."""

    @abstractmethod
    async def append(self, session: Session, token_ids: Sequence[int]) -> None:
        """Append tokens that were not sampled (tool results, a user turn) to ``session``."""

    @abstractmethod
    async def generate(self, session: Session, params: SamplingParams) -> Generation:
        """Sample one continuation of ``session``; its tokens are appended to the session.

        The Generation carries ``token_ids``, their ``logprobs``, ``finish_reason`` ("stop" when
        a stop token was sampled, which is then the last token; "length" otherwise) and the
        ``version`` of the weights that sampled it."""

    @abstractmethod
    async def fork(self, session: Session, n: int) -> list[Session]:
        """``n`` new sessions, each a copy of ``session`` (which stays open)."""

    @abstractmethod
    async def rollback(self, session: Session, position: int) -> None:
        """Truncate ``session`` to its first ``position`` tokens."""

    @abstractmethod
    async def close(self, session: Session) -> None:
        """Release ``session``; it cannot be used afterwards."""


# ------------------------------------------------------------------------------------------------
# The in-process policy engine
# ------------------------------------------------------------------------------------------------


class EngineBackend(Backend):
    """The in-process ``policy.AsyncEngine``: every call goes straight to the engine's session
    API. The engine owns batching, the KV cache and the weight version."""

    def __init__(self, engine: Any) -> None:
        for name in ("open", "append", "generate", "fork", "rollback", "close"):
            if not callable(getattr(engine, name, None)):
                raise ValueError(
                    f"engine must be a policy.AsyncEngine (no {name}() on {type(engine).__name__})"
                )
        self.engine = engine
        self.max_context = getattr(engine, "max_context", None)

    async def open(self, prompt_ids: Sequence[int]) -> Session:
        return await self.engine.open(list(prompt_ids))

    async def append(self, session: Session, token_ids: Sequence[int]) -> None:
        await self.engine.append(session, list(token_ids))

    async def generate(self, session: Session, params: SamplingParams) -> Generation:
        return await self.engine.generate(session, params)

    async def fork(self, session: Session, n: int) -> list[Session]:
        return list(await self.engine.fork(session, n))

    async def rollback(self, session: Session, position: int) -> None:
        await self.engine.rollback(session, position)

    async def close(self, session: Session) -> None:
        await self.engine.close(session)


# ------------------------------------------------------------------------------------------------
# Scripted replay
# ------------------------------------------------------------------------------------------------

Script = Sequence[str] | Callable[[str, int], "str | Awaitable[str]"]


@dataclass
class ScriptedSession:
    """A :class:`ScriptedBackend` session: the context ids and how many turns it generated."""

    id: int
    tokens: list[int] = field(default_factory=list)
    turns: int = 0
    closed: bool = False

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ScriptedTurn:
    """One :meth:`ScriptedBackend.generate` call: the context it saw and the tokens it gave."""

    session_id: int
    turn: int
    context_ids: list[int]
    token_ids: list[int]


class ScriptedBackend(Backend):
    """Replays completion texts as if a model had sampled them.

    ``script`` is a list of texts (a session's turn ``k`` gets ``script[k]``) or a callable
    ``script(context, turn) -> text`` (or an awaitable of it), where ``context`` is the session's
    decoded context and ``turn`` counts that session's generate calls from 0 (a fork inherits the
    count). A text is what the model emits after the generation prompt, e.g. ``"reasoning</think>
    answer"`` in thinking mode; it is encoded with ``tokenizer`` (special-token strings become
    special ids, as the model would sample them) and ends with EOS, which is added when the text
    does not end with it, so that the parser sees a complete assistant turn.

    Like a real engine, the completion stops after the first of ``params.stop_token_ids`` or EOS
    (``finish_reason`` "stop") and is cut at ``params.max_new_tokens`` ("length"); ``max_context``
    bounds a session. Every logprob is 0.0 and every generation reports weight ``version``.
    ``transcript`` records each generate call (:class:`ScriptedTurn`).
    """

    def __init__(
        self,
        script: Script,
        tokenizer: Tokenizer,
        *,
        version: int = 0,
        max_context: int | None = None,
    ) -> None:
        if isinstance(script, (str, bytes)):
            raise ValueError(f"script must be a list of texts or a callable, got {script!r}")
        if not callable(script):
            if not isinstance(script, Sequence):
                raise ValueError(f"script must be a list of texts or a callable, got {script!r}")
            for i, text in enumerate(script):
                if not isinstance(text, str):
                    raise ValueError(f"script[{i}] must be a str, got {text!r}")
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be a policy Tokenizer, got {tokenizer!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise ValueError(f"max_context must be an int >= 1 or None, got {max_context!r}")
        self.script = script
        self.tokenizer = tokenizer
        self.version = version
        self.max_context = max_context
        self.transcript: list[ScriptedTurn] = []
        self._ids = itertools.count()
        self._sessions: dict[int, ScriptedSession] = {}

    def _get(self, session: Session) -> ScriptedSession:
        sid = getattr(session, "id", None)
        live = self._sessions.get(sid) if isinstance(sid, int) else None
        if live is None or live is not session:
            raise ValueError(f"session {sid!r} is not an open session of this backend")
        return live

    def _check_fits(self, s: ScriptedSession, extra: int) -> None:
        if self.max_context is not None and s.length + extra > self.max_context:
            raise ValueError(
                f"session {s.id}: {s.length} + {extra} tokens exceed max_context {self.max_context}"
            )

    def _new(self, tokens: list[int], turns: int = 0) -> ScriptedSession:
        s = ScriptedSession(next(self._ids), tokens, turns)
        self._sessions[s.id] = s
        return s

    async def open(self, prompt_ids: Sequence[int]) -> ScriptedSession:
        ids = _token_list(prompt_ids, "prompt_ids")
        if not ids:
            raise ValueError("prompt_ids is empty")
        if self.max_context is not None and len(ids) > self.max_context:
            raise ValueError(f"{len(ids)} prompt tokens exceed max_context {self.max_context}")
        return self._new(ids)

    async def append(self, session: Session, token_ids: Sequence[int]) -> None:
        s = self._get(session)
        ids = _token_list(token_ids, "token_ids")
        self._check_fits(s, len(ids))
        s.tokens += ids

    async def generate(self, session: Session, params: SamplingParams) -> Generation:
        s = self._get(session)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        turn = s.turns
        text = await self._text(s, turn)
        ids = self.tokenizer.encode(text)
        eos = self.tokenizer.eos_id
        if not ids or ids[-1] != eos:
            ids.append(eos)
        stops = {*params.stop_token_ids, eos}
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        ids, finish = ids[:end], "stop"
        if len(ids) > params.max_new_tokens:
            ids, finish = ids[: params.max_new_tokens], "length"
        self._check_fits(s, len(ids))
        self.transcript.append(ScriptedTurn(s.id, turn, list(s.tokens), list(ids)))
        s.tokens += ids
        s.turns += 1
        return _generation(ids, finish, self.version)

    async def _text(self, s: ScriptedSession, turn: int) -> str:
        if callable(self.script):
            text = self.script(self.tokenizer.decode(s.tokens), turn)
            if inspect.isawaitable(text):
                text = await text
        elif turn < len(self.script):
            text = self.script[turn]
        else:
            raise ValueError(
                f"session {s.id}: the script has no completion for turn {turn} "
                f"(it has {len(self.script)})"
            )
        if not isinstance(text, str):
            raise ValueError(f"script returned {text!r} for turn {turn}; expected a str")
        return text

    async def fork(self, session: Session, n: int) -> list[ScriptedSession]:
        s = self._get(session)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        return [self._new(list(s.tokens), s.turns) for _ in range(n)]

    async def rollback(self, session: Session, position: int) -> None:
        s = self._get(session)
        if not isinstance(position, int) or isinstance(position, bool):
            raise ValueError(f"position must be an int, got {position!r}")
        if not 1 <= position <= s.length:
            raise ValueError(f"position must be in [1, {s.length}], got {position}")
        del s.tokens[position:]

    async def close(self, session: Session) -> None:
        s = self._get(session)
        s.closed = True
        del self._sessions[s.id]


def _token_list(ids: Sequence[int], what: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{what} must be a list of token ids, got {ids!r}")
    out = list(ids)
    bad = [t for t in out if not isinstance(t, int) or isinstance(t, bool) or t < 0]
    if bad:
        raise ValueError(f"{what} holds values that are not token ids: {bad[:5]}")
    return out


def _generation(ids: list[int], finish: str, version: int) -> Generation:
    return Generation(
        token_ids=ids,
        logprobs=[0.0] * len(ids),
        finish_reason=finish,
        version=version,
        versions=[version] * len(ids),
    )
