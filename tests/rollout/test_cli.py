"""``python -m rollout run``: errors before anything starts, and a whole run on its embedded Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rollout.cli import main
from rollout.config import load_config
from rollout.job import make_groups
from rollout.store import iter_trajectories, read_metrics

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "configs" / "eval.toml"


def test_bad_config_exits_2_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(EVAL), "--set", "task.num_prompt=3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --set: unknown key task.num_prompt (did you mean 'num_prompts'?)" in err
    assert not out.exists()

    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_existing_run_needs_resume(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["run", str(EVAL), "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2


@pytest.mark.ray
@pytest.mark.slow
def test_run_on_an_embedded_ray(tmp_path):
    """The default: `python -m rollout run CONFIG` starts (and stops) its own Ray."""
    sets = ["task.num_prompts=2", "sampling.max_new_tokens=8", "workers.num_workers=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rollout", "run", str(EVAL), "--out", str(out)]
    done = subprocess.run(
        [*args, *(a for s in sets for a in ("--set", s))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "rollout summary" in done.stdout and "batch 0:" in done.stdout
    config = load_config(EVAL, sets)
    keys = Counter((t.group_id, t.sample_index) for t in iter_trajectories(out))
    size = config.task.group_size
    assert set(keys) == {(g.group_id, i) for g in make_groups(config) for i in range(size)}
    assert max(keys.values()) == 1
    assert sum(m["trajectories"] for m in read_metrics(out)) == 2 * size
