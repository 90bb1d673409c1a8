"""Long context on 2 CPU cores: block-sparse prefill and training against the dense reference path.

Model: the ``demo`` preset (random weights, FP8 KV cache) with max_position_embeddings raised to
131072. Every measurement runs in its own child process (so its peak RSS is its own) with
torch.set_num_threads(2); times are minima over ``--repeats`` (the machine is shared: a burst of
another process's load lands on one repeat, not on all). Rows:

- prefill 16K: ``V4Model.prefill`` of one 16,384-token sequence into an empty cache, block-sparse
  (cfg.attn_path="blocksparse") vs dense (attn_path="dense"), same run.
- prefill 64K / 128K: block-sparse, one run each; time and the child's peak RSS.
- split of the 64K prefill: indexer (queries, scoring, top-k), HCA layer attention (window + all
  visible entries), SWA and CSA attention (window + selected entries), compressors (main and
  indexer keys), the rest (projections, mHC, MoE, head), by timers wrapped around those calls.
- decode: one batch-1 decode step (minimum over 16 steps) after a prefill of 8K and of 128K.
- train: forward + backward of the loss (block-sparse) at 2K and 16K tokens, and the ratio.

Run: ``python bench/long_context.py [--quick] [--repeats 2]`` (about 20 minutes; ``--quick``
skips 128K and the dense 16K prefill). Writes bench/results/long_context.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K = 1024
MAX_POS = 128 * K


def _model(path: str):
    import torch

    from policy.config import V4Config
    from policy.model import V4Model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = V4Config.from_preset("demo", max_position_embeddings=MAX_POS, attn_path=path)
    return V4Model(cfg).eval()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _instrument() -> dict[str, float]:
    """Wrap the attention pieces with timers; returns the dict they add seconds to."""
    import policy.attention as attention
    from policy.compressor import Compressor
    from policy.indexer import Indexer

    spent: dict[str, float] = defaultdict(float)

    def timed(label, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[label] += time.perf_counter() - t0
            return out

        return run

    Indexer.queries = timed("indexer", Indexer.queries)
    attention.Attention._select_chunk = timed("indexer", attention.Attention._select_chunk)
    Compressor.extend = timed("compressors", Compressor.extend)
    core = attention.chunk_attention

    @functools.wraps(core)
    def chunk(qc, kvp, prev_ok, a, w, comp, *rest):
        before, t0 = spent["indexer"], time.perf_counter()
        out = core(qc, kvp, prev_ok, a, w, comp, *rest)
        own = time.perf_counter() - t0 - (spent["indexer"] - before)  # top-k runs inside
        kind = "hca" if comp is not None and comp.select is None else "window+selected"
        spent[f"attention {kind}"] += own
        return out

    attention.chunk_attention = chunk
    return spent


def child_prefill(s: int, path: str, repeats: int, decode_steps: int, split: bool) -> dict:
    import torch

    model = _model(path)
    spent = _instrument() if split else None
    ids = torch.randint(0, 512, (1, s + decode_steps))
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            cache = model.new_cache(1, s + decode_steps)
            if spent is not None:
                spent.clear()
            t0 = time.perf_counter()
            model.prefill(ids[:, :s], torch.tensor([s]), cache)
            best = min(best, time.perf_counter() - t0)
        split = None if spent is None else dict(spent)  # before the decode steps add to it
        steps = []
        for t in range(decode_steps):
            t0 = time.perf_counter()
            model.decode(ids[:, s + t], cache)
            steps.append(time.perf_counter() - t0)
    out = {"tokens": s, "path": path, "seconds": best, "peak_rss_mib": _rss_mib()}
    if steps:
        out["decode_step_ms"] = 1e3 * min(steps)
    if split is not None:
        out["split"] = split
    return out


def child_train(s: int, repeats: int) -> dict:
    import torch

    model = _model("blocksparse").train()
    ids = torch.randint(0, 512, (1, s))
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model.loss(ids).backward()
        best = min(best, time.perf_counter() - t0)
    return {"tokens": s, "seconds": best, "peak_rss_mib": _rss_mib()}


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {' '.join(args)}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the dense 16K prefill")
    ap.add_argument(
        "--long", type=int, nargs="+", default=[64, 128], help="long prefills, in K tokens"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_context.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, s, *rest = args.child
        if kind == "prefill":
            path, repeats, steps, split = rest
            out = child_prefill(int(s), path, int(repeats), int(steps), split == "split")
        else:
            out = child_train(int(s), int(rest[0]))
        print(json.dumps(out))
        return

    r = str(args.repeats)
    res: dict = {"machine": platform.machine(), "threads": 2, "repeats": args.repeats}
    res["prefill_16k"] = _run_child(["prefill", str(16 * K), "blocksparse", r, "0", "-"])
    if not args.quick:
        res["prefill_16k_dense"] = _run_child(["prefill", str(16 * K), "dense", "1", "0", "-"])
    for i, n in enumerate(args.long):  # the first is timed piece by piece; the last decodes
        steps = "16" if i == len(args.long) - 1 else "0"
        split = "split" if i == 0 else "-"
        res[f"prefill_{n}k"] = _run_child(["prefill", str(n * K), "blocksparse", "1", steps, split])
    res["decode_8k"] = _run_child(["prefill", str(8 * K), "blocksparse", "1", "16", "-"])
    res["train_2k"] = _run_child(["train", str(2 * K), r])
    res["train_16k"] = _run_child(["train", str(16 * K), r])
    _report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


def _report(res: dict) -> None:
    rows = []
    bs = res["prefill_16k"]["seconds"]
    if "prefill_16k_dense" in res:
        dense = res["prefill_16k_dense"]["seconds"]
        rows.append(
            (
                "prefill 16K: dense / block-sparse",
                f"{dense:.1f} s / {bs:.1f} s",
                f"{dense / bs:.1f}x",
            )
        )
    longs = [k for k in res if k.startswith("prefill_") and "_16k" not in k]
    for key in longs:
        p = res[key]
        rss = f"peak RSS {p['peak_rss_mib'] / 1024:.2f} GiB"
        rows.append((f"prefill {p['tokens'] // K}K", f"{p['seconds']:.1f} s", rss))
    first, last = res[longs[0]], res[longs[-1]]
    split, total = first["split"], first["seconds"]
    rest = total - sum(split.values())
    parts = ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in sorted(split.items()))
    note = f"rest {rest:.1f} s ({100 * rest / total:.0f}%)"
    rows.append((f"split of the {first['tokens'] // K}K prefill", parts, note))
    d8, dn = res["decode_8k"]["decode_step_ms"], last["decode_step_ms"]
    rows.append(
        (
            f"decode step {last['tokens'] // K}K / 8K",
            f"{dn:.1f} ms / {d8:.1f} ms",
            f"{dn / d8:.2f}x",
        )
    )
    t2, t16 = res["train_2k"]["seconds"], res["train_16k"]["seconds"]
    rows.append(
        ("train step 16K / 2K", f"{t16:.1f} s / {t2:.2f} s", f"{t16 / t2:.1f}x (tokens x8)")
    )
    print("\n| measure | value | ratio / note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
