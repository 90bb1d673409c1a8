"""rollout.agent.run_episode in real sandboxes: scripted model output (ScriptedBackend) for every
limit and failure mode, hostile commands, and the real tiny policy through EngineBackend.

Every episode is checked for exact token accounting: each turn's context is a prefix of the final
one (prompt_ids + response_ids), the sampled tokens sit there verbatim with loss_mask 1, and every
other token is exactly the encoded tool results of the turn before (loss_mask 0, logprob 0.0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import dsec
import policy.engine
from policy import chat
from policy.engine import SamplingParams
from policy.tokenizer import ByteTokenizer
from rollout.agent import Limits, run_episode
from rollout.backends import EngineBackend, ScriptedBackend
from rollout.tasks.base import Instance, tool_schemas
from rollout.types import Trajectory

TOK = ByteTokenizer()
SANDBOX = dict(
    memory_bytes=256 << 20,
    max_pids=64,
    timeout=20.0,
    max_output_bytes=256 << 10,
    disk_bytes=32 << 20,
)
LIMITS = Limits(
    max_turns=4,
    max_context_tokens=16_000,
    max_new_tokens=2_000,
    tool_timeout=5.0,
    deadline=20.0,
    max_tool_output_chars=2_000,
)
# Generous bound on an episode that a limit must end: about limits, never a measurement.
ENDS_WITHIN = 30.0
POLL_LIMIT = 15.0  # bounds a wait for a process to appear; decides nothing


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


def turn(reasoning="thinking", content="", calls=()):
    """A well-formed assistant turn as the model emits it after ``<｜Assistant｜><think>``."""
    message = {"reasoning_content": reasoning, "content": content, "tool_calls": list(calls)}
    return chat.render_assistant(message)


ANSWER = turn("done", "the answer")


def instance(tools=("python", "bash", "read_file", "write_file"), files=None, text="solve it"):
    return Instance(
        id="inst-1",
        task="unit",
        messages=[{"role": "user", "content": text}],
        tools=tool_schemas(tools),
        files=files or {},
    )


@pytest.fixture
def sandbox():
    with dsec.Sandbox(**SANDBOX) as sb:
        yield sb


def episode(backend, sb, inst=None, limits=LIMITS, **kw) -> Trajectory:
    return asyncio.run(run_episode(backend, sb, inst or instance(), limits, tokenizer=TOK, **kw))


def scripted(sb, script, inst=None, limits=LIMITS, **kw):
    backend = ScriptedBackend(script, TOK)
    traj = episode(backend, sb, inst, limits, **kw)
    turns = [(t.context_ids, t.token_ids) for t in backend.transcript]
    check_accounting(traj, turns, kw.get("thinking_mode", "thinking"))
    return traj, backend


def check_accounting(
    traj: Trajectory, turns: list[tuple[list[int], list[int]]], mode: str = "thinking"
) -> None:
    """``turns``: (context, sampled tokens) of each generate call, in order."""
    full = traj.prompt_ids + traj.response_ids
    n, p = len(traj.response_ids), len(traj.prompt_ids)
    assert len(traj.loss_mask) == n and len(traj.logprobs) == n
    assert len(turns) == traj.num_turns
    if turns:
        assert turns[0][0] == traj.prompt_ids
    mask, spans, prev = [0] * n, [], []
    for context, sampled in turns:
        assert context[: len(prev)] == prev  # each turn's context extends the previous turn's
        assert full[: len(context)] == context  # ... and is a prefix of the final context
        start = len(context) - p
        assert traj.response_ids[start : start + len(sampled)] == sampled  # kept as sampled
        mask[start : start + len(sampled)] = [1] * len(sampled)
        spans.append((start, start + len(sampled)))
        prev = context + sampled
    assert traj.loss_mask == mask  # 1 exactly on sampled tokens
    assert all(traj.logprobs[i] == 0.0 for i in range(n) if not mask[i])
    # What lies between turns is exactly the encoded tool results (after an EOS that closed a
    # turn cut off by max_new_tokens); nothing follows a turn without tool calls, and only an
    # episode cut short leaves its last turn's results out.
    for k, (_, end) in enumerate(spans):
        gap = traj.response_ids[end : spans[k + 1][0] if k + 1 < len(spans) else n]
        outputs = [c.output for c in traj.tool_calls if c.turn == k]
        if not outputs:
            assert gap == []
        elif gap:
            expected = TOK.encode_tool_results(outputs, mode)
            assert gap in (expected, [TOK.eos_id, *expected]), TOK.decode(gap)
        else:
            assert k == len(spans) - 1
            assert traj.finish_reason in ("context", "deadline", "sandbox_error")


def turns_from_mask(traj: Trajectory) -> list[tuple[list[int], list[int]]]:
    """(context, sampled tokens) of each turn, from the runs of loss_mask 1."""
    full, p = traj.prompt_ids + traj.response_ids, len(traj.prompt_ids)
    turns, start = [], None
    for i, m in enumerate([*traj.loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            turns.append((full[: p + start], traj.response_ids[start:i]))
            start = None
    return turns


def contexts(backend):
    return [TOK.decode(t.context_ids) for t in backend.transcript]


# ------------------------------------------------------------------------------------------------
# The normal path
# ------------------------------------------------------------------------------------------------


def test_tool_call_then_answer(sandbox):
    script = [turn("use python", calls=[call("python", code="print(123 * 456)")]), ANSWER]
    traj, backend = scripted(sandbox, script, sample_index=3, group_id="g")
    assert traj.finish_reason == "stop" and traj.num_turns == 2
    assert (traj.task, traj.instance_id, traj.group_id, traj.sample_index) == (
        "unit",
        "inst-1",
        "g",
        3,
    )
    [c] = traj.tool_calls
    assert (c.name, c.arguments, c.ok, c.error_kind, c.turn) == (
        "python",
        {"code": "print(123 * 456)"},
        True,
        None,
        0,
    )
    assert "56088" in c.output and c.wall_time > 0
    assert "56088" in contexts(backend)[1]  # the model saw the result
    assert "use python" in contexts(backend)[1]  # reasoning kept across the tool turn
    assert traj.policy_version == 0 and traj.timings["tools"] > 0
    assert set(traj.timings) >= {"generate", "tools"}
    # Token in, token out equals the official rendering of the recorded conversation.
    messages = [{k: v for k, v in m.items() if k != "errors"} for m in traj.messages]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    rendered = chat.encode(messages, tools=instance().tools)
    assert TOK.decode(traj.prompt_ids + traj.response_ids) == rendered
    assert traj.prompt_ids == TOK.encode_chat(instance().messages, tools=instance().tools)


def test_chat_mode_episode(sandbox):
    def chat_turn(content="", calls=()):
        message = {"content": content, "tool_calls": list(calls)}
        return chat.render_assistant(message, "chat")

    script = [chat_turn(calls=[call("bash", command="echo 7")]), chat_turn("7")]
    traj, _ = scripted(sandbox, script, thinking_mode="chat")
    assert traj.finish_reason == "stop" and traj.tool_calls[0].ok
    messages = [{k: v for k, v in m.items() if k != "errors"} for m in traj.messages]
    rendered = chat.encode(messages, "chat", tools=instance().tools)
    assert TOK.decode(traj.prompt_ids + traj.response_ids) == rendered


def test_several_calls_in_one_turn_run_in_order_and_state_persists(sandbox):
    calls = [
        call("write_file", path="/workspace/n.txt", content="41"),
        call("bash", command="echo $(( $(cat /workspace/n.txt) + 1 ))"),
    ]
    traj, _ = scripted(sandbox, [turn(calls=calls), ANSWER])
    assert [c.name for c in traj.tool_calls] == ["write_file", "bash"]
    assert all(c.ok for c in traj.tool_calls) and "42" in traj.tool_calls[1].output
    assert traj.finish_reason == "stop"


def test_instance_files_are_placed_in_workspace(sandbox):
    inst = instance(files={"notes/fact.txt": "the key is 7731\n", "top.bin": b"\x00\x01"})
    script = [turn(calls=[call("read_file", path="/workspace/notes/fact.txt")]), ANSWER]
    traj, _ = scripted(sandbox, script, inst)
    assert traj.tool_calls[0].ok and "the key is 7731" in traj.tool_calls[0].output
    assert bytes(sandbox.read_file("/workspace/top.bin")) == b"\x00\x01"


def test_answer_without_tools_stops_at_once(sandbox):
    traj, _ = scripted(sandbox, [ANSWER])
    assert traj.finish_reason == "stop" and traj.num_turns == 1 and traj.tool_calls == []
    assert traj.loss_mask == [1] * len(traj.response_ids)
    assert traj.messages[-1]["content"] == "the answer"


# ------------------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------------------


def test_turn_limit(sandbox):
    def script(context, k):
        return turn(calls=[call("bash", command=f"echo turn-{k}")])

    for max_turns in (1, 3):
        limits = dataclasses.replace(LIMITS, max_turns=max_turns)
        traj, backend = scripted(sandbox, script, limits=limits)
        assert traj.finish_reason == "max_turns" and traj.num_turns == max_turns
        assert len(backend.transcript) == max_turns and len(traj.tool_calls) == max_turns
        # The last turn's call ran (the sandbox holds its effects) and its result is recorded.
        assert f"turn-{max_turns - 1}" in traj.tool_calls[-1].output
        assert traj.messages[-1]["role"] == "tool"


def test_context_budget_tool_results_that_do_not_fit_end_the_episode(sandbox):
    big = call("bash", command="head -c 3000 /dev/zero | tr '\\0' y")
    base = scripted(sandbox, [ANSWER])[0]
    budget = len(base.prompt_ids) + 600
    limits = Limits(max_context_tokens=budget, deadline=20.0)
    traj, _ = scripted(sandbox, [turn(calls=[big]), ANSWER], limits=limits)
    assert traj.finish_reason == "context" and traj.num_turns == 1
    assert len(traj.prompt_ids) + len(traj.response_ids) <= budget
    assert traj.tool_calls[0].ok  # it ran; its result did not fit, so nothing was appended
    assert traj.loss_mask == [1] * len(traj.response_ids)


def test_context_budget_cuts_a_generation_that_would_not_fit(sandbox):
    base = scripted(sandbox, [ANSWER])[0]
    budget = len(base.prompt_ids) + 10
    limits = Limits(max_context_tokens=budget, deadline=20.0)
    traj, _ = scripted(sandbox, [turn("a long line of reasoning that will not fit")], limits=limits)
    assert traj.finish_reason == "context" and traj.num_turns == 1
    assert len(traj.prompt_ids) + len(traj.response_ids) == budget
    assert traj.loss_mask == [1] * 10


def test_prompt_longer_than_the_budget(sandbox):
    backend = ScriptedBackend([ANSWER], TOK)
    traj = episode(backend, sandbox, limits=Limits(max_context_tokens=50))
    assert traj.finish_reason == "context" and traj.num_turns == 0
    assert traj.response_ids == [] and backend.transcript == []


def test_turn_cut_off_by_max_new_tokens_is_closed_and_reported(sandbox):
    limits = Limits(max_new_tokens=12, deadline=20.0)
    traj, backend = scripted(
        sandbox, ["this reasoning runs on and on", "k</think>ok"], None, limits
    )
    assert traj.finish_reason == "stop" and traj.num_turns == 2
    [c] = traj.tool_calls
    assert c.error_kind == "parse_error" and not c.ok
    assert "missing end-of-sentence token" in c.output
    assert "No tool was run" in contexts(backend)[1]
    first_end = traj.loss_mask.index(0)
    assert first_end == 12 and traj.response_ids[first_end] == TOK.eos_id  # appended, mask 0


def test_tool_timeout_kills_the_call_and_the_episode_goes_on(sandbox):
    limits = Limits(tool_timeout=1.0, deadline=20.0)
    # The model asks for 500 s; the per-call limit wins.
    script = [turn(calls=[call("bash", command="sleep 30", timeout=500)]), ANSWER]
    start = time.monotonic()
    traj, _ = scripted(sandbox, script, limits=limits)
    assert time.monotonic() - start < ENDS_WITHIN
    [c] = traj.tool_calls
    assert c.error_kind == "timeout" and "timed out after 1 s" in c.output
    assert c.arguments == {"command": "sleep 30", "timeout": 500}  # as the model wrote them
    assert traj.finish_reason == "stop"


def test_deadline_cuts_off_a_tool_call(sandbox):
    limits = Limits(tool_timeout=60.0, deadline=2.0)
    script = [turn(calls=[call("bash", command="sleep 1000")]), ANSWER]
    start = time.monotonic()
    traj, _ = scripted(sandbox, script, limits=limits)
    assert time.monotonic() - start < ENDS_WITHIN
    assert traj.finish_reason == "deadline" and traj.num_turns == 1
    assert traj.tool_calls[-1].error_kind == "timeout" and not traj.tool_calls[-1].ok
    # The sandbox itself killed the command at the deadline: the sandbox is free again.
    assert sandbox.exec("echo free", timeout=5).stdout == b"free\n"


def test_deadline_cuts_off_a_generation(sandbox):
    async def script(context, k):
        if k == 0:
            return turn(calls=[call("bash", command="echo one")])
        await asyncio.sleep(3600)  # a model that never finishes its second turn

    start = time.monotonic()
    traj, _ = scripted(sandbox, script, limits=Limits(deadline=1.5))
    assert time.monotonic() - start < ENDS_WITHIN
    assert traj.finish_reason == "deadline" and traj.num_turns == 1
    assert traj.tool_calls[0].ok  # the first turn is complete; the cut-off one is not recorded


# ------------------------------------------------------------------------------------------------
# Model errors go back to the model
# ------------------------------------------------------------------------------------------------


def test_malformed_dsml_becomes_a_tool_error(sandbox):
    broken = turn(calls=[call("bash", command="echo hi")]).replace("</｜DSML｜invoke>", "")
    traj, backend = scripted(sandbox, [broken, ANSWER])
    assert traj.finish_reason == "stop" and traj.num_turns == 2
    [c] = traj.tool_calls
    assert (c.ok, c.error_kind, c.turn) == (False, "parse_error", 0)
    assert "unterminated invoke" in c.output and c.output in contexts(backend)[1]
    assert traj.tool_errors == 1
    assert traj.messages[1]["errors"]  # the parsed message keeps its defects


def test_unknown_and_undeclared_tools_are_tool_errors(sandbox):
    inst = instance(tools=("python",))
    calls = [call("rm_rf", path="/"), call("bash", command="touch /workspace/ran")]
    traj, _ = scripted(sandbox, [turn(calls=calls), ANSWER], inst)
    assert [(c.name, c.error_kind) for c in traj.tool_calls] == [
        ("rm_rf", "unknown_tool"),
        ("bash", "unknown_tool"),
    ]
    assert "available tools: python" in traj.tool_calls[1].output
    assert sandbox.exec("ls /workspace", timeout=5).stdout == b""  # nothing ran
    assert traj.finish_reason == "stop" and traj.tool_errors == 2


def test_bad_arguments_are_tool_errors(sandbox):
    calls = [call("python", source="print(1)"), call("read_file", path="/x", offset=0)]
    traj, _ = scripted(sandbox, [turn(calls=calls), ANSWER])
    assert [c.error_kind for c in traj.tool_calls] == ["invalid_arguments"] * 2
    assert "'code' is a required property" in traj.tool_calls[0].output
    assert traj.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------
# Sandbox failures end the episode, never the run
# ------------------------------------------------------------------------------------------------


def test_sandbox_closed_mid_episode_is_a_sandbox_error(sandbox):
    def script(context, k):
        if k == 1:
            sandbox.close()  # the sandbox dies between two turns
        return turn(calls=[call("bash", command="echo hi")])

    traj, _ = scripted(sandbox, script)
    assert traj.finish_reason == "sandbox_error" and traj.num_turns == 2
    assert "SandboxClosedError" in traj.metadata["error"]
    assert traj.tool_calls[-1].error_kind == "sandbox_error"
    with dsec.Sandbox(**SANDBOX) as fresh:  # the next episode works
        assert scripted(fresh, [ANSWER])[0].finish_reason == "stop"


def test_sandbox_closed_before_files_are_placed(sandbox):
    sandbox.close()
    traj, backend = scripted(sandbox, [ANSWER], instance(files={"a.txt": "x"}))
    assert traj.finish_reason == "sandbox_error" and traj.num_turns == 0
    assert backend.transcript == []


# ------------------------------------------------------------------------------------------------
# Bad input from the caller raises, naming the value
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_turns", 0),
        ("max_context_tokens", 1.5),
        ("max_new_tokens", True),
        ("tool_timeout", 0),
        ("tool_timeout", 601),
        ("deadline", float("inf")),
        ("max_tool_output_chars", 10),
    ],
)
def test_bad_limits(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field} must be .*got {value!r}"):
        Limits(**{field: value})


def test_bad_instances_and_arguments(sandbox):
    backend = ScriptedBackend([ANSWER], TOK)
    outside = SimpleNamespace(
        id="x",
        task="t",
        messages=[{"role": "user", "content": "hi"}],
        tools=[],
        verifier={},
        files={"../etc/evil": "x"},
    )
    with pytest.raises(ValueError, match=r"file '\.\./etc/evil' is not inside /workspace"):
        episode(backend, sandbox, outside)
    custom = SimpleNamespace(**{**vars(outside), "files": {}, "tools": [{"name": "browse"}]})
    with pytest.raises(ValueError, match="declares tool 'browse'"):
        episode(backend, sandbox, custom)
    with pytest.raises(ValueError, match=r"limits must be rollout\.agent\.Limits"):
        episode(backend, sandbox, limits={"max_turns": 2})
    with pytest.raises(ValueError, match="thinking_mode must be"):
        episode(backend, sandbox, thinking_mode="fast")


# ------------------------------------------------------------------------------------------------
# Hostile model output: each episode ends within its limits and the next episode still works
# ------------------------------------------------------------------------------------------------

HOSTILE_LIMITS = Limits(tool_timeout=2.0, deadline=15.0, max_tool_output_chars=1_000)


def _host_secret(tmp_path):
    secret = "host-secret-" + secrets.token_hex(8)
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    return str(path), secret


@pytest.mark.parametrize(
    "attack",
    ["fork_bomb", "huge_output", "read_host_files", "sleep_forever", "write_outside"],
)
def test_hostile_output(attack, tmp_path):
    host_file, secret = _host_secret(tmp_path)
    # A writable host path outside /tmp and /workspace (a sandbox has its own of both), wherever
    # the checkout lies.
    pwned = Path("/var/tmp") / f"dsec-pwned-{secrets.token_hex(4)}"
    try:
        _hostile_episode(attack, host_file, secret, pwned)
    finally:
        assert not pwned.exists()
        pwned.unlink(missing_ok=True)


def _hostile_episode(attack, host_file, secret, pwned):
    calls = {
        "fork_bomb": [
            call("bash", command="f(){ f|f& }; f; sleep 100"),
            call(
                "python",
                code="import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
            ),
        ],
        "huge_output": [call("bash", command="head -c 100000000 /dev/zero | tr '\\0' x")],
        "read_host_files": [
            call("read_file", path="/etc/shadow"),
            call("read_file", path=host_file),
            call("bash", command=f"cat /etc/shadow {host_file} ~/.ssh/* /root/* 2>&1; ls /home"),
        ],
        "sleep_forever": [
            call("bash", command="sleep infinity", timeout=600),
            call("python", code="import time\ntime.sleep(10**6)"),
        ],
        "write_outside": [
            call("write_file", path="/etc/evil", content="x"),
            call("write_file", path=str(pwned), content="x"),
            call("bash", command=f"echo x > /usr/evil; echo y > {pwned}; touch /evil"),
        ],
    }[attack]
    start = time.monotonic()
    with dsec.Sandbox(**SANDBOX) as sb:
        traj, _ = scripted(sb, [turn(calls=calls), ANSWER], limits=HOSTILE_LIMITS)
        assert time.monotonic() - start < ENDS_WITHIN
        assert traj.finish_reason == "stop" and len(traj.tool_calls) == len(calls)
        for c in traj.tool_calls:
            assert len(c.output) < 2 * HOSTILE_LIMITS.max_tool_output_chars + 500
            assert secret not in c.output
        assert sb.exec("echo alive", timeout=5).stdout == b"alive\n"
    assert len(traj.response_ids) < 10_000
    if attack in ("fork_bomb", "sleep_forever"):
        assert [c.error_kind for c in traj.tool_calls] == ["timeout"] * len(calls)
    if attack == "huge_output":
        assert "truncated" in traj.tool_calls[0].output
    if attack in ("read_host_files", "write_outside"):
        assert not any(c.ok for c in traj.tool_calls)
    with dsec.Sandbox(**SANDBOX) as sb:  # the next episode works
        script = [turn(calls=[call("python", code="print(6 * 7)")]), ANSWER]
        nxt, _ = scripted(sb, script)
        assert nxt.finish_reason == "stop" and "42" in nxt.tool_calls[0].output


def _pids_with_arg(root: int, arg: str) -> list[int]:
    """Host pids of the descendants of ``root`` that have ``arg`` in their argv."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in argv:
                found.append(pid)
    return found


def test_episodes_overlap_tool_calls_with_generation():
    """While episode A's command runs (in a thread), episode B generates: B's scripted model
    finds A's command running in A's sandbox and kills it from the host. Were tool calls run
    on the event loop, B could only generate after A's command had ended."""
    killed: list[int] = []

    with dsec.Sandbox(**SANDBOX) as a, dsec.Sandbox(**SANDBOX) as b:

        def b_script(context, k):
            if k == 0:
                end = time.monotonic() + POLL_LIMIT
                while not killed and time.monotonic() < end:
                    killed.extend(_pids_with_arg(a.pid, "29.5"))
                    time.sleep(0.01)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            return ANSWER

        a_script = [turn(calls=[call("bash", command="sleep 29.5")]), ANSWER]

        async def both():
            return await asyncio.gather(
                run_episode(ScriptedBackend(a_script, TOK), a, instance(), LIMITS, tokenizer=TOK),
                run_episode(ScriptedBackend(b_script, TOK), b, instance(), LIMITS, tokenizer=TOK),
            )

        ta, tb = asyncio.run(both())
    assert killed, "episode B never saw episode A's command running"
    assert ta.finish_reason == tb.finish_reason == "stop"
    out = ta.tool_calls[0].output  # sh reports its child's SIGKILL as 137
    assert ta.tool_calls[0].error_kind == "exit_status"
    assert "exit code: 137" in out or "killed by signal 9" in out


# ------------------------------------------------------------------------------------------------
# The real tiny policy
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy():
    import torch

    from policy import V4Config, V4Model

    torch.manual_seed(0)
    return V4Model(V4Config.from_preset("tiny")).eval(), policy.engine.AsyncEngine


def test_tiny_policy_episode_keeps_sampled_tokens(tiny_policy, sandbox):
    model, async_engine = tiny_policy
    inst = instance(tools=(), text="hi")  # a short prompt keeps the reference check below cheap
    limits = Limits(max_turns=3, max_context_tokens=4_000, max_new_tokens=8, deadline=60.0)
    greedy = SamplingParams(temperature=0.0)

    async def go():
        engine = async_engine(model, max_batch=4, max_context=4_096)
        engine.load_weights(model.state_dict(), 3)
        try:
            backend = EngineBackend(engine)
            return await run_episode(backend, sandbox, inst, limits, tokenizer=TOK, sampling=greedy)
        finally:
            await engine.shutdown()

    traj = asyncio.run(go())
    assert traj.finish_reason in ("stop", "max_turns")
    assert 1 <= traj.num_turns <= 3 and traj.policy_version == 3
    sampled = [i for i, m in enumerate(traj.loss_mask) if m]
    assert 1 <= len(sampled) <= 3 * 8
    assert all(traj.logprobs[i] <= 0.0 for i in sampled)
    assert all(traj.logprobs[i] == 0.0 for i in range(len(traj.loss_mask)) if i not in sampled)
    # Each turn, rebuilt from the mask, checked against the engine without sessions: greedy
    # decoding of the same context gives the tokens that were stored.
    turns = turns_from_mask(traj)
    check_accounting(traj, turns)
    reference = policy.engine.Engine(model, max_batch=1, max_context=4_096)
    for context, sampled in turns:
        params = SamplingParams(temperature=0.0, max_new_tokens=len(sampled))
        [gen] = reference.generate([context], params)
        assert gen.token_ids == sampled


def test_tiny_policy_generation_cut_off_by_the_deadline(tiny_policy, sandbox):
    model, async_engine = tiny_policy
    # A short prompt (no tools) so that the deadline falls inside a generation, not the
    # prefill. Turn and context limits far beyond what 2 s of decoding can reach on a CPU leave
    # the deadline as the only way this episode can end.
    inst = instance(tools=(), text="hi")
    limits = Limits(max_turns=100, max_context_tokens=4_000, max_new_tokens=2_500, deadline=2.0)
    sampling = SamplingParams(temperature=0.0)

    async def go():
        engine = async_engine(model, max_batch=4, max_context=4_096)
        try:
            backend = EngineBackend(engine)
            traj = await run_episode(
                backend, sandbox, inst, limits, tokenizer=TOK, sampling=sampling
            )
            return traj, engine.stats()
        finally:
            await engine.shutdown()

    start = time.monotonic()
    traj, stats = asyncio.run(go())
    assert time.monotonic() - start < ENDS_WITHIN
    assert traj.finish_reason == "deadline"
    assert stats["sessions"] == 0 and stats["running"] == 0  # its session was closed
    # What was recorded is whole turns (a cut-off generation leaves nothing behind).
    check_accounting(traj, turns_from_mask(traj))
