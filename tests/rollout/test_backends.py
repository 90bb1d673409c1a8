"""rollout.backends: ScriptedBackend replays texts like an engine would sample them; EngineBackend
drives the real tiny policy through policy.AsyncEngine sessions."""

from __future__ import annotations

import asyncio

import pytest

import policy.engine
from policy.dsml import EOS, THINK_END
from policy.engine import Generation, SamplingParams
from policy.tokenizer import ByteTokenizer
from rollout.backends import Backend, EngineBackend, ScriptedBackend

TOK = ByteTokenizer()
PARAMS = SamplingParams(max_new_tokens=64, stop_token_ids=(TOK.eos_id,))


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------------
# ScriptedBackend
# ------------------------------------------------------------------------------------------------


def test_scripted_replays_texts_turn_by_turn_and_appends_eos():
    backend = ScriptedBackend(["a</think>one", f"b{THINK_END}two{EOS}"], TOK, version=7)

    async def go():
        s = await backend.open([1, 2, 3])
        g0 = await backend.generate(s, PARAMS)
        await backend.append(s, [9, 9])
        g1 = await backend.generate(s, PARAMS)
        return s, g0, g1

    s, g0, g1 = run(go())
    assert isinstance(g0, Generation)
    assert g0.token_ids == [*TOK.encode("a</think>one"), TOK.eos_id]
    assert g1.token_ids == TOK.encode(f"b{THINK_END}two{EOS}")  # EOS present: not doubled
    assert g1.token_ids.count(TOK.eos_id) == 1
    for g in (g0, g1):
        assert g.finish_reason == "stop"
        assert g.logprobs == [0.0] * len(g.token_ids)
        assert g.version == 7
    assert s.tokens == [1, 2, 3, *g0.token_ids, 9, 9, *g1.token_ids]
    assert s.length == len(s.tokens)
    assert [(t.turn, t.token_ids) for t in backend.transcript] == [
        (0, g0.token_ids),
        (1, g1.token_ids),
    ]
    assert backend.transcript[1].context_ids == [1, 2, 3, *g0.token_ids, 9, 9]


def test_scripted_stops_at_first_stop_token_and_cuts_at_max_new_tokens():
    backend = ScriptedBackend([f"x{EOS}after", "abcdefghij"], TOK)

    async def go():
        s = await backend.open([1])
        g0 = await backend.generate(s, PARAMS)
        g1 = await backend.generate(s, SamplingParams(max_new_tokens=4))
        return g0, g1

    g0, g1 = run(go())
    assert g0.token_ids == [ord("x"), TOK.eos_id] and g0.finish_reason == "stop"
    assert g1.token_ids == list(b"abcd") and g1.finish_reason == "length"


def test_scripted_callable_sees_decoded_context_and_turn_and_may_be_async():
    seen = []

    async def script(context: str, turn: int) -> str:
        seen.append((context, turn))
        await asyncio.sleep(0)
        return f"turn {turn}"

    backend = ScriptedBackend(script, TOK)

    async def go():
        s = await backend.open(TOK.encode("hello"))
        await backend.generate(s, PARAMS)
        await backend.generate(s, PARAMS)

    run(go())
    assert seen == [("hello", 0), (f"helloturn 0{EOS}", 1)]


def test_scripted_fork_rollback_close():
    backend = ScriptedBackend(["first", "second", "third"], TOK)

    async def go():
        s = await backend.open([5, 6])
        g = await backend.generate(s, PARAMS)
        a, b = await backend.fork(s, 2)
        assert a.tokens == b.tokens == s.tokens and a.id != b.id != s.id
        ga = await backend.generate(a, PARAMS)  # a fork continues the parent's turn count
        assert ga.token_ids == [*TOK.encode("second"), TOK.eos_id]
        assert b.tokens == [5, 6, *g.token_ids]  # forks are independent
        await backend.rollback(a, 2)
        assert a.tokens == [5, 6]
        with pytest.raises(ValueError, match=r"position must be in \[1, 2\], got 3"):
            await backend.rollback(a, 3)
        await backend.close(b)
        with pytest.raises(ValueError, match="is not an open session"):
            await backend.generate(b, PARAMS)
        with pytest.raises(ValueError, match="is not an open session"):
            await backend.close(b)

    run(go())


def test_scripted_script_exhausted_and_bad_input_name_the_value():
    backend = ScriptedBackend(["only"], TOK)

    async def go():
        s = await backend.open([1])
        await backend.generate(s, PARAMS)
        with pytest.raises(ValueError, match="no completion for turn 1"):
            await backend.generate(s, PARAMS)
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            await backend.open([])
        with pytest.raises(ValueError, match=r"not token ids: \[-1\]"):
            await backend.append(s, [-1])

    run(go())
    with pytest.raises(ValueError, match="list of texts or a callable, got 'abc'"):
        ScriptedBackend("abc", TOK)
    with pytest.raises(ValueError, match=r"script\[1\] must be a str, got 3"):
        ScriptedBackend(["a", 3], TOK)
    with pytest.raises(ValueError, match="max_context must be an int >= 1"):
        ScriptedBackend(["a"], TOK, max_context=0)


def test_scripted_max_context_is_enforced():
    backend = ScriptedBackend(["abc"], TOK, max_context=5)

    async def go():
        with pytest.raises(ValueError, match="6 prompt tokens exceed max_context 5"):
            await backend.open([1] * 6)
        s = await backend.open([1, 2])
        with pytest.raises(ValueError, match="exceed max_context 5"):
            await backend.generate(s, PARAMS)  # 'abc' + EOS = 4 tokens

    run(go())


# ------------------------------------------------------------------------------------------------
# EngineBackend
# ------------------------------------------------------------------------------------------------


def test_engine_backend_rejects_what_is_not_an_engine():
    with pytest.raises(ValueError, match=r"engine must be a policy\.AsyncEngine"):
        EngineBackend(policy.engine.SamplingParams())
    assert issubclass(EngineBackend, Backend) and issubclass(ScriptedBackend, Backend)


@pytest.fixture(scope="module")
def tiny_engine():
    import torch

    from policy import V4Config, V4Model

    torch.manual_seed(0)
    model = V4Model(V4Config.from_preset("tiny")).eval()
    return model, policy.engine.AsyncEngine


def test_engine_backend_sessions_with_the_tiny_policy(tiny_engine):
    model, async_engine = tiny_engine
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompt = TOK.encode_chat([{"role": "user", "content": "hi"}])

    async def go():
        engine = async_engine(model, max_batch=4, max_context=256)
        backend = EngineBackend(engine)
        try:
            s = await backend.open(prompt)
            g0 = await backend.generate(s, greedy)
            await backend.append(s, [TOK.eos_id])
            forks = await backend.fork(s, 2)
            g1 = [await backend.generate(f, greedy) for f in forks]
            await backend.rollback(forks[1], len(prompt))
            g2 = await backend.generate(forks[1], greedy)
            for sess in (s, *forks):
                await backend.close(sess)
            return backend, s, g0, g1, g2
        finally:
            await engine.shutdown()

    backend, s, g0, g1, g2 = run(go())
    assert backend.max_context == 256
    assert 1 <= len(g0.token_ids) <= 6 and len(g0.logprobs) == len(g0.token_ids)
    assert all(lp <= 0.0 for lp in g0.logprobs) and isinstance(g0.version, int)
    assert g1[0].token_ids == g1[1].token_ids  # greedy forks of one context agree
    assert g2.token_ids == g0.token_ids  # rolled back to the prompt: the same greedy turn
    assert s.length == len(prompt) + len(g0.token_ids) + 1
