"""Triton kernel for the core of CSA sparse attention: gathered keys, shared K = V, sink.

Letters: B batch, S queries, H heads, N stored entries, K indices per query, c head dim.

Each query row (b, s) attends to the entries ``kv[b, idx[b, s, j]]`` named by its index list —
the reference's layout of one list holding the window slots and the top-k compressed entries
(V4_SPEC.md §4.3) — with one softmax over all of them plus the per-head sink in the denominator:

    o[b, s, h] = Σ_j e^(l_j) · kv[b, idx_j] / (Σ_j e^(l_j) + e^(sink_h)),
    l_j = scale · q[b, s, h] · kv[b, idx_j],   idx_j = −1: no key (skipped).

Indices must be distinct within a row (a repeated index counts twice). A row with no valid
index returns zeros (only the sink is in the denominator).

The kernel runs one program per query row and all heads at once: the key tile is loaded once
and shared by every head (MQA). The online softmax starts from the sink (m = sink_h, l = 1), so
there is no −inf − (−inf). Portable style (PLATFORM.md §4): under ``PORTABLE`` (the CPU
interpreter) every operand is cast to fp32 before ``tl.dot`` (the interpreter multiplies bf16 bit
patterns); on a GPU operands stay in their dtype with fp32 accumulation. Masks are vector
comparisons only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_attn_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    sink_ptr,
    o_ptr,
    S,
    H,
    K,
    scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvn,
    stride_ib,
    stride_is,
    stride_ob,
    stride_os,
    stride_oh,
    C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PORTABLE: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BLOCK_K)
    hmask = offs_h < H

    q_ptrs = q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_c[None, :]
    q = tl.load(q_ptrs, mask=hmask[:, None], other=0.0)
    if PORTABLE:
        q = q.to(tl.float32)

    sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    m_i = sink  # running max, started at the sink logit
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)  # e^(sink - m_i)
    acc = tl.zeros([BLOCK_H, C], dtype=tl.float32)

    idx_base = idx_ptr + b * stride_ib + s * stride_is
    kv_base = kv_ptr + b * stride_kvb
    for start in range(0, K, BLOCK_K):
        ks = start + offs_k
        idx = tl.load(idx_base + ks, mask=ks < K, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0)
        kv = tl.load(
            kv_base + safe[:, None] * stride_kvn + offs_c[None, :], mask=valid[:, None], other=0.0
        )
        if PORTABLE:
            kv = kv.to(tl.float32)
        logits = tl.dot(q, tl.trans(kv)) * scale  # [BLOCK_H, BLOCK_K] fp32
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PORTABLE:  # noqa: SIM108 - constexpr branch, kept as a statement for the JIT
            pv = tl.dot(p, kv)
        else:
            pv = tl.dot(p.to(kv.dtype), kv)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


def _portable(device: torch.device) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or device.type == "cpu"


def triton_sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    *,
    block_k: int = 32,
) -> torch.Tensor:
    """Gathered sparse MQA attention with a sink (module doc).

    Args:
        q: [B, S, H, c] queries (bf16 / fp16 / fp32); c a power of two >= 16.
        kv: [B, N, c] stored keys, which are also the values (same dtype family as q).
        idx: [B, S, K] int indices into N, −1 = no key; distinct within a row.
        sink: [H] sink logits (fp32).
        scale: softmax scale.
        block_k: keys per loop step (power of two >= 16).
    Returns:
        o: [B, S, H, c] in q's dtype.
    """
    if q.dim() != 4 or kv.dim() != 3 or idx.dim() != 3:
        raise ValueError(
            f"expected q [B,S,H,c], kv [B,N,c], idx [B,S,K]; got {tuple(q.shape)}, "
            f"{tuple(kv.shape)}, {tuple(idx.shape)}"
        )
    b, s, h, c = q.shape
    if kv.shape[0] != b or kv.shape[2] != c:
        raise ValueError(f"kv shape {tuple(kv.shape)} does not match q {tuple(q.shape)}")
    if idx.shape[:2] != (b, s):
        raise ValueError(f"idx shape {tuple(idx.shape)} does not match q {tuple(q.shape)}")
    if c < 16 or c & (c - 1):
        raise ValueError(f"head dim c must be a power of two >= 16, got {c}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if sink.shape != (h,):
        raise ValueError(f"sink shape {tuple(sink.shape)} != ({h},)")
    if idx.dtype.is_floating_point:
        raise ValueError(f"idx must be an integer tensor, got {idx.dtype}")
    q = q.contiguous() if q.stride(-1) != 1 else q
    kv = kv.contiguous() if kv.stride(-1) != 1 else kv
    idx = idx.to(torch.int32).contiguous()
    sink = sink.float().contiguous()
    o = torch.empty_like(q)
    n_idx = idx.shape[2]
    if b * s == 0:
        return o
    block_h = max(16, triton.next_power_of_2(h))
    _sparse_attn_kernel[(b * s,)](
        q,
        kv,
        idx,
        sink,
        o,
        s,
        h,
        n_idx,
        float(scale),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kv.stride(0),
        kv.stride(1),
        idx.stride(0),
        idx.stride(1),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        C=c,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        PORTABLE=_portable(q.device),
    )
    return o


def gathered_sparse_attention_torch(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain-torch version of ``triton_sparse_attention`` (same arguments and result), fp32 math."""
    b = q.shape[0]
    if idx.shape[-1] == 0:
        return torch.zeros_like(q)
    valid = idx >= 0
    rows = torch.arange(b, device=q.device)[:, None, None]
    keys = kv.float()[rows, idx.clamp(min=0).long()]  # [B, S, K, c]
    logits = torch.einsum("bshc,bskc->bshk", q.float(), keys) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    mx = torch.maximum(logits.amax(dim=-1), sink.float())
    p = torch.exp(logits - mx[..., None])
    denom = p.sum(dim=-1) + torch.exp(sink.float() - mx)
    return (torch.einsum("bshk,bskc->bshc", p, keys) / denom[..., None]).to(q.dtype)
