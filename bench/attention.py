"""Attention cost of one decode step against context length: CSA and HCA layers vs dense attention.

CPU table: one layer of the ``demo`` preset (H = 4 heads of c = 128, window W = 32; CSA m = 4,
indexer 4 heads x 128, top-k 16; HCA m' = 32), FP8 KV cache, random weights, ``--batch`` rows
(1 and 8 by default) whose caches each hold n = 8K / 32K / 128K tokens (ring, compressed
entries and indexer keys filled with random entries; filling is not timed), plus one row at
``flash`` widths. Measured per step, minimum over ``--repeats`` rounds after a warm-up:

- dense: one query per row against all n keys with the sink, the faster of the project's
  dense core (``policy.kernels.sparse_attention``, all keys allowed) and a plain two-matmul
  version; the keys are an fp32 [n, c] tensor per row, the format the V4 decode reads (the
  cache's decode mirror).
- CSA / HCA attention: what the layer's cached decode runs after its projections
  (``Attention._decode_sources`` + ``sources_attention``) on the fastest CPU path: ring write,
  compressor step(s), indexer queries, the indexer's scores over the n/m stored keys fused with
  the top-k (CSA: attn_impl "cpu", the native kernel of ``policy.kernels.cpu_indexer``),
  gathering the chosen entries (CSA; HCA reads all visible ones in place), one softmax with
  the sink. "CSA, torch indexer" is the same step with attn_impl "torch" (torch matmuls over
  the fp32 mirror of the indexer keys, then ``topk``).
- CSA / HCA layer: the whole ``Attention.forward`` decode step (projections included).
- peak: the step's peak memory above the process before it (VmHWM reset through
  /proc/self/clear_refs, malloc's mmap threshold fixed at 64 KiB so every temporary above it is
  fresh pages), in MiB.

Times are CPU seconds of the calling thread (``time.thread_time``) with one torch thread, so
all the work of a step runs on that thread and the figure leaves out the time the process
waits for a core on a shared machine. Each round runs every step in turn (twice, timing the
second call, so its caches are warm from the first), so all of them go through the same slow
and fast spells of the machine. Each context runs in its own child
process. The Triton kernels are not timed here: on a CPU they only run under the interpreter
(~0.2 s per launch).

Analytic table: per-token attention FLOPs at 1M tokens of ``flash`` and ``pro`` against
DeepSeek-V3.2, with the accounting of V4_SPEC.md §8.3 from the configs (activated parameters
counted on a meta-device model), next to the published 10% / 27%.

Run: ``python bench/attention.py [--contexts 8 32 128] [--batch 1 8] [--repeats 20]
[--flash-widths 32 128]`` (about 3 minutes). Writes bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K = 1024


# --------------------------------------------------------------------------- child: one context
def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def _peak(fn) -> float:
    """Peak bytes of one call of ``fn`` (after 3 warm-up calls) above the process before it."""
    for _ in range(3):
        fn()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _timed_together(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum CPU seconds of the calling thread per function over ``repeats`` rounds, each
    round calling every function in turn, twice, and timing the second call (its caches warm
    from the first, not from whatever ran before). With one torch thread all the work runs on
    this thread, so its CPU time does not count the time the process waits for a core on a
    shared machine; interleaving puts every function through the same slow and fast spells of
    the machine, so the ratios of one run compare like with like."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            t0 = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - t0)
    return best


def _layer(cfg, kind: str):
    import torch

    from policy.attention import Attention

    layer_id = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == kind)
    attn = Attention(cfg, layer_id).eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("ape") or name == "attn_sink":
                p.zero_()
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return attn


def _filled_cache(attn, n: int, batch: int):
    """A LayerCache of ``batch`` rows, each holding n tokens of its own random entries (ring,
    compressed, indexer)."""
    import torch

    from policy.kv_cache import LayerCache

    cfg = attn.cfg
    cache = LayerCache(cfg, attn.layer_id, batch, n + 64, "cpu")
    g = torch.Generator().manual_seed(0)

    def fill(store, count, dim, step=8192):
        for row in range(batch):
            for a in range(0, count, step):
                e = min(count, a + step)
                slots = torch.arange(a, e)
                rows = torch.full_like(slots, row)
                store.write(rows, slots, torch.randn(e - a, dim, generator=g))

    fill(cache.window, cfg.sliding_window, cfg.head_dim)
    if attn.kind != "swa":
        fill(cache.comp, n // attn.ratio, cfg.head_dim)
    if attn.kind == "csa":
        fill(cache.index, n // attn.ratio, cfg.index_head_dim)
    return cache


def _dense_lean(q, keys, sink, scale):
    """q [B, H, c], keys [B, n, c] -> [B, H, c]: softmax with the sink over all keys, two
    matmuls."""
    import torch

    logits = torch.bmm(keys, q.transpose(1, 2)) * scale  # [B, n, H]
    mx = torch.maximum(logits.amax(dim=1), sink)  # [B, H]
    p = torch.exp(logits - mx[:, None])
    denom = p.sum(dim=1) + torch.exp(sink - mx)
    return torch.bmm(p.transpose(1, 2), keys) / denom[..., None]


def _dense(n: int, h: int, c: int, batch: int) -> dict:
    """The dense baseline at n keys per row, two ways: the project's core and a lean version
    (the report takes the faster)."""
    import torch

    from policy.kernels import sparse_attention

    keys, q, sink = torch.randn(batch, n, c), torch.randn(batch, h, c), torch.zeros(h)
    allowed = torch.ones(batch, 1, n, dtype=torch.bool)
    scale = c**-0.5
    return {
        "dense_core": lambda: sparse_attention(q[:, None], keys, allowed, sink, scale),
        "dense_lean": lambda: _dense_lean(q, keys, sink, scale),
    }


def _compressed(cfg, kind: str, n: int, batch: int) -> dict:
    """The decode-step attention and whole-layer steps of one ``kind`` layer at n cached tokens
    per row. CSA runs with attn_impl "cpu" (the fastest CPU path: the native indexer kernel on
    the stored keys) and, for comparison, "torch" (the indexer as torch ops on the fp32 mirror
    a "torch" cache keeps, added to this cache)."""
    import torch

    from policy.kernels import sources_attention
    from policy.rope import apply_rope, rope_tables

    impl = "cpu" if kind == "csa" else cfg.attn_impl
    attn = _layer(cfg.replace(attn_impl=impl), kind)
    cache = _filled_cache(attn, n, batch)
    x = torch.randn(batch, 1, cfg.hidden_size)
    pos = torch.full((batch, 1), n)
    rope = rope_tables(pos, attn.inv_freq, x.device)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), pos, attn.inv_freq, tables=rope)
    qr, q = attn._queries(x, pos, rope)

    fast, torch_cfg = attn.cfg, cfg.replace(attn_impl="torch")

    def step(use=fast):  # everything the decode runs between its projections
        attn.cfg = use
        sources = attn._decode_sources(x, qr, kv, pos, cache, rope)
        return sources_attention(q, sources, attn.attn_sink, attn.softmax_scale)

    def layer():  # the whole decode step of the layer
        attn.cfg = fast
        return attn(x, pos, cache)

    fns = {f"{kind}_attn": step, f"{kind}_layer": layer}
    if kind == "csa":
        cache.index.mirror = cache.index.decode(cache.index.data)
        fns["csa_torch_attn"] = lambda: step(torch_cfg)
    return fns


def child(n: int, repeats: int, preset: str, batch: int) -> dict:
    import torch

    from policy.config import V4Config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = V4Config.from_preset(preset, max_position_embeddings=n + 64, dtype="float32")
    out: dict = {"tokens": n, "preset": preset, "batch": batch}
    with torch.inference_mode():
        fns = _dense(n, cfg.num_attention_heads, cfg.head_dim, batch)
        for kind in ("csa", "hca"):
            fns.update(_compressed(cfg, kind, n, batch))
        peaks = {name: _peak(fn) / 2**20 for name, fn in fns.items()}
        best = _timed_together(fns, repeats)
    for name, t in best.items():
        out[f"{name}_ms"] = 1e3 * t
        out[f"{name}_peak_mib"] = peaks[name]
    lean = best["dense_lean"] <= best["dense_core"]
    out["dense_ms"] = out["dense_lean_ms" if lean else "dense_core_ms"]
    out["dense_peak_mib"] = peaks["dense_lean" if lean else "dense_core"]
    return out


# --------------------------------------------------------------------------- analytic FLOPs
V32 = {"layers": 61, "heads": 128, "keys": 2048, "c_qk": 576, "c_v": 512, "activated": 37e9}
V32_INDEX = {"heads": 64, "dim": 128}


def activated_params(cfg) -> float:
    """Parameters one token multiplies by in the main layers and the head (no embedding table,
    no MTP): every weight except the routed experts not chosen."""
    import torch

    from policy.model import V4Model

    with torch.device("meta"):
        model = V4Model(cfg)
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("mtp.", "embed.")):
            continue
        n = p.numel()
        if ".ffn.experts." in name:
            n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
        total += n
    return float(total)


def flops_per_token(cfg, t: int) -> dict:
    """V4_SPEC.md §8.3 accounting for one decoded token at context t (main layers)."""
    h, c = cfg.num_attention_heads, cfg.head_dim
    attn = index = 0.0
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.layer_kind(i), cfg.compress_ratios[i]
        w = cfg.sliding_window
        keys = {"swa": w, "csa": cfg.index_topk + w, "hca": t // max(m, 1) + w}[kind]
        attn += 2 * h * keys * (c + c)
        if kind == "csa":
            index += 2 * cfg.index_n_heads * cfg.index_head_dim * (t // m)
    linear = 2 * activated_params(cfg)
    return {"linear": linear, "attention": attn, "indexer": index}


def v32_flops(t: int) -> dict:
    attn = V32["layers"] * 2 * V32["heads"] * V32["keys"] * (V32["c_qk"] + V32["c_v"])
    index = V32["layers"] * 2 * V32_INDEX["heads"] * V32_INDEX["dim"] * t
    return {"linear": 2 * V32["activated"], "attention": attn, "indexer": index}


def fp8_equivalent(f: dict, index_weight: float) -> float:
    """BF16 attention counts 2x, linear (FP8) 1x, the indexer ``index_weight`` (V3.2 FP8: 1,
    V4 FP4: 0.5): the weighting §8.3 found to reproduce the published figures."""
    return f["linear"] + 2 * f["attention"] + index_weight * f["indexer"]


def analytic(t: int = 1 << 20) -> list[dict]:
    from policy.config import V4Config

    base = v32_flops(t)
    rows = [
        {"model": "V3.2", **base, "total": sum(base.values()), "fp8eq": fp8_equivalent(base, 1)}
    ]
    for name, published in (("flash", 0.10), ("pro", 0.27)):
        f = flops_per_token(V4Config.from_preset(name), t)
        rows.append(
            {
                "model": name,
                **f,
                "total": sum(f.values()),
                "fp8eq": fp8_equivalent(f, 0.5),
                "published": published,
            }
        )
    return rows


# --------------------------------------------------------------------------- driver
def _run_child(n: int, repeats: int, preset: str, batch: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--child", str(n), str(repeats), preset, str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{preset} {n} batch {batch} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {preset} {n // K}K x{batch}: {json.dumps(result)}", flush=True)
    return result


def _report(res: dict) -> None:
    print(
        "\n| widths | context | batch | dense | CSA attention | dense / CSA | CSA, torch indexer "
        "| HCA attention | dense / HCA | CSA layer | HCA layer | peak MiB dense / CSA / HCA |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in res["cpu"]:
        d = r["dense_ms"]
        print(
            f"| {r['preset']} | {r['tokens'] // K}K | {r['batch']} | {d:.2f} ms "
            f"| {r['csa_attn_ms']:.2f} ms | {d / r['csa_attn_ms']:.1f}x "
            f"| {r['csa_torch_attn_ms']:.2f} ms ({d / r['csa_torch_attn_ms']:.1f}x) "
            f"| {r['hca_attn_ms']:.2f} ms "
            f"| {d / r['hca_attn_ms']:.1f}x | {r['csa_layer_ms']:.2f} ms "
            f"| {r['hca_layer_ms']:.2f} ms | {r['dense_peak_mib']:.1f} / "
            f"{r['csa_attn_peak_mib']:.1f} / {r['hca_attn_peak_mib']:.1f} |"
        )
    print(
        "\n| 1M tokens, per token | linear | attention | indexer | total | vs V3.2 "
        "| FP8-equivalent vs V3.2 | published |\n|---|---|---|---|---|---|---|---|"
    )
    base = res["analytic"][0]
    for r in res["analytic"]:
        g = 1e9
        rel = "–" if r is base else f"{100 * r['total'] / base['total']:.1f}%"
        eq = "–" if r is base else f"{100 * r['fp8eq'] / base['fp8eq']:.1f}%"
        pub = f"{100 * r['published']:.0f}%" if "published" in r else "–"
        print(
            f"| {r['model']} | {r['linear'] / g:.0f} GFLOP | {r['attention'] / g:.0f} "
            f"| {r['indexer'] / g:.0f} | {r['total'] / 1e12:.3f} TFLOP | {rel} | {eq} | {pub} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8, 32, 128], help="in K tokens")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 8],
        help="decode rows per step (each its own n-token cache); demo widths run each",
    )
    ap.add_argument(
        "--flash-widths",
        type=int,
        nargs="*",
        default=[32, 128],
        help="contexts (K tokens) also run with one layer of flash widths (none: skip)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attention.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, repeats, preset, batch = args.child
        print(json.dumps(child(int(n), int(repeats), preset, int(batch))))
        return
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch values must be >= 1, got {args.batch}")
    runs = [(n, "demo", args.repeats, b) for b in args.batch for n in args.contexts]
    runs += [(n, "flash", min(args.repeats, 5), 1) for n in args.flash_widths]
    res: dict = {
        "machine": platform.machine(),
        "threads": 1,
        "clock": "thread CPU time",
        "repeats": args.repeats,
        "cpu": [_run_child(n * K, r, preset, b) for n, preset, r, b in runs],
        "analytic": analytic(),
    }
    _report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
