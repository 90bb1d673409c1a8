"""Reading a run directory back for analysis (the notebooks use these).

``load_run(dir)`` returns ``(config, trajectories, metrics)``: the resolved config dict, every
stored ``Trajectory`` (a list), and the records of ``metrics.jsonl`` (a list of dicts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollout import store
from rollout.types import Trajectory

__all__ = ["latest_run", "load_run", "render_trajectory"]


def load_run(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[Trajectory], list[dict[str, Any]]]:
    """``(config, trajectories, metrics)`` of a run directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist")
    if not (path / store.TRAJECTORY_DIR).is_dir() and not (path / store.CONFIG_FILE).exists():
        raise ValueError(f"{str(path)!r} is not a run directory (no config.json, no trajectories/)")
    return store.read_config(path), list(store.iter_trajectories(path)), store.read_metrics(path)


def latest_run(root: str | os.PathLike[str]) -> Path:
    """The most recently modified run directory directly under ``root`` (e.g. ``runs/``)."""
    base = Path(root)
    runs = [
        p
        for p in (base.iterdir() if base.is_dir() else [])
        if p.is_dir() and ((p / store.TRAJECTORY_DIR).is_dir() or (p / store.CONFIG_FILE).exists())
    ]
    if not runs:
        raise ValueError(f"no run directory under {str(base)!r}")

    def mtime(p: Path) -> float:
        files = [p, *(p / store.TRAJECTORY_DIR).glob("*.msgpack"), p / store.METRICS_FILE]
        return max(f.stat().st_mtime for f in files if f.exists())

    return max(runs, key=mtime)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]} [...] {text[-limit // 2 :]}"


def render_trajectory(t: Trajectory, *, max_chars: int = 600) -> str:
    """A trajectory as readable text: a header, each message (tool results included), then one
    line per tool call (turn, arguments, outcome, wall time)."""
    lines = [
        f"== {t.id}  task={t.task}  reward={t.reward:g} {t.reward_components}  "
        f"finish={t.finish_reason}  turns={t.num_turns}  tool_calls={len(t.tool_calls)} "
        f"(errors {t.tool_errors})"
    ]
    for msg in t.messages:
        role = msg.get("role", "?")
        if msg.get("reasoning_content"):
            lines.append(f"[{role} reasoning] {_short(str(msg['reasoning_content']), max_chars)}")
        content = msg.get("content")
        if content:
            lines.append(f"[{role}] {_short(str(content), max_chars)}")
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", call)
            lines.append(
                f"[{role} calls] {fn.get('name')}({_short(str(fn.get('arguments')), max_chars)})"
            )
        for err in msg.get("errors") or []:
            lines.append(f"[{role} parse error] {err}")
    for c in t.tool_calls:  # the outputs were shown with the tool messages above
        status = "ok" if c.ok else f"error: {c.error_kind}"
        lines.append(
            f"-- tool turn {c.turn}: {c.name}({_short(str(c.arguments), max_chars)}) -> {status}, "
            f"{c.wall_time:.3f} s"
        )
    return "\n".join(lines)
