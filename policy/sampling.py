"""Sampling: ``SamplingParams``, the ``Generation`` record and ``sample``.

Letters: B batch rows, V vocabulary.

Logprob convention: ``Generation.logprobs[i]`` is log softmax(logits / temperature) at the
sampled token, taken BEFORE top-k / top-p filtering (the policy distribution the sample was
drawn under, up to the truncation); with temperature 0 (greedy) it is the plain log softmax of
the logits. The stop token, when sampled, is part of ``token_ids`` (and has a logprob).

Seeding: every request draws its uniforms from its own generator seeded with ``seed``, so its
tokens do not depend on what else is in the batch (up to float-reordering noise in batched
logits, which would have to move a uniform across a CDF boundary). Without a seed the generator
is seeded from torch's global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
    """One request's output: new tokens, their logprobs, why it ended ("stop" | "length"), and
    the policy weight version it was sampled with (``versions``: per token; they differ only
    when weights were updated mid-generation, see ``policy.scheduler``)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    version: int = 0
    versions: list[int] = field(default_factory=list)


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
