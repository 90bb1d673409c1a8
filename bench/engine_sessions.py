"""Engine sessions for agents (extends engine.py): continuation, forks, continuous batching and the
decode step, each against its baseline in the same run, as ratios.

Model: the ``demo`` preset (random weights, FP8 KV cache); sampling at temperature 1 with no
stop token, so every reply has its full length. Rows:

- agent: an 8-turn conversation (600-token system prompt, 64-token tool results, 48-token
  replies). Session continuation (open once; per turn generate, append the tool result) vs
  re-prefilling the whole history every turn (a new session per turn, prefix cache off).
- group: a GRPO group, G=8, 1K-token prompt, 64 new tokens each. fork after one prefill vs 8
  independent requests (prefix cache off), both decoded as one batch of 8.
- loops: 32 concurrent agent loops (3 turns, replies of 16-64 tokens, a 5-50 ms tool pause
  between turns). Continuous batching (every loop on its own) vs static batches (all loops in
  lockstep: a turn starts when every member finished the previous one and its pause, and every
  row is decoded until the longest reply of the turn is done). tokens/s counts the planned
  reply tokens on both sides.
- decode: one batch-1 decode step at 512 tokens of context vs one full forward over 512 tokens.

Also reported: torch ops per decode step, where its time goes (profiler, top ops), and the KV
bytes in use. Run: ``python bench/engine_sessions.py [--quick]``; writes
bench/results/engine_sessions.json. Each side is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.config import V4Config  # noqa: E402
from policy.engine import AsyncEngine, SamplingParams  # noqa: E402
from policy.model import V4Model  # noqa: E402


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(512) for _ in range(n)]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        best = min(best, fn())
    return best


def _timed(model, coro_fn, **engine_kw) -> float:
    async def main():
        eng = AsyncEngine(model, **engine_kw)
        t0 = time.perf_counter()
        await coro_fn(eng)
        dt = time.perf_counter() - t0
        await eng.shutdown()
        return dt

    return asyncio.run(main())


# ---------------------------------------------------------------------- agent conversation
def agent_row(model, turns, system, tool, reply, repeats):
    rng = random.Random(0)
    prompt = _ids(rng, system)
    tools = [_ids(rng, tool) for _ in range(turns)]
    params = SamplingParams(max_new_tokens=reply, seed=0)

    async def session(eng):
        s = await eng.open(prompt)
        for t in tools:
            await eng.generate(s, params)
            await eng.append(s, t)

    async def reprefill(eng):
        history = list(prompt)
        for t in tools:
            s = await eng.open(history)
            g = await eng.generate(s, params)
            await eng.close(s)
            history += g.token_ids + t

    kw = dict(max_batch=1, max_context=4096, prefix_cache_bytes=0)
    a = _best(lambda: _timed(model, session, **kw), repeats)
    b = _best(lambda: _timed(model, reprefill, **kw), repeats)
    return {"measure": "8-turn agent: continuation vs re-prefill", "new_s": a, "base_s": b}


# ---------------------------------------------------------------------- GRPO group
def group_row(model, g, prompt_len, new, repeats):
    prompt = _ids(random.Random(1), prompt_len)
    params = [SamplingParams(max_new_tokens=new, seed=i) for i in range(g)]

    async def fork(eng):
        s = await eng.open(prompt)
        group = await eng.fork(s, g)
        await asyncio.gather(*(eng.generate(f, p) for f, p in zip(group, params, strict=True)))

    async def independent(eng):
        async def one(p):
            s = await eng.open(prompt)
            await eng.generate(s, p)

        await asyncio.gather(*(one(p) for p in params))

    kw = dict(max_batch=g, max_context=2048, prefix_cache_bytes=0, token_budget=1024)
    a = _best(lambda: _timed(model, fork, **kw), repeats)
    b = _best(lambda: _timed(model, independent, **kw), repeats)
    return {"measure": f"GRPO group G={g}: fork vs independent", "new_s": a, "base_s": b}


# ---------------------------------------------------------------------- concurrent loops
def loops_row(model, n, turns, repeats):
    rng = random.Random(2)
    prompts = [_ids(rng, rng.randrange(32, 128)) for _ in range(n)]
    plan = [
        [(rng.randrange(16, 65), rng.uniform(0.005, 0.05), _ids(rng, 16)) for _ in range(turns)]
        for _ in range(n)
    ]
    tokens = sum(k for p in plan for k, _, _ in p)

    async def continuous(eng):
        async def loop(i):
            s = await eng.open(prompts[i])
            for k, pause, tool in plan[i]:
                await eng.generate(s, SamplingParams(max_new_tokens=k, seed=i))
                await asyncio.sleep(pause)
                await eng.append(s, tool)

        await asyncio.gather(*(loop(i) for i in range(n)))

    async def static(eng):
        sessions = await asyncio.gather(*(eng.open(p) for p in prompts))
        for t in range(turns):  # a static batch decodes every row until its longest is done
            longest = max(plan[i][t][0] for i in range(n))
            await asyncio.gather(
                *(
                    eng.generate(s, SamplingParams(max_new_tokens=longest, seed=i))
                    for i, s in enumerate(sessions)
                )
            )
            await asyncio.sleep(max(plan[i][t][1] for i in range(n)))  # the slowest tool
            await asyncio.gather(*(eng.append(s, plan[i][t][2]) for i, s in enumerate(sessions)))

    kw = dict(max_batch=n, max_context=1024)
    a = _best(lambda: _timed(model, continuous, **kw), repeats)
    b = _best(lambda: _timed(model, static, **kw), repeats)
    return {
        "measure": f"{n} agent loops: continuous vs static batches (tokens/s)",
        "new_s": a,
        "base_s": b,
        "tokens": tokens,
    }


# ---------------------------------------------------------------------- decode step
@torch.inference_mode()
def decode_row(model, ctx, repeats):
    ids = torch.randint(0, 512, (1, ctx))
    cache = model.new_cache(1, ctx + 64)
    model.prefill(ids, torch.tensor([ctx]), cache)
    tok = torch.tensor([3])

    def step():
        cache.pos.fill_(ctx)
        t0 = time.perf_counter()
        model.decode(tok, cache)
        return time.perf_counter() - t0

    def full():
        t0 = time.perf_counter()
        model(ids)
        return time.perf_counter() - t0

    step()
    a = min(_best(step, 1) for _ in range(10 * repeats))
    b = _best(full, repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cache.pos.fill_(ctx)
        model.decode(tok, cache)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    top = sorted(
        (e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total
    )[:6]
    total = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) or 1
    where = {e.key: round(e.self_cpu_time_total / total, 3) for e in top}
    return {
        "measure": f"batch-1 decode step vs full forward at {ctx} tokens",
        "new_s": a,
        "base_s": b,
        "ops_per_step": ops,
        "time_share": where,
        "kv_bytes": cache.nbytes(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer turns, loops and repeats")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_sessions.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = V4Config.from_preset("demo")
    model = V4Model(cfg).eval()
    reps = 1 if args.quick else args.repeats
    rows = [
        agent_row(model, 4 if args.quick else 8, 600, 64, 48, reps),
        group_row(model, 8, 1024, 64, reps),
        loops_row(model, 16 if args.quick else 32, 2 if args.quick else 3, reps),
        decode_row(model, 512, reps),
    ]
    targets = [4.0, 3.0, 1.5, 10.0]
    print(f"demo model, kv {cfg.kv_dtype}, {torch.get_num_threads()} threads")
    print(f"{'measure':<58} {'new s':>8} {'baseline s':>11} {'ratio':>7} {'target':>7}")
    for row, target in zip(rows, targets, strict=True):
        row["ratio"] = row["base_s"] / row["new_s"]
        row["target"] = target
        print(
            f"{row['measure']:<58} {row['new_s']:>8.3f} {row['base_s']:>11.3f} "
            f"{row['ratio']:>6.1f}x {target:>6.1f}x"
        )
    d = rows[3]
    print(f"decode step: {d['ops_per_step']} torch ops, KV bytes {d['kv_bytes']:,}")
    print("decode step time share:", ", ".join(f"{k} {v:.0%}" for k, v in d["time_share"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": "demo",
        "kv_dtype": cfg.kv_dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "quick": args.quick,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
