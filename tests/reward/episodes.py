"""Real trajectories without a model: scripted assistant turns, encoded with the byte tokenizer
and the V4 chat template exactly as the agent loop records them, with tool calls really run in
a dsec sandbox."""

from __future__ import annotations

import json
from typing import Any

import dsec
from dsec.tools import ToolBox
from policy.chat import assistant_segments, parse_assistant
from policy.tokenizer import ByteTokenizer
from rollout.tasks import Instance, place_files
from rollout.types import ToolCall, Trajectory

TOKENIZER = ByteTokenizer()


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def episode(
    instance: Instance,
    turns: list[dict[str, Any]],
    *,
    sample_index: int = 0,
    group_id: str | None = None,
    sandbox: dsec.Sandbox | None = None,
    finish_reason: str = "stop",
) -> Trajectory:
    """A trajectory of ``instance`` whose assistant turns are ``turns`` (message dicts with
    ``content`` and optional ``tool_calls``). Tool calls run in ``sandbox`` (a fresh one when
    None) with the instance's files placed; their results are appended as unsampled tokens."""
    tok = TOKENIZER
    prompt_ids = tok.encode_chat(instance.messages, tools=instance.tools)
    response_ids: list[int] = []
    loss_mask: list[int] = []
    messages = [dict(m) for m in instance.messages]
    tool_calls: list[ToolCall] = []
    own = sandbox is None
    sb = dsec.Sandbox(timeout=20.0) if own else sandbox
    try:
        place_files(sb, instance.files)
        box = ToolBox(sb)
        for turn, msg in enumerate(turns):
            ids = tok.encode_segments(assistant_segments({"role": "assistant", **msg}))
            response_ids += ids
            loss_mask += [1] * len(ids)
            parsed = parse_assistant(tok.decode(ids), tools=instance.tools)
            messages.append(parsed)
            if not parsed["tool_calls"]:
                continue
            texts = []
            for c in parsed["tool_calls"]:
                fn = c["function"]
                res = box.execute(fn["name"], fn["arguments"])
                tool_calls.append(
                    ToolCall(
                        fn["name"],
                        json.loads(fn["arguments"]),
                        res.ok,
                        res.text,
                        res.wall_time,
                        res.error_kind,
                        turn,
                    )
                )
                messages.append({"role": "tool", "name": fn["name"], "content": res.text})
                texts.append(res.text)
            ids = tok.encode_tool_results(texts)
            response_ids += ids
            loss_mask += [0] * len(ids)
    finally:
        if own:
            sb.close()
    return Trajectory(
        id=f"{group_id or instance.id}#{sample_index}",
        task=instance.task,
        instance_id=instance.id,
        group_id=group_id or instance.id,
        sample_index=sample_index,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        loss_mask=loss_mask,
        logprobs=[-0.5 if m else 0.0 for m in loss_mask],
        messages=messages,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        num_turns=len(turns),
        timings={"generate": 0.01 * len(turns), "tools": sum(c.wall_time for c in tool_calls)},
    )


def answer(text: str) -> dict[str, Any]:
    return {"content": text}
