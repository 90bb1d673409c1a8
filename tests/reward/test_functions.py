"""The built-in reward functions and composites, on real trajectories and a real sandbox."""

from __future__ import annotations

import pytest
from episodes import answer, call, episode

from reward import get_reward, make_reward
from reward.functions import exact_match, final_answer, format_reward, sandbox_tests
from rollout.tasks import Instance, get_task, place_files

ARITH = Instance(
    id="arith/12*34",
    task="arith_tool",
    messages=[{"role": "user", "content": "Compute 12*34 with python."}],
    tools=["python"],
    verifier={"answer": "408"},
)


def _answered(text: str, **verifier) -> float:
    inst = Instance(ARITH.id, ARITH.task, ARITH.messages, ["python"], verifier or ARITH.verifier)
    return exact_match(episode(inst, [answer(text)]), inst.verifier)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("408", 1.0),
        ("  408\n", 1.0),
        ("408.", 1.0),
        ("408.0", 1.0),
        ("409", 0.0),
        ("4080", 0.0),
        ("The answer is 408", 0.0),
        ("", 0.0),
        ("408 408", 0.0),
    ],
)
def test_exact_match_numbers(text: str, want: float) -> None:
    assert _answered(text) == want


def test_exact_match_thousands_commas_tolerance_text_and_lists() -> None:
    assert _answered("1,234,567", answer="1234567") == 1.0
    assert _answered("12,34", answer="1234") == 0.0
    assert _answered("3.14", answer=3.14159, tolerance=0.01) == 1.0
    assert _answered("3.14", answer=3.14159) == 0.0
    assert _answered("  Paris ", answer="paris") == 1.0
    assert _answered("New   York", answer="new york") == 1.0
    assert _answered("Pariss", answer="paris") == 0.0
    assert _answered("42", answer=["41", "42"]) == 1.0
    assert _answered("007", answer="7", match="text") == 0.0
    assert _answered("007", answer="7") == 1.0


def test_exact_match_needs_a_final_answer_not_a_tool_call() -> None:
    t = episode(ARITH, [{"content": "", "tool_calls": [call("python", code="print(12*34)")]}])
    assert t.tool_calls[0].ok and "408" in t.tool_calls[0].output
    assert final_answer(t) is None
    assert exact_match(t, ARITH.verifier) == 0.0
    t = episode(
        ARITH, [{"content": "", "tool_calls": [call("python", code="print(12*34)")]}, answer("408")]
    )
    assert final_answer(t) == "408"
    assert exact_match(t, ARITH.verifier) == 1.0


def test_exact_match_bad_verifier() -> None:
    t = episode(ARITH, [answer("408")])
    with pytest.raises(ValueError, match=r"verifier\['answer'\]"):
        exact_match(t, {})
    with pytest.raises(ValueError, match="'fuzzy'"):
        exact_match(t, {"answer": "408", "match": "fuzzy"})
    with pytest.raises(ValueError, match="'abc' is not a number"):
        exact_match(t, {"answer": "abc", "match": "number"})


def test_format_reward() -> None:
    good = episode(ARITH, [answer("408")])
    assert format_reward(good, {}) == 1.0
    assert format_reward(episode(ARITH, [answer("408")], finish_reason="max_turns"), {}) == 0.0
    bad = episode(ARITH, [answer("408")])
    bad.messages[-1] = {**bad.messages[-1], "errors": ["missing </think> after the reasoning"]}
    assert format_reward(bad, {}) == 0.0
    empty = episode(ARITH, [])
    assert format_reward(empty, {}) == 0.0


def _code_instance():
    [inst] = get_task("code_tests", families=["scale"]).instances("train", 1, seed=3)
    return inst


def _write_solution(sandbox, inst, source: str):
    return episode(
        inst,
        [
            {
                "content": "",
                "tool_calls": [call("write_file", path=inst.verifier["path"], content=source)],
            },
            answer("done"),
        ],
        sandbox=sandbox,
    )


def test_sandbox_tests_pass_and_fail(sandbox) -> None:
    inst = _code_instance()
    k = int(inst.messages[0]["content"].split("x*")[1].rstrip("."))
    t = _write_solution(sandbox, inst, f"def scale(x):\n    return x * {k}\n")
    assert t.tool_calls[0].ok
    assert sandbox_tests(t, inst.verifier, sandbox) == 1.0
    t = _write_solution(sandbox, inst, f"def scale(x):\n    return x * {k + 1}\n")
    assert sandbox_tests(t, inst.verifier, sandbox) == 0.0


def test_sandbox_tests_no_solution_and_hacks(sandbox) -> None:
    inst = _code_instance()
    t = episode(inst, [answer("I can't")], sandbox=sandbox)
    assert sandbox_tests(t, inst.verifier, sandbox) == 0.0  # ImportError
    # A solution that exits with status 0 on import must not pass: the marker is never printed.
    t = _write_solution(sandbox, inst, "import os\nos._exit(0)\n")
    assert sandbox_tests(t, inst.verifier, sandbox) == 0.0
    # A solution that hangs is cut by the verifier timeout.
    t = _write_solution(sandbox, inst, "import time\ntime.sleep(60)\n")
    assert sandbox_tests(t, {**inst.verifier, "timeout": 1.0}, sandbox) == 0.0


def test_sandbox_tests_state_is_the_episodes_workspace(sandbox) -> None:
    inst = Instance(
        "qa/1",
        "workspace_qa",
        [{"role": "user", "content": "Write 42 to out.txt."}],
        ["bash"],
        {"tests": "assert open('/workspace/out.txt').read().strip() == '42'"},
        files={"notes/readme.txt": "write 42"},
    )
    place_files(sandbox, inst.files)
    assert sandbox.read_file("/workspace/notes/readme.txt") == b"write 42"
    t = episode(
        inst,
        [{"content": "", "tool_calls": [call("bash", command="echo 42 > out.txt")]}, answer("ok")],
        sandbox=sandbox,
    )
    assert sandbox_tests(t, inst.verifier, sandbox) == 1.0
    t.finish_reason = "sandbox_error"
    assert sandbox_tests(t, inst.verifier, sandbox) == 0.0


def test_sandbox_tests_errors() -> None:
    t = episode(ARITH, [answer("408")])
    with pytest.raises(ValueError, match="needs the episode's live sandbox"):
        get_reward("sandbox_tests")(t, {"tests": "pass"})
    with pytest.raises(ValueError, match=r"verifier\['tests'\]"):
        sandbox_tests(t, {"answer": "1"}, object())


def test_composite_keeps_components() -> None:
    correct = episode(ARITH, [answer("408")])
    wrong = episode(ARITH, [answer("407")])
    r = make_reward({"exact_match": 1.0, "format": 0.25})
    assert not r.needs_sandbox
    assert r(correct, ARITH.verifier) == (1.25, {"exact_match": 1.0, "format": 1.0})
    assert r(wrong, ARITH.verifier) == (0.25, {"exact_match": 0.0, "format": 1.0})
    r.score(wrong, ARITH.verifier)
    assert wrong.reward == 0.25
    assert wrong.reward_components == {"exact_match": 0.0, "format": 1.0}
    assert wrong.timings["score"] >= 0.0
    penalty = make_reward({"exact_match": 1.0, "format": -0.5})
    assert penalty(correct, ARITH.verifier)[0] == 0.5
    assert make_reward("exact_match")(correct, ARITH.verifier) == (1.0, {"exact_match": 1.0})
    assert make_reward({"sandbox_tests": 1.0}).needs_sandbox


def test_composite_errors() -> None:
    with pytest.raises(ValueError, match="unknown reward 'exact'; known rewards: exact_match"):
        make_reward({"exact": 1.0})
    with pytest.raises(ValueError, match="weight of 'format' must be a finite number, got nan"):
        make_reward({"format": float("nan")})
    with pytest.raises(ValueError, match="non-empty"):
        make_reward({})
