"""Decode throughput of the cached Engine vs re-running the full forward every step.

Model: the ``demo`` preset (random weights; throughput does not depend on them), FP8 KV cache.
For each batch size B: B prompts of ``--prompt-len`` tokens, ``--new-tokens`` generated tokens
each (no stop token, temperature 1, seeded).

- engine: the Engine's loop (prefill, then sample + decode over the KV cache per token), every
  step timed, step-wise minimum over ``--repeats`` runs; ``Engine.generate`` end to end (one
  run, wall time) is shown beside it. tokens/s = B * new_tokens / seconds.
- full forward: the same model generating by calling ``model(ids)`` on the whole sequence at
  every step. Its cost grows with the length, so by default it is timed at ``--points`` evenly
  spaced steps (each a real forward at that length) and the total over all steps is the
  sum of those timings linearly interpolated over every step; ``--exact-baseline`` runs every step instead.

Run: ``make bench`` (or ``python bench/engine.py [--quick]``). Writes bench/results/engine.json.
Timings on a shared CPU are noisy: both sides take per-step minima over ``--repeats`` runs, so a
burst of load elsewhere does not land on one side only. The speedup compares those two.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.config import V4Config  # noqa: E402
from policy.engine import Engine, SamplingParams, sample  # noqa: E402
from policy.model import V4Model  # noqa: E402


def time_engine(model, batch, prompt_len, new_tokens, repeats):
    """Best end-to-end wall time of ``Engine.generate`` (prefill + every decode step)."""
    eng = Engine(model, max_batch=batch, max_context=prompt_len + new_tokens)
    prompts = [
        [(7 * i + j) % model.cfg.vocab_size for j in range(prompt_len)] for i in range(batch)
    ]
    params = SamplingParams(max_new_tokens=new_tokens, seed=0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gens = eng.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
        assert all(len(g.token_ids) == new_tokens for g in gens)
    return best


@torch.inference_mode()
def time_engine_steps(model, batch, prompt_len, new_tokens, repeats):
    """The Engine's loop (prefill, then sample + decode per token) with every step timed; the
    step-wise minimum over ``repeats`` runs, summed: robust to bursts of load on a shared CPU."""
    params = SamplingParams(seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len))
    lengths = torch.full((batch,), prompt_len)
    runs = []
    for _ in range(repeats):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        cache = model.new_cache(batch, prompt_len + new_tokens)
        times = []
        t0 = time.perf_counter()
        logits = model.prefill(ids, lengths, cache)
        for k in range(new_tokens):
            tok, _ = sample(logits, params, gens)
            if k < new_tokens - 1:
                logits = model.decode(tok, cache)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        runs.append(times)
    return float(np.min(np.array(runs), axis=0).sum())


@torch.no_grad()
def time_full_forward(model, batch, prompt_len, new_tokens, points, exact, repeats):
    """Seconds to generate new_tokens per row by re-running the full forward each step
    (each timed step: the minimum over ``repeats``)."""
    params = SamplingParams(seed=0)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    ids = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len + new_tokens))

    def step(k):  # the forward + sampling of step k (sequence length prompt_len + k)
        t0 = time.perf_counter()
        logits = model(ids[:, : prompt_len + k])[:, -1]
        sample(logits, params, gens)
        return time.perf_counter() - t0

    if exact:
        return sum(min(step(k) for _ in range(repeats)) for k in range(new_tokens)), "every step"
    ks = sorted({round(i * (new_tokens - 1) / (points - 1)) for i in range(points)})
    ts = [min(step(k) for _ in range(repeats)) for k in ks]
    # linear interpolation between timed steps, summed over every step 0..new_tokens-1
    total = float(np.interp(np.arange(new_tokens), ks, ts).sum())
    return total, f"{len(ks)} timed steps, interpolated over {new_tokens}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 new tokens, batches 1 and 8")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--points", type=int, default=9, help="timed steps of the baseline")
    ap.add_argument("--exact-baseline", action="store_true", help="time every baseline step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.batches = 128, [1, 8]

    torch.manual_seed(0)
    cfg = V4Config.from_preset("demo")
    model = V4Model(cfg).eval()
    rows = []
    print(
        f"demo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"kv {cfg.kv_dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'batch':>5} {'engine tok/s':>13} {'(end-to-end)':>13} {'full-fwd tok/s':>15} "
        f"{'speedup':>8}"
    )
    for b in args.batches:
        te2e = time_engine(model, b, args.prompt_len, args.new_tokens, 1)
        te = time_engine_steps(model, b, args.prompt_len, args.new_tokens, args.repeats)
        tf, how = time_full_forward(
            model,
            b,
            args.prompt_len,
            args.new_tokens,
            args.points,
            args.exact_baseline,
            args.repeats,
        )
        n = b * args.new_tokens
        row = {
            "batch": b,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "engine_s": te,
            "engine_tok_s": n / te,
            "engine_end_to_end_s": te2e,
            "engine_end_to_end_tok_s": n / te2e,
            "full_forward_s": tf,
            "full_forward_tok_s": n / tf,
            "speedup": tf / te,
            "full_forward_method": how,
        }
        rows.append(row)
        print(f"{b:>5} {n / te:>13.1f} {n / te2e:>13.1f} {n / tf:>15.1f} {tf / te:>7.1f}x")
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
