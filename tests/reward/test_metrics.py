"""pass@k and summarize() against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from reward import pass_at_k, summarize
from reward.metrics import pass_at_k_curve
from rollout.types import ToolCall, Trajectory


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(3, 1, 3) == 1.0  # n - c < k


def test_pass_at_k_matches_binomials_and_stays_stable() -> None:
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # Large n, where C(n, k) overflows a float: still exact to rounding.
    exact = 1 - Fraction(math.comb(1997, 300), math.comb(2000, 300))
    assert pass_at_k(2000, 3, 300) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 6, 1), "c must be in"),
        ((5, 2, 0), "k must be in"),
        ((5, 2, 6), "k must be in"),
        ((5.0, 2, 1), "n must be an int"),
    ],
)
def test_pass_at_k_errors(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)


def _t(task: str, group: str, i: int, reward: float, **kw) -> Trajectory:
    n = kw.pop("response", 4)
    return Trajectory(
        id=f"{group}#{i}",
        task=task,
        instance_id=group,
        group_id=group,
        sample_index=i,
        prompt_ids=[1, 2],
        response_ids=list(range(n)),
        loss_mask=[1] * (n - 1) + [0],
        logprobs=[0.0] * n,
        reward=reward,
        **kw,
    )


def _ok(name: str) -> ToolCall:
    return ToolCall(name, {"code": "print(1)"}, True, "exit code: 0")


def _bad(name: str, kind: str) -> ToolCall:
    return ToolCall(name, {}, False, "error", error_kind=kind)


def test_summarize_hand_computed() -> None:
    ts = [
        # group a (arith): 1 of 2 correct
        _t(
            "arith",
            "a",
            0,
            1.0,
            num_turns=2,
            tool_calls=[_ok("python")],
            reward_components={"exact_match": 1.0},
        ),
        _t(
            "arith",
            "a",
            1,
            0.0,
            num_turns=1,
            finish_reason="max_turns",
            reward_components={"exact_match": 0.0},
        ),
        # group b (arith): none correct (zero variance)
        _t(
            "arith",
            "b",
            0,
            0.0,
            num_turns=3,
            tool_calls=[_bad("python", "timeout"), _bad("", "parse_error")],
        ),
        _t("arith", "b", 1, 0.0, num_turns=1, response=8),
        # group c (qa): both correct (zero variance)
        _t(
            "qa",
            "c",
            0,
            1.0,
            num_turns=2,
            tool_calls=[_ok("bash"), _ok("read_file")],
            timings={"generate": 1.0},
        ),
        _t("qa", "c", 1, 1.0, num_turns=2, finish_reason="context", timings={"generate": 3.0}),
    ]
    m = summarize(ts)
    assert m["trajectories"] == 6 and m["groups"] == 3
    assert m["reward/mean"] == pytest.approx(0.5)
    assert m["reward/std"] == pytest.approx(0.5)
    assert (m["reward/min"], m["reward/max"]) == (0.0, 1.0)
    assert m["reward/exact_match/mean"] == pytest.approx(0.5)
    assert m["pass_rate"] == pytest.approx(0.5)
    assert m["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["task/arith/count"] == 4 and m["task/qa/count"] == 2
    assert m["task/arith/pass_rate"] == pytest.approx(0.25)
    assert m["task/arith/pass@1"] == pytest.approx(0.25)
    assert m["task/arith/pass@2"] == pytest.approx(0.5)
    assert m["task/qa/pass@2"] == 1.0
    assert m["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert (m["turns/mean"], m["turns/min"], m["turns/max"]) == (pytest.approx(11 / 6), 1.0, 3.0)
    assert m["tool_calls/total"] == 5 and m["tool_calls/max"] == 2.0
    assert m["tool_calls/mean"] == pytest.approx(5 / 6)
    assert m["tool_errors/total"] == 2
    assert m["tool_errors/rate"] == pytest.approx(0.4)
    assert m["tool_errors/timeout"] == 1 and m["tool_errors/parse_error"] == 1
    assert m["tools/python"] == 2 and m["tools/bash"] == 1 and m["tools/read_file"] == 1
    assert m["response_tokens/mean"] == pytest.approx((4 * 5 + 8) / 6)
    assert m["response_tokens/max"] == 8.0
    assert m["sampled_tokens/mean"] == pytest.approx((3 * 5 + 7) / 6)
    assert m["prompt_tokens/mean"] == 2.0
    assert m["finish_reason/stop"] == 4
    assert m["finish_reason/max_turns"] == 1 and m["finish_reason/context"] == 1
    assert m["finish_reason/deadline"] == 0 and m["finish_reason/sandbox_error"] == 0
    assert m["timing/generate/mean"] == pytest.approx(2.0)


def test_summarize_threshold_and_empty() -> None:
    ts = [_t("x", "g", 0, 1.1), _t("x", "g", 1, 0.1)]
    assert summarize(ts)["pass_rate"] == 0.5
    assert summarize(ts, threshold=0.05)["pass_rate"] == 1.0
    empty = summarize([])
    assert empty["trajectories"] == 0 and empty["finish_reason/stop"] == 0
    assert "reward/mean" not in empty


def test_pass_at_k_curve_uses_groups_with_enough_samples() -> None:
    ts = [_t("x", "big", i, float(i == 0)) for i in range(4)] + [_t("x", "small", 0, 1.0)]
    curve = pass_at_k_curve(ts)
    assert curve[1] == pytest.approx((0.25 + 1.0) / 2)
    assert curve[2] == pytest.approx(0.5)  # only the 4-sample group: 1 - C(3,2)/C(4,2)
    assert curve[4] == 1.0
    assert pass_at_k_curve([]) == {}
