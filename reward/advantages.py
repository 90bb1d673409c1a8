"""Group advantages from the rewards of one group (the G episodes of one prompt).

With rewards r_1..r_G, mean m and unbiased standard deviation s (divisor G - 1, as verl and
TRL compute it):

- ``grpo``    A_i = (r_i - m) / (s + eps)                  (DeepSeekMath, arXiv 2402.03300)
- ``drgrpo``  A_i = r_i - m                                (Dr.GRPO, arXiv 2503.20783: no std)
- ``rloo``    A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - m)   (leave-one-out baseline)

A group whose rewards are all equal (including a group of one) has no signal: every method
gives zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["METHODS", "group_advantages", "trajectory_advantages"]

METHODS = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: Sequence[float], method: str = "grpo", *, eps: float = 1e-6
) -> list[float]:
    """Advantages of one group's rewards, in the same order."""
    if method not in METHODS:
        raise ValueError(f"unknown advantage method {method!r}; known: {', '.join(METHODS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    values = [float(r) for r in rewards]
    if not values:
        raise ValueError("a group needs at least one reward")
    bad = [r for r in values if not math.isfinite(r)]
    if bad:
        raise ValueError(f"rewards must be finite, got {bad[0]!r}")
    g = len(values)
    if g == 1 or max(values) == min(values):
        return [0.0] * g
    mean = math.fsum(values) / g
    centred = [r - mean for r in values]
    if method == "drgrpo":
        return centred
    if method == "rloo":
        return [c * g / (g - 1) for c in centred]
    std = math.sqrt(math.fsum(c * c for c in centred) / (g - 1))
    return [c / (std + eps) for c in centred]


def trajectory_advantages(
    trajectories: Iterable[Any], method: str = "grpo", *, eps: float = 1e-6
) -> dict[str, float]:
    """``{trajectory id: advantage}``, computed within each ``group_id``."""
    groups: dict[str, list[Any]] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t)
    out: dict[str, float] = {}
    for ts in groups.values():
        for t, a in zip(ts, group_advantages([t.reward for t in ts], method, eps=eps), strict=True):
            out[t.id] = a
    return out
