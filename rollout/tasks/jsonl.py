"""``jsonl``: instances read from a JSON Lines file (``get_task("jsonl", path=...)``).

Each non-empty line is an object::

    {"id": "q1",                                  required, unique in the file
     "messages": [{"role": "user", "content": "..."}],   required, V4 chat messages
     "verifier": {"answer": "42"},                required, data for the reward
     "tools": ["python"],                         optional: standard tool names or schemas
     "files": {"notes.txt": "..."},               optional: text files put in /workspace
     "split": "train" | "test",                   optional: else decided by a hash of the id
     "task": "my_task"}                           optional: the task name on the instance

Bad input raises ``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import ClassVar

from rollout.tasks.base import SPLITS, Instance, Task, check_count, check_split, split_of

__all__ = ["JsonlTask"]

_REQUIRED = ("id", "messages", "verifier")
_OPTIONAL = ("tools", "files", "split", "task")


class JsonlTask(Task):
    """Options: ``path`` (required), ``test_fraction`` (0.2; for lines without ``split``),
    ``reward`` (``exact_match``): the reward spec of these instances."""

    name: ClassVar[str] = "jsonl"

    def __init__(
        self, path: str, test_fraction: float = 0.2, reward: str | dict[str, float] = "exact_match"
    ) -> None:
        if not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
            raise ValueError(f"jsonl: test_fraction must be in [0, 1), got {test_fraction!r}")
        self.path = Path(path)
        self.test_fraction = float(test_fraction)
        self.reward = reward  # type: ignore[misc]  # per-instance override of the class default
        if not self.path.is_file():
            raise ValueError(f"jsonl: task file {str(self.path)!r} does not exist")
        self._splits: dict[str, list[Instance]] = {s: [] for s in SPLITS}
        seen: dict[str, int] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                split, inst = self._parse(line, where)
                if inst.id in seen:
                    raise ValueError(
                        f"{where}: duplicate id {inst.id!r} (first on line {seen[inst.id]})"
                    )
                seen[inst.id] = lineno
                self._splits[split].append(inst)
        if not seen:
            raise ValueError(f"jsonl: task file {str(self.path)!r} has no instances")

    def _parse(self, line: str, where: str) -> tuple[str, Instance]:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}"
            )
        if not isinstance(raw["id"], str) or not raw["id"]:
            raise ValueError(f"{where}: id must be a non-empty string, got {raw['id']!r}")
        if not isinstance(raw["verifier"], dict):
            raise ValueError(f"{where}: verifier must be an object")
        files = raw.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError(f"{where}: files must be an object of path to text")
        split = raw.get("split")
        if split is None:
            split = split_of(f"{self.name}:{raw['id']}", self.test_fraction)
        elif split not in SPLITS:
            raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        task = raw.get("task", self.name)
        if not isinstance(task, str) or not task:
            raise ValueError(f"{where}: task must be a non-empty string, got {task!r}")
        try:
            inst = Instance(
                id=raw["id"],
                task=task,
                messages=raw["messages"],
                tools=raw.get("tools", []),
                verifier=raw["verifier"],
                files=files,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return split, inst

    def count(self, split: str) -> int:
        """How many instances ``split`` holds."""
        check_split(split)
        return len(self._splits[split])

    def instances(self, split: str, n: int | None = None, seed: int = 0) -> list[Instance]:
        """``n`` instances of ``split`` in a seeded order (``n=None``: all, in file order)."""
        check_split(split)
        pool = self._splits[split]
        if n is None:
            return list(pool)
        check_count(n)
        if n > len(pool):
            raise ValueError(f"jsonl: asked for {n} {split} instances, {self.path} has {len(pool)}")
        return random.Random(f"{self.name}:{split}:{seed}").sample(pool, n)
