"""load_run, latest_run and render_trajectory on a run written with the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from episodes import build_run

from reward import latest_run, load_run, render_trajectory, summarize


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    return run_dir, build_run(run_dir)


def test_load_run(run) -> None:
    run_dir, written = run
    config, trajectories, metrics = load_run(run_dir)
    assert config == {
        "task": {"name": "mixed", "group_size": 3},
        "reward": {"functions": ["exact_match", "format"]},
    }
    assert [t.to_dict() for t in trajectories] == [t.to_dict() for t in written]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["trajectories"] == 3
    # The scores are those of the rewards: right answers (tool used) pass, guesses fail.
    m = summarize(trajectories)
    assert m["task/arith_tool/pass_rate"] == pytest.approx(2 / 6)
    assert m["task/code_tests/pass_rate"] == 0.5 and m["task/workspace_qa/pass_rate"] == 0.5
    assert m["finish_reason/max_turns"] == 2


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a run directory"):
        load_run(tmp_path / "empty")


def test_latest_run(run, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with pytest.raises(ValueError, match="no run directory under"):
        latest_run(root)
    for name, age in (("old", 100), ("new", 10), ("older", 200)):
        (root / name / "trajectories").mkdir(parents=True)
        os.utime(root / name, (1e9 - age, 1e9 - age))
    (root / "not-a-run").mkdir()
    assert latest_run(root).name == "new"


def test_render_trajectory_shows_messages_and_tool_calls(run) -> None:
    _, written = run
    failed = next(t for t in written if t.finish_reason == "max_turns")
    text = render_trajectory(failed)
    assert text.startswith(f"== {failed.id}  task=arith_tool  reward=0")
    assert "ZeroDivisionError" in text
    assert "-- tool turn 1: python({'code': '1/0'}) -> error: exit_status" in text
    assert len(render_trajectory(failed, max_chars=20)) < len(text)
