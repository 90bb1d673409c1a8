"""The registry of reward functions, by name.

A reward function scores one finished episode::

    fn(trajectory, verifier, sandbox=None) -> float

``trajectory`` is a ``rollout.types.Trajectory``, ``verifier`` the instance's verifier dict
(never shown to the model), and ``sandbox`` the episode's live ``dsec.Sandbox`` holding its
final workspace (the caller scores before releasing it). A function registered with
``needs_sandbox=True`` raises ``ValueError`` without one. Register with
``register_reward(name, fn)`` or as a decorator ``@register_reward("name")``; a lazy
``"module:attr"`` string is accepted in place of ``fn``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RewardFunction", "get_reward", "list_rewards", "register_reward"]

RewardFn = Callable[..., float]


@dataclass(frozen=True)
class RewardFunction:
    """A registered reward function (call it like the function itself)."""

    name: str
    fn: RewardFn
    needs_sandbox: bool = False

    def __call__(self, trajectory: Any, verifier: Any, sandbox: Any = None) -> float:
        if self.needs_sandbox and sandbox is None:
            raise ValueError(f"reward {self.name!r} needs the episode's live sandbox; got None")
        value = self.fn(trajectory, verifier, sandbox)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"reward {self.name!r} returned {value!r}, not a number")
        return float(value)


_REGISTRY: dict[str, RewardFunction | tuple[str, bool]] = {}


def register_reward(
    name: str,
    fn: RewardFn | str | None = None,
    *,
    needs_sandbox: bool = False,
    replace: bool = False,
) -> Any:
    """Register ``fn`` as ``name``; without ``fn``, returns a decorator."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")
    if fn is None:
        return lambda f: register_reward(name, f, needs_sandbox=needs_sandbox, replace=replace)
    if name in _REGISTRY and not replace:
        raise ValueError(f"reward {name!r} is already registered")
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"reward {name!r}: a lazy reference must be 'module:attr', got {fn!r}")
        _REGISTRY[name] = (fn, needs_sandbox)
    elif callable(fn):
        _REGISTRY[name] = RewardFunction(name, fn, needs_sandbox)
    else:
        raise ValueError(f"reward {name!r}: fn must be callable, got {fn!r}")
    return fn


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFunction:
    """The reward function registered as ``name`` (``ValueError`` naming an unknown one)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(list_rewards())}")
    entry = _REGISTRY[name]
    if isinstance(entry, tuple):
        ref, needs_sandbox = entry
        module, _, attr = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward {name!r}: cannot load {ref!r}: {exc}") from exc
        entry = _REGISTRY[name] = RewardFunction(name, fn, needs_sandbox)
    return entry


# The built-in functions (reward.functions), loaded on first use.
register_reward("exact_match", "reward.functions:exact_match")
register_reward("format", "reward.functions:format_reward")
register_reward("sandbox_tests", "reward.functions:sandbox_tests", needs_sandbox=True)
