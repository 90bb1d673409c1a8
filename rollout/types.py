"""The records a rollout produces: one ``Trajectory`` per episode, with its ``ToolCall`` list.

Token in, token out: ``prompt_ids`` is the encoded prompt; ``response_ids`` is everything after it
in order (tokens the policy sampled, and the encoded tool results appended between turns);
``loss_mask[i]`` is 1 exactly where ``response_ids[i]`` was sampled by the policy, and
``logprobs[i]`` is the sampling-time logprob of that token (0.0 where the mask is 0). The three
lists always have the same length.

``to_dict`` / ``from_dict`` give the plain form stored with msgpack (see ``rollout.store``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

FINISH_REASONS = ("stop", "max_turns", "context", "deadline", "sandbox_error")


@dataclass
class ToolCall:
    """One tool call the model made and what came back.

    ``ok`` is False for every failure the model caused or saw (malformed DSML, unknown tool, bad
    arguments, non-zero exit, timeout); ``error_kind`` names it (``dsec.tools.ToolResult`` kinds,
    plus ``"parse_error"`` for DSML that could not be parsed and ``"sandbox_error"`` for a call
    cut off by a sandbox failure). ``output`` is the text the model was shown. ``turn`` is the assistant turn (0-based) that made the call.
    """

    name: str
    arguments: dict[str, Any] | str
    ok: bool
    output: str
    wall_time: float = 0.0
    error_kind: str | None = None
    turn: int = 0


@dataclass
class Trajectory:
    """One episode of one task instance (see module doc for the token arrays)."""

    id: str
    task: str
    instance_id: str
    group_id: str
    sample_index: int
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    num_turns: int = 0
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    policy_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # generate, tools, score (seconds)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}"
            )
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"response_ids ({n}), loss_mask ({len(self.loss_mask)}) and logprobs "
                f"({len(self.logprobs)}) must have the same length"
            )

    @property
    def tool_errors(self) -> int:
        """Tool calls that failed (any ``ok=False``)."""
        return sum(not c.ok for c in self.tool_calls)

    @property
    def num_sampled(self) -> int:
        """Tokens the policy sampled (``sum(loss_mask)``)."""
        return sum(self.loss_mask)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Trajectory:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown trajectory fields: {sorted(unknown)}")
        data = dict(raw)
        data["tool_calls"] = [ToolCall(**c) for c in data.get("tool_calls", [])]
        return cls(**data)
