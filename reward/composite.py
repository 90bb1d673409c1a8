"""Composite rewards: a weighted sum of registered reward functions that keeps its parts.

>>> r = make_reward({"exact_match": 1.0, "format": 0.1})
>>> total, components = r(trajectory, verifier)          # components: unweighted values
>>> r.score(trajectory, verifier, sandbox)               # sets reward, reward_components

``reward_components`` holds each function's unweighted value under its name, so format and
correctness stay apart in the logs (shared/RL.md §9.4); ``reward`` is the weighted sum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from reward.registry import RewardFunction, get_reward

__all__ = ["CompositeReward", "make_reward"]


class CompositeReward:
    """``spec`` is a reward name (weight 1) or a ``{name: weight}`` mapping."""

    def __init__(self, spec: str | Mapping[str, float]) -> None:
        weights = {spec: 1.0} if isinstance(spec, str) else spec
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                f"a reward spec must be a name or a non-empty {{name: weight}}, got {spec!r}"
            )
        self.weights: dict[str, float] = {}
        self.functions: dict[str, RewardFunction] = {}
        for name, weight in weights.items():
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
            ):
                raise ValueError(
                    f"reward weight of {name!r} must be a finite number, got {weight!r}"
                )
            self.functions[name] = get_reward(name)
            self.weights[name] = float(weight)

    def __repr__(self) -> str:
        return f"CompositeReward({self.weights!r})"

    @property
    def needs_sandbox(self) -> bool:
        """True when a component must see the episode's live sandbox."""
        return any(f.needs_sandbox for f in self.functions.values())

    def __call__(
        self, trajectory: Any, verifier: Mapping[str, Any], sandbox: Any = None
    ) -> tuple[float, dict[str, float]]:
        """``(weighted sum, {name: unweighted value})``."""
        components = {name: f(trajectory, verifier, sandbox) for name, f in self.functions.items()}
        total = sum(self.weights[name] * value for name, value in components.items())
        return total, components

    def score(self, trajectory: Any, verifier: Mapping[str, Any], sandbox: Any = None) -> Any:
        """Score in place: sets ``reward``, ``reward_components`` and ``timings["score"]``."""
        start = time.perf_counter()
        total, components = self(trajectory, verifier, sandbox)
        trajectory.reward = total
        trajectory.reward_components = components
        trajectory.timings["score"] = time.perf_counter() - start
        return trajectory


def make_reward(spec: str | Mapping[str, float] | CompositeReward) -> CompositeReward:
    """A :class:`CompositeReward` from a name, a ``{name: weight}`` mapping, or one already built."""
    return spec if isinstance(spec, CompositeReward) else CompositeReward(spec)
