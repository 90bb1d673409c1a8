"""Triton CSA / HCA attention over the cache entries as stored: FP8 nope dims with their ue8m0
scales and BF16 RoPE dims are decoded in registers, so no dequantised copy of the cache exists.

Letters: B batch, S queries, H heads, c head dim, K indices per query, E bytes per entry.

Each query row (b, s) attends, with one softmax and the per-head sink in the denominator only
(the formula of ``policy.kernels.sparse_attention``), to the union of two sources:
- ``win``: the window, entries named by an index list [B, S, Kw] (-1 = none): the cache's ring
  slots in a decode step, or timeline positions in a prefill chunk;
- ``comp``: the compressed entries, either named by an index list [B, S, Kc] (CSA: the indexer's
  top-k) or the first ``count[b, s]`` entries (HCA: every causal one), or absent (SWA).
A source is an ``Entries``: a float tensor [B, N, c] (any float dtype), or the cache's packed
rows uint8 [B, N, E] in the layout of ``policy.kv_layout`` ([nope FP8 e4m3 | RoPE BF16 | one
ue8m0 scale per ``block`` nope dims | pad]).

One program per query row, all heads at once (MQA: each key tile is loaded and decoded once for
every head); online softmax started at the sink (m = sink_h, l = 1). Portable style
(PLATFORM.md §4): under ``PORTABLE`` (the interpreter) all maths is fp32; on a GPU the dots run
in bf16 when q is bf16 (FP8 x power-of-two values and BF16 RoPE dims are exact in bf16), else
in fp32 ("ieee"). Masks are vector comparisons only.

``decode_attention`` is the decode step of a CSA / HCA / SWA layer on these kernels (with the
fused indexer of ``policy.kernels.triton_indexer``): it reads the ring, the chosen compressed
entries and the indexer keys from the cache's stored bytes; per step it holds the query, its
top-k indices and one key tile per program: O(W + k) per CSA row and O(W + n/m') per HCA row,
never a dequantised copy of the cache.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from policy.kernels import check_triton
from policy.kernels.triton_indexer import triton_indexer_topk
from policy.kernels.triton_sparse_attn import gathered_sparse_attention_torch
from policy.quant import SCALE_DTYPE, dequantize_fp8


class Entries(NamedTuple):
    """One key source: ``data`` float [B, N, c], or packed uint8 rows [B, N, E] with ``nope``
    FP8 dims and one scale per ``block`` of them (``nope`` None: not packed)."""

    data: torch.Tensor
    nope: int | None = None
    block: int = 64

    @classmethod
    def of_store(cls, store) -> Entries:
        """The stored bytes (or plain values) of a ``policy.kv_cache.EntryStore`` (main KV)."""
        if store.quantised:
            return cls(store.data, store.layout.nope_dims, store.layout.scale_block)
        return cls(store.data)

    def decode(self, head_dim: int) -> torch.Tensor:
        """All entries as fp32 [B, N, c] (the reference's view; O(N)), decoded by
        ``policy.quant.dequantize_fp8``."""
        if self.nope is None:
            return self.data.float()
        n, r = self.nope, head_dim - self.nope
        q8 = self.data[..., :n].contiguous().view(torch.float8_e4m3fn)
        rp = self.data[..., n : n + 2 * r].contiguous().view(torch.bfloat16)
        sc = self.data[..., n + 2 * r : n + 2 * r + n // self.block].contiguous()
        nope = dequantize_fp8(q8, sc.view(SCALE_DTYPE), self.block)
        return torch.cat((nope, rp.float()), dim=-1)


@triton.jit
def _load_entries(
    f_ptr,
    bf_ptr,
    u8_ptr,
    rows,
    valid,
    base,
    stride_n,
    C: tl.constexpr,
    PACKED: tl.constexpr,
    NOPE: tl.constexpr,
    QB: tl.constexpr,
):
    """Rows ``rows`` [K] of one batch row (``base``: its offset) -> fp32 [K, C], 0 where not
    valid. Packed: f_ptr, bf_ptr and u8_ptr view the same bytes as FP8, BF16 and uint8;
    stride_n = E bytes."""
    offs_c = tl.arange(0, C)
    if PACKED:
        off = base + rows * stride_n  # byte offset of each entry
        is_nope = offs_c < NOPE
        mn = valid[:, None] & is_nope[None, :]
        nope = tl.load(f_ptr + off[:, None] + offs_c[None, :], mask=mn, other=0.0)
        sp = u8_ptr + off[:, None] + NOPE + 2 * (C - NOPE) + offs_c[None, :] // QB
        sbits = tl.load(sp, mask=mn, other=127)
        scale = tl.exp2(sbits.to(tl.float32) - 127.0)
        mr = valid[:, None] & (offs_c >= NOPE)[None, :]
        rp = bf_ptr + off[:, None] // 2 + NOPE // 2 + (offs_c[None, :] - NOPE)
        rope = tl.load(rp, mask=mr, other=0.0).to(tl.float32)
        return tl.where(is_nope[None, :], nope.to(tl.float32) * scale, rope)
    else:
        p = f_ptr + base + rows[:, None] * stride_n + offs_c[None, :]
        return tl.load(p, mask=valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _online_step(q, kv, valid, m_i, l_i, acc, scale, BF16_DOT: tl.constexpr):
    """Fold one key tile kv [K, C] (valid [K]) into the running softmax of q [H, C]."""
    if BF16_DOT:
        kvd = kv.to(tl.bfloat16)
        logits = tl.dot(q.to(tl.bfloat16), tl.trans(kvd)) * scale
    else:
        kvd = kv
        logits = tl.dot(q, tl.trans(kv), input_precision="ieee") * scale
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if BF16_DOT:  # noqa: SIM108 - constexpr branch, kept as a statement for the JIT
        pv = tl.dot(p.to(tl.bfloat16), kvd)
    else:
        pv = tl.dot(p, kvd, input_precision="ieee")
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _compressed_attn_kernel(
    q_ptr,
    sink_ptr,
    o_ptr,
    wf_ptr,
    wbf_ptr,
    wu8_ptr,
    widx_ptr,
    cf_ptr,
    cbf_ptr,
    cu8_ptr,
    cidx_ptr,
    S,
    H,
    KW,
    KC,
    scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_wb,
    stride_wn,
    stride_wib,
    stride_wis,
    stride_cb,
    stride_cn,
    stride_cib,
    stride_cis,
    C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_PACKED: tl.constexpr,
    C_PACKED: tl.constexpr,
    C_MODE: tl.constexpr,  # 0 none, 1 index list, 2 the first count[b, s] entries
    NOPE: tl.constexpr,
    QB: tl.constexpr,
    BF16_DOT: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BLOCK_K)
    hmask = offs_h < H
    qp = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_c[None, :]
    q = tl.load(qp, mask=hmask[:, None], other=0.0).to(tl.float32)
    m_i = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)  # e^(sink - m_i)
    acc = tl.zeros([BLOCK_H, C], dtype=tl.float32)

    wi_base = widx_ptr + b * stride_wib + s * stride_wis
    for start in range(0, KW, BLOCK_K):
        ks = start + offs_k
        idx = tl.load(wi_base + ks, mask=ks < KW, other=-1)
        valid = idx >= 0
        kv = _load_entries(
            wf_ptr, wbf_ptr, wu8_ptr, tl.where(valid, idx, 0), valid, b * stride_wb, stride_wn,
            C, W_PACKED, NOPE, QB,
        )  # fmt: skip
        m_i, l_i, acc = _online_step(q, kv, valid, m_i, l_i, acc, scale, BF16_DOT)

    if C_MODE == 1:
        ci_base = cidx_ptr + b * stride_cib + s * stride_cis
        for start in range(0, KC, BLOCK_K):
            ks = start + offs_k
            idx = tl.load(ci_base + ks, mask=ks < KC, other=-1)
            valid = idx >= 0
            kv = _load_entries(
                cf_ptr, cbf_ptr, cu8_ptr, tl.where(valid, idx, 0), valid, b * stride_cb, stride_cn,
                C, C_PACKED, NOPE, QB,
            )  # fmt: skip
            m_i, l_i, acc = _online_step(q, kv, valid, m_i, l_i, acc, scale, BF16_DOT)
    elif C_MODE == 2:
        count = tl.load(cidx_ptr + b * stride_cib + s * stride_cis)
        for start in range(0, KC, BLOCK_K):
            rows = start + offs_k
            valid = rows < count
            kv = _load_entries(
                cf_ptr, cbf_ptr, cu8_ptr, tl.where(valid, rows, 0), valid, b * stride_cb, stride_cn,
                C, C_PACKED, NOPE, QB,
            )  # fmt: skip
            m_i, l_i, acc = _online_step(q, kv, valid, m_i, l_i, acc, scale, BF16_DOT)

    out = acc / l_i[:, None]
    op = o_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :]
    tl.store(op, out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


def _views(src: Entries | None, like: torch.Tensor):
    """(main pointer tensor, bf16 view, uint8 view, stride_b, stride_n, packed) of a source."""
    if src is None:
        return like, like, like, 0, 0, False
    d = src.data
    if d.stride(-1) != 1:
        d = d.contiguous()
    if src.nope is None:
        return d, d, d, d.stride(0), d.stride(1), False
    if d.dtype != torch.uint8 or d.shape[-1] % 2 or src.nope % 2 or d.stride(1) != d.shape[-1]:
        raise ValueError(f"packed entries must be contiguous uint8 rows of even width, got {d}")
    f8, bf = d.view(torch.float8_e4m3fn), d.view(torch.bfloat16)
    return f8, bf, d, d.stride(0), d.stride(1), True


def triton_compressed_attention(
    q: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    win: Entries,
    win_idx: torch.Tensor,
    comp: Entries | None = None,
    comp_idx: torch.Tensor | None = None,
    comp_count: torch.Tensor | None = None,
    *,
    block_k: int = 32,
) -> torch.Tensor:
    """Window + compressed attention with a sink over stored entries (module doc).

    Args:
        q: [B, S, H, c] queries; c a power of two >= 16.
        sink: [H] sink logits; scale: softmax scale.
        win / win_idx: the window source and its index lists [B, S, Kw] (-1 = none; distinct).
        comp: the compressed source, with either comp_idx [B, S, Kc] (-1 = none; distinct)
            or comp_count [B, S] (the first count entries); None: no compressed part.
        block_k: keys per loop step (power of two >= 16).
    Returns:
        o: [B, S, H, c] in q's dtype.
    """
    b, s, h, c = q.shape
    if c < 16 or c & (c - 1):
        raise ValueError(f"head dim c must be a power of two >= 16, got {c}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if sink.shape != (h,):
        raise ValueError(f"sink shape {tuple(sink.shape)} != ({h},)")
    if win_idx.shape[:2] != (b, s):
        raise ValueError(f"win_idx shape {tuple(win_idx.shape)} does not match q")
    nopes = {e.nope for e in (win, comp) if e is not None and e.nope is not None}
    if len(nopes) > 1:
        raise ValueError(f"packed sources disagree on nope dims: {nopes}")
    nope = nopes.pop() if nopes else c
    blocks = {e.block for e in (win, comp) if e is not None and e.nope is not None}
    qb = blocks.pop() if blocks else 64
    if comp is None:
        mode, cidx, kc = 0, win_idx, 0
    elif (comp_idx is None) == (comp_count is None):
        raise ValueError("give exactly one of comp_idx and comp_count")
    elif comp_idx is not None:
        mode, cidx, kc = 1, comp_idx.to(torch.int32).contiguous(), comp_idx.shape[-1]
    else:
        mode = 2
        cidx = comp_count.clamp(0, comp.data.shape[1]).to(torch.int32).contiguous()[..., None]
        kc = int(cidx.max()) if cidx.numel() else 0
    widx = win_idx.to(torch.int32).contiguous()
    q = q.contiguous() if q.stride(-1) != 1 else q
    o = torch.empty_like(q)
    if b * s == 0:
        return o
    wf, wbf, wu8, swb, swn, wpacked = _views(win, q)
    cf, cbf, cu8, scb, scn, cpacked = _views(comp, q)
    portable = os.environ.get("TRITON_INTERPRET") == "1" or q.device.type == "cpu"
    _compressed_attn_kernel[(b * s,)](
        q,
        sink.float().contiguous(),
        o,
        wf,
        wbf,
        wu8,
        widx,
        cf,
        cbf,
        cu8,
        cidx,
        s,
        h,
        widx.shape[-1],
        kc,
        float(scale),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        swb,
        swn,
        widx.stride(0),
        widx.stride(1),
        scb,
        scn,
        cidx.stride(0),
        cidx.stride(1),
        C=c,
        BLOCK_H=max(16, triton.next_power_of_2(h)),
        BLOCK_K=block_k,
        W_PACKED=wpacked,
        C_PACKED=cpacked,
        C_MODE=mode,
        NOPE=nope,
        QB=qb,
        BF16_DOT=q.dtype == torch.bfloat16 and not portable,
    )
    return o


def compressed_attention_torch(
    q: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    win: Entries,
    win_idx: torch.Tensor,
    comp: Entries | None = None,
    comp_idx: torch.Tensor | None = None,
    comp_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of ``triton_compressed_attention`` (same arguments): both sources
    decoded in full, one index list over [window | compressed], the gathered formula."""
    c = q.shape[-1]
    keys, idx = [win.decode(c)], [win_idx.long()]
    if comp is not None:
        nw = keys[0].shape[1]
        keys.append(comp.decode(c))
        if comp_idx is None:
            n = keys[1].shape[1]
            ar = torch.arange(n, device=q.device)
            cidx = torch.where(ar < comp_count[..., None], ar, -1)
        else:
            cidx = comp_idx.long()
        idx.append(torch.where(cidx >= 0, cidx + nw, -1))
    return gathered_sparse_attention_torch(q, torch.cat(keys, 1), torch.cat(idx, -1), sink, scale)


def decode_attention(attn, x, qr, q, kv, pos, cache, rope) -> torch.Tensor:
    """One decode token per row on the stored cache (module doc): the same cache writes as
    ``Attention._decode_keys`` (ring slot, compressor and indexer-compressor steps), then the
    fused indexer top-k (CSA) and the attention kernel. x [B, 1, d], qr [B, 1, d_c], q [B, 1,
    H, c], kv [B, 1, c], pos [B, 1] -> o [B, 1, H, c]."""
    check_triton(q, kv, attn.attn_sink)
    p = pos[:, 0]
    b, w, m = x.shape[0], attn.window, attn.ratio
    rows = torch.arange(b, device=x.device)
    cache.window.write(rows, p % w, kv[:, 0])
    slot = torch.arange(w, device=x.device)
    held = p[:, None] - (p[:, None] - slot) % w  # position held by each slot
    win_idx = torch.where(held >= 0, slot, -1)[:, None]  # [B, 1, W]
    comp = comp_idx = comp_count = None
    if attn.kind != "swa":
        entry, emit = attn.compressor.step(x, p, cache.kv_state, cache.sc_state, attn.inv_freq)
        if entry is not None:
            er, es = rows[emit], (p // m)[emit]
            cache.comp.write(er, es, entry[emit])
        nvis = ((p + 1) // m)[:, None]  # [B, 1]
        comp = Entries.of_store(cache.comp)
        if attn.kind == "csa":
            ind = attn.indexer
            ientry, _ = ind.compressor.step(x, p, cache.ikv_state, cache.isc_state, attn.inv_freq)
            if ientry is not None:
                cache.index.write(er, es, ientry[emit])
            iq, iw = ind.queries(qr, x, pos, attn.inv_freq, rope)
            store = cache.index
            block = store.layout.index_block if store.quantised else None
            if store.quantised and store.layout.index_dtype != "fp4":
                raise ValueError("the Triton indexer reads fp4 or unquantised indexer keys")
            comp_idx = triton_indexer_topk(
                iq, iw, store.data, nvis, attn.cfg.index_topk, packed_block=block
            )
        else:
            comp_count = nvis
    return triton_compressed_attention(
        q,
        attn.attn_sink,
        attn.softmax_scale,
        Entries.of_store(cache.window),
        win_idx,
        comp,
        comp_idx,
        comp_count,
    )
