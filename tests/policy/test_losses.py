"""policy.losses: GRPO-family losses and SFT against hand-computed values, the batch alignment,
and micro-batch gradient accumulation on a tiny V4Model."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from policy.config import V4Config
from policy.losses import (
    PolicyLossConfig,
    aggregate,
    forward_logprobs,
    kl_estimate,
    make_batch,
    make_micro_batches,
    policy_loss,
    sft_loss,
    split_by_token_budget,
    token_entropy,
    token_logprobs,
)
from policy.model import V4Model


def sample(prompt, response, mask, logprobs):
    return SimpleNamespace(
        prompt_ids=prompt, response_ids=response, loss_mask=mask, logprobs=logprobs
    )


def leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# ---------------------------------------------------------------------------- policy loss
def test_ratio_one_is_plain_policy_gradient():
    lp = leaf([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    old = lp.detach().clone()
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, m = policy_loss(lp, old, adv, mask, PolicyLossConfig())
    # -(2 + 2 + 2 - 1 - 1) / 5
    assert loss.item() == pytest.approx(-0.8)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A, over 5 tokens; masked token gets 0
    want = torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]])
    torch.testing.assert_close(lp.grad, want)
    # the plain REINFORCE loss -mean(A * logp) has the same gradient
    lp2 = lp.detach().clone().requires_grad_()
    (-(adv[:, None] * lp2 * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(lp.grad, lp2.grad)
    assert m["ratio_mean"] == 1.0 and m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0
    assert m["logprob_gap_mean"] == 0.0 and m["tokens"] == 5.0


def test_clipping_both_sides_with_both_advantage_signs():
    ratios = [0.5, 0.9, 1.0, 1.2, 1.5]
    lp = leaf([[math.log(r) for r in ratios]] * 2)
    old = torch.zeros(2, 5)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 5)
    loss, m = policy_loss(lp, old, adv, mask, PolicyLossConfig(eps_low=0.2, eps_high=0.28))
    # A=+1: max(-r, -clip(r, 0.8, 1.28)) = [-0.5, -0.9, -1.0, -1.2, -1.28]  (1.5 clipped)
    # A=-1: max(r, clip(r, 0.8, 1.28))   = [0.8, 0.9, 1.0, 1.2, 1.5]       (0.5 clipped)
    assert loss.item() == pytest.approx((-4.88 + 5.4) / 10)
    loss.backward()
    want = torch.tensor([[-0.5, -0.9, -1.0, -1.2, 0.0], [0.0, 0.9, 1.0, 1.2, 1.5]]) / 10
    torch.testing.assert_close(lp.grad, want)
    assert m["clip_frac_low"] == pytest.approx(0.1)
    assert m["clip_frac_high"] == pytest.approx(0.1)
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / 5)
    assert m["ratio_max"] == pytest.approx(1.5)


def test_clip_higher_lets_rare_tokens_grow():
    lp = leaf([[math.log(1.25)]])
    args = (torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss, m = policy_loss(lp, *args, PolicyLossConfig(eps_low=0.2, eps_high=0.28))
    loss.backward()
    assert lp.grad.item() == pytest.approx(-1.25) and m["clip_frac_high"] == 0.0
    lp.grad = None
    loss, m = policy_loss(lp, *args, PolicyLossConfig(eps_low=0.2, eps_high=0.2))
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and lp.grad.item() == 0.0
    assert m["clip_frac_high"] == 1.0


def test_dual_clip_bounds_negative_advantages():
    lp = leaf([[math.log(5.0), math.log(2.0)]])
    args = (torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    loss, _ = policy_loss(lp, *args, PolicyLossConfig(dual_clip=3.0))
    loss.backward()
    # ratio 5 -> min(5, 3) = 3, no gradient; ratio 2 -> 2, gradient 2 / 2 tokens
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 1.0]]))


def test_masked_tokens_do_not_count():
    lp = leaf([[0.0, 5.0]])  # the masked token has ratio e^5, which must not show anywhere
    loss, m = policy_loss(
        lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), PolicyLossConfig()
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert lp.grad[0, 1].item() == 0.0
    assert m["ratio_max"] == 1.0 and m["tokens"] == 1.0
    # a dummy old logprob off the mask (ratio overflows to inf there) leaves loss and grad finite
    lp.grad = None
    old = torch.tensor([[0.0, -1000.0]])
    cfg = PolicyLossConfig(tis_cap=2.0)
    loss, m = policy_loss(
        lp, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), cfg, rollout_logprobs=old * 2
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and torch.isfinite(lp.grad).all()
    assert all(math.isfinite(v) for v in m.values())


def test_per_token_advantages():
    lp = leaf([[0.0, 0.0]])
    adv = torch.tensor([[1.0, 3.0]])
    loss, _ = policy_loss(lp, torch.zeros(1, 2), adv, torch.ones(1, 2), PolicyLossConfig())
    assert loss.item() == pytest.approx(-2.0)


# ---------------------------------------------------------------------------- aggregation
def test_aggregation_modes_hand_values():
    vals = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert aggregate(vals, mask, "token-mean").item() == pytest.approx(10 / 4)
    # row means 2 and 4; the empty third row is not a sequence of the batch
    assert aggregate(vals, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate(vals, mask, "seq-mean-token-sum-norm", norm_length=8).item() == pytest.approx(
        (6 / 8 + 4 / 8) / 2
    )
    # global normalisers replace the batch's own counts
    assert aggregate(vals, mask, "token-mean", num_tokens=20).item() == pytest.approx(0.5)
    assert aggregate(vals, mask, "seq-mean-token-mean", num_seqs=6).item() == pytest.approx(1.0)


def test_drgrpo_weighs_every_token_by_one_constant():
    # a long and a short response: token-mean-per-sequence would weigh their tokens 1/6 and 1/2
    lp = leaf([[0.0] * 6, [0.0] * 6])
    mask = torch.tensor([[1.0] * 6, [1.0, 1.0, 0, 0, 0, 0]])
    adv = torch.tensor([1.0, 1.0])
    cfg = PolicyLossConfig(agg="seq-mean-token-sum-norm", norm_length=10)
    loss, _ = policy_loss(lp, torch.zeros(2, 6), adv, mask, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-(6 / 10 + 2 / 10) / 2)
    torch.testing.assert_close(lp.grad, -mask / 20)
    lp.grad = None
    loss, _ = policy_loss(
        lp, torch.zeros(2, 6), adv, mask, PolicyLossConfig(agg="seq-mean-token-mean")
    )
    loss.backward()
    torch.testing.assert_close(lp.grad[:, 0], torch.tensor([-1 / 12, -1 / 4]))


# ---------------------------------------------------------------------------- TIS and KL
def test_truncated_importance_sampling_caps_detached_weights():
    lp = leaf([[0.0, 0.0, 0.0]])
    old = torch.zeros(1, 3)
    rollout = torch.log(torch.tensor([[2.0, 0.5, 0.25]]))  # pi_old / pi_rollout = 0.5, 2, 4
    cfg = PolicyLossConfig(tis_cap=2.0)
    loss, m = policy_loss(
        lp, old, torch.tensor([1.0]), torch.ones(1, 3), cfg, rollout_logprobs=rollout
    )
    assert loss.item() == pytest.approx(-(0.5 + 2.0 + 2.0) / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -2.0, -2.0]]) / 3)
    assert m["tis_weight_mean"] == pytest.approx(1.5)
    assert m["tis_capped_frac"] == pytest.approx(1 / 3)
    # the gap is learner vs rollout: |0 - log 2|, |0 - log 0.5|, |0 - log 0.25|
    assert m["logprob_gap_mean"] == pytest.approx((2 * math.log(2) + math.log(4)) / 3)
    assert m["logprob_gap_max"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), cfg)


def test_kl_estimators_known_values():
    lp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])  # r = p_ref / p = 0.5
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    delta = torch.randn(1000) * 3
    assert (kl_estimate(delta, torch.zeros(1000), "k3") >= 0).all()
    assert kl_estimate(torch.zeros(3), torch.zeros(3), "k3").abs().max().item() == 0.0


def test_k1_and_k3_are_unbiased_on_samples_from_the_policy():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    for est in ("k1", "k3"):
        got = kl_estimate(p.log()[x], q.log()[x], est).mean().item()
        assert got == pytest.approx(exact, abs=0.01), est


def test_kl_term_in_the_loss():
    lp = leaf([[math.log(0.5), math.log(0.5)]])
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1")
    loss, m = policy_loss(
        lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg, ref_logprobs=ref
    )
    assert loss.item() == pytest.approx(0.1 * math.log(2) / 2)
    assert m["kl"] == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg)


# ---------------------------------------------------------------------------- logprobs, entropy, SFT
def test_token_logprobs_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    want = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), want)
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(token_entropy(logits, chunk_tokens=3), ent)
    assert token_entropy(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :4])


def test_entropy_metric_is_the_masked_mean():
    ent = torch.tensor([[1.0, 3.0, 100.0]])
    _, m = policy_loss(
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        torch.tensor([1.0]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        PolicyLossConfig(),
        entropy=ent,
    )
    assert m["entropy"] == pytest.approx(2.0)


def test_sft_loss_equals_cross_entropy_on_masked_positions():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 13, requires_grad=True)
    targets = torch.randint(0, 13, (3, 6))
    mask = (torch.rand(3, 6) > 0.4).float()
    loss, m = sft_loss(token_logprobs(logits, targets), mask)
    sel = mask.bool()
    want = F.cross_entropy(logits[sel], targets[sel])
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g, g_want)
    assert m["tokens"] == mask.sum().item()


# ---------------------------------------------------------------------------- batches
def test_make_batch_alignment_by_hand():
    # prompt 10 11 12; response: sampled 20 21, tool output 30 31, sampled 22
    a = sample([10, 11, 12], [20, 21, 30, 31, 22], [1, 1, 0, 0, 1], [-0.1, -0.2, 0.0, 0.0, -0.3])
    b = sample([5], [6], [1], [-0.5])
    batch = make_batch([a, b], [1.5, -0.5], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31], [5, 0, 0, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[11, 12, 20, 21, 30, 31, 22], [6, 0, 0, 0, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0]]
    torch.testing.assert_close(
        batch.old_logprobs,
        torch.tensor([[0, 0, -0.1, -0.2, 0, 0, -0.3], [-0.5, 0, 0, 0, 0, 0, 0]]),
    )
    assert batch.advantages.tolist() == [1.5, -0.5]
    assert batch.lengths.tolist() == [7, 1]
    assert (batch.num_tokens, batch.num_seqs) == (4.0, 2.0)
    # response token j at absolute position P + j is predicted at t = P + j - 1
    for j, tok in enumerate(a.response_ids):
        assert batch.targets[0, 3 + j - 1].item() == tok
        assert batch.loss_mask[0, 3 + j - 1].item() == a.loss_mask[j]


def test_make_batch_logprobs_match_model_on_full_sequence():
    torch.manual_seed(0)
    model = V4Model(V4Config.from_preset("tiny"))
    a = sample([1, 2, 3], [4, 5, 6, 7], [1, 0, 1, 1], [0.0] * 4)
    b = sample([8, 9], [10, 11], [1, 1], [0.0] * 2)
    batch = make_batch([a, b])
    with torch.no_grad():
        lp, ent = forward_logprobs(model, batch)
        for row, s in enumerate((a, b)):
            seq = torch.tensor([[*s.prompt_ids, *s.response_ids]])
            logp = model(seq).log_softmax(-1)[0]  # [L, V]
            p = len(s.prompt_ids)
            for j, tok in enumerate(s.response_ids):
                want = logp[p + j - 1, tok]
                torch.testing.assert_close(lp[row, p + j - 1], want, rtol=0, atol=1e-5)
    assert ent.shape == lp.shape and (ent > 0).all()


def test_make_batch_errors():
    with pytest.raises(ValueError, match="same length"):
        make_batch([sample([1], [2, 3], [1], [0.0, 0.0])])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        make_batch([sample([], [2], [1], [0.0])])
    with pytest.raises(ValueError, match="0 or 1"):
        make_batch([sample([1], [2], [2], [0.0])])
    with pytest.raises(ValueError, match="2 advantages for 1 samples"):
        make_batch([sample([1], [2], [1], [0.0])], [1.0, 2.0])


def test_split_by_token_budget():
    assert split_by_token_budget([5, 3, 9, 2, 4], 10) == [[2], [0, 4], [1, 3]]
    assert split_by_token_budget([12, 1], 10) == [[0], [1]]  # too long: alone, never split
    lengths = [7, 1, 3, 3, 8, 2, 6, 5, 4, 4]
    groups = split_by_token_budget(lengths, 12)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 12
    with pytest.raises(ValueError, match="token_budget"):
        split_by_token_budget([3], 0)


# ---------------------------------------------------------------------------- micro-batching
@pytest.fixture(scope="module")
def tiny_rl():
    """A tiny V4Model and five samples whose rollout logprobs are the model's, perturbed so that
    ratios leave the clip band on some tokens."""
    torch.manual_seed(0)
    model = V4Model(V4Config.from_preset("tiny"))
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 9), (2, 4), (5, 12), (1, 6), (4, 3)]
    raw = []
    for p, r in shapes:
        prompt = torch.randint(1, 512, (p,), generator=gen).tolist()
        resp = torch.randint(1, 512, (r,), generator=gen).tolist()
        mask = (torch.rand(r, generator=gen) > 0.3).long().tolist()
        mask[0] = 1
        raw.append(sample(prompt, resp, mask, [0.0] * r))
    batch = make_batch(raw)
    with torch.no_grad():
        lp, _ = forward_logprobs(model, batch, entropy=False)
    samples = []
    for i, s in enumerate(raw):
        p, r = len(s.prompt_ids), len(s.response_ids)
        noise = 0.3 * torch.randn(r, generator=gen)
        lps = (lp[i, p - 1 : p - 1 + r] + noise) * torch.tensor(s.loss_mask)
        samples.append(sample(s.prompt_ids, s.response_ids, s.loss_mask, lps.tolist()))
    advantages = [1.0, -0.5, 0.7, -1.2, 0.3]
    return model, samples, advantages


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(agg="token-mean"),
        PolicyLossConfig(agg="seq-mean-token-mean", eps_low=0.1, eps_high=0.1),
        PolicyLossConfig(agg="seq-mean-token-sum-norm", norm_length=16),
        "sft",
    ],
    ids=["token-mean", "seq-mean-token-mean", "drgrpo", "sft"],
)
def test_micro_batch_gradients_sum_to_full_batch(tiny_rl, cfg):
    model, samples, advantages = tiny_rl

    def step(batch):
        lp, _ = forward_logprobs(model, batch, entropy=False)
        norm = {"num_tokens": batch.num_tokens, "num_seqs": batch.num_seqs}
        if cfg == "sft":
            return sft_loss(lp, batch.loss_mask, **norm)
        return policy_loss(lp, batch.old_logprobs, batch.advantages, batch.loss_mask, cfg, **norm)

    model.zero_grad(set_to_none=True)
    loss, m = step(make_batch(samples, advantages))
    loss.backward()
    full = _grads(model)
    if cfg != "sft":
        assert m["clip_frac_low"] + m["clip_frac_high"] > 0  # clipping is exercised

    model.zero_grad(set_to_none=True)
    micro = make_micro_batches(samples, advantages, token_budget=24)
    assert len(micro) >= 3
    total = 0.0
    for mb in micro:
        mb_loss, _ = step(mb)
        mb_loss.backward()
        total += mb_loss.item()
    assert total == pytest.approx(loss.item(), abs=1e-6)
    acc = _grads(model)
    assert full.keys() == acc.keys() and len(full) > 10
    for name, g in full.items():
        torch.testing.assert_close(acc[name], g, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"agg": "seq-sum"}, "unknown aggregation mode 'seq-sum'"),
        ({"eps_low": -0.1}, "eps_low must be in"),
        ({"eps_high": -0.2}, "eps_high must be >= 0, got -0.2"),
        ({"agg": "seq-mean-token-sum-norm"}, "needs norm_length > 0, got None"),
        ({"tis_cap": 0.0}, "tis_cap must be > 0"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"kl_coef": -1.0}, "kl_coef must be >= 0"),
        ({"kl_estimator": "k4"}, "unknown kl_estimator 'k4'"),
    ],
)
def test_config_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_shape_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"old_logprobs must be \[B, T\] matching logprobs \(2, 3\), got \(2, 4\)"
    ):
        policy_loss(lp, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), PolicyLossConfig())
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        policy_loss(lp, lp, torch.zeros(3), torch.ones(2, 3), PolicyLossConfig())
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'"):
        sft_loss(lp, torch.ones(2, 3), agg="mean")


def test_forward_logprobs_at_a_temperature():
    torch.manual_seed(0)
    model = V4Model(V4Config.from_preset("tiny"))
    batch = make_batch([sample([1, 2, 3], [4, 5, 6], [1, 1, 1], [0.0] * 3)])
    with torch.no_grad():
        logits = model(batch.input_ids)
        lp, ent = forward_logprobs(model, batch, temperature=0.5)
        want = (logits / 0.5).log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
        torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)
        tempered = (logits / 0.5).log_softmax(-1)  # the entropy is the sampling distribution's
        torch.testing.assert_close(ent, -(tempered.exp() * tempered).sum(-1), rtol=0, atol=1e-4)
        plain, _ = forward_logprobs(model, batch, temperature=0)  # greedy: the plain softmax
        torch.testing.assert_close(
            plain,
            logits.log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0],
            rtol=0,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -1"):
        forward_logprobs(model, batch, temperature=-1)
