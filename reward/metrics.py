"""Metrics of a set of trajectories (shared/RL.md §9): one flat dict from :func:`summarize`.

An episode *passes* when its reward is at least ``threshold`` (1.0 by default: with
``{"exact_match": 1, "format": 0.1}`` a correct answer passes and a well-formatted wrong one
does not). pass@k is the unbiased estimator of Chen et al. (arXiv 2107.03374) per group (the
episodes of one prompt, ``group_id``), averaged over the groups with at least k episodes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from rollout.types import FINISH_REASONS

__all__ = ["pass_at_k", "pass_at_k_curve", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples (c correct) hold a correct one.

    Computed in the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i); 1.0 when n - c < k.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _groups(trajectories: Iterable[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for t in trajectories:
        groups[t.group_id].append(t)
    return groups


def pass_at_k_curve(
    trajectories: Iterable[Any], *, threshold: float = 1.0, ks: Sequence[int] | None = None
) -> dict[int, float]:
    """``{k: mean pass@k over groups with >= k episodes}`` for k = 1..largest group (or ``ks``)."""
    counts = [
        (len(ts), sum(t.reward >= threshold for t in ts)) for ts in _groups(trajectories).values()
    ]
    if not counts:
        return {}
    ks = range(1, max(n for n, _ in counts) + 1) if ks is None else ks
    curve = {}
    for k in ks:
        vals = [pass_at_k(n, c, k) for n, c in counts if n >= k]
        if vals:
            curve[k] = sum(vals) / len(vals)
    return curve


def _stats(
    prefix: str, values: Sequence[float], out: dict[str, float], *, std: bool = False
) -> None:
    if not values:
        return
    mean = math.fsum(values) / len(values)
    out[f"{prefix}/mean"] = mean
    if std:
        out[f"{prefix}/std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    out[f"{prefix}/min"] = float(min(values))
    out[f"{prefix}/max"] = float(max(values))


def summarize(trajectories: Iterable[Any], *, threshold: float = 1.0) -> dict[str, float]:
    """Flat metrics: counts, ``reward/*`` (and per component), ``pass_rate``, ``pass@k``,
    ``task/<name>/*`` (count, reward_mean, pass_rate, pass@k), ``frac_reward_zero_std``,
    ``turns/*``, ``tool_calls/*``, ``tool_errors/*`` (total, rate, per kind), ``tools/<name>``,
    ``response_tokens/*``, ``sampled_tokens/*``, ``prompt_tokens/mean``, ``finish_reason/<r>``
    (counts, every reason present) and ``timing/<phase>/mean``."""
    ts = list(trajectories)
    out: dict[str, float] = {"trajectories": len(ts)}
    groups = _groups(ts)
    out["groups"] = len(groups)
    for reason in FINISH_REASONS:
        out[f"finish_reason/{reason}"] = sum(t.finish_reason == reason for t in ts)
    if not ts:
        return out
    rewards = [t.reward for t in ts]
    _stats("reward", rewards, out, std=True)
    components: dict[str, list[float]] = defaultdict(list)
    for t in ts:
        for name, value in t.reward_components.items():
            components[name].append(value)
    for name, values in sorted(components.items()):
        out[f"reward/{name}/mean"] = math.fsum(values) / len(values)
    out["pass_rate"] = sum(r >= threshold for r in rewards) / len(ts)
    for k, v in pass_at_k_curve(ts, threshold=threshold).items():
        out[f"pass@{k}"] = v
    by_task: dict[str, list[Any]] = defaultdict(list)
    for t in ts:
        by_task[t.task].append(t)
    for task, tts in sorted(by_task.items()):
        out[f"task/{task}/count"] = len(tts)
        out[f"task/{task}/reward_mean"] = math.fsum(t.reward for t in tts) / len(tts)
        out[f"task/{task}/pass_rate"] = sum(t.reward >= threshold for t in tts) / len(tts)
        for k, v in pass_at_k_curve(tts, threshold=threshold).items():
            out[f"task/{task}/pass@{k}"] = v
    zero_std = [len({t.reward for t in g}) == 1 for g in groups.values()]
    out["frac_reward_zero_std"] = sum(zero_std) / len(zero_std)
    _stats("turns", [t.num_turns for t in ts], out)
    _stats("tool_calls", [len(t.tool_calls) for t in ts], out)
    calls = [c for t in ts for c in t.tool_calls]
    errors = [c for c in calls if not c.ok]
    out["tool_calls/total"] = len(calls)
    out["tool_errors/total"] = len(errors)
    out["tool_errors/rate"] = len(errors) / len(calls) if calls else 0.0
    for kind, n in sorted(Counter(c.error_kind or "unknown" for c in errors).items()):
        out[f"tool_errors/{kind}"] = n
    for name, n in sorted(Counter(c.name for c in calls).items()):
        out[f"tools/{name}"] = n
    _stats("response_tokens", [len(t.response_ids) for t in ts], out)
    _stats("sampled_tokens", [t.num_sampled for t in ts], out)
    out["prompt_tokens/mean"] = math.fsum(len(t.prompt_ids) for t in ts) / len(ts)
    phases: dict[str, list[float]] = defaultdict(list)
    for t in ts:
        for phase, seconds in t.timings.items():
            phases[phase].append(seconds)
    for phase, values in sorted(phases.items()):
        out[f"timing/{phase}/mean"] = math.fsum(values) / len(values)
    return out
