"""The agent loop: one episode of one task instance, token in, token out (DESIGN.md §2).

:func:`run_episode` encodes the prompt once (``policy.chat``, with the instance's tools declared,
so the V4 template keeps every turn's reasoning and the conversation only grows by appending),
then per turn:

1. the backend samples one assistant turn; its tokens are kept exactly as sampled
   (``loss_mask`` 1, the sampling logprobs);
2. the turn's text is parsed (``policy.chat.parse_assistant``); a turn without tool calls ends
   the episode ("stop");
3. each tool call runs through ``dsec.tools.ToolBox`` on the episode's sandbox in a thread, so
   many episodes overlap; unknown (undeclared) tools and bad arguments come back to the model as
   tool errors, and a turn with any DSML defect runs none of its calls and gets one
   ``parse_error`` result listing the defects;
4. the results are encoded with the V4 template (``<｜User｜><tool_result>…<｜Assistant｜><think>``)
   and appended to the session and to ``response_ids`` with ``loss_mask`` 0 and logprob 0.0.

A turn cut off by ``Limits.max_new_tokens`` (no EOS) is closed with an appended EOS (mask 0) and
its defects are sent back like malformed DSML. The episode ends with ``finish_reason``:

- ``"stop"``: the model answered without a tool call;
- ``"max_turns"``: ``Limits.max_turns`` assistant turns were generated (the last turn's tool
  calls still run, so the sandbox holds their effects);
- ``"context"``: the next turn, or the tool results, cannot fit ``Limits.max_context_tokens``
  (nothing that does not fit is appended);
- ``"deadline"``: ``Limits.deadline`` seconds passed; a generation or tool call in flight is cut
  off (the unfinished turn is not recorded);
- ``"sandbox_error"``: the sandbox could not do what was asked (closed, died); the error text is
  in ``metadata["error"]``.

Every command's timeout is clamped to ``Limits.tool_timeout`` and to the time left before the
deadline, so the sandbox itself kills what runs past the episode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import posixpath
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import dsec
from dsec.tools import MAX_TIMEOUT, TOOL_SCHEMAS, ToolBox, ToolResult, validate_call
from policy.chat import parse_assistant
from policy.engine import SamplingParams
from policy.tokenizer import Tokenizer
from rollout.backends import Backend
from rollout.types import ToolCall, Trajectory

__all__ = ["Limits", "run_episode"]

WORKSPACE = "/workspace"
_STANDARD_TOOLS = {t["function"]["name"] for t in TOOL_SCHEMAS}
_COMMAND_TOOLS = ("bash", "python")
_MIN_TOOL_SECONDS = 0.05  # a command started just before the deadline still gets a valid timeout

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What bounds one episode.

    Attributes:
        max_turns: most assistant turns.
        max_context_tokens: context budget: prompt + everything appended never exceeds it.
        max_new_tokens: most tokens sampled in one turn.
        tool_timeout: seconds one tool call may run (a longer ``timeout`` asked by the model is
            cut to this).
        deadline: wall-clock seconds for the whole episode, file placement included.
        max_tool_output_chars: characters kept of each output stream of a tool call (head and
            tail; ``dsec.tools.ToolBox``'s ``max_output_chars``).
    """

    max_turns: int = 8
    max_context_tokens: int = 8192
    max_new_tokens: int = 1024
    tool_timeout: float = 30.0
    deadline: float = 600.0
    max_tool_output_chars: int = 8000

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_context_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {value!r}")
        t = self.tool_timeout
        if not _is_number(t) or not 0 < t <= MAX_TIMEOUT:
            raise ValueError(f"Limits.tool_timeout must be in (0, {MAX_TIMEOUT:g}], got {t!r}")
        if not _is_number(self.deadline) or not self.deadline > 0:
            raise ValueError(f"Limits.deadline must be a number > 0, got {self.deadline!r}")
        c = self.max_tool_output_chars
        if not isinstance(c, int) or isinstance(c, bool) or c < 100:
            raise ValueError(f"Limits.max_tool_output_chars must be an int >= 100, got {c!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class _Deadline(Exception):
    """The episode deadline passed."""


class _Ended(Exception):
    """The episode ends with ``reason`` (context budget or a sandbox failure)."""

    def __init__(self, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


async def run_episode(
    backend: Backend,
    sandbox: Any,
    instance: Any,
    limits: Limits,
    *,
    tokenizer: Tokenizer,
    sampling: SamplingParams | None = None,
    trajectory_id: str | None = None,
    group_id: str | None = None,
    sample_index: int = 0,
    thinking_mode: str = "thinking",
) -> Trajectory:
    """Run one episode of ``instance`` on ``sandbox`` and return its :class:`Trajectory`.

    ``instance`` is any object with ``id``, ``task``, ``messages``, ``tools``, ``verifier`` and
    ``files`` (``rollout.tasks.base.Instance``); its files are written into /workspace first.
    ``sampling`` gives temperature, top-p/k and seed (default ``SamplingParams()``; turn t samples
    with seed + 1_000_003 * t, so turns do not replay one random stream); each turn
    samples at most ``limits.max_new_tokens`` tokens (``sampling.max_new_tokens`` is replaced)
    and stops at EOS besides any ``stop_token_ids`` given. The sandbox belongs to this episode
    and is left open (the caller closes or recycles it). Model errors and sandbox failures never
    raise; bad arguments raise ``ValueError`` naming the value.
    """
    if not isinstance(backend, Backend):
        raise ValueError(f"backend must be a rollout.backends.Backend, got {backend!r}")
    if not isinstance(limits, Limits):
        raise ValueError(f"limits must be rollout.agent.Limits, got {limits!r}")
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer must be a policy Tokenizer, got {tokenizer!r}")
    if sampling is None:
        sampling = SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
    episode = _Episode(backend, sandbox, instance, limits, tokenizer, sampling, thinking_mode)
    traj = Trajectory(
        id=trajectory_id or uuid.uuid4().hex,
        task=str(instance.task),
        instance_id=str(instance.id),
        group_id=group_id if group_id is not None else str(instance.id),
        sample_index=sample_index,
        prompt_ids=episode.prompt_ids,
    )
    await episode.run()
    traj.response_ids = episode.context[len(episode.prompt_ids) :]
    traj.loss_mask, traj.logprobs = episode.loss_mask, episode.logprobs
    traj.messages, traj.tool_calls = episode.messages, episode.tool_calls
    traj.finish_reason, traj.num_turns = episode.finish_reason, episode.turns
    traj.policy_version = min(episode.versions, default=0)
    traj.timings = episode.timings
    if len(set(episode.versions)) > 1:
        traj.metadata["turn_versions"] = episode.versions
    if episode.error is not None:
        traj.metadata["error"] = episode.error
    return traj


class _Episode:
    """The state of one running episode (see :func:`run_episode`)."""

    def __init__(
        self,
        backend: Backend,
        sandbox: Any,
        instance: Any,
        limits: Limits,
        tokenizer: Tokenizer,
        sampling: SamplingParams,
        thinking_mode: str,
    ) -> None:
        if thinking_mode not in ("thinking", "chat"):
            raise ValueError(f"thinking_mode must be 'thinking' or 'chat', got {thinking_mode!r}")
        self.backend, self.sandbox, self.limits = backend, sandbox, limits
        self.tokenizer, self.thinking_mode = tokenizer, thinking_mode
        self.files = _workspace_files(instance)
        tools = list(instance.tools or [])
        self.tool_names = _tool_names(tools, instance.id)
        self.box = ToolBox(
            sandbox,
            max_output_chars=limits.max_tool_output_chars,
            default_timeout=limits.tool_timeout,
        )
        self.sampling = dataclasses.replace(
            sampling, stop_token_ids=(tokenizer.eos_id, *sampling.stop_token_ids)
        )
        self.prompt_ids = tokenizer.encode_chat(
            instance.messages, thinking_mode, tools=tools or None
        )
        self.budget = limits.max_context_tokens
        if backend.max_context is not None:
            self.budget = min(self.budget, backend.max_context)

        self.context: list[int] = list(self.prompt_ids)  # prompt_ids + response_ids
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.messages: list[dict[str, Any]] = [dict(m) for m in instance.messages]
        self.tool_calls: list[ToolCall] = []
        self.versions: list[int] = []
        self.turns = 0
        self.finish_reason = "stop"
        self.error: str | None = None
        self.timings = {"generate": 0.0, "tools": 0.0, "total": 0.0}
        self.session: Any = None

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.deadline_at = loop.time() + self.limits.deadline
        try:
            await self._episode()
        except _Deadline:
            self.finish_reason = "deadline"
        except _Ended as end:
            self.finish_reason, self.error = end.reason, end.error
        finally:
            if self.session is not None:
                await self.backend.close(self.session)
            self.timings["total"] = time.perf_counter() - start

    async def _episode(self) -> None:
        await self._place_files()
        if len(self.context) + 1 > self.budget:
            raise _Ended("context")
        self.session = await self._infer(self.backend.open(self.prompt_ids))
        for turn in range(self.limits.max_turns):
            message, cut_off = await self._generate_turn(turn)
            if not message["errors"] and not message["tool_calls"]:
                self.finish_reason = "stop"
                return
            tail = [self.tokenizer.eos_id] if cut_off else []
            results = await self._tool_results(turn, message)
            ids = tail + self.tokenizer.encode_tool_results(results, self.thinking_mode)
            if len(self.context) + len(ids) > self.budget:
                raise _Ended("context")
            await self._infer(self.backend.append(self.session, ids))
            self._record(ids, sampled=False)
        self.finish_reason = "max_turns"

    async def _generate_turn(self, turn: int) -> tuple[dict[str, Any], bool]:
        """Sample one assistant turn; returns the parsed message and whether it was cut off."""
        room = self.budget - len(self.context)
        if room < 1:
            raise _Ended("context")
        max_new = min(self.limits.max_new_tokens, room)
        seed = self.sampling.seed
        seed = None if seed is None else seed + 1_000_003 * turn  # a fresh stream per turn
        params = dataclasses.replace(self.sampling, max_new_tokens=max_new, seed=seed)
        gen = await self._infer(self.backend.generate(self.session, params))
        if len(gen.token_ids) != len(gen.logprobs) or len(gen.token_ids) > max_new:
            raise RuntimeError(
                f"backend returned {len(gen.token_ids)} tokens and {len(gen.logprobs)} logprobs "
                f"for max_new_tokens={max_new}"
            )
        self._record(list(gen.token_ids), sampled=True, logprobs=list(gen.logprobs))
        self.turns += 1
        self.versions.append(min(getattr(gen, "versions", None) or [gen.version]))
        message = self._parse(list(gen.token_ids))
        self.messages.append(message)
        cut_off = gen.finish_reason != "stop"
        if cut_off and max_new == room:
            raise _Ended("context")
        return message, cut_off

    def _parse(self, ids: list[int]) -> dict[str, Any]:
        """The parsed turn; ids the tokenizer cannot decode (a model whose vocabulary is larger
        than the tokenizer's) are left out of the text and reported as a defect."""
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        text = self.tokenizer.decode([t for t in ids if 0 <= t < vocab])
        message = parse_assistant(text, self.thinking_mode)
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            message["errors"].append(
                f"{len(bad)} sampled token(s) outside the tokenizer's vocabulary: {shown}"
            )
        return message

    def _record(self, ids: list[int], *, sampled: bool, logprobs: list[float] | None = None):
        self.context += ids
        self.loss_mask += [1 if sampled else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    # -- tools -------------------------------------------------------------------------------

    async def _tool_results(self, turn: int, message: dict[str, Any]) -> list[str]:
        """Run a turn's tool calls (or report its defects); the texts the model sees, in order."""
        if message["errors"]:
            text = (
                "error: malformed output: "
                + "; ".join(message["errors"])
                + ". No tool was run; reply again in the required format."
            )
            self.tool_calls.append(
                ToolCall("", "", ok=False, output=text, error_kind="parse_error", turn=turn)
            )
            self.messages.append({"role": "tool", "content": text})
            return [text]
        texts = []
        for call in message["tool_calls"]:
            fn = call["function"]
            start = time.perf_counter()
            try:
                result = await self._run_call(fn["name"], fn["arguments"])
            except (_Deadline, _Ended) as exc:
                ended = exc.reason if isinstance(exc, _Ended) else "deadline"
                kind = "sandbox_error" if ended == "sandbox_error" else "timeout"
                text = f"error: the tool call was cut off ({ended})"
                wall = time.perf_counter() - start
                self.tool_calls.append(
                    ToolCall(fn["name"], fn["arguments"], False, text, wall, kind, turn)
                )
                raise
            arguments = result.arguments if result.arguments is not None else fn["arguments"]
            self.tool_calls.append(
                ToolCall(
                    name=fn["name"],
                    arguments=arguments,
                    ok=result.ok,
                    output=result.text,
                    wall_time=result.wall_time,
                    error_kind=result.error_kind,
                    turn=turn,
                )
            )
            self.messages.append({"role": "tool", "name": fn["name"], "content": result.text})
            texts.append(result.text)
        return texts

    async def _run_call(self, name: str, raw_arguments: str) -> ToolResult:
        if name not in self.tool_names:
            known = ", ".join(self.tool_names) or "none"
            msg = f"error: unknown tool {name!r}; available tools: {known}"
            return ToolResult(name, msg, ok=False, error_kind="unknown_tool")
        args = validate_call(name, raw_arguments)
        if isinstance(args, ToolResult):
            return args
        run_args = dict(args)
        if name in _COMMAND_TOOLS:
            left = self.deadline_at - asyncio.get_running_loop().time()
            asked = float(args.get("timeout", self.limits.tool_timeout))
            run_args["timeout"] = max(min(asked, self.limits.tool_timeout, left), _MIN_TOOL_SECONDS)
        start = time.perf_counter()
        try:
            result = await self._bounded(asyncio.to_thread(self.box.execute, name, run_args))
        except dsec.SandboxError as exc:
            raise _Ended("sandbox_error", f"{type(exc).__name__}: {exc}") from None
        finally:
            self.timings["tools"] += time.perf_counter() - start
        return dataclasses.replace(result, arguments=args)

    async def _place_files(self) -> None:
        if not self.files:
            return
        start = time.perf_counter()
        try:
            await self._bounded(asyncio.to_thread(_write_files, self.sandbox, self.files))
        except dsec.SandboxError as exc:
            raise _Ended("sandbox_error", f"{type(exc).__name__}: {exc}") from None
        finally:
            self.timings["tools"] += time.perf_counter() - start

    # -- time --------------------------------------------------------------------------------

    async def _infer(self, call: Awaitable[T]) -> T:
        """A backend call, cut off at the deadline; its time counts as generation time."""
        start = time.perf_counter()
        try:
            return await self._bounded(call)
        finally:
            self.timings["generate"] += time.perf_counter() - start

    async def _bounded(self, call: Awaitable[T]) -> T:
        if asyncio.get_running_loop().time() >= self.deadline_at:
            if asyncio.iscoroutine(call):
                call.close()
            raise _Deadline
        try:
            async with asyncio.timeout_at(self.deadline_at) as scope:
                return await call
        except TimeoutError:
            if scope.expired():
                raise _Deadline from None
            raise


# ------------------------------------------------------------------------------------------------
# Instance checks and file placement
# ------------------------------------------------------------------------------------------------


def _tool_names(tools: list[Any], instance_id: Any) -> list[str]:
    names = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise ValueError(
                f"instance {instance_id!r}: a tool must be a schema dict, got {tool!r:.200}"
            )
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in _STANDARD_TOOLS:
            raise ValueError(
                f"instance {instance_id!r} declares tool {name!r}, which is not one of "
                f"the sandbox tools {sorted(_STANDARD_TOOLS)}"
            )
        names.append(name)
    return names


def _workspace_files(instance: Any) -> dict[str, bytes | str]:
    files = getattr(instance, "files", None) or {}
    if not isinstance(files, Mapping):
        raise ValueError(f"instance {instance.id!r}: files must be a dict, got {files!r:.200}")
    out: dict[str, bytes | str] = {}
    for path, content in files.items():
        if not isinstance(path, str) or not path:
            raise ValueError(f"instance {instance.id!r}: file path must be a str, got {path!r}")
        full = posixpath.normpath(posixpath.join(WORKSPACE, path))
        if not full.startswith(WORKSPACE + "/"):
            raise ValueError(f"instance {instance.id!r}: file {path!r} is not inside {WORKSPACE}")
        if not isinstance(content, (str, bytes)):
            raise ValueError(
                f"instance {instance.id!r}: file {path!r} must be str or bytes, "
                f"got {type(content).__name__}"
            )
        out[full] = content
    return out


def _write_files(sandbox: Any, files: dict[str, bytes | str]) -> None:
    dirs = sorted({posixpath.dirname(p) for p in files} - {WORKSPACE})
    if dirs:
        made = sandbox.exec(["mkdir", "-p", "--", *dirs], timeout=30.0)
        if made.exit_code != 0:
            err = bytes(made.stderr).decode("utf-8", errors="replace").strip()
            raise dsec.SandboxError(f"cannot create {dirs} in the sandbox: {err}")
    for path, content in files.items():
        sandbox.write_file(path, content)
