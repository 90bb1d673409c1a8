"""The Task interface, task instances, and the task registry.

A :class:`Task` produces :class:`Instance` objects: the prompt messages (V4 chat message dicts,
``policy.chat``), the tool schemas the model may call (``dsec.tools.TOOL_SCHEMAS``), the data
the reward needs (``verifier``: never shown to the model) and files placed in ``/workspace`` of
the episode's sandbox before it starts.

Splits: ``instances("train", n, seed)`` and ``instances("test", n, seed)`` are deterministic for
a given seed, and never share an instance: each instance's split is decided by a hash of its
content key, not by the seed, so the held-out set stays held out whatever seeds are used.

Registry: ``register_task(name, factory)`` where ``factory`` is a Task class, a callable
returning a Task, or a lazy ``"module:attr"`` string; ``get_task(name, **options)`` builds one and
raises ``ValueError`` naming an unknown task or option.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import posixpath
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dsec.tools import TOOL_SCHEMAS

__all__ = [
    "SPLITS",
    "GeneratedTask",
    "Instance",
    "Task",
    "get_task",
    "list_tasks",
    "place_files",
    "register_task",
    "split_of",
    "tool_schemas",
]

SPLITS = ("train", "test")
WORKSPACE = "/workspace"
TEST_FRACTION = 0.2  # share of a task's key space held out as the test split

_SCHEMAS_BY_NAME = {t["function"]["name"]: t for t in TOOL_SCHEMAS}


def tool_schemas(tools: Iterable[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool schemas from names of the standard tools (``bash``, ``python``, ``read_file``,
    ``write_file``) or schema dicts (kept as given)."""
    if isinstance(tools, (str, bytes)):
        raise ValueError(f"tools must be a list of names or schemas, got {tools!r}")
    out = []
    for tool in tools:
        if isinstance(tool, str):
            if tool not in _SCHEMAS_BY_NAME:
                raise ValueError(
                    f"unknown tool {tool!r}; standard tools: {', '.join(_SCHEMAS_BY_NAME)}"
                )
            out.append(_SCHEMAS_BY_NAME[tool])
        elif isinstance(tool, Mapping):
            fn = tool.get("function", tool)
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tool schema has no function name: {tool!r:.200}")
            out.append(dict(tool))
        else:
            raise ValueError(f"a tool must be a name or a schema dict, got {tool!r:.200}")
    return out


def _workspace_path(path: str) -> str:
    """``path`` as an absolute path inside /workspace (relative paths are beneath it)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"file path must be a non-empty str, got {path!r}")
    full = posixpath.normpath(posixpath.join(WORKSPACE, path))
    if not full.startswith(WORKSPACE + "/"):
        raise ValueError(f"file path {path!r} is not inside {WORKSPACE}")
    return full


@dataclass(frozen=True)
class Instance:
    """One task instance.

    ``messages``: the prompt (V4 chat message dicts, usually one user message); ``tools``: tool
    schemas (OpenAI function form; pass as ``tools=`` to ``policy.chat.encode``); ``verifier``:
    data for the reward (e.g. ``answer``, ``tests``); ``files``: ``{path: content}`` placed in
    the sandbox before the episode (paths normalised to absolute paths under /workspace).
    """

    id: str
    task: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    verifier: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"instance id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"instance {self.id!r}: messages must be a non-empty list")
        for i, msg in enumerate(self.messages):
            if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
                raise ValueError(f"instance {self.id!r}: message {i} has no role: {msg!r:.200}")
        if not isinstance(self.verifier, dict):
            raise ValueError(f"instance {self.id!r}: verifier must be a dict")
        object.__setattr__(self, "tools", tool_schemas(self.tools))
        files = {}
        for path, content in self.files.items():
            if not isinstance(content, (str, bytes)):
                raise ValueError(
                    f"instance {self.id!r}: file {path!r} must be str or bytes, "
                    f"got {type(content).__name__}"
                )
            files[_workspace_path(path)] = content
        object.__setattr__(self, "files", files)

    @property
    def tool_names(self) -> list[str]:
        return [t.get("function", t)["name"] for t in self.tools]


def place_files(sandbox: Any, files: Mapping[str, bytes | str], *, timeout: float = 30.0) -> None:
    """Write an instance's ``files`` into a sandbox, creating parent directories."""
    dirs = sorted({posixpath.dirname(p) for p in files} - {WORKSPACE})
    if dirs:
        made = sandbox.exec(["mkdir", "-p", "--", *dirs], timeout=timeout)
        if made.exit_code != 0:
            err = bytes(made.stderr).decode("utf-8", errors="replace").strip()
            raise RuntimeError(f"cannot create {dirs} in the sandbox: {err}")
    for path, content in files.items():
        sandbox.write_file(path, content)


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """The split an instance belongs to, from a stable hash of its content key."""
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_count(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


class Task(ABC):
    """A source of instances. ``name`` is the registry name; ``reward`` the default reward spec
    (a name in ``reward.registry``, or a ``{name: weight}`` mapping)."""

    name: ClassVar[str] = ""
    reward: ClassVar[str | Mapping[str, float]] = "exact_match"
    splits: ClassVar[tuple[str, ...]] = SPLITS

    @abstractmethod
    def instances(self, split: str, n: int, seed: int = 0) -> list[Instance]:
        """``n`` instances of ``split`` ("train" or "test"), the same for the same seed."""


class GeneratedTask(Task):
    """A task whose instances come from a random generator over a large key space.

    Subclasses implement :meth:`sample` (draw one instance from ``rng``, returning its content
    key and the instance). :meth:`instances` draws until it has ``n`` distinct instances of the
    requested split; membership is decided by :func:`split_of` on the key.
    """

    max_draws_per_instance: ClassVar[int] = 200

    @abstractmethod
    def sample(self, rng: random.Random, split: str) -> tuple[str, Instance]:
        """One random instance and its content key."""

    def instances(self, split: str, n: int, seed: int = 0) -> list[Instance]:
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: dict[str, Instance] = {}
        draws = 0
        while len(out) < n:
            draws += 1
            if draws > self.max_draws_per_instance * n:
                raise ValueError(
                    f"task {self.name!r} found only {len(out)} distinct {split} instances "
                    f"for n={n}; ask for fewer"
                )
            key, inst = self.sample(rng, split)
            if key not in out and split_of(f"{self.name}:{key}") == split:
                out[key] = inst
        return list(out.values())


# -- registry ---------------------------------------------------------------------------------

TaskFactory = Callable[..., Task] | str
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory, *, replace: bool = False) -> None:
    """Register a task factory (a Task class, a callable returning a Task, or ``"module:attr"``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty str, got {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise ValueError(f"task factory for {name!r} must be callable or 'module:attr'")
    if name in _REGISTRY and not replace:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str, factory: TaskFactory) -> Callable[..., Task]:
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"task {name!r}: cannot load {factory!r}: {exc}") from exc
    return factory


def _option_names(factory: Callable[..., Task]) -> list[str]:
    params = inspect.signature(factory).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    factory = _resolve(name, _REGISTRY[name])
    known = _option_names(factory)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(known) or '(none)'}"
        )
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: {exc}") from exc
    task = factory(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task factory {name!r} returned {type(task).__name__}, not a Task")
    return task


def user_prompt(text: str) -> list[dict[str, Any]]:
    """The usual prompt: one user message."""
    return [{"role": "user", "content": text}]
