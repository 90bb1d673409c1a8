"""``ray job submit --working-dir . -- python -m rollout run configs/eval.toml`` against a head
node this test starts on loopback (shared/PLATFORM.md §5).

The job runs in Ray's unpacked copy of the working directory, whose ``dsec/`` lacks the
compiled module (it is git-ignored): the job must still import the built ``dsec``
(``rollout.native_import``). The head is started with ``--block`` and stopped through that one
process, so the test ends only the processes it started (``ray stop --force`` would end every
Ray instance of the user on this machine); the test then checks that none of them is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest

from rollout.config import load_config
from rollout.job import make_groups
from rollout.store import iter_trajectories, read_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERRIDES = ["task.num_prompts=3", "task.group_size=2", "sampling.max_new_tokens=8"]
AGENT_WAIT = 90.0  # bounds the wait for the head's job agent
FIXED_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: {head.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {timeout} s")


def stop_head(head: subprocess.Popen, started: list[psutil.Process]) -> list[str]:
    """Stop the head (SIGTERM to `ray start --block`, which stops what it started), then kill
    any process of it still alive after a grace period; returns those stragglers."""
    started = started + _descendants(head.pid)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
    _, alive = psutil.wait_procs(started, timeout=20)
    stragglers = [f"{p.pid} {_name(p)}" for p in alive]
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    return stragglers


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def test_ray_job_submit_eval_config(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job is this venv's
    )
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths
    port, dashboard = free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--disable-usage-stats",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--port={port}",
            # every fixed default port free too, so that another Ray on this machine (the
            # test session's own, a neighbour's) cannot take the head's job agent's place
            *(f"--{name}={free_port()}" for name in FIXED_PORTS),
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a Ctrl-C of the test run reaches the head only through us
    )
    started: list[psutil.Process] = []
    run_dir = tmp_path / "run"
    try:
        wait_for_dashboard(url, head)
        started = _descendants(head.pid)
        sets = [arg for item in OVERRIDES for arg in ("--set", item)]
        submit = [
            *(str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", "."),
            *("--", "python", "-m", "rollout", "run", "configs/eval.toml", *sets),
            *("--out", str(run_dir)),
        ]
        # The head's job agent may register a little after the dashboard answers; a submission
        # refused for that reason started nothing and is retried (bounded; decides nothing).
        end = time.monotonic() + AGENT_WAIT
        while True:
            job = subprocess.run(
                submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
            )
            if "No available agent" not in job.stderr or time.monotonic() > end:
                break
            time.sleep(2.0)
        started += _descendants(head.pid)
        log = f"stdout:\n{job.stdout[-3000:]}\nstderr:\n{job.stderr[-1500:]}"
        assert job.returncode == 0, log
        assert "rollout summary" in job.stdout, log
    finally:
        stragglers = stop_head(head, started)
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert not stragglers, f"Ray processes left after stopping the head: {stragglers}"
    config = load_config(ROOT / "configs" / "eval.toml", OVERRIDES)
    assert read_config(run_dir) == config.to_dict()
    keys = Counter((t.group_id, t.sample_index) for t in iter_trajectories(run_dir))
    expected = {(g.group_id, i) for g in make_groups(config) for i in range(2)}
    assert set(keys) == expected and max(keys.values()) == 1
