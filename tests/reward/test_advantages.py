"""Group advantages against hand-computed values."""

from __future__ import annotations

import pytest

from reward import group_advantages
from reward.advantages import trajectory_advantages
from rollout.types import Trajectory


def test_grpo_hand_computed() -> None:
    # mean 0.25; centred (0.75, -0.25 x3); unbiased var = 0.75 / 3 = 0.25, std 0.5
    assert group_advantages([1, 0, 0, 0], "grpo", eps=0.0) == [1.5, -0.5, -0.5, -0.5]
    assert group_advantages([1, 2, 3], "grpo", eps=0.0) == [-1.0, 0.0, 1.0]
    got = group_advantages([1, 0, 0, 0])  # default eps 1e-6 in the denominator
    assert got == pytest.approx(
        [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001], rel=1e-12
    )


def test_drgrpo_is_mean_centred_without_std() -> None:
    assert group_advantages([1, 0, 0, 0], "drgrpo") == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([2, 4], "drgrpo") == [-1.0, 1.0]


def test_rloo_is_leave_one_out() -> None:
    assert group_advantages([1, 0, 0, 0], "rloo") == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert group_advantages([1, 2, 3], "rloo") == pytest.approx([-1.5, 0.0, 1.5])


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_zero_variance_and_single_groups_give_zeros(method: str) -> None:
    assert group_advantages([1, 1, 1, 1], method) == [0.0] * 4
    assert group_advantages([0.3], method) == [0.0]


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown advantage method 'ppo'"):
        group_advantages([1, 0], "ppo")
    with pytest.raises(ValueError, match="at least one reward"):
        group_advantages([])
    with pytest.raises(ValueError, match="finite, got nan"):
        group_advantages([1.0, float("nan")])


def test_trajectory_advantages_work_within_groups() -> None:
    def t(group: str, i: int, reward: float) -> Trajectory:
        return Trajectory(
            id=f"{group}#{i}",
            task="x",
            instance_id=group,
            group_id=group,
            sample_index=i,
            reward=reward,
        )

    ts = [t("a", 0, 1.0), t("b", 0, 5.0), t("a", 1, 0.0), t("b", 1, 5.0)]
    assert trajectory_advantages(ts, "drgrpo") == {"a#0": 0.5, "a#1": -0.5, "b#0": 0.0, "b#1": 0.0}
