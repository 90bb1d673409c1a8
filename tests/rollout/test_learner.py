"""rollout.learner: GRPO and SFT steps on the tiny policy, staleness, checkpoints that resume
exactly, two gloo ranks against one, and config errors before anything starts."""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import random
import socket

import pytest
import torch

from rollout.config import ConfigError, load_config
from rollout.learner import Learner, Sample, latest_checkpoint
from rollout.types import Trajectory


def _config(*overrides: str):
    return load_config(None, ["policy.preset=tiny", "learner.token_budget=256", *overrides])


def _batch(seed: int = 0, groups: int = 2, size: int = 4, version: int = 0) -> list[Trajectory]:
    """Groups of random token sequences with mixed rewards (every group has signal)."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        for i in range(size):
            n = rng.randint(4, 12)
            out.append(
                Trajectory(
                    id=f"g{g}#{i}",
                    task="t",
                    instance_id=f"g{g}",
                    group_id=f"g{g}",
                    sample_index=i,
                    prompt_ids=[rng.randrange(300) for _ in range(rng.randint(3, 8))],
                    response_ids=[rng.randrange(300) for _ in range(n)],
                    loss_mask=[1] * (n - 2) + [0, 1],
                    logprobs=[-rng.uniform(4.0, 8.0) for _ in range(n - 2)] + [0.0, -6.0],
                    reward=float(i % 2),
                    policy_version=version,
                )
            )
    return out


def _params(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


def test_train_step_changes_weights_and_reports_the_gap():
    learner = Learner(_config())
    before = _params(learner)
    m = learner.train_step(_batch())
    after = _params(learner)
    assert learner.version == 1 and m["version"] == 1.0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert m["trained"] == 8 and m["dropped_stale"] == 0
    assert m["tokens"] == sum(sum(t.loss_mask) for t in _batch())
    # the learner's logprobs of random tokens are near -log(512); the stored ones are -4..-8
    assert 0.0 < m["logprob_gap_mean"] <= m["logprob_gap_max"]
    assert m["grad_norm"] > 0


def test_stale_and_signal_free_groups_are_not_trained():
    learner = Learner(_config("learner.max_staleness=1"))
    learner.version = 3
    batch = _batch(version=1) + _batch(seed=1, version=3)
    for t in _batch(seed=2, groups=1):
        t.group_id, t.reward, t.policy_version = "flat", 1.0, 3
        batch.append(t)
    m = learner.train_step(batch)
    assert m["dropped_stale"] == 8 and learner.dropped_stale == 8
    assert m["groups_zero_std"] == 1 and m["trained"] == 8


def test_sft_step_lowers_the_loss_on_its_batch():
    learner = Learner(_config("learner.lr=0.003"))
    samples = [Sample(t.prompt_ids, t.response_ids, t.loss_mask, t.logprobs) for t in _batch()]
    first = learner.sft_step(samples)["sft_loss"]
    for _ in range(2):
        last = learner.sft_step(samples)["sft_loss"]
    assert last < first - 0.2
    assert learner.version == 0  # SFT is not an RL update


def test_sft_schedule_warms_up_then_follows_a_cosine_to_five_percent():
    from rollout.sft import run_sft, sft_lr

    assert [sft_lr(i, 10, 0.01, "constant", 3) for i in (0, 5, 9)] == [0.01] * 3
    cos = [sft_lr(i, 101, 0.01, "cosine", 4) for i in range(101)]
    # warmup: 1/4, 2/4, 3/4 of the cosine's value; then the cosine itself
    assert cos[0] == pytest.approx(0.01 * 0.25 * (0.05 + 0.95 * 0.5 * (1 + math.cos(0))))
    assert cos[2] == pytest.approx(0.01 * 0.75 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 50))))
    assert cos[50] == pytest.approx(0.01 * (0.05 + 0.95 * 0.5))  # half way: the midpoint
    assert cos[100] == pytest.approx(0.0005)  # the last step: 5% of the peak
    assert all(a >= b for a, b in itertools.pairwise(cos[3:]))
    with pytest.raises(ValueError, match="'linear'"):
        sft_lr(0, 10, 0.01, "linear", 0)

    learner = Learner(_config())
    samples = [Sample(t.prompt_ids, t.response_ids, t.loss_mask, t.logprobs) for t in _batch()]
    history = run_sft(learner, samples, steps=3, batch_size=4, lr=0.01, seed=0, schedule="cosine")
    assert [h["lr"] for h in history] == [sft_lr(i, 3, 0.01, "cosine", 0) for i in range(3)]
    assert learner.optimizer.param_groups[0]["lr"] == history[-1]["lr"] == pytest.approx(0.0005)


def test_rl_lr_warms_up_over_the_first_updates(tmp_path):
    learner = Learner(_config("learner.lr=0.002", "learner.warmup_steps=4"))
    lrs = [learner.train_step(_batch(i))["lr"] for i in range(2)]
    assert lrs == pytest.approx([0.0005, 0.001])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    learner.save(tmp_path / "ckpt", extra={"next_step": 2})
    resumed = Learner(_config("learner.lr=0.002", "learner.warmup_steps=4"))
    resumed.load(tmp_path / "ckpt")  # the warmup goes on where it stopped
    lrs = [resumed.train_step(_batch(i))["lr"] for i in range(2, 5)]
    assert lrs == pytest.approx([0.0015, 0.002, 0.002])
    assert Learner(_config("learner.lr=0.002")).rl_lr() == 0.002  # no warmup by default


def test_checkpoint_resumes_exactly(tmp_path):
    ref = Learner(_config())
    ref.train_step(_batch(0))
    ref.save(tmp_path / "checkpoints" / "step-000001", extra={"next_step": 1})
    ref.train_step(_batch(1))

    resumed = Learner(_config("run.seed=5"))  # other initial weights: all must come from disk
    assert resumed.load(latest_checkpoint(tmp_path)) == {"next_step": 1}
    assert resumed.version == 1
    resumed.train_step(_batch(1))
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.version == ref.version == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    learner = Learner(
        _config("learner.num_ranks=2"), rank=rank, init_method=f"tcp://127.0.0.1:{port}"
    )
    metrics = learner.train_step(_batch())
    torch.save((learner.state_dict(), metrics), f"{out}/rank{rank}.pt")
    learner.close()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "needs one of init_method and store"),
        ({"init_method": "tcp://127.0.0.1:1", "store": "127.0.0.1:1"}, "needs one of"),
        ({"store": "127.0.0.1"}, "store must be 'host:port', got '127.0.0.1'"),
        ({"store": "host:port"}, "got 'host:port'"),
    ],
)
def test_a_rank_needs_one_valid_rendezvous(kw, message):
    with pytest.raises(ValueError, match=message):
        Learner(_config("learner.num_ranks=2"), rank=1, **kw)


def test_two_gloo_ranks_match_one_rank(tmp_path):
    one = Learner(_config())
    m1 = one.train_step(_batch())
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    for rank in (0, 1):
        state, m = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in one.model.state_dict().items():
            # Adam's first step is about lr * sign(g): 1e-4 is a tenth of one step (lr 1e-3)
            torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-4)
        assert m["tokens"] == m1["tokens"]
        # the summed gradient, not a mean or one shard's (Adam alone would hide the scale)
        assert m["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        assert m["pg_loss"] == pytest.approx(m1["pg_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('learner.loss="ppo-clip"', "learner.loss must be one of"),
        ("learner.clip_low=-0.1", "learner.clip_low must be >= 0"),
        ("learner.clip_high=-1", "learner.clip_high must be >= 0"),
        ("learner.num_ranks=4096", "learner.num_ranks = 4096"),
        ('learner.loss="seq-mean-token-sum-norm"', "norm_length"),
        ("rl.eval_temperature=-0.5", "rl.eval_temperature must be >= 0"),
        ('rl.mode="async"', None),
    ],
)
def test_bad_training_config_is_refused_before_anything_starts(override, message):
    extra = ["learner.max_staleness=0"] if override.startswith("rl.mode") else []
    with pytest.raises(ConfigError, match=message or "max_staleness"):
        load_config(None, [override, *extra])


@pytest.mark.ray
def test_learner_group_on_ray_matches_one_learner(ray_session, tmp_path):
    """Two Learner actors joined by torch.distributed (rendezvous on rank 0, pinned to this
    node): after one step both hold the parameters of one in-process Learner on the same
    batch; rank 0 publishes the weights and writes a checkpoint every rank can load."""
    import ray

    from rollout.workers import LearnerGroup

    one = Learner(_config())
    m1 = one.train_step(_batch())
    group = LearnerGroup(_config("learner.num_ranks=2"))
    try:
        m2 = group.train_step(_batch())
        assert group.version == one.version == 1
        for state in group.state_dicts():
            for k, v in one.model.state_dict().items():
                torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-4)
        assert m2["tokens"] == m1["tokens"]
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)

        ref, version = group.weights()
        assert isinstance(ref, ray.ObjectRef) and version == 1
        published = ray.get(ref)
        assert all(torch.equal(published[k], v) for k, v in group.state_dicts()[1].items())

        group.save(tmp_path / "ckpt", extra={"next_step": 1})
        group.train_step(_batch(1))
        assert group.load(tmp_path / "ckpt") == {"next_step": 1} and group.version == 1
        for state in group.state_dicts():  # every rank is back at the checkpoint
            assert all(torch.equal(state[k], v) for k, v in published.items())
    finally:
        group.close()


@pytest.mark.ray
def test_learner_group_needs_the_cpus_before_it_starts(ray_session):
    from rollout.workers import JobError, LearnerGroup

    with pytest.raises(JobError, match=r"learner.num_ranks = 2 ranks x learner.num_cpus = 1.5"):
        LearnerGroup(_config("learner.num_ranks=2", "learner.num_cpus=1.5"))
    with pytest.raises(JobError, match="beside the 1 CPUs of the rollout workers"):
        LearnerGroup(_config("learner.num_ranks=2"), reserve_cpus=1)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_learner_scores_samples_at_the_sampling_temperature(temperature):
    """Trajectories sampled at temperature T carry logprobs of softmax(logits / T); the learner
    configured with the same ``sampling.temperature`` computes the same ones (the gap is float
    rounding), a learner at T = 1 on the same weights does not."""
    from policy import Engine, SamplingParams

    def learner(t: float) -> Learner:
        return Learner(_config(f"sampling.temperature={t}", "policy.kv_dtype=float32"))

    matched, plain = learner(temperature), learner(1.0)
    plain.model.load_state_dict(matched.model.state_dict())
    engine = Engine(matched.model.eval(), max_batch=8, max_context=64)
    prompts = [[5 + i, 17, 3 * i + 1] for i in range(8)]
    gens = engine.generate(
        prompts, SamplingParams(temperature=temperature, max_new_tokens=8, seed=1)
    )
    batch = [
        Trajectory(
            id=f"g{i // 4}#{i % 4}",
            task="t",
            instance_id=f"g{i // 4}",
            group_id=f"g{i // 4}",
            sample_index=i % 4,
            prompt_ids=p,
            response_ids=g.token_ids,
            loss_mask=[1] * len(g.token_ids),
            logprobs=g.logprobs,
            reward=float(i % 2),
            policy_version=0,
        )
        for i, (p, g) in enumerate(zip(prompts, gens, strict=True))
    ]
    matched.model.train()
    assert matched.train_step(batch)["logprob_gap_max"] < 1e-4
    assert plain.train_step(batch)["logprob_gap_max"] > 0.1
