"""Warm-start demonstrations that a task generates itself, and the SFT stage that learns them.

For ``arith_tool`` (shared/RL.md §8): a demonstration is the episode a correct agent would
produce, rendered exactly as the agent loop renders a real one (``policy.chat`` through the
run's tokenizer), so SFT teaches the same token format RL then samples:

- a share ``sft.tool_fraction`` of the demonstrations calls the tool: an assistant turn with
  one DSML ``python`` call (``print(a*b)``), the tool result (the text ``dsec.tools.ToolBox``
  renders for that call, run for real in a sandbox) encoded with the template, and a final turn
  with the number;
- the others answer directly with the correct number. The policy cannot multiply 3-4 digit
  numbers in its head, so after SFT it knows both formats, calls the tool now and then, and
  usually guesses wrong when it does not: RL has room to raise the tool-use rate;
- ``sft.call_fraction`` (more than ``tool_fraction``) adds *forced* calls: demonstrations that
  call the tool but whose first response token, the choice between calling the tool and
  answering, has loss_mask 0. They teach the call's arguments and copying the tool's result
  into the answer, which a policy must get right on every digit to earn the reward, without
  teaching the choice: of the choices SFT trains, the share that calls the tool is still
  ``tool_fraction``.

``loss_mask`` is 1 on the assistant tokens only (the prompt is not in the response; the tool
result is in it with mask 0), as in a sampled trajectory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rollout.learner import Sample

__all__ = [
    "Demonstration",
    "demonstration_samples",
    "demonstrations",
    "render_text",
    "run_sft",
    "sft_lr",
]

MIN_LR_RATIO = 0.05  # where the cosine schedule ends, as a share of the peak lr


@dataclass(frozen=True)
class Demonstration:
    """One demonstration: the prompt (messages and tools) and the turns that follow it.

    ``turns`` alternates assistant messages and tool outputs: ``("assistant", message)`` or
    ``("tool", text)``.
    """

    instance: Any
    turns: list[tuple[str, Any]]
    forced: bool = False  # a forced call: the first token (the choice) is not trained

    @property
    def uses_tool(self) -> bool:
        return any(kind == "tool" for kind, _ in self.turns)


def _call_message(expression: str) -> dict[str, Any]:
    call = {"name": "python", "arguments": {"code": f"print({expression})"}}
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": call}],
    }


def demonstrations(
    task_name: str,
    n: int,
    *,
    seed: int,
    tool_fraction: float,
    run_tool: Callable[[str, dict[str, Any]], str],
    options: dict[str, Any] | None = None,
    call_fraction: float = 0.0,
) -> list[Demonstration]:
    """``n`` demonstrations of ``task_name`` on its train split (seeded). ``round(n *
    max(tool_fraction, call_fraction))`` of them call the tool; the rest answer directly. Of
    the calls, as many as make the calls among the trained choices ``tool_fraction`` of them
    are chosen; the others are forced (``Demonstration.forced``: their first token is not
    trained). ``run_tool(name, arguments)`` returns the text the tool shows (a
    ``dsec.tools.ToolBox`` on a sandbox, see :func:`sandbox_tool`); ``options`` are the task's
    options (``[task.options]``), so demonstrations match the RL problems."""
    from rollout.tasks import get_task

    if task_name != "arith_tool":
        raise ValueError(f"demonstrations exist for 'arith_tool' only, not {task_name!r}")
    for name, value in (("tool_fraction", tool_fraction), ("call_fraction", call_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    calls = round(n * max(tool_fraction, call_fraction))
    if call_fraction <= tool_fraction:
        chosen = calls
    else:
        # chosen calls : direct answers = tool_fraction : (1 - tool_fraction)
        chosen = min(calls, round((n - calls) * tool_fraction / (1.0 - tool_fraction)))
        if calls > chosen and n == calls:
            raise ValueError(
                f"call_fraction {call_fraction!r} leaves no direct answer, so no choice is "
                f"trained at tool_fraction {tool_fraction!r}; use a call_fraction below 1"
            )
    instances = get_task(task_name, **(options or {})).instances("train", n, seed=seed)
    rng = random.Random(f"sft:{task_name}:{seed}")
    with_tool = rng.sample(range(n), calls)
    calling, forced = set(with_tool), set(with_tool[chosen:])
    out = []
    for i, inst in enumerate(instances):
        answer = {"role": "assistant", "content": inst.verifier["answer"]}
        if i in calling:
            call = _call_message(inst.verifier["expression"])
            args = call["tool_calls"][0]["function"]["arguments"]
            turns = [("assistant", call), ("tool", run_tool("python", args)), ("assistant", answer)]
        else:
            turns = [("assistant", answer)]
        out.append(Demonstration(inst, turns, forced=i in forced))
    return out


def sandbox_tool(sandbox: Any) -> Callable[[str, dict[str, Any]], str]:
    """``run_tool`` for :func:`demonstrations`: the call run by ``dsec.tools.ToolBox``."""
    from dsec.tools import ToolBox

    box = ToolBox(sandbox)

    def run(name: str, arguments: dict[str, Any]) -> str:
        result = box.execute(name, arguments)
        if not result.ok:
            raise RuntimeError(f"demonstration tool call {name}({arguments}) failed: {result.text}")
        return result.text

    return run


def render_text(demo: Demonstration, thinking_mode: str) -> str:
    """The demonstration as one string (prompt and all turns): text to train a tokenizer on."""
    from policy import chat

    text = chat.encode(demo.instance.messages, thinking_mode, tools=demo.instance.tools or None)
    for kind, value in demo.turns:
        if kind == "assistant":
            text += chat.render_assistant(value, thinking_mode)
        else:
            text += chat.encode_tool_results([value], thinking_mode)
    return text


def demonstration_samples(
    demos: list[Demonstration], tokenizer: Any, thinking_mode: str
) -> list[Sample]:
    """Token samples: the prompt as the agent loop encodes it, then the turns (assistant tokens
    with loss_mask 1, tool results with 0; a forced call's first token with 0)."""
    from policy import chat

    out = []
    for demo in demos:
        inst = demo.instance
        prompt = tokenizer.encode_chat(inst.messages, thinking_mode, tools=inst.tools or None)
        ids: list[int] = []
        mask: list[int] = []
        for kind, value in demo.turns:
            if kind == "assistant":
                piece = tokenizer.encode_segments(chat.assistant_segments(value, thinking_mode))
            else:
                piece = tokenizer.encode_tool_results([value], thinking_mode)
            ids += piece
            mask += [1 if kind == "assistant" else 0] * len(piece)
        if demo.forced:
            mask[0] = 0  # the choice to call the tool is given, not taught
        out.append(Sample(prompt, ids, mask, [0.0] * len(ids)))
    return out


def sft_lr(step: int, steps: int, lr: float, schedule: str, warmup_steps: int) -> float:
    """The learning rate of SFT step ``step`` (0-based) of ``steps``: "constant" is ``lr``
    throughout; "cosine" rises linearly over ``warmup_steps`` and then follows a cosine from
    ``lr`` down to ``MIN_LR_RATIO * lr`` at the last step."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"SFT schedule must be 'constant' or 'cosine', got {schedule!r}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    progress = step / max(steps - 1, 1)
    return (
        lr * warm * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
    )


def run_sft(
    learner: Any,
    samples: list[Sample],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """``steps`` SFT steps on batches drawn from ``samples`` (seeded), at the learning rates of
    :func:`sft_lr`; returns the metrics (with ``lr``).

    ``learner`` is a :class:`rollout.learner.Learner` or anything with its ``sft_step``
    (``rollout.workers``' learner group)."""
    rng = random.Random(f"sft-batches:{seed}")
    history = []
    for step in range(steps):
        batch = [samples[i] for i in rng.sample(range(len(samples)), min(batch_size, len(samples)))]
        step_lr = sft_lr(step, steps, lr, schedule, warmup_steps)
        metrics = {**learner.sft_step(batch, lr=step_lr), "lr": step_lr}
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history
