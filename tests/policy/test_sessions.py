"""AsyncEngine sessions: continuation across turns, forks, the prefix cache, continuous batching
with concurrent callers, preemption under a KV budget, rollback, live weight updates, bad input.

Reference: greedy decoding by the uncached full forward of the same token sequence (float32
cache; logprobs within 1e-5). Paths that do the same arithmetic (fork vs independent session,
prefix hit vs miss) are compared bitwise."""

import asyncio
import random

import pytest
import torch

from policy.config import V4Config
from policy.engine import AsyncEngine, SamplingParams, SessionError
from policy.model import V4Model

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def _model(kv_dtype="float32", seed=0):
    torch.manual_seed(seed)
    m = V4Model(V4Config.from_preset("tiny", kv_dtype=kv_dtype)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so argmax has no near-ties
        m.head.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


@torch.no_grad()
def _greedy_full(model, ids, n, stop=()):
    ids, toks, lps = list(ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
        t = int(lp.argmax())
        ids.append(t)
        toks.append(t)
        lps.append(float(lp[t]))
        if t in stop:
            break
    return toks, lps


def _run(coro):
    return asyncio.run(coro)


def _engine(model, **kw):
    kw.setdefault("max_context", 256)
    kw.setdefault("chunk", 16)
    kw.setdefault("prefix_block", 16)
    return AsyncEngine(model, **kw)


def test_turns_continue_the_session_and_equal_full_forward(model):
    """An agent conversation: prompt, generate, append a tool result, generate, ... Each turn's
    tokens and logprobs equal greedy decoding of the whole history by the full forward."""

    async def main():
        eng = _engine(model)
        rng = random.Random(0)
        prompt = [rng.randrange(512) for _ in range(37)]
        s = await eng.open(prompt)
        history = list(prompt)
        for turn in range(4):
            g = await eng.generate(s, GREEDY)
            toks, lps = _greedy_full(model, history, 8)
            assert g.token_ids == toks, f"turn {turn}"
            torch.testing.assert_close(
                torch.tensor(g.logprobs), torch.tensor(lps), atol=1e-5, rtol=0
            )
            history += g.token_ids
            tool = [rng.randrange(512) for _ in range(rng.randrange(1, 23))]
            await eng.append(s, tool)
            history += tool
            assert s.tokens == history
        stats = eng.stats()
        # prompt + 4 tool results + the last token of each generation: nothing re-prefilled
        assert stats["prefill_tokens"] == len(history) - 4 * 8 + 4
        await eng.close(s)
        await eng.shutdown()

    _run(main())


@pytest.mark.parametrize("kv_dtype", ["float32", "fp8"])
def test_fork_equals_independent_sessions(kv_dtype):
    model = _model(kv_dtype)

    async def main():
        eng = _engine(model)
        prompt = list(range(5, 45))
        parent = await eng.open(prompt)
        forks = await eng.fork(parent, 3)
        assert [f.tokens for f in forks] == [prompt] * 3
        tails = [[1, 2, 3], [7] * 9, [400]]
        got = []
        for f, tail in zip(forks, tails, strict=True):
            await eng.append(f, tail)
            got.append(await eng.generate(f, GREEDY))
        for tail, g in zip(tails, got, strict=True):
            alone = await eng.open(prompt)  # an independent session, same appends
            await eng.append(alone, tail)
            want = await eng.generate(alone, GREEDY)
            assert g.token_ids == want.token_ids
            assert g.logprobs == want.logprobs  # the same arithmetic: bitwise
        assert eng.stats()["forks"] == 3
        await eng.shutdown()

    _run(main())


def test_fork_group_sampling_is_seeded_and_distinct(model):
    async def main():
        eng = _engine(model)
        s = await eng.open([3, 1, 4, 1, 5, 9, 2, 6])
        group = await eng.fork(s, 4)
        params = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=i) for i in range(4)]
        outs = await asyncio.gather(
            *(eng.generate(f, p) for f, p in zip(group, params, strict=True))
        )
        assert len({tuple(o.token_ids) for o in outs}) > 1
        again = await eng.fork(s, 1)
        repeat = await eng.generate(again[0], params[2])
        assert repeat.token_ids == outs[2].token_ids
        await eng.shutdown()

    _run(main())


@pytest.mark.parametrize("kv_dtype", ["float32", "fp8"])
def test_prefix_cache_hit_equals_miss_bitwise(kv_dtype):
    model = _model(kv_dtype)
    system = list(range(100, 150))  # 50 tokens: prefix points every 16
    prompts = [[*system, 7, 8, 9], system + [1] * 5, system[:40]]

    async def outputs(prefix_bytes):
        eng = _engine(model, prefix_cache_bytes=prefix_bytes)
        outs = []
        for p in prompts:
            s = await eng.open(p)
            outs.append(await eng.generate(s, GREEDY))
            await eng.close(s)
        stats = eng.stats()
        await eng.shutdown()
        return outs, stats

    hit, stats = _run(outputs(1 << 26))
    miss, nostats = _run(outputs(0))
    assert stats["prefix_hits"] == 2 and nostats["prefix_hits"] == 0
    assert stats["prefill_tokens"] < nostats["prefill_tokens"]
    for a, b in zip(hit, miss, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_prefix_cache_memory_is_bounded(model):
    async def main():
        eng = _engine(model, prefix_cache_bytes=400_000)
        for i in range(6):
            s = await eng.open([i] * 40)
            await eng.close(s)
        st = eng.stats()
        assert 0 < st["prefix_cache_bytes"] <= 400_000
        await eng.shutdown()

    _run(main())


def _request(rng):
    prompt = [rng.randrange(512) for _ in range(rng.randrange(3, 60))]
    turns = [
        ([rng.randrange(512) for _ in range(rng.randrange(1, 12))], rng.randrange(1, 10))
        for _ in range(rng.randrange(1, 4))
    ]
    stop = (rng.randrange(512),)
    return prompt, turns, stop


async def _agent(eng, prompt, turns, stop, seed, pause_rng=None):
    """Open, then per turn: generate up to n tokens, 'tool' pause, append the tool tokens."""
    s = await eng.open(prompt)
    outs = []
    for i, (tool, n) in enumerate(turns):
        temp = 0 if seed is None else 1.0
        p = SamplingParams(
            temperature=temp, max_new_tokens=n, stop_token_ids=stop, seed=seed and seed + i
        )
        outs.append(await eng.generate(s, p))
        if pause_rng is not None:
            await asyncio.sleep(pause_rng.random() * 0.02)
        await eng.append(s, tool)
    await eng.close(s)
    return [(o.token_ids, o.finish_reason) for o in outs], [o.logprobs for o in outs]


@pytest.mark.parametrize("seeded", [False, True])
def test_concurrent_callers_equal_requests_run_alone(model, seeded):
    """16 asyncio callers with random prompt lengths, stop tokens and tool pauses share one
    decode batch (max_batch 6: some wait for a row); each output equals the same request alone."""
    rng = random.Random(1)
    reqs = [_request(rng) for _ in range(16)]
    seeds = [None] * 16 if not seeded else [1000 * i + 1 for i in range(16)]

    async def together():
        eng = _engine(model, max_batch=6, token_budget=24)
        pause = random.Random(2)
        outs = await asyncio.gather(
            *(_agent(eng, *r, sd, pause) for r, sd in zip(reqs, seeds, strict=True))
        )
        stats = eng.stats()
        await eng.shutdown()
        return outs, stats

    async def alone():
        eng = _engine(model, max_batch=6)
        outs = [await _agent(eng, *r, sd) for r, sd in zip(reqs, seeds, strict=True)]
        await eng.shutdown()
        return outs

    got, stats = _run(together())
    want = _run(alone())
    assert stats["decode_tokens"] > stats["decode_steps"]  # rows really shared steps
    for (g_toks, g_lps), (w_toks, w_lps) in zip(got, want, strict=True):
        assert g_toks == w_toks
        for a, b in zip(g_lps, w_lps, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_small_budget_preempts_and_outputs_stay_equal(model):
    rng = random.Random(3)
    reqs = [_request(rng) for _ in range(8)]
    probe = _engine(model, max_batch=2)
    floor = probe._sched.batch_bytes + probe._sched.session_max_bytes
    probe._sched.shutdown()

    async def run(budget):
        eng = _engine(model, max_batch=2, kv_budget_bytes=budget)
        outs = await asyncio.gather(*(_agent(eng, *r, None, random.Random(4)) for r in reqs))
        stats = eng.stats()
        await eng.shutdown()
        return [o[0] for o in outs], stats

    tight, tstats = _run(run(floor))
    loose, lstats = _run(run(None))
    assert tstats["preemptions"] > 0 and lstats.get("preemptions", 0) == 0
    assert tight == loose


def test_budget_too_small_is_a_clear_error(model):
    with pytest.raises(ValueError, match="kv_budget_bytes 1000 is too small"):
        _engine(model, kv_budget_bytes=1000)


def test_rollback_to_turn_start_and_to_any_position(model):
    async def main():
        eng = _engine(model)
        prompt = list(range(30, 61))
        s = await eng.open(prompt)
        g1 = await eng.generate(s, GREEDY)
        await eng.append(s, [5, 6, 7])
        g2 = await eng.generate(s, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
        await eng.rollback(s, len(prompt) + 8 + 3)  # reject the second turn
        again = await eng.generate(s, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
        assert again.token_ids == g2.token_ids and again.logprobs == g2.logprobs
        for pos in (len(prompt) + 5, 20, 1):
            await eng.rollback(s, pos)
            hist = (prompt + g1.token_ids)[:pos]
            assert s.tokens == hist
            g = await eng.generate(s, GREEDY)
            toks, lps = _greedy_full(model, hist, 8)
            assert g.token_ids == toks
            torch.testing.assert_close(
                torch.tensor(g.logprobs), torch.tensor(lps), atol=1e-5, rtol=0
            )
        await eng.shutdown()

    _run(main())


@pytest.mark.parametrize("mode", ["recompute", "finish"])
def test_load_weights_mid_run_reports_versions_and_never_mixes(mode):
    model = _model()
    other = _model(seed=7).state_dict()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    ref_old, ref_new = _model(), _model(seed=7)
    prompt = list(range(10, 30))

    async def main():
        eng = _engine(model, on_weight_update=mode)
        s = await eng.open(prompt)
        task = asyncio.ensure_future(
            eng.generate(s, SamplingParams(temperature=0, max_new_tokens=40))
        )
        while eng.stats().get("decode_steps", 0) < 5:
            await asyncio.sleep(0.001)
        eng.load_weights(other, version=1)
        g = await task
        s2 = await eng.open(prompt)
        g2 = await eng.generate(s2, GREEDY)
        await eng.shutdown()
        return g, g2

    g, g2 = _run(main())
    model.load_state_dict(old)
    assert g2.version == 1 and g2.versions == [1] * 8
    if mode == "finish":
        assert g.versions == [0] * 40 and g.version == 0
    else:
        assert g.versions[0] == 0 and g.versions[-1] == 1 and g.version == 0
        assert g.versions == sorted(g.versions)
    # every token: the argmax and logprob of the full forward under the weights it reports
    ids = list(prompt)
    for t, lp, v in zip(g.token_ids, g.logprobs, g.versions, strict=True):
        ref = ref_old if v == 0 else ref_new
        with torch.no_grad():
            want = torch.log_softmax(ref(torch.tensor([ids]))[0, -1], dim=-1)
        assert t == int(want.argmax())
        assert abs(lp - float(want[t])) < 1e-4
        ids.append(t)


@pytest.mark.parametrize("timeout", [0.0, 0.01, 0.05])
def test_cancelled_generate_leaves_a_usable_session(model, timeout):
    async def main():
        eng = _engine(model)
        s = await eng.open([1, 2, 3])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                eng.generate(s, SamplingParams(temperature=0, max_new_tokens=200)), timeout
            )
        held = s.tokens  # the cancelled call returned: nothing is added after it
        assert held[:3] == [1, 2, 3]
        await asyncio.sleep(0.05)
        assert s.tokens == held
        g = await eng.generate(s, GREEDY)
        toks, _ = _greedy_full(model, held, 8)
        assert g.token_ids == toks
        assert s.tokens == held + toks
        await eng.shutdown()

    _run(main())


def test_cancelled_open_leaves_no_session(model):
    async def main():
        eng = _engine(model, max_context=4096, token_budget=16)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(eng.open(list(range(500)) * 6), 0.01)
        s = await eng.open([1, 2])  # the engine goes on; the abandoned prompt is dropped
        await eng.generate(s, GREEDY)
        assert eng.stats()["sessions"] == 1
        await eng.shutdown()

    _run(main())


def test_bad_input_is_named_and_other_sessions_unaffected(model):
    async def main():
        eng = _engine(model, max_context=64)
        good = await eng.open([1, 2, 3])
        with pytest.raises(SessionError, match="outside"):
            await eng.open([1, 512])
        with pytest.raises(SessionError, match="at least one"):
            await eng.open([])
        with pytest.raises(SessionError, match="exceeds max_context 64"):
            await eng.open(list(range(65)))
        bad = await eng.open([4, 5])
        await eng.close(bad)
        with pytest.raises(SessionError, match="unknown or closed session"):
            await eng.append(bad, [1])
        with pytest.raises(SessionError, match="not a session"):
            await eng.generate("nope", GREEDY)
        with pytest.raises(ValueError, match="params must be SamplingParams"):
            await eng.generate(good, {"temperature": 0})
        with pytest.raises(SessionError, match="rollback position"):
            await eng.rollback(good, 9)
        task = asyncio.ensure_future(
            eng.generate(good, SamplingParams(temperature=0, max_new_tokens=50))
        )
        await asyncio.sleep(0.01)
        with pytest.raises(SessionError, match="busy"):
            await eng.fork(good, 2)
        g = await task
        assert len(g.token_ids) == 50
        g = await eng.generate(good, SamplingParams(temperature=0, max_new_tokens=50))
        assert len(g.token_ids) == 64 - 53 and g.finish_reason == "length"
        with pytest.raises(SessionError, match="no room to generate within max_context 64"):
            await eng.generate(good, GREEDY)
        with pytest.raises(ValueError, match="must have shape"):
            eng.load_weights({"embed.weight": torch.zeros(3, 3)}, 1)
        with pytest.raises(ValueError, match="unknown weight names"):
            eng.load_weights({"nope": torch.zeros(3)}, 1)
        assert eng.stats()["version"] == 0
        await eng.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            await eng.open([1])

    _run(main())


def test_operations_submitted_during_shutdown_are_all_answered(model):
    """Submitters racing shutdown: every operation is either run or refused with "shut down",
    none is left unanswered (an await on it would hang)."""
    import threading

    from policy.scheduler import Scheduler

    for _ in range(3):
        sched = Scheduler(
            model,
            max_batch=2,
            max_context=64,
            kv_budget_bytes=None,
            prefix_cache_bytes=0,
            prefix_block=16,
            token_budget=64,
            chunk=16,
            on_weight_update="recompute",
        )
        futures, go = [], threading.Event()

        def submit(futures=futures, sched=sched, go=go):
            go.wait()
            for _ in range(200):
                futures.append(sched.submit("open", tokens=[1, 2, 3]))

        threads = [threading.Thread(target=submit) for _ in range(3)]
        for t in threads:
            t.start()
        go.set()
        sched.shutdown()
        for t in threads:
            t.join()
        for fut in futures:
            exc = fut.exception(timeout=10)  # raises TimeoutError if never answered
            assert exc is None or "shut down" in str(exc)
