"""The rollout job's config: TOML sections mapped onto frozen dataclasses, checked before a run.

A config file has the sections below; every key is optional and falls back to its default.
``load_config(path, overrides)`` reads the file, applies ``--set`` overrides (``section.key=value``,
the value parsed as a TOML literal, else taken as a string), and checks every key and value:
an unknown section or key, a value of the wrong type, or a value out of range raises
:class:`ConfigError` naming it, before Ray, a model or a sandbox is started.

    [run]       name, seed, out_dir (the run directory is out_dir/name unless --out is given),
                groups_per_batch (task groups per stored batch file)
    [policy]    preset ("tiny" | "demo" | ...), checkpoint (a safetensors file or a learner
                checkpoint directory; "" = random weights seeded by run.seed, the same on every
                worker), tokenizer (a tokenizer.json, e.g. a training run's; "" = as [tokenizer]
                says), kv_dtype, numerics ("reference" | "official": the policy's rounding,
                V4Config.numerics; the rollout workers' engines and the learner both follow it)
    [engine]    max_batch, max_context, kv_budget_bytes (0 = no budget)
    [task]      name, split, num_prompts, group_size (G episodes per prompt), [task.options]
    [sampling]  temperature (the learner's logprobs are of softmax(logits / temperature) too),
                top_p, top_k, max_new_tokens (per turn), thinking_mode
    [limits]    max_turns, max_context_tokens (an episode's context budget; 0: engine.max_context),
                tool_timeout, deadline (seconds per episode), max_tool_output_chars
    [sandbox]   memory_mb, max_pids, timeout (each episode gets its own sandbox), command_log
                (true: episodes log their sandbox calls in the run directory, so a group run
                again after an interruption replays them; rollout.cmdlogs)
    [workers]   num_workers, num_cpus, num_gpus (per worker), concurrency (agent loops per
                worker, and the size of its sandbox pool), max_restarts (Ray restarts of a
                dead worker), max_group_retries
    [reward]    functions (reward registry names; empty = the task's default reward),
                weights (one per function; empty = all 1.0)
    [tokenizer], [learner], [sft], [rl]: the training sections (see rollout.train_config)

The resolved config (``config.to_dict()``) is stored in the run directory as ``config.json``;
``from_dict`` reads it back with the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.train_config import LearnerSection, RlSection, SftSection, TokenizerSection
from rollout.train_config import check as _check_training

__all__ = ["Config", "ConfigError", "from_dict", "load_config", "parse_overrides"]


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names it."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None, open_lo=False, **kw):
    """A dataclass field with a range check: lo <= v (lo < v when open_lo) and v <= hi."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "open_lo": open_lo, **kw})


@dataclass(frozen=True)
class RunSection:
    name: str = _opt("run", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*")
    seed: int = _opt(0, lo=0)
    out_dir: str = _opt("runs", nonempty=True)
    groups_per_batch: int = _opt(4, lo=1)


@dataclass(frozen=True)
class PolicySection:
    preset: str = _opt("demo", nonempty=True)
    checkpoint: str = ""
    tokenizer: str = ""
    kv_dtype: str = _opt("fp8", choices=("fp8", "bfloat16", "float32"))
    numerics: str = _opt("reference", choices=("reference", "official"))


@dataclass(frozen=True)
class EngineSection:
    max_batch: int = _opt(16, lo=1)
    max_context: int = _opt(2048, lo=16)
    kv_budget_bytes: int = _opt(0, lo=0)


@dataclass(frozen=True)
class TaskSection:
    name: str = _opt("arith_tool", nonempty=True)
    split: str = _opt("train", nonempty=True)
    num_prompts: int = _opt(8, lo=1)
    group_size: int = _opt(4, lo=1)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingSection:
    temperature: float = _opt(1.0, lo=0.0)
    top_p: float = _opt(1.0, lo=0.0, open_lo=True, hi=1.0)
    top_k: int = _opt(0, lo=0)
    max_new_tokens: int = _opt(256, lo=1)
    thinking_mode: str = _opt("thinking", choices=("thinking", "chat"))


@dataclass(frozen=True)
class LimitsSection:
    max_turns: int = _opt(4, lo=1)
    max_context_tokens: int = _opt(0, lo=0)
    tool_timeout: float = _opt(10.0, lo=0.0, open_lo=True, hi=600.0)
    deadline: float = _opt(300.0, lo=0.0, open_lo=True)
    max_tool_output_chars: int = _opt(4000, lo=100)


@dataclass(frozen=True)
class SandboxSection:
    memory_mb: int = _opt(512, lo=16)
    max_pids: int = _opt(64, lo=4)
    timeout: float = _opt(30.0, lo=0.0, open_lo=True)
    command_log: bool = True


@dataclass(frozen=True)
class WorkersSection:
    num_workers: int = _opt(2, lo=1)
    num_cpus: float = _opt(1.0, lo=0.0)
    num_gpus: float = _opt(0.0, lo=0.0)
    concurrency: int = _opt(8, lo=1)
    max_restarts: int = _opt(2, lo=0)
    max_group_retries: int = _opt(3, lo=0)


@dataclass(frozen=True)
class RewardSection:
    functions: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
    """The whole job config; ``config.task.group_size`` etc. Build it with :func:`load_config`."""

    run: RunSection = field(default_factory=RunSection)
    policy: PolicySection = field(default_factory=PolicySection)
    engine: EngineSection = field(default_factory=EngineSection)
    task: TaskSection = field(default_factory=TaskSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    reward: RewardSection = field(default_factory=RewardSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    sft: SftSection = field(default_factory=SftSection)
    rl: RlSection = field(default_factory=RlSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reward_spec(self) -> dict[str, float] | None:
        """``{function name: weight}`` (weights default to 1.0); None: the task's default."""
        if not self.reward.functions:
            return None
        weights = self.reward.weights or [1.0] * len(self.reward.functions)
        return dict(zip(self.reward.functions, weights, strict=True))


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# ---------------------------------------------------------------- parsing and overrides


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["task.num_prompts=4", "run.name=x"]`` -> ``[(["task", "num_prompts"], 4), ...]``.

    The value is read as a TOML literal (``4``, ``0.5``, ``true``, ``["a", "b"]``,
    ``"quoted"``); anything that is not one is taken as a plain string.
    """
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be dotted: section.key (e.g. task.name)")
        text = text.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.append((parts, value))
    return out


def _apply(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    name = ".".join(parts)
    if parts[0] not in SECTIONS:
        raise ConfigError(
            f"--set {name}: unknown section {parts[0]!r}{_suggest(parts[0], list(SECTIONS))}"
        )
    if len(parts) > 2 and parts[:2] != ["task", "options"]:
        raise ConfigError(f"--set {name}: too many dots; use section.key=value")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {name}: {'.'.join(parts[: depth + 1])} is not a table")
        node = child
    node[parts[-1]] = value


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_TYPE_NAMES[typing.get_args(hint)[0]]}s"
    if typing.get_origin(hint) is dict:
        return "a table"
    name = _TYPE_NAMES[hint]
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _check_type(where: str, hint: Any, value: Any) -> Any:
    """Type check of one value; returns it normalised (an integer given for a number: float)."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        ok = isinstance(value, dict)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        value = float(value) if ok else value
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    return value


def _check_value(where: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """Type and range check of one value (the range rules are in the field's metadata)."""
    value = _check_type(where, hint, value)
    meta = f.metadata
    lo, hi, open_lo = meta.get("lo"), meta.get("hi"), meta.get("open_lo", False)
    if lo is not None and (value <= lo if open_lo else value < lo):
        raise ConfigError(f"{where} must be {'>' if open_lo else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi:g}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    if meta.get("nonempty") and not value:
        raise ConfigError(f"{where} must not be empty")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(
            f"{where} must be letters, digits, '.', '_' or '-' (a directory name), got {value!r}"
        )
    return value


def _build(raw: dict[str, Any], source: str, overridden: set[tuple[str, str]]) -> Config:
    """Check every section, key and value of ``raw``; errors name ``source`` or ``--set``."""

    def origin(name: str, key: str | None = None) -> str:
        return "--set: " if (name, key) in overridden else f"{source}: "

    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, list(SECTIONS))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table (a section), got {value!r}")
    sections = {}
    for name, cls in SECTIONS.items():
        given = raw.get(name, {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in given.items():
            if key not in fields:
                raise ConfigError(
                    f"{origin(name, key)}unknown key {name}.{key}{_suggest(key, list(fields))}"
                )
            where = f"{origin(name, key)}{name}.{key}"
            values[key] = _check_value(where, fields[key], hints[key], value)
        sections[name] = cls(**values)
    config = Config(**sections)
    _check_across(config)
    return config


def _check_across(c: Config) -> None:
    """Checks that involve more than one key, or another package's names."""
    from rollout.train_config import model_config

    try:
        model = model_config(c)
    except ValueError as e:
        raise ConfigError(f"policy.preset: {e}") from None
    if c.policy.checkpoint and not checkpoint_file(c.policy.checkpoint).is_file():
        raise ConfigError(
            f"policy.checkpoint: no file {c.policy.checkpoint!r} (a safetensors file, or a "
            "checkpoint directory holding model.safetensors)"
        )
    if c.policy.tokenizer and not Path(c.policy.tokenizer).is_file():
        raise ConfigError(f"policy.tokenizer: no file {c.policy.tokenizer!r}")
    if c.engine.max_context > model.max_position_embeddings:
        raise ConfigError(
            f"engine.max_context must be <= {model.max_position_embeddings} (the "
            f"{c.policy.preset!r} preset's max_position_embeddings), got {c.engine.max_context}"
        )
    if c.sampling.max_new_tokens >= c.engine.max_context:
        raise ConfigError(
            f"sampling.max_new_tokens ({c.sampling.max_new_tokens}) must be < "
            f"engine.max_context ({c.engine.max_context})"
        )
    if c.limits.max_context_tokens > c.engine.max_context:
        raise ConfigError(
            f"limits.max_context_tokens ({c.limits.max_context_tokens}) must be <= "
            f"engine.max_context "
            f"({c.engine.max_context})"
        )
    if c.reward.weights and not c.reward.functions:
        raise ConfigError("reward.weights is given without reward.functions")
    if c.reward.weights and len(c.reward.weights) != len(c.reward.functions):
        raise ConfigError(
            f"reward.weights has {len(c.reward.weights)} entries but reward.functions has "
            f"{len(c.reward.functions)}: give one weight per function (or none)"
        )
    if len(set(c.reward.functions)) != len(c.reward.functions):
        raise ConfigError(f"reward.functions lists a function twice: {c.reward.functions}")
    _check_training(c, ConfigError)
    _check_names(c)


# What a resumed run may change: where it runs (workers, engine sizes, the run directory,
# command logs) and, per kind of run, how much it does; every other setting must match.
RESUME_FREE_SECTIONS = frozenset({"workers", "engine"})
RESUME_FREE_KEYS = frozenset({("run", "out_dir"), ("run", "name"), ("sandbox", "command_log")})
JOB_RESUME_FREE = frozenset({("task", "num_prompts")})  # rollout.job
TRAIN_RESUME_FREE = frozenset({("rl", "steps")})  # rollout.train


def resume_kept(
    settings: dict[str, Any], free: frozenset[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """The settings (``Config.to_dict`` form) a resumed run must keep: all but the
    ``RESUME_FREE_*`` sets and ``free``."""
    free = RESUME_FREE_KEYS | free
    return {
        section: {k: v for k, v in values.items() if (section, k) not in free}
        for section, values in settings.items()
        if section not in RESUME_FREE_SECTIONS
    }


def changed_settings(
    now: dict[str, Any], stored: dict[str, Any], free: frozenset[tuple[str, str]]
) -> list[str]:
    """``section.key`` of each setting of ``now`` that differs from ``stored`` (both in
    ``Config.to_dict`` form), except what a resume may change (see :func:`resume_kept`)."""
    return [
        f"{section}.{key}"
        for section, values in resume_kept(now, free).items()
        for key, value in values.items()
        if stored.get(section, {}).get(key) != value
    ]


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of ``policy.checkpoint``: the path itself, or ``model.safetensors`` in a
    checkpoint directory (as the learner writes them)."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def _check_names(c: Config) -> None:
    """Task and reward names against their registries (cheap: nothing is started)."""
    from reward import make_reward
    from rollout import tasks

    try:
        task = tasks.get_task(c.task.name, **c.task.options)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    if c.task.split not in tasks.SPLITS:
        raise ConfigError(f"task.split must be one of {list(tasks.SPLITS)}, got {c.task.split!r}")
    try:
        make_reward(c.reward_spec() or task.reward)
    except ValueError as e:
        raise ConfigError(f"reward.functions: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (None: all defaults), apply ``key=value`` overrides, check it all."""
    raw: dict[str, Any] = {}
    source = "defaults" if path is None else str(path)
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}") from None
    overridden = set()
    for parts, value in parse_overrides(list(overrides or [])):
        _apply(raw, parts, value)
        overridden.add((parts[0], parts[1]))
    return _build(raw, source, overridden)


def from_dict(raw: dict[str, Any]) -> Config:
    """A Config from its ``to_dict`` form (checked like a file)."""
    return _build(raw, "config", set())
