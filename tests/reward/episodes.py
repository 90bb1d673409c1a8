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


def build_run(run_dir: Any) -> list[Trajectory]:
    """A small run directory written with the store: arith_tool, workspace_qa and code_tests
    groups with right and wrong answers, real tool calls, scored by the registered rewards."""
    from reward import make_reward, summarize
    from rollout.store import RunStore
    from rollout.tasks import get_task

    store = RunStore(run_dir)
    config = {
        "task": {"name": "mixed", "group_size": 3},
        "reward": {"functions": ["exact_match", "format"]},
    }
    store.write_config(config)
    plain = make_reward({"exact_match": 1.0, "format": 0.1})
    tested = make_reward({"sandbox_tests": 1.0, "format": 0.1})
    written: list[Trajectory] = []
    for step, inst in enumerate(get_task("arith_tool").instances("test", 2, seed=0)):
        expr, value = inst.verifier["expression"], inst.verifier["answer"]
        computed = {"content": "", "tool_calls": [call("python", code=f"print({expr})")]}
        scripts = [
            [computed, answer(value)],  # uses the tool, right
            [answer(str(int(value) + 1))],  # guesses, wrong
            [computed, {"content": "", "tool_calls": [call("python", code="1/0")]}],  # out of turns
        ]
        group = []
        for i, turns in enumerate(scripts):
            reason = "max_turns" if i == 2 else "stop"
            t = episode(inst, turns, sample_index=i, finish_reason=reason)
            plain.score(t, inst.verifier)
            group.append(t)
        store.write_groups(group)
        store.append_metrics({"step": step, **summarize(group)})
        written += group
    [qa] = get_task("workspace_qa").instances("test", 1, seed=0)
    read = {"content": "", "tool_calls": [call("bash", command="cat people/*.txt ages.txt")]}
    group = []
    for i, turns in enumerate([[read, answer(qa.verifier["answer"])], [answer("41")]]):
        t = episode(qa, turns, sample_index=i)
        plain.score(t, qa.verifier)
        group.append(t)
    [code] = get_task("code_tests", families=["rep"]).instances("test", 1, seed=0)
    k = int(code.messages[0]["content"].split("repeated ")[1].split()[0])
    for i, source in enumerate(
        [f"def rep(s):\n    return s * {k}\n", "def rep(s):\n    return s\n"]
    ):
        with dsec.Sandbox(timeout=20.0) as sb:
            write = {
                "content": "",
                "tool_calls": [call("write_file", path=code.verifier["path"], content=source)],
            }
            t = episode(code, [write, answer("done")], sample_index=i, sandbox=sb)
            tested.score(t, code.verifier, sb)
        group.append(t)
    store.write_groups(group)
    written += group
    store.append_metrics({"step": 2, **summarize(group)})
    return written
