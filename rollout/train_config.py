"""The training job's config sections: ``[tokenizer]``, ``[learner]``, ``[sft]`` and ``[rl]``.

They are sections of ``rollout.config.Config`` like the rollout ones (same TOML file, same
``--set section.key=value`` overrides, same checks); this module holds their dataclasses and the
checks that involve them, so that the rollout sections and the training sections stay apart.

    [tokenizer] kind ("byte": 256 bytes + the V4 special tokens; "bpe": a byte-level BPE trained
                on the task's own prompts and demonstrations, see rollout.bpe), vocab_size (bpe:
                the model's embedding is sized to it), corpus_prompts (instances rendered to
                train it)
    [learner]   optimizer ("adamw"), lr, warmup_steps (RL updates over which lr rises
                linearly from lr / warmup_steps; 0 = none), betas, weight_decay, grad_clip (max
                global grad norm; 0 = off), token_budget (padded tokens per micro-batch), loss (aggregation:
                "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"), advantage
                ("grpo" | "drgrpo" | "rloo"), clip_low, clip_high, norm_length (Dr.GRPO's
                constant), tis_cap (0 = off; the learner then recomputes the old
                logprobs), max_staleness (trajectories sampled more than this many versions ago are
                dropped), skip_zero_std (groups whose rewards are all equal are not trained on),
                num_ranks (data-parallel learner ranks; 1 = no process group), num_cpus (per rank)
    [sft]       steps (0 = no warm start), batch_size, lr (the peak), demonstrations,
                tool_fraction (share of demonstrations that call the tool; the rest answer
                directly), call_fraction (0 = tool_fraction; above it, forced calls are added:
                demonstrations that call the tool with their first token, the choice, not
                trained, so the copying is taught on more of them while the choices SFT trains
                still call the tool at tool_fraction; see rollout.sft), schedule ("constant"; "cosine": linear warmup over warmup_steps, then
                a cosine down to 5% of lr at the last step), warmup_steps
    [rl]        steps, eval_every (0 = only before and after), eval_prompts (held-out "test"
                instances, one episode each), eval_temperature (0 = greedy: the policy's own
                answer, the usual held-out measure), checkpoint_every, mode ("sync" | "async":
                rollouts for step k+1 run while step k trains)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LearnerSection", "RlSection", "SftSection", "TokenizerSection", "check", "model_config"]


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None, open_lo=False, **kw):
    """A dataclass field with a range check (the metadata rollout.config reads)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "open_lo": open_lo, **kw})


@dataclass(frozen=True)
class TokenizerSection:
    kind: str = _opt("byte", choices=("byte", "bpe"))
    vocab_size: int = _opt(1024, lo=288)
    corpus_prompts: int = _opt(512, lo=1)


@dataclass(frozen=True)
class LearnerSection:
    optimizer: str = _opt("adamw", choices=("adamw",))
    lr: float = _opt(1e-3, lo=0.0, open_lo=True)
    warmup_steps: int = _opt(0, lo=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = _opt(0.0, lo=0.0)
    grad_clip: float = _opt(1.0, lo=0.0)
    token_budget: int = _opt(4096, lo=16)
    loss: str = _opt(
        "token-mean", choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
    )
    advantage: str = _opt("grpo", choices=("grpo", "drgrpo", "rloo"))
    clip_low: float = _opt(0.2, lo=0.0, hi=0.999)
    clip_high: float = _opt(0.28, lo=0.0)
    norm_length: int = _opt(0, lo=0)
    tis_cap: float = _opt(0.0, lo=0.0)
    max_staleness: int = _opt(1, lo=0)
    skip_zero_std: bool = True
    num_ranks: int = _opt(1, lo=1)
    num_cpus: float = _opt(1.0, lo=0.0)


@dataclass(frozen=True)
class SftSection:
    steps: int = _opt(0, lo=0)
    batch_size: int = _opt(32, lo=1)
    lr: float = _opt(3e-3, lo=0.0, open_lo=True)
    demonstrations: int = _opt(512, lo=1)
    tool_fraction: float = _opt(0.2, lo=0.0, hi=1.0)
    call_fraction: float = _opt(0.0, lo=0.0, hi=1.0)
    schedule: str = _opt("constant", choices=("constant", "cosine"))
    warmup_steps: int = _opt(10, lo=0)


@dataclass(frozen=True)
class RlSection:
    steps: int = _opt(0, lo=0)
    eval_every: int = _opt(5, lo=0)
    eval_prompts: int = _opt(64, lo=1)
    eval_temperature: float = _opt(0.0, lo=0.0)
    checkpoint_every: int = _opt(5, lo=1)
    mode: str = _opt("sync", choices=("sync", "async"))


def check(c: Any, error: type[Exception]) -> None:
    """Checks across keys of the training sections (``c`` is a rollout.config.Config); raises
    ``error`` naming the value."""
    lr = c.learner
    if len(lr.betas) != 2 or not all(0.0 <= b < 1.0 for b in lr.betas):
        raise error(f"learner.betas must be two numbers in [0, 1), got {lr.betas}")
    if lr.loss == "seq-mean-token-sum-norm" and lr.norm_length < 1:
        raise error(
            "learner.loss = 'seq-mean-token-sum-norm' (Dr.GRPO) needs learner.norm_length >= 1 "
            "(e.g. the longest response in tokens)"
        )
    cpus = os.cpu_count() or 1
    if lr.num_ranks > cpus:
        raise error(
            f"learner.num_ranks = {lr.num_ranks}, but this machine has {cpus} CPUs: each rank "
            "needs at least one"
        )
    if c.tokenizer.kind == "bpe" and c.tokenizer.vocab_size > 65536:
        raise error(f"tokenizer.vocab_size must be <= 65536, got {c.tokenizer.vocab_size}")
    if c.sft.steps and c.task.name != "arith_tool":
        raise error(
            f"sft.steps = {c.sft.steps}: demonstrations exist for task 'arith_tool' only, "
            f"not {c.task.name!r}; set sft.steps = 0"
        )
    sft = c.sft
    if sft.call_fraction == 1.0 and sft.tool_fraction < 1.0:
        raise error(
            f"sft.call_fraction = 1.0 leaves no direct answer, so no choice is trained at "
            f"sft.tool_fraction = {sft.tool_fraction}; use a call_fraction below 1"
        )
    if c.rl.mode == "async" and lr.max_staleness < 1:
        raise error(
            "rl.mode = 'async' samples step k+1's batch while step k trains (one version old): "
            "it needs "
            f"learner.max_staleness >= 1, got {lr.max_staleness}"
        )


def model_config(c: Any) -> Any:
    """The policy's V4Config, the one every rollout worker and the learner build: the preset
    with ``[policy]`` kv_dtype and numerics, the embedding sized to a BPE tokenizer."""
    from policy.config import V4Config

    extra = {"vocab_size": c.tokenizer.vocab_size} if c.tokenizer.kind == "bpe" else {}
    p = c.policy
    return V4Config.from_preset(p.preset, kv_dtype=p.kv_dtype, numerics=p.numerics, **extra)
