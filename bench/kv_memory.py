"""KV-cache memory: bytes/token and GiB per sequence at 128K and 1M tokens.

Rows: V3.2-style MLA (FP8 latent + FP8 indexer key), BF16 GQA-8 at the depth of Flash and of
Pro, V4-Flash and V4-Pro. V4 figures come from two sources that must agree: the layout formula
(policy.kv_layout.kv_cache_bytes) and the bytes a real ``KVCache`` allocates, built on the meta
device so that no memory is touched. The ``demo`` model's cache is then allocated for real at a
few context lengths and compared with the formula.

Run: ``make bench`` (or ``python bench/kv_memory.py``). Writes bench/results/kv_memory.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy.config import V4Config  # noqa: E402
from policy.kv_cache import KVCache  # noqa: E402
from policy.kv_layout import (  # noqa: E402
    KVLayout,
    gqa_bf16_bytes,
    kv_cache_bytes,
    mla_v32_bytes,
)

GIB = 2**30
CONTEXTS = {"128K": 2**17, "1M": 2**20}
DEMO_CONTEXTS = (256, 1024, 4096, 16384)


def big_rows() -> list[dict]:
    rows = []
    flash, pro = V4Config.from_preset("flash"), V4Config.from_preset("pro")
    for label, t in CONTEXTS.items():
        v32 = mla_v32_bytes(t)
        v32_bf16 = mla_v32_bytes(t, entry_bytes=1152, index_bytes=256)
        entries = [
            ("V3.2 MLA (FP8 + FP8 indexer)", v32, None),
            ("V3.2 MLA, BF16", v32_bf16, None),
            ("GQA-8 BF16, 43 layers", gqa_bf16_bytes(t, 43), None),
            ("GQA-8 BF16, 61 layers", gqa_bf16_bytes(t, 61), None),
        ]
        for name, cfg in (("V4-Flash", flash), ("V4-Pro", pro)):
            formula = kv_cache_bytes(cfg, t)
            allocated = KVCache(cfg, 1, t, device="meta").nbytes()
            entries.append((f"{name} (FP8 + FP4 indexer)", formula, allocated))
            bf16 = cfg.replace(kv_dtype="bfloat16")
            entries.append((f"{name}, BF16 cache", kv_cache_bytes(bf16, t), None))
        for name, nbytes, allocated in entries:
            rows.append(
                {
                    "context": label,
                    "tokens": t,
                    "cache": name,
                    "bytes": nbytes,
                    "allocated_bytes": allocated,
                    "bytes_per_token": nbytes / t,
                    "gib": nbytes / GIB,
                    # like with like: BF16 rows against V3.2 in BF16
                    "vs_v32": nbytes / (v32_bf16 if "BF16" in name else v32),
                }
            )
    return rows


def demo_rows() -> list[dict]:
    rows = []
    for kv_dtype in ("fp8", "bfloat16"):
        cfg = V4Config.from_preset("demo", kv_dtype=kv_dtype)
        for t in DEMO_CONTEXTS:
            t0 = time.perf_counter()
            cache = KVCache(cfg, 1, t)
            alloc_s = time.perf_counter() - t0
            allocated = cache.nbytes()
            rows.append(
                {
                    "kv_dtype": kv_dtype,
                    "tokens": t,
                    "allocated_bytes": allocated,
                    "formula_bytes": kv_cache_bytes(cfg, t),
                    "bytes_per_token": allocated / t,
                    "alloc_seconds": alloc_s,
                }
            )
    return rows


def main() -> None:
    flash = KVLayout.from_config(V4Config.from_preset("flash"))
    pro = KVLayout.from_config(V4Config.from_preset("pro"))
    print(
        f"entry bytes: main {flash.main_entry_bytes}, indexer {flash.index_entry_bytes}; "
        f"amortised B/token: Flash {flash.amortised_bytes_per_token():,.2f}, "
        f"Pro {pro.amortised_bytes_per_token():,.2f}"
    )
    big = big_rows()
    print("vs V3.2 compares like with like: rows marked BF16 against V3.2 MLA in BF16.")
    print(
        f"\n{'cache':34} {'ctx':>5} {'B/token':>10} {'GiB':>8} {'vs V3.2':>8}  allocated==formula"
    )
    for r in big:
        same = "" if r["allocated_bytes"] is None else str(r["allocated_bytes"] == r["bytes"])
        print(
            f"{r['cache']:34} {r['context']:>5} {r['bytes_per_token']:>10,.1f} {r['gib']:>8.2f} "
            f"{100 * r['vs_v32']:>7.2f}%  {same}"
        )
    demo = demo_rows()
    print(
        f"\ndemo model ({'kv_dtype':8}) {'tokens':>7} {'allocated B':>12} {'formula B':>12} "
        f"{'B/token':>9}"
    )
    for r in demo:
        print(
            f"demo model ({r['kv_dtype']:8}) {r['tokens']:>7} {r['allocated_bytes']:>12,} "
            f"{r['formula_bytes']:>12,} {r['bytes_per_token']:>9.1f}"
        )
    ok = all(r["allocated_bytes"] == r["formula_bytes"] for r in demo) and all(
        r["allocated_bytes"] in (None, r["bytes"]) for r in big
    )
    print(f"\nallocation matches the formula everywhere: {ok}")
    out = ROOT / "bench" / "results" / "kv_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": big, "demo": demo, "allocation_matches": ok}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
