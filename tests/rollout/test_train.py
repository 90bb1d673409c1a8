"""The training job on a real local Ray with real sandboxes and the tiny policy: SFT, GRPO steps
whose updates reach the rollout workers, a run killed after a step that resumes at the next one,
and a learner that does not fit next to the workers refused before anything starts.

The reward is ``format`` (the episode stopped with a well-formed last message): after a few SFT
steps the tiny policy stops within the token limit in some samples of a group and not in others,
so the groups carry signal and the GRPO steps really update the policy.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from safetensors.torch import load_file

from rollout.config import load_config
from rollout.store import iter_trajectories
from rollout.train import step_groups
from rollout.workers import JobError, run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "policy.preset=tiny",
    'tokenizer.kind="bpe"',
    "tokenizer.vocab_size=1024",
    "tokenizer.corpus_prompts=32",
    'sampling.thinking_mode="chat"',
    "sampling.max_new_tokens=16",
    "engine.max_context=512",
    "engine.max_batch=8",
    "limits.max_turns=2",
    "limits.deadline=60",
    "task.num_prompts=3",
    "task.group_size=4",
    "workers.num_workers=1",
    "workers.num_cpus=1",
    "workers.concurrency=8",
    'reward.functions=["format"]',
    "learner.token_budget=2048",
    "learner.lr=0.003",
    "sft.steps=6",
    "sft.batch_size=8",
    "sft.lr=0.01",
    "sft.demonstrations=32",
    "sft.tool_fraction=0.5",
    "rl.eval_every=0",
    "rl.eval_prompts=2",
    "rl.checkpoint_every=1",
]


class Killed(Exception):
    """Stands for a killed process: raised from the step callback, after a step's checkpoint."""


def records(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_rl_updates_reach_the_workers_and_a_killed_run_resumes(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, [*TINY, "rl.steps=3"])

    def kill_after_step_1(trainer, record):
        if record["step"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run_training(config, run_dir, progress=False, on_step=kill_after_step_1)

    steps = records(run_dir, "rl")
    assert [r["step"] for r in steps] == [0, 1]
    # each step trained on groups with signal, and each was sampled by the version before it:
    # the workers received the weights of every update
    for r in steps:
        assert r["learner/trained"] > 0, r
        assert r["sampled_versions"] == [r["step"]] and r["version"] == r["step"] + 1
    # the workers sampled step 1 with the weights the learner held then (not only its version
    # number): the rollout-vs-learner logprob gap is float rounding
    assert steps[1]["learner/logprob_gap_max"] < 1e-3, steps[1]
    before, after = weights(run_dir, 0), weights(run_dir, 1)
    assert any(not before[k].equal(after[k]) for k in before)
    sft_rows = records(run_dir, "sft")
    assert sft_rows and sft_rows[-1]["sft_step"] == 5

    # resumed from the checkpoint of step 1: step 2 runs, nothing before it again
    summary = run_training(config, run_dir, resume=True, progress=False)
    steps = records(run_dir, "rl")
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert records(run_dir, "sft") == sft_rows  # SFT was not repeated
    assert steps[2]["sampled_versions"] == [2] and steps[2]["version"] == 3
    assert summary["steps"] == 3 and (run_dir / "reward_curve.png").is_file()

    by_step = defaultdict(set)
    for t in iter_trajectories(run_dir):
        step = int(t.group_id.split("/")[0][1:])
        assert t.policy_version == step  # the version it was sampled with
        by_step[step].add((t.group_id, t.sample_index))
    assert sorted(by_step) == [0, 1, 2]
    for step, keys in by_step.items():  # each step's own instances, each sample once
        ids = {g.group_id for g in step_groups(config, step)}
        assert keys == {(g, i) for g in ids for i in range(config.task.group_size)}


def test_learner_ranks_that_do_not_fit_beside_the_workers_are_refused(ray_session, tmp_path):
    config = load_config(None, [*TINY, "rl.steps=1", "learner.num_ranks=2"])
    with pytest.raises(JobError, match=r"num_ranks = 2 .* beside the 1 CPUs of the rollout"):
        run_training(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
