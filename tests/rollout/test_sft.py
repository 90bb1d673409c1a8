"""rollout.sft: demonstrations made with a real sandbox (the tool's output is the one the agent
loop shows), the share of them that call the tool, forced calls whose choice is not trained."""

from __future__ import annotations

import pytest

import dsec
from policy.tokenizer import ByteTokenizer
from rollout.sft import demonstration_samples, demonstrations, sandbox_tool

OPTIONS = {"min_digits": 2, "max_digits": 2}


@pytest.fixture(scope="module")
def run_tool():
    with dsec.Sandbox() as sb:
        yield sandbox_tool(sb)


def _demos(run_tool, n, tool_fraction, call_fraction=0.0):
    return demonstrations(
        "arith_tool",
        n,
        seed=0,
        tool_fraction=tool_fraction,
        call_fraction=call_fraction,
        run_tool=run_tool,
        options=OPTIONS,
    )


def test_a_share_of_demonstrations_calls_the_tool_and_shows_its_real_output(run_tool):
    demos = _demos(run_tool, 10, 0.3)
    calls = [d for d in demos if d.uses_tool]
    assert len(calls) == 3 and not any(d.forced for d in demos)
    for d in calls:
        (_, call), (_, output), (_, answer) = d.turns
        code = call["tool_calls"][0]["function"]["arguments"]["code"]
        assert code == f"print({d.instance.verifier['expression']})"
        assert f"stdout:\n{d.instance.verifier['answer']}\n" in output  # run for real
        assert answer["content"] == d.instance.verifier["answer"]
    for d in demos:
        if not d.uses_tool:
            assert d.turns == [
                ("assistant", {"role": "assistant", "content": d.instance.verifier["answer"]})
            ]
    # the same demonstrations whatever call_fraction adds (the same instances, the same calls)
    more = _demos(run_tool, 10, 0.3, call_fraction=0.7)
    assert [d.instance.id for d in more] == [d.instance.id for d in demos]


def test_forced_calls_teach_the_call_but_not_the_choice(run_tool):
    demos = _demos(run_tool, 20, 0.4, call_fraction=0.7)
    calls = [d for d in demos if d.uses_tool]
    forced = [d for d in demos if d.forced]
    direct = [d for d in demos if not d.uses_tool]
    assert (len(calls), len(direct)) == (14, 6)
    # chosen calls : direct answers = 0.4 : 0.6, so 4 of the 14 calls are chosen
    assert len(forced) == 10 and all(d.uses_tool for d in forced)
    samples = demonstration_samples(demos, ByteTokenizer(), "chat")
    for d, s in zip(demos, samples, strict=True):
        assert s.loss_mask[0] == (0 if d.forced else 1)
        assert s.loss_mask[1] == 1  # everything after the choice is taught
    # the choices SFT trains: 4 calls and 6 direct answers
    assert sum(s.loss_mask[0] for d, s in zip(demos, samples, strict=True) if d.uses_tool) == 4


def test_bad_fractions_are_refused(run_tool):
    with pytest.raises(ValueError, match=r"call_fraction must be in \[0, 1\], got 1\.5"):
        _demos(run_tool, 4, 0.2, call_fraction=1.5)
    with pytest.raises(ValueError, match=r"call_fraction 1\.0 leaves no direct answer"):
        _demos(run_tool, 4, 0.2, call_fraction=1.0)
