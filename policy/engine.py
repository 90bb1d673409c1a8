"""Generation engine for agents: sessions that continue across tool turns, forks that share a
prefilled prompt, a prefix cache, continuous batching, a KV memory budget and live weight
updates (the step loop is ``policy.scheduler``); ``Engine.generate`` is the batch API on top.

Logprob convention (``policy.sampling``): ``Generation.logprobs[i]`` is log softmax(logits /
temperature) at the sampled token, before top-k / top-p filtering; greedy (temperature 0) gives
the plain log softmax. A sampled stop token is part of ``token_ids``.

A session holds one token sequence and its KV cache. After ``generate`` the sampled tokens are
part of the session (the last one is computed with whatever is appended next), so an agent turn
is ``generate`` -> ``append(tool result tokens)`` -> ``generate``: only new tokens are computed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from policy.model import V4Model
from policy.sampling import Generation, SamplingParams, sample
from policy.scheduler import Scheduler, SessionError

__all__ = [
    "AsyncEngine",
    "Engine",
    "Generation",
    "SamplingParams",
    "Session",
    "SessionError",
    "sample",
]


class Session:
    """Handle of one engine session (a token sequence and its cache). Read-only for callers."""

    __slots__ = ("_engine", "_s")

    def __init__(self, engine: AsyncEngine, state) -> None:
        self._engine, self._s = engine, state

    @property
    def id(self) -> int:
        return self._s.id

    @property
    def length(self) -> int:
        """Tokens the session holds (prompt, appended and sampled)."""
        return len(self._s.tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._s.tokens)

    @property
    def closed(self) -> bool:
        return self._s.closed

    def __repr__(self) -> str:
        return f"Session(id={self.id}, length={self.length})"


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_sizes(model: V4Model, max_batch, max_context) -> None:
    _check_int("max_batch", max_batch, 1)
    limit = model.cfg.max_position_embeddings
    if not isinstance(max_context, int) or not 1 <= max_context <= limit:
        raise ValueError(
            f"max_context must be an int in [1, max_position_embeddings={limit}], "
            f"got {max_context!r}"
        )


class AsyncEngine:
    """Sessions over a V4Model with continuous batching (see module doc and policy.scheduler).

    Args:
        model: the policy (generation runs without gradients, in a background thread).
        max_batch: most sequences decoded together in one step.
        max_context: most tokens per session.
        kv_budget_bytes: KV bytes (real cache layout, packed) for the decode batch plus every
            parked session; beyond it the least recently used idle sessions are preempted
            (their cache dropped, recomputed when used again). None: unbounded.
        prefix_cache_bytes: memory for cached prompt prefixes (LRU); 0 disables it.
        prefix_block: prompts are cached at every multiple of this many tokens and at their
            full length, so prompts sharing a long head (system prompt, tool schemas) reuse it.
        token_budget: most prefill tokens per step besides the decode rows (at least one chunk
            runs), so a long prompt does not stall the running generations.
        chunk: prefill chunk size; chunks end at absolute multiples of it.
        on_weight_update: "recompute" or "finish" (see ``policy.scheduler``).

    Every method is a coroutine except ``load_weights`` and ``stats``; all are safe from any
    thread or event loop. Cancelling an awaited ``generate`` stops it at the next step and
    returns once the session is idle: the tokens sampled so far stay in the session and
    ``session.tokens`` no longer changes.
    """

    def __init__(
        self,
        model: V4Model,
        *,
        max_batch: int = 32,
        max_context: int = 4096,
        kv_budget_bytes: int | None = None,
        prefix_cache_bytes: int = 64 << 20,
        prefix_block: int = 256,
        token_budget: int = 512,
        chunk: int = 256,
        on_weight_update: str = "recompute",
    ):
        _check_sizes(model, max_batch, max_context)
        if kv_budget_bytes is not None:
            _check_int("kv_budget_bytes", kv_budget_bytes, 1)
        _check_int("prefix_cache_bytes", prefix_cache_bytes, 0)
        for name, v in (("prefix_block", prefix_block), ("token_budget", token_budget)):
            _check_int(name, v, 1)
        _check_int("chunk", chunk, 1)
        if on_weight_update not in ("recompute", "finish"):
            raise ValueError(
                f"on_weight_update must be 'recompute' or 'finish', got {on_weight_update!r}"
            )
        model.eval()
        self.model, self.max_batch, self.max_context = model, max_batch, max_context
        self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        self._sched = Scheduler(
            model,
            max_batch=max_batch,
            max_context=max_context,
            kv_budget_bytes=kv_budget_bytes,
            prefix_cache_bytes=prefix_cache_bytes,
            prefix_block=prefix_block,
            token_budget=token_budget,
            chunk=chunk,
            on_weight_update=on_weight_update,
        )

    # ------------------------------------------------------------------ futures
    def _submit(self, kind: str, session: Session | None = None, **kw) -> Future:
        state = None
        if session is not None:
            if not isinstance(session, Session) or session._engine is not self:
                raise SessionError(f"not a session of this engine: {session!r}")
            state = session._s
        return self._sched.submit(kind, session=state, **kw)

    async def _await(self, fut: Future, session: Session | None = None):
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if session is not None:  # return only once the step loop has let go of it
                settled = self._submit("settle", session)
                with contextlib.suppress(SessionError, RuntimeError):
                    await asyncio.shield(asyncio.wrap_future(settled))
            raise

    @staticmethod
    def _tokens(token_ids: Sequence[int]) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence):
            raise ValueError(
                f"token ids must be a sequence of ints, got {type(token_ids).__name__}"
            )
        return list(token_ids)

    # ------------------------------------------------------------------ session API
    async def open(self, prompt_ids: Sequence[int]) -> Session:
        """A new session holding prompt_ids, prefilled (reusing a cached prefix when one
        matches)."""
        state = await self._await(self._submit("open", tokens=self._tokens(prompt_ids)))
        return Session(self, state)

    async def append(self, session: Session, token_ids: Sequence[int]) -> None:
        """Append tokens (a tool result, the next user turn); only they are computed."""
        await self._await(self._submit("append", session, tokens=self._tokens(token_ids)), session)

    async def generate(self, session: Session, params: SamplingParams) -> Generation:
        """Sample up to params.max_new_tokens tokens; they are appended to the session."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        return await self._await(self._submit("generate", session, params=params), session)

    async def fork(self, session: Session, n: int) -> list[Session]:
        """n new sessions sharing everything computed for ``session`` (which stays open)."""
        _check_int("n", n, 1)
        states = await self._await(self._submit("fork", session, n=n), session)
        return [Session(self, s) for s in states]

    async def rollback(self, session: Session, position: int) -> None:
        """Keep only the first ``position`` tokens (e.g. drop a rejected turn). Rolling back to
        the start of one of the last generations is a copy of the window and compressor
        states; anything else recomputes from the nearest earlier point."""
        await self._await(self._submit("rollback", session, n=position), session)

    async def close(self, session: Session) -> None:
        """Free the session's cache; the handle becomes unusable."""
        await self._await(self._submit("close", session))

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Swap the policy weights between two steps (never inside a token); generations
        report the version they were sampled with. Shapes and dtypes are checked here, before
        anything changes."""
        _check_int("version", version, 0)
        unknown = sorted(set(state_dict) - set(self._shapes))
        if unknown:
            raise ValueError(f"unknown weight names: {unknown[:5]}")
        for k, v in state_dict.items():
            shape, _ = self._shapes[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"weight {k!r} must have shape {shape}, got {got}")
            if not torch.isfinite(v.float()).all():
                raise ValueError(f"weight {k!r} has non-finite values")
        copied = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
        self._sched.set_weights(copied, version)

    def stats(self) -> dict:
        """Counters: sessions, running rows, KV bytes in use and budget, prefix hits, tokens."""
        return self._sched.stats()

    async def shutdown(self) -> None:
        """Stop the step loop; operations still pending fail with RuntimeError."""
        await asyncio.to_thread(self._sched.shutdown)

    def shutdown_sync(self) -> None:
        self._sched.shutdown()

    def __del__(self) -> None:  # a forgotten engine does not keep its thread alive
        sched = getattr(self, "_sched", None)
        if sched is not None:
            sched.stopping = True
            sched.wake.set()

    # ------------------------------------------------------------------ blocking helpers
    def run(self, kind: str, session: Session | None = None, **kw):
        """Blocking form of an operation (for callers without an event loop)."""
        return self._submit(kind, session, **kw).result()


class Engine:
    """Batch generation: ``generate(prompts, params)`` runs every prompt as a session of an
    ``AsyncEngine`` (continuous batching, up to ``max_batch`` rows at once).

    Seeding: prompt i of a call samples with seed ``params.seed + i``, so its tokens do not
    depend on ``max_batch`` or on the other prompts.
    """

    def __init__(self, model: V4Model, *, max_batch: int = 32, max_context: int = 4096, **kw):
        self.model, self.max_batch, self.max_context = model, max_batch, max_context
        self._kw = kw
        self._engine: AsyncEngine | None = None
        _check_sizes(model, max_batch, max_context)

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
            if len(p) + params.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {i}: {len(p)} prompt tokens + max_new_tokens "
                    f"{params.max_new_tokens} = {len(p) + params.max_new_tokens} exceeds "
                    f"max_context {self.max_context}"
                )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Generate for every prompt (token ids); one Generation per prompt, in order."""
        prompts = [list(p) for p in prompts]
        self._check(prompts, params)
        if self._engine is None:
            self._engine = AsyncEngine(
                self.model, max_batch=self.max_batch, max_context=self.max_context, **self._kw
            )
        eng = self._engine
        base = params.seed
        if base is None:
            base = int(torch.randint(0, 2**62, ()))
        futs = [eng._submit("open", tokens=p) for p in prompts]
        gens = []
        for i, f in enumerate(futs):
            state = f.result()
            s = Session(eng, state)
            p = SamplingParams(**{**params.__dict__, "seed": base + i})
            gens.append((s, eng._submit("generate", s, params=p)))
        out = []
        for s, f in gens:
            out.append(f.result())
            eng.run("close", s)
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown_sync()
            self._engine = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
