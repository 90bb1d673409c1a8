"""The run directory store: round trip, atomic batches, group dedup across reopen, metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from rollout.store import SCHEMA_VERSION, RunStore, iter_trajectories, read_config, read_metrics
from rollout.types import ToolCall, Trajectory


def traj(group: str, i: int, *, reward: float = 0.0) -> Trajectory:
    return Trajectory(
        id=f"{group}#{i}",
        task="arith_tool",
        instance_id=group,
        group_id=group,
        sample_index=i,
        prompt_ids=[0, 5, 7],
        response_ids=[11, 12, 13, 14],
        loss_mask=[1, 1, 0, 1],
        logprobs=[-0.25, -1.5, 0.0, -0.125],
        messages=[
            {"role": "user", "content": "Compute 2*3 with python."},
            {
                "role": "assistant",
                "content": "6",
                "reasoning_content": "",
                "tool_calls": [],
                "errors": [],
            },
        ],
        tool_calls=[
            ToolCall(
                "python", {"code": "print(2*3)"}, True, "exit code: 0\nstdout:\n6", 0.01, None, 0
            )
        ],
        finish_reason="stop",
        num_turns=2,
        reward=reward,
        reward_components={"exact_match": reward},
        policy_version=3,
        timings={"generate": 0.5, "tools": 0.01, "score": 0.001},
        metadata={"worker": 1},
    )


def test_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    written = [traj("g0", 0, reward=1.0), traj("g0", 1), traj("g1", 0)]
    assert store.write_groups(written) == []
    assert store.write_groups([traj("g2", 0), traj("g2", 1)]) == []
    back = list(iter_trajectories(tmp_path / "run"))
    assert [t.to_dict() for t in back] == [
        t.to_dict() for t in [*written, traj("g2", 0), traj("g2", 1)]
    ]
    assert isinstance(back[0].tool_calls[0], ToolCall)
    assert [p.name for p in store.batch_paths()] == ["batch-00000.msgpack", "batch-00001.msgpack"]
    assert store.stored_group_ids == {"g0", "g1", "g2"}


def test_batch_file_header_is_versioned(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_groups([traj("g0", 0), traj("g0", 1)])
    with open(store.batch_paths()[0], "rb") as f:
        header, *records = list(msgpack.Unpacker(f, raw=False))
    assert header == {
        "schema_version": SCHEMA_VERSION,
        "format": "dsec-rl/trajectories",
        "batch": 0,
        "count": 2,
        "group_ids": ["g0"],
    }
    assert records[1]["sample_index"] == 1


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path)
    path = tmp_path / "trajectories" / "batch-00000.msgpack"
    header = {
        "schema_version": SCHEMA_VERSION + 1,
        "format": "dsec-rl/trajectories",
        "count": 0,
        "group_ids": [],
    }
    path.write_bytes(msgpack.packb(header))
    with pytest.raises(
        ValueError,
        match=rf"batch-00000.msgpack: schema_version {SCHEMA_VERSION + 1} is not supported",
    ):
        list(iter_trajectories(tmp_path))
    with pytest.raises(ValueError, match="is not supported"):
        RunStore(tmp_path)


def test_leftover_tmp_file_is_ignored(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_groups([traj("g0", 0)])
    # A crash mid-write leaves only a hidden temp file with a partial batch.
    full = msgpack.packb(
        {
            "schema_version": 1,
            "format": "dsec-rl/trajectories",
            "batch": 1,
            "count": 1,
            "group_ids": ["g1"],
        }
    )
    (tmp_path / "trajectories" / ".batch-00001.msgpack.x1y2.tmp").write_bytes(full + b"\x8f\xa2id")
    assert [t.id for t in iter_trajectories(tmp_path)] == ["g0#0"]
    reopened = RunStore(tmp_path)
    assert reopened.stored_group_ids == {"g0"}
    # The crashed group is not considered stored: its retry is written.
    assert reopened.write_groups([traj("g1", 0)]) == []
    assert [t.id for t in iter_trajectories(tmp_path)] == ["g0#0", "g1#0"]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    bad = traj("g0", 0)
    bad.metadata["obj"] = object()
    with pytest.raises(ValueError, match="trajectory 'g0#0' cannot be stored"):
        store.write_groups([bad])
    assert os.listdir(tmp_path / "trajectories") == []
    assert store.stored_group_ids == set()


def test_numpy_values_are_stored_as_plain_numbers(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    t = traj("g0", 0)
    t.reward = np.float32(0.5)
    t.metadata["ids"] = np.arange(3, dtype=np.int32)
    store.write_groups([t])
    [back] = iter_trajectories(tmp_path)
    assert back.reward == 0.5 and back.metadata["ids"] == [0, 1, 2]


def test_group_stored_once_across_reopen(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.write_groups([traj("g0", 0), traj("g0", 1), traj("g1", 0)]) == []
    # A retried group in the same process is skipped as a whole, fresh ones are written.
    assert store.write_groups([traj("g1", 0), traj("g1", 1), traj("g2", 0)]) == ["g1"]
    # After a restart (resume) the index comes back from the files.
    reopened = RunStore(tmp_path)
    assert reopened.stored_group_ids == {"g0", "g1", "g2"}
    assert reopened.has_group("g2") and not reopened.has_group("g3")
    assert reopened.write_groups([traj("g0", 0), traj("g2", 0)]) == ["g0", "g2"]
    assert len(reopened.batch_paths()) == 2  # nothing written when every group is skipped
    assert reopened.write_groups([traj("g3", 0)]) == []
    assert reopened.batch_paths()[-1].name == "batch-00002.msgpack"
    ids = [t.id for t in iter_trajectories(tmp_path)]
    assert ids == ["g0#0", "g0#1", "g1#0", "g2#0", "g3#0"]
    assert len(ids) == len(set(ids))


def test_write_groups_rejects_bad_input(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="group 'g0' has two trajectories with sample_index 0"):
        store.write_groups([traj("g0", 0), traj("g0", 0)])
    with pytest.raises(ValueError, match="takes Trajectory objects, got dict"):
        store.write_groups([traj("g0", 0).to_dict()])
    assert store.batch_paths() == []


def test_streaming_reader_is_lazy(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for g in range(3):
        store.write_groups([traj(f"g{g}", 0)])
    it = iter_trajectories(tmp_path)
    assert next(it).id == "g0#0"
    # Files not yet reached can still change: the reader opens them one at a time.
    (tmp_path / "trajectories" / "batch-00002.msgpack").write_bytes(b"garbage")
    assert next(it).id == "g1#0"
    with pytest.raises(ValueError, match=r"batch-00002\.msgpack: not a trajectory batch file"):
        next(it)


def test_config_and_metrics(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    assert read_config(tmp_path / "run") == {}
    config = {
        "task": {"name": "arith_tool", "group_size": 4},
        "reward": {"functions": ["exact_match"]},
    }
    store.write_config(config)
    assert store.read_config() == config
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    with pytest.raises(ValueError, match="config is not JSON-serialisable"):
        store.write_config({"x": object()})
    assert store.read_config() == config  # a failed write does not replace the old config
    store.append_metrics({"step": 0, "reward/mean": 0.5})
    store.append_metrics({"step": 1, "reward/mean": np.float64(0.75)})
    assert read_metrics(tmp_path / "run") == [
        {"step": 0, "reward/mean": 0.5},
        {"step": 1, "reward/mean": 0.75},
    ]
    # A torn last line (crash mid-append) is ignored; a bad line elsewhere is an error.
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')
    assert len(read_metrics(tmp_path / "run")) == 2
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not valid JSON"):
        read_metrics(tmp_path / "run")


def test_run_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        RunStore(tmp_path / "file")
