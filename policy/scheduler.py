"""The engine's step loop: sessions that continue across turns, forks, a prefix cache, continuous
batching with chunked prefill, a KV memory budget with preemption, and live weight updates.

One background thread owns the model and every cache; callers submit operations through a queue
and get ``concurrent.futures.Future`` results (``policy.engine.AsyncEngine`` wraps them for
asyncio). Each step of the loop:

1. applies queued operations (open, append, generate, fork, rollback, close) and a pending
   weight update;
2. prefill: runs pending extends (prompts, appended tool results, recomputation after a
   preemption) in chunks, up to ``token_budget`` new tokens per step (at least one chunk);
3. joins sessions whose generation is ready into the decode batch (up to ``max_batch`` rows);
4. samples one token for every running row, lets finished rows leave, decodes the rest.

Where a session lives: parked (its own one-row cache, grown on demand), running (a row of the
shared decode batch), or preempted (no cache; recomputed from its tokens when used again).

Chunk boundaries are absolute positions (multiples of ``chunk``), so a sequence is computed in
the same pieces whatever else runs: a prefix-cache hit gives bitwise the same cache as a miss.

Weight updates (``load_weights``) take effect between two steps, never inside a token. With
``on_weight_update="recompute"`` (the default) they apply at the next step and every session
whose cache was computed under older weights is recomputed from its tokens before its next
token (a running generation continues on the new weights). With ``"finish"`` the update waits
until no generation is running (new generations wait for it), and caches are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from policy.kv_cache import KVCache, clone_row, copy_row, restore_tail, tail_state, view_rows
from policy.model import V4Model
from policy.sampling import Generation, SamplingParams, sample

MAX_MARKS = 4  # rollback points kept per session (the starts of its latest generations)


class SessionError(ValueError):
    """A bad operation on a session: unknown, closed, busy, or bad arguments."""


@dataclass(eq=False)
class _Op:
    kind: str
    future: Future
    session: _Session | None = None
    tokens: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    n: int = 0
    # generate state
    gen: Generation | None = None
    generator: torch.Generator | None = None
    sample_key: SamplingParams | None = None


@dataclass(eq=False)
class _Session:
    id: int
    tokens: list[int]
    computed: int = 0  # tokens whose KV is in the cache
    cache: KVCache | None = None  # parked one-row cache (None: running or preempted)
    row: int | None = None  # decode-batch row while running
    logits: torch.Tensor | None = None  # [V] after token computed-1
    version: int = 0  # weights the cache was computed with
    marks: list[tuple[int, dict, torch.Tensor]] = field(default_factory=list)
    op: _Op | None = None  # operation in progress
    closed: bool = False
    last_used: float = 0.0


class _PrefixCache:
    """LRU map token prefix -> (one-row cache snapshot, logits after it), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[KVCache, torch.Tensor, int]]
        self.entries = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def _size(cache: KVCache) -> int:
        mirrors = [
            s.mirror
            for la in cache.layers
            for s in (la.window, la.comp, la.index)
            if s is not None and s.mirror is not None
        ]
        return cache.nbytes() + sum(m.numel() * m.element_size() for m in mirrors)

    def get(self, key: tuple[int, ...]):
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: tuple[int, ...], cache: KVCache, logits: torch.Tensor) -> None:
        if key in self.entries or self.max_bytes <= 0:
            return
        size = self._size(cache)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, _, old) = self.entries.popitem(last=False)
            self.bytes -= old
        self.entries[key] = (cache, logits, size)
        self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class Scheduler:
    """The step loop (see module doc). Use it through ``policy.AsyncEngine`` / ``Engine``."""

    def __init__(
        self,
        model: V4Model,
        *,
        max_batch: int,
        max_context: int,
        kv_budget_bytes: int | None,
        prefix_cache_bytes: int,
        prefix_block: int,
        token_budget: int,
        chunk: int,
        on_weight_update: str,
    ):
        self.model, self.cfg = model, model.cfg
        self.max_batch, self.max_context = max_batch, max_context
        self.token_budget, self.chunk, self.prefix_block = token_budget, chunk, prefix_block
        self.on_weight_update = on_weight_update
        self.device = model.embed.weight.device
        self.batch = KVCache(self.cfg, max_batch, max_context, self.device)
        self.batch_bytes = self.batch.nbytes()
        self.session_max_bytes = KVCache(self.cfg, 1, max_context, "meta", mirror=False).nbytes()
        if (
            kv_budget_bytes is not None
            and kv_budget_bytes < self.batch_bytes + self.session_max_bytes
        ):
            raise ValueError(
                f"kv_budget_bytes {kv_budget_bytes} is too small: the decode batch of max_batch="
                f"{max_batch} rows takes {self.batch_bytes} bytes and one session of max_context="
                f"{max_context} tokens up to {self.session_max_bytes} more"
            )
        self.kv_budget = kv_budget_bytes
        self.prefix = _PrefixCache(prefix_cache_bytes)
        self.sessions: dict[int, _Session] = {}
        self.running: list[_Op] = []  # decode batch, index = batch row
        self.prefill: collections.deque[_Session] = collections.deque()
        self.ready: collections.deque[_Op] = collections.deque()  # generations waiting for a row
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ids = itertools.count(1)
        self.version = 0
        self.pending_weights: tuple[dict[str, torch.Tensor], int] | None = None
        self.counters = collections.Counter()
        self.error: BaseException | None = None
        self.stopping = False
        # submit's check of ``stopping`` and its put are one step against shutdown: an operation
        # is either refused or in the inbox before the loop's last drain, never lost between
        self.submit_lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="policy-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, kind: str, **kw: Any) -> Future:
        fut: Future = Future()
        with self.submit_lock:
            if self.stopping:
                fut.set_exception(RuntimeError("the engine is shut down"))
                return fut
            self.inbox.put(_Op(kind, fut, **kw))
        self.wake.set()
        return fut

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.inbox.put(("weights", state_dict, version))
        self.wake.set()

    def shutdown(self, timeout: float | None = None) -> None:
        with self.submit_lock:
            self.stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        parked = [s.cache for s in list(self.sessions.values()) if s.cache is not None]
        return {
            "version": self.version,
            "sessions": len(self.sessions),
            "running": len(self.running),
            "kv_bytes_in_use": self.batch_bytes + sum(c.nbytes() for c in parked),
            "kv_budget_bytes": self.kv_budget,
            "prefix_cache_bytes": self.prefix.bytes,
            "prefix_hits": self.prefix.hits,
            "prefix_misses": self.prefix.misses,
            **dict(self.counters),
        }

    # ------------------------------------------------------------------ the loop (engine thread)
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    self._intake()
                    if self.stopping:
                        break
                    busy = self._step()
                except BaseException as exc:  # never die silently: fail what is in flight
                    self._fail_all(exc)
                    busy = False
                if not busy:  # sleep until an operation arrives (submit sets wake)
                    self.wake.wait(1.0)
                    self.wake.clear()
        self._fail_all(RuntimeError("the engine is shut down"))
        while not self.inbox.empty():
            item = self.inbox.get()
            if isinstance(item, _Op):
                _resolve(item.future, exc=RuntimeError("the engine is shut down"))

    def _fail_all(self, exc: BaseException) -> None:
        ops = [s.op for s in self.sessions.values() if s.op is not None]
        for op in ops:
            _resolve(op.future, exc=exc)
        for s in self.sessions.values():
            if s.op is not None and s.row is not None:
                s.row = None
                s.computed, s.cache, s.logits, s.marks = 0, None, None, []
            s.op = None
        self.running.clear()
        self.prefill.clear()
        self.ready.clear()

    def _intake(self) -> None:
        while not self.inbox.empty():
            item = self.inbox.get()
            if isinstance(item, tuple):
                self.pending_weights = item[1:]
                continue
            try:
                self._accept(item)
            except (SessionError, ValueError) as exc:
                _resolve(item.future, exc=exc)

    def _session(self, op: _Op) -> _Session:
        s = op.session
        if s is None or s.id not in self.sessions or s.closed:
            raise SessionError(f"unknown or closed session {getattr(s, 'id', s)!r}")
        if s.op is not None and s.op.future.cancelled():
            self._cancel(s)
        if s.op is not None:
            raise SessionError(
                f"session {s.id} is busy with '{s.op.kind}'; await it before '{op.kind}'"
            )
        return s

    def _accept(self, op: _Op) -> None:
        if op.kind == "open":
            self._check_tokens(op.tokens, 0)
            s = _Session(next(self.ids), list(op.tokens), version=self.version)
            self.sessions[s.id] = s
            op.session = s
            self._lookup_prefix(s)
            self._start(s, op)
            return
        s = self._session(op)
        s.last_used = time.monotonic()
        if op.kind == "append":
            self._check_tokens(op.tokens, len(s.tokens))
            s.tokens += op.tokens
            self._start(s, op)
        elif op.kind == "generate":
            if len(s.tokens) >= self.max_context:
                raise SessionError(
                    f"session {s.id} holds {len(s.tokens)} tokens: no room to generate within "
                    f"max_context {self.max_context}"
                )
            seed = op.params.seed
            seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
            op.generator = torch.Generator().manual_seed(seed)
            op.sample_key = dataclasses.replace(op.params, seed=None)
            op.gen = Generation()
            self._start(s, op)
        elif op.kind == "fork":
            self._start(s, op)
        elif op.kind == "rollback":
            self._rollback(s, op)
        elif op.kind == "settle":  # _session() has dropped a cancelled operation
            _resolve(op.future, None)
        elif op.kind == "close":
            s.closed = True
            self._drop_cache(s)
            del self.sessions[s.id]
            _resolve(op.future, None)
        else:
            raise SessionError(f"unknown operation {op.kind!r}")

    def _check_tokens(self, tokens: list[int], held: int) -> None:
        vocab = self.cfg.vocab_size
        bad = [
            t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
        ]
        if bad:
            raise SessionError(f"token ids outside [0, {vocab}): {bad[:5]}")
        if held + len(tokens) > self.max_context:
            raise SessionError(
                f"{held} held + {len(tokens)} new tokens = {held + len(tokens)} exceeds "
                f"max_context {self.max_context}"
            )
        if held == 0 and not tokens:
            raise SessionError("a session needs at least one prompt token")

    def _start(self, s: _Session, op: _Op) -> None:
        """Queue s for its pending computation, or finish op now when nothing is pending."""
        s.op = op
        if self._stale(s) or s.computed < len(s.tokens):
            self.prefill.append(s)
        else:
            self._computed(s)

    def _stale(self, s: _Session) -> bool:
        if s.version != self.version and self.on_weight_update == "recompute" and s.computed:
            self._drop_cache(s)
            s.version = self.version
        return s.computed < len(s.tokens)

    def _computed(self, s: _Session) -> None:
        """Every token of s is in its cache: complete or advance its operation."""
        op = s.op
        if op.future.cancelled():
            self._abandon(s)
            return
        if op.kind == "generate":
            self.ready.append(op)
            return
        if op.kind == "fork":
            forks = []
            for _ in range(op.n):
                f = _Session(next(self.ids), list(s.tokens), s.computed, version=s.version)
                f.cache = clone_row(s.cache, 0, s.cache.capacity) if s.cache is not None else None
                f.logits, f.marks = s.logits, list(s.marks)
                self._reserve(f.cache.nbytes() if f.cache is not None else 0, keep=(s, *forks))
                self.sessions[f.id] = f
                forks.append(f)
            self.counters["forks"] += op.n
            s.op = None
            _resolve(op.future, forks)
            return
        s.op = None
        _resolve(op.future, s)

    # ------------------------------------------------------------------ memory
    def _parked_bytes(self) -> int:
        return sum(x.cache.nbytes() for x in self.sessions.values() if x.cache is not None)

    def _reserve(self, nbytes: int, keep: tuple[_Session, ...]) -> None:
        """Preempt least recently used parked sessions until nbytes more fit the budget."""
        if self.kv_budget is None:
            return
        limit = self.kv_budget - self.batch_bytes
        if nbytes > limit:
            raise SessionError(
                f"a session cache of {nbytes} bytes cannot fit the KV budget: {self.kv_budget} "
                f"bytes minus {self.batch_bytes} for the decode batch"
            )
        used = self._parked_bytes()
        victims = sorted(
            (x for x in self.sessions.values() if x.cache is not None and x not in keep),
            key=lambda x: x.last_used,
        )
        for v in victims:
            if used + nbytes <= limit:
                break
            used -= v.cache.nbytes()
            self._drop_cache(v)
            self.counters["preemptions"] += 1  # queued work recomputes it (prefill, _join)

    def _drop_cache(self, s: _Session) -> None:
        s.cache, s.computed, s.logits, s.marks = None, 0, None, []

    def _grow(self, s: _Session, need: int) -> None:
        """Give s a parked cache that can hold ``need`` tokens."""
        if s.cache is not None and s.cache.capacity >= need:
            return
        old = s.cache.capacity if s.cache is not None else 0
        cap = min(self.max_context, max(need, 2 * old, self.chunk))
        new = KVCache(self.cfg, 1, cap, "meta", mirror=False).nbytes()
        self._reserve(new - (s.cache.nbytes() if s.cache is not None else 0), keep=(s,))
        if s.cache is None:
            s.cache = KVCache(self.cfg, 1, cap, self.device)
        else:
            s.cache = clone_row(s.cache, 0, cap)

    # ------------------------------------------------------------------ prefix cache
    def _prefix_points(self, n: int) -> list[int]:
        blk = self.prefix_block
        return sorted({n, *range(blk, n, blk)}, reverse=True)

    def _lookup_prefix(self, s: _Session) -> None:
        for length in self._prefix_points(len(s.tokens)):
            hit = self.prefix.get(tuple(s.tokens[:length]))
            if hit is not None:
                snap, logits, _ = hit
                self._grow(s, len(s.tokens))
                copy_row(s.cache, 0, snap, 0)
                s.computed, s.logits = length, logits
                self.prefix.hits += 1
                return
        self.prefix.misses += 1

    def _maybe_snapshot(self, s: _Session, prompt_len: int) -> None:
        if s.computed in self._prefix_points(prompt_len) and s.computed >= self.prefix_block:
            key = tuple(s.tokens[: s.computed])
            if key not in self.prefix.entries:
                self.prefix.put(key, clone_row(s.cache, 0, s.computed), s.logits)

    # ------------------------------------------------------------------ prefill
    def _run_prefill(self) -> bool:
        budget = max(self.token_budget - len(self.running), 1)
        did = False
        while self.prefill and budget > 0:
            s = self.prefill[0]
            if s.op is None or s.op.future.cancelled() or s.closed:
                self.prefill.popleft()
                if s.op is not None and s.op.future.cancelled():
                    self._abandon(s)
                continue
            self._stale(s)
            target = len(s.tokens)
            stop = min(target, (s.computed // self.chunk + 1) * self.chunk)
            if s.op.kind == "open":  # stop at prefix-cache points too
                stop = min([p for p in self._prefix_points(target) if p > s.computed] + [stop])
            self._grow(s, target)
            ids = torch.tensor([s.tokens[s.computed : stop]], device=self.device)
            s.logits = self.model.extend(ids, torch.tensor([stop - s.computed]), s.cache)[0]
            self.counters["prefill_tokens"] += stop - s.computed
            budget -= stop - s.computed
            s.computed, s.version, did = stop, self.version, True
            if s.op.kind == "open":
                self._maybe_snapshot(s, target)
            if s.computed == target:
                self.prefill.popleft()
                self._computed(s)
        return did

    # ------------------------------------------------------------------ decode batch
    def _join(self) -> bool:
        did = False
        while self.ready and len(self.running) < self.max_batch:
            if self.pending_weights is not None and self.on_weight_update == "finish":
                break
            op = self.ready.popleft()
            s = op.session
            if op.future.cancelled():
                s.op = None
                continue
            if self._stale(s):  # weights changed while it waited
                self.prefill.append(s)
                continue
            if not s.marks or s.marks[-1][0] != s.computed:
                s.marks = [
                    *s.marks[-(MAX_MARKS - 1) :],
                    (s.computed, tail_state(s.cache, 0), s.logits),
                ]
            row = len(self.running)
            copy_row(self.batch, row, s.cache, 0)
            s.cache, s.row = None, row
            self.running.append(op)
            did = True
        return did

    def _leave(self, op: _Op) -> None:
        s = op.session
        row, last = s.row, len(self.running) - 1
        cap = min(self.max_context, max(s.computed + self.chunk, self.chunk))
        self._reserve(KVCache(self.cfg, 1, cap, "meta", mirror=False).nbytes(), keep=(s,))
        s.cache = clone_row(self.batch, row, cap)
        if row != last:  # keep the running rows contiguous
            moved = self.running[last]
            copy_row(self.batch, row, self.batch, last)
            self.running[row] = moved
            moved.session.row = row
        self.running.pop()
        s.row = None

    def _decode(self) -> None:
        ops = self.running
        logits = torch.stack([op.session.logits for op in ops])
        toks = torch.empty(len(ops), dtype=torch.long)
        lps = torch.empty(len(ops))
        groups: dict[SamplingParams, list[int]] = collections.defaultdict(list)
        for i, op in enumerate(ops):  # one sample() per distinct params (seeds live in generators)
            groups[op.sample_key].append(i)
        for params, idx in groups.items():
            t, lp = sample(logits[idx], params, [ops[i].generator for i in idx])
            toks[idx], lps[idx] = t.cpu(), lp.cpu()
        done = []
        for op, t, lp in zip(ops, toks.tolist(), lps.tolist(), strict=True):
            s, g = op.session, op.gen
            s.tokens.append(t)
            g.token_ids.append(t)
            g.logprobs.append(lp)
            g.versions.append(s.version)
            if t in op.params.stop_token_ids:
                g.finish_reason = "stop"
            elif len(g.token_ids) >= op.params.max_new_tokens or len(s.tokens) >= self.max_context:
                g.finish_reason = "length"
            else:
                continue
            done.append(op)
        self.counters["decode_tokens"] += len(ops)
        for op in done:
            self._finish(op)
        for op in list(self.running):
            if op.future.cancelled():  # the caller gave up: keep what was sampled
                self._finish(op)
        if self.running:
            n = len(self.running)
            ids = torch.tensor([op.session.tokens[-1] for op in self.running], device=self.device)
            out = self.model.decode(ids, view_rows(self.batch, n))
            for op, lg in zip(self.running, out, strict=True):
                op.session.logits = lg
                op.session.computed += 1
            self.counters["decode_steps"] += 1

    def _finish(self, op: _Op) -> None:
        s = op.session
        self._leave(op)
        s.op = None
        s.last_used = time.monotonic()
        g = op.gen
        g.version = g.versions[0] if g.versions else self.version
        _resolve(op.future, g)

    def _abandon(self, s: _Session) -> None:
        """The caller cancelled s's operation before it finished: a session whose open was
        cancelled is dropped (nobody holds its handle); otherwise s stays as it is."""
        if s.op.kind == "open":
            s.closed = True
            self._drop_cache(s)
            self.sessions.pop(s.id, None)
        s.op = None

    def _cancel(self, s: _Session) -> None:
        """Drop a cancelled operation of s (its sampled tokens stay in the session)."""
        op = s.op
        if op in self.running:
            self._finish(op)
        elif op in self.ready:
            self.ready.remove(op)
        if s in self.prefill:
            self.prefill.remove(s)
        s.op = None

    # ------------------------------------------------------------------ rollback / weights
    def _rollback(self, s: _Session, op: _Op) -> None:
        p = op.n
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= len(s.tokens):
            raise SessionError(f"rollback position must be in [1, {len(s.tokens)}], got {p!r}")
        del s.tokens[p:]
        if p < s.computed:
            marks = [m for m in s.marks if m[0] <= p]
            if marks and s.cache is not None:
                pos, tail, logits = marks[-1]
                restore_tail(s.cache, 0, tail)
                s.computed, s.logits, s.marks = pos, logits, marks
            else:
                self._drop_cache(s)
                self._lookup_prefix(s)
        self.counters["rollbacks"] += 1
        self._start(s, op)

    def _apply_weights(self) -> None:
        if self.pending_weights is None:
            return
        if self.on_weight_update == "finish" and self.running:
            return
        state, version = self.pending_weights
        self.pending_weights = None
        self.model.load_state_dict(state, strict=False)
        self.version = version
        self.prefix.clear()
        self.counters["weight_updates"] += 1
        if self.on_weight_update == "recompute":
            for op in list(self.running):  # recompute before their next token
                s = op.session
                self._leave(op)
                self._drop_cache(s)
                s.version = version
                self.prefill.append(s)
        else:
            for s in self.sessions.values():
                s.version = version

    def _step(self) -> bool:
        self._apply_weights()
        did = self._run_prefill()
        did = self._join() or did
        if self.running:
            self._decode()
            did = True
        return did or bool(self.prefill) or bool(self.ready)


def _resolve(fut: Future, value: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
