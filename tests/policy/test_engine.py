"""Engine: cached generation equals re-running the full forward, logprobs, seeding, stops,
lengths, the context budget and parameter validation."""

import pytest
import torch

from policy.config import V4Config
from policy.engine import Engine, SamplingParams, sample
from policy.model import V4Model

PROMPTS = [[1, 2, 3], [5] * 10, [7, 8], [9, 4] * 10, [3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = V4Model(V4Config.from_preset("tiny", kv_dtype="float32")).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so argmax has no near-ties
        m.head.weight.mul_(20)
    return m


@torch.no_grad()
def _greedy_by_full_forward(model, prompt, n):
    ids, lps = list(prompt), []
    for _ in range(n):
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
        ids.append(int(lp.argmax()))
        lps.append(float(lp.max()))
    return ids[len(prompt) :], lps


def test_greedy_equals_full_forward_generation(model):
    gens = Engine(model, max_batch=8, max_context=64).generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=24)
    )
    for prompt, g in zip(PROMPTS, gens, strict=True):
        toks, lps = _greedy_by_full_forward(model, prompt, 24)
        assert g.token_ids == toks
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)
        assert g.finish_reason == "length"


def test_seeded_determinism_and_batch_independence(model):
    p = SamplingParams(temperature=1.0, max_new_tokens=12, seed=123)
    a = Engine(model, max_batch=8, max_context=64).generate(PROMPTS, p)
    b = Engine(model, max_batch=2, max_context=64).generate(PROMPTS, p)
    c = Engine(model, max_batch=1, max_context=64).generate(PROMPTS[:1], p)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].token_ids == c[0].token_ids
    d = Engine(model, max_batch=8, max_context=64).generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=124)
    )
    assert [g.token_ids for g in a] != [g.token_ids for g in d]
    same = Engine(model, max_context=64).generate([[1, 2], [1, 2]], p)
    assert same[0].token_ids != same[1].token_ids  # a GRPO group gets distinct samples


def test_sampled_logprobs_are_pre_filter_tempered(model):
    p = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=6, seed=0)
    g = Engine(model, max_context=64).generate([PROMPTS[0]], p)[0]
    ids = PROMPTS[0] + g.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(PROMPTS[0]) - 1 : -1]
    lp = torch.log_softmax(logits / 0.7, dim=-1)
    want = lp.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(g.logprobs), want, atol=1e-5, rtol=0)
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in top5[i] for i, t in enumerate(g.token_ids))


def test_top_k1_and_tiny_top_p_are_greedy(model):
    greedy = Engine(model, max_context=64).generate(
        PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=8)
    )
    for kw in ({"top_k": 1}, {"top_p": 1e-9}):
        g = Engine(model, max_context=64).generate(
            PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=8, seed=5, **kw)
        )
        assert [x.token_ids for x in g] == [x.token_ids for x in greedy]


def test_stop_tokens_and_max_new_tokens(model):
    greedy = Engine(model, max_context=64).generate(
        [PROMPTS[3]], SamplingParams(temperature=0, max_new_tokens=10)
    )[0]
    stop = greedy.token_ids[3]
    first = greedy.token_ids.index(stop)
    g = Engine(model, max_context=64).generate(
        [PROMPTS[3], PROMPTS[0]],
        SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)),
    )
    assert g[0].token_ids == greedy.token_ids[: first + 1] and g[0].finish_reason == "stop"
    assert len(g[0].logprobs) == len(g[0].token_ids)
    if stop not in g[1].token_ids:
        assert len(g[1].token_ids) == 10 and g[1].finish_reason == "length"


def test_sample_follows_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    probs = torch.softmax(logits, dim=-1)[0]
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = torch.cat([sample(logits, SamplingParams(), [g])[0] for g in gens])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - probs).abs().max() < 0.03
    top2 = torch.cat([sample(logits, SamplingParams(top_k=2), [g])[0] for g in gens[:500]])
    assert set(top2.tolist()) == {1, 2}
    # sorted probabilities 0.644 (id 2), 0.237 (id 1), ...: the nucleus is the shortest prefix
    # whose mass reaches top_p
    for top_p, support in ((0.6, {2}), (0.7, {1, 2})):
        p = SamplingParams(top_p=top_p)
        nucleus = torch.cat([sample(logits, p, [g])[0] for g in gens[:500]])
        assert set(nucleus.tolist()) == support


def test_context_budget_error(model):
    eng = Engine(model, max_context=16)
    with pytest.raises(
        ValueError, match=r"prompt 1: 12 prompt tokens .* 17 exceeds max_context 16"
    ):
        eng.generate([[1], [2] * 12], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        eng.generate([[]], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[1, 9999]], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="max_context"):
        Engine(model, max_context=0)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("stop_token_ids", (-1,)),
        ("seed", "x"),
    ],
)
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_finished_rows_leave_the_batch(model):
    """After some rows stop, the rest continue from a compacted cache with the same tokens."""
    ref = {i: _greedy_by_full_forward(model, p, 16)[0] for i, p in enumerate(PROMPTS)}
    stop = ref[2][2]  # row 2 stops at its third token; others may stop later or never
    g = Engine(model, max_context=64).generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=(stop,))
    )
    for i, gen in enumerate(g):
        want = ref[i][: ref[i].index(stop) + 1] if stop in ref[i] else ref[i]
        assert gen.token_ids == want, i
        assert gen.finish_reason == ("stop" if stop in ref[i] else "length")
    assert sum(gen.finish_reason == "length" for gen in g) >= 1
