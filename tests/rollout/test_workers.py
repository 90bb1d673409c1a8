"""RolloutWorker actors and the driver on a real local Ray, with the real tiny policy and real
sandboxes: every group is stored exactly once, also when a worker is killed mid-run."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from rollout.config import load_config
from rollout.job import JobError, RolloutJob, make_groups
from rollout.store import iter_trajectories, read_config, read_metrics
from rollout.workers import RolloutPool

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = [
    "policy.preset=tiny",
    "engine.max_context=1536",
    "engine.max_batch=8",
    "task.group_size=2",
    "sampling.max_new_tokens=8",
    "limits.max_turns=1",
    "limits.deadline=60",
    "workers.num_workers=2",
    "workers.num_cpus=1",
    "workers.concurrency=4",
    "run.groups_per_batch=1",
]


def small_config(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def assert_each_group_once(run_dir: Path, config) -> list:
    """Every group of the config is stored, each with its G samples, and nothing twice."""
    trajectories = list(iter_trajectories(run_dir))
    keys = Counter((t.group_id, t.sample_index) for t in trajectories)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    expected = {g.group_id for g in make_groups(config)}
    size = config.task.group_size
    assert set(keys) == {(g, i) for g in expected for i in range(size)}
    return trajectories


def test_run_stores_every_group_once_and_resumes(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    config = small_config("task.num_prompts=4")
    summary = RolloutJob(config, run_dir, progress="none").run()

    trajectories = assert_each_group_once(run_dir, config)
    assert summary.groups_stored == summary.groups_total == 4 and summary.groups_skipped == 0
    assert summary.trajectories == len(trajectories) == 8
    assert summary.worker_failures == 0 and summary.requeued_groups == 0
    assert read_config(run_dir) == config.to_dict()
    metrics = read_metrics(run_dir)
    assert [m["batch"] for m in metrics] == [0, 1, 2, 3]  # groups_per_batch = 1
    assert sum(m["trajectories"] for m in metrics) == 8
    assert metrics[-1]["groups_done"] == 4
    for t in trajectories:
        assert t.task == "arith_tool" and t.group_id == t.instance_id
        assert len(t.loss_mask) == len(t.response_ids) == len(t.logprobs)
        assert 1 <= t.num_sampled <= 8  # one turn of at most max_new_tokens
        assert set(t.reward_components) == {"exact_match"}  # arith_tool's default reward
        assert {"generate", "tools", "score"} <= set(t.timings)
    assert summary.sampled_tokens == sum(t.num_sampled for t in trajectories)

    # the same directory again: refused without --resume, or with a config that changed
    with pytest.raises(JobError, match="already holds a run; pass --resume"):
        RolloutJob(config, run_dir, progress="none").run()
    changed = small_config("task.num_prompts=5", "sampling.temperature=0.5")
    with pytest.raises(JobError, match=r"differs from the stored run in sampling\.temperature"):
        RolloutJob(changed, run_dir, resume=True, progress="none").run()

    # resumed with more prompts (and fewer workers): only the missing group runs
    more = small_config("task.num_prompts=5", "workers.num_workers=1")
    summary = RolloutJob(more, run_dir, resume=True, progress="none").run()
    assert (summary.groups_skipped, summary.groups_stored, summary.groups_total) == (4, 1, 5)
    assert_each_group_once(run_dir, more)


@pytest.mark.parametrize("max_restarts", [1, 0], ids=["restarted-by-ray", "replaced"])
def test_worker_killed_mid_run_loses_nothing(ray_session, tmp_path, max_restarts):
    """SIGKILL one worker after the first stored batch, while it has groups in flight: its
    groups are re-run (on the worker Ray restarts, or on a new worker once it has no restarts
    left) and every group is stored exactly once."""
    import ray

    config = small_config("task.num_prompts=4", f"workers.max_restarts={max_restarts}")
    killed: dict[str, object] = {}

    def kill_first_worker(job: RolloutJob, batch: int) -> None:
        if batch == 0:
            slot = job.pool.slots[0]
            killed["actor"], killed["pid"] = slot.actor, ray.get(slot.actor.pid.remote())
            assert slot.inflight, "the worker should have groups in flight"
            os.kill(killed["pid"], signal.SIGKILL)

    job = RolloutJob(config, tmp_path / "run", progress="none", on_batch=kill_first_worker)
    summary = job.run()

    assert_each_group_once(tmp_path / "run", config)
    assert summary.groups_stored == 4
    assert summary.worker_failures >= 1 and summary.requeued_groups >= 1
    if max_restarts == 0:
        assert summary.workers_replaced == 1
    else:
        assert summary.workers_replaced == 0


def test_pool_batches_and_new_weights_survive_a_restart(ray_session):
    """Two batches in flight come back whole, in submission order; weights set on the pool
    reach a worker that Ray restarted while idle (the pool never saw it die)."""
    import ray
    import torch

    import policy
    from rollout.train_config import model_config

    config = small_config("task.num_prompts=6", "workers.num_workers=1", "workers.max_restarts=1")
    groups = make_groups(config)
    ids = [g.group_id for g in groups]
    with RolloutPool(config) as pool:
        first, second = pool.submit(groups[:2]), pool.submit(groups[2:4])
        later = pool.collect(second)
        earlier = pool.collect(first)
        assert [t.group_id for t in earlier + later] == [i for i in ids[:4] for _ in range(2)]
        assert [t.sample_index for t in later] == [0, 1, 0, 1]
        assert {t.policy_version for t in earlier + later} == {0}

        torch.manual_seed(123)
        pool.set_weights(policy.V4Model(model_config(config)).state_dict(), 7)
        pid = ray.get(pool.slots[0].actor.pid.remote())
        os.kill(pid, signal.SIGKILL)
        after = pool.collect(pool.submit(groups[4:]))
        assert [t.group_id for t in after] == [i for i in ids[4:] for _ in range(2)]
        assert {t.policy_version for t in after} == {7}
        assert ray.get(pool.slots[0].actor.pid.remote()) != pid

        # a group's own temperature overrides the config's: greedy samples of a group agree
        # despite their different seeds, sampled ones (temperature 1) do not
        greedy = pool.collect(pool.submit([dataclasses.replace(groups[0], temperature=0.0)]))
        assert greedy[0].response_ids == greedy[1].response_ids
        assert earlier[0].response_ids != earlier[1].response_ids


def test_episode_seeds_are_stable_and_distinct():
    from rollout.workers import episode_seed

    seeds = {episode_seed(0, f"g{g}", i) for g in range(50) for i in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**40 for s in seeds)
    assert episode_seed(0, "g1", 3) == episode_seed(0, "g1", 3) != episode_seed(1, "g1", 3)
