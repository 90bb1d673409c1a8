"""The reward-evaluation notebook executes headless against a run written in the test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nbformat
import pytest
from episodes import build_run
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "reward" / "notebooks" / "reward_eval.ipynb"


@pytest.mark.slow
def test_reward_eval_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run-nb"
    written = build_run(run_dir)
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Run where nbmake would: in the notebook's own directory.
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run: run-nb: {len(written)} trajectories, 3 metrics records" in text
    assert "pass_rate" in text and "finish_reason/max_turns" in text
    failed = Counter(t.task for t in written if t.reward < 1.0)
    assert failed == {"arith_tool": 4, "workspace_qa": 1, "code_tests": 1}
    assert "### arith_tool: 4 of 6 failed" in text
    assert f"{sum(min(n, 3) for n in failed.values())} failure examples shown" in text
    assert "-- tool turn 1: python({'code': '1/0'}) -> error: exit_status" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6  # distributions, pass@k, tools, finish reasons, length, metrics log
