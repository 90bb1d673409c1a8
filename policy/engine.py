"""Generation engine: batched prefill and decode over the V4 KV cache, with sampling and the
per-token logprobs that RL needs.

Letters: B batch rows, V vocabulary.

Logprob convention: ``Generation.logprobs[i]`` is log softmax(logits / temperature) at the
sampled token, taken BEFORE top-k / top-p filtering (the policy distribution the sample was
drawn under, up to the truncation); with temperature 0 (greedy) it is the plain log softmax of
the logits. The stop token, when sampled, is part of ``token_ids`` (and has a logprob).

Seeding: with ``seed`` set, prompt i of a ``generate`` call draws its uniforms from its own
generator seeded with ``seed + i``, so its tokens do not depend on ``max_batch`` or on the other
prompts (up to float-reordering noise in batched logits, which would have to move a uniform
across a CDF boundary). Without a seed the generators are seeded from torch's global RNG.

Batching: prompts of different lengths are right-padded and prefilled together (one causal
forward; each row's cache takes only its own tokens), then decoded one token per row at per-row
positions. A row that samples a stop token leaves the batch and the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from policy.model import V4Model


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        max_new_tokens: most tokens generated per prompt (>= 1).
        stop_token_ids: generation of a prompt ends after sampling one of these.
        seed: base seed for reproducible sampling (see module doc), or None.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        m = self.max_new_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
        stops = tuple(self.stop_token_ids)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in stops):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


@dataclass
class Generation:
    """One prompt's output: new tokens, their logprobs, and why it ended ("stop" | "length")."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


def sample(
    logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits [B, V] fp32 -> (tokens [B] int64, logprobs [B] fp32)."""
    if params.temperature == 0:
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok = lp.argmax(dim=-1)
        return tok, lp.gather(1, tok[:, None])[:, 0]
    lp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # [B, V]
    probs, order = lp.exp().sort(dim=-1, descending=True, stable=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k > 0:
        keep[:, params.top_k :] = False
    if params.top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        keep &= before < params.top_p
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(cdf) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=cdf.shape[1] - 1)
    pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)  # stay inside the kept set
    tok = order.gather(1, pick)[:, 0]
    return tok, lp.gather(1, tok[:, None])[:, 0]


class Engine:
    """Batched generation from a V4Model through its KV cache.

    Args:
        model: the policy (put in eval mode; generation runs without gradients).
        max_batch: most prompts decoded together; longer prompt lists run in chunks.
        max_context: most tokens (prompt + new) per sequence; a request that could exceed it
            is rejected with ValueError before anything runs.
    """

    def __init__(self, model: V4Model, *, max_batch: int = 32, max_context: int = 4096):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        limit = model.cfg.max_position_embeddings
        if not isinstance(max_context, int) or not 1 <= max_context <= limit:
            raise ValueError(
                f"max_context must be an int in [1, max_position_embeddings={limit}], "
                f"got {max_context!r}"
            )
        self.model, self.max_batch, self.max_context = model, max_batch, max_context

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

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Generate for every prompt (token ids); returns one Generation per prompt, in order."""
        prompts = [list(p) for p in prompts]
        self._check(prompts, params)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = prompts[start : start + self.max_batch]
            out += self._generate_chunk(chunk, params, first_index=start)
        return out

    def _generators(self, n: int, params: SamplingParams, first: int) -> list[torch.Generator]:
        if params.seed is None:
            seeds = torch.randint(0, 2**62, (n,)).tolist()
        else:
            seeds = [params.seed + first + i for i in range(n)]
        return [torch.Generator().manual_seed(s) for s in seeds]

    def _generate_chunk(self, prompts, params, first_index):
        model, device = self.model, self.model.embed.weight.device
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(b, int(lengths.max()), dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p)
        capacity = int(lengths.max()) + params.max_new_tokens
        cache = model.new_cache(b, capacity)
        gens = self._generators(b, params, first_index)
        stops = set(params.stop_token_ids)
        results = [Generation() for _ in range(b)]
        active = list(range(b))  # prompt (result) index of each cache row
        logits = model.prefill(ids, lengths, cache)
        for step in range(params.max_new_tokens):
            tok, lp = sample(logits, params, [gens[r] for r in active])
            keep = []
            for i, (t, logp) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
                res = results[active[i]]
                res.token_ids.append(t)
                res.logprobs.append(logp)
                if t in stops:
                    res.finish_reason = "stop"
                else:
                    keep.append(i)
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                rows = torch.tensor(keep, device=device)
                cache.keep_rows(rows)
                tok = tok[rows]
                active = [active[i] for i in keep]
            logits = model.decode(tok, cache)
        return results
