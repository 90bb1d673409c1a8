"""Command logs of the rollout workers (``rollout.cmdlogs``) on a real local Ray with real
sandboxes: a group run again replays the calls it made and is scored on the restored workspace,
its logs go once it is stored, and a log of another run is refused."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from policy import chat
from rollout.backends import ScriptedBackend
from rollout.cmdlogs import command_log_dir, remove_logs, run_identity
from rollout.config import load_config
from rollout.job import JobError, RolloutJob, make_groups
from rollout.store import iter_trajectories, read_metrics
from rollout.workers import RolloutPool

SMALL = [
    "policy.preset=tiny",
    "engine.max_context=4096",
    "engine.max_batch=4",
    "task.name=code_tests",
    "task.options.families=['scale']",
    "task.num_prompts=1",
    "task.group_size=2",
    "sampling.max_new_tokens=1024",
    "limits.max_turns=2",
    "limits.deadline=60",
    "workers.num_workers=1",
    "workers.num_cpus=1",
    "workers.concurrency=2",
    "run.groups_per_batch=1",
]


def small_config(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def scripted(group) -> functools.partial:
    """A backend factory whose episodes write the right solution and print a nanosecond clock
    (different on every run) in one python call, then answer."""
    k = group.instance.id.rpartition(":")[2]
    code = (
        "import time\n"
        f"open('/workspace/solution.py', 'w').write('def scale(x):\\n    return x * {k}\\n')\n"
        "print(time.time_ns())\n"
    )
    call = {"name": "python", "arguments": {"code": code}}
    turns = [
        {"reasoning_content": "write it", "content": "", "tool_calls": [call]},
        {"reasoning_content": "done", "content": "written", "tool_calls": []},
    ]
    return functools.partial(ScriptedBackend, [chat.render_assistant(t) for t in turns])


def interrupted_run(config, run_dir: Path):
    """The group ran on a pool with the run's log directory and was never stored."""
    (group,) = make_groups(config)
    factory = scripted(group)
    with RolloutPool(
        config, backend_factory=factory, log_dir=command_log_dir(config, run_dir)
    ) as pool:
        return pool.collect(pool.submit([group])), factory


@pytest.mark.ray
@pytest.mark.slow
def test_a_resumed_group_replays_its_calls_and_is_scored_on_the_restored_workspace(
    ray_session, tmp_path
):
    config = small_config()
    run_dir = tmp_path / "run"
    logs = Path(command_log_dir(config, run_dir))
    first, factory = interrupted_run(config, run_dir)
    assert len(list(logs.rglob("*.log"))) == 2
    assert [t.reward for t in first] == [1.0, 1.0]
    executed = {"replayed": 0, "executed": 1, "restored": 0}
    assert [t.metadata["cmdlog"] for t in first] == [executed] * 2

    job = RolloutJob(config, run_dir, resume=True, progress="none", backend_factory=factory)
    assert job.run().groups_stored == 1
    stored = sorted(iter_trajectories(run_dir), key=lambda t: t.sample_index)
    # the recorded outputs (the clock) came back: the calls did not run again
    assert [t.tool_calls[0].output for t in stored] == [t.tool_calls[0].output for t in first]
    replayed = {"replayed": 1, "executed": 0, "restored": 1}
    assert [t.metadata["cmdlog"] for t in stored] == [replayed] * 2
    # scored on the workspace the replayed call implies: solution.py was restored
    assert [t.reward for t in stored] == [1.0, 1.0]
    assert read_metrics(run_dir)[-1]["tools/replayed"] == 2
    assert not logs.exists()  # the stored group's logs are gone, and the emptied directory


@pytest.mark.ray
@pytest.mark.slow
def test_a_reward_that_does_not_read_the_sandbox_costs_no_restore(ray_session, tmp_path):
    config = small_config("reward.functions=['format']")
    run_dir = tmp_path / "run"
    first, factory = interrupted_run(config, run_dir)
    job = RolloutJob(config, run_dir, resume=True, progress="none", backend_factory=factory)
    job.run()
    stored = sorted(iter_trajectories(run_dir), key=lambda t: t.sample_index)
    assert [t.tool_calls[0].output for t in stored] == [t.tool_calls[0].output for t in first]
    replayed = {"replayed": 1, "executed": 0, "restored": 0}
    assert [t.metadata["cmdlog"] for t in stored] == [replayed] * 2


@pytest.mark.ray
@pytest.mark.slow
def test_a_log_of_another_run_is_refused(ray_session, tmp_path):
    config = small_config()
    run_dir = tmp_path / "run"
    _, factory = interrupted_run(config, run_dir)
    logs = Path(command_log_dir(config, run_dir))
    before = {p: p.read_bytes() for p in logs.rglob("*.log")}
    other = small_config("limits.tool_timeout=9", "workers.max_group_retries=0")
    job = RolloutJob(other, run_dir, resume=True, progress="none", backend_factory=factory)
    with pytest.raises(JobError) as err:
        job.run()
    message = str(err.value)
    assert f"belongs to task {run_identity(config)!r} trajectory 'code_tests/scale:" in message
    assert f"not to task {run_identity(other)!r}" in message
    assert {p: p.read_bytes() for p in logs.rglob("*.log")} == before  # left as they were


def test_the_run_identity_ignores_what_a_resume_may_change():
    config = small_config()
    same = small_config("run.name=elsewhere", "workers.num_workers=2", "task.num_prompts=3")
    assert run_identity(config) == run_identity(same)
    assert run_identity(small_config("sandbox.command_log=false")) == run_identity(config)
    assert run_identity(small_config("run.seed=1")) != run_identity(config)
    assert run_identity(config).startswith("code_tests/")
    assert command_log_dir(small_config("sandbox.command_log=false"), "run") is None


def test_a_group_id_stays_inside_the_log_directory(tmp_path):
    root = tmp_path / "cmdlogs"
    config = small_config()
    from rollout.cmdlogs import open_log

    for group_id in ("s3/code_tests/scale:7", "..", "../x"):
        open_log(str(root), run_identity(config), group_id, 0).close()
    assert len(list(root.iterdir())) == 3 and not (tmp_path / "x").exists()
    assert all(p.parent.parent == root for p in root.rglob("*.log"))
    remove_logs(str(root), ["..", "s3/code_tests/scale:7"])
    assert [p.name for p in root.iterdir()] == ["%2E%2E%2Fx"]
    remove_logs(None, ["../x"])  # no log directory: nothing to do
