"""Triton lightning-indexer kernel: scores over the stored indexer keys fused with the causal
top-k choice, one program per query row.

Letters: B batch, S queries, h indexer heads, c indexer head dim, N stored keys, k top-k.

For query row (b, s) with ``nvis[b, s]`` visible entries (the causal rule (i + 1) m <= pos + 1,
already applied by the caller), the kernel walks the keys in blocks of ``BLOCK_N``:

    score_i = sum_h w[b, s, h] * relu(q[b, s, h] . key[b, i]),   i < nvis (else -inf)

and keeps the best ``BLOCK_N`` of all blocks seen so far, so no [S, N] score matrix is ever
written (``scores=True`` also writes it, for tests). Keys are read as stored: fp32 / bf16
vectors, or the cache's MXFP4 rows (``KVLayout.pack_index``: two e2m1 codes per byte, low
nibble = even dim, then one ue8m0 scale byte per ``QBLOCK`` dims), decoded in registers.

Order and ties are those of ``policy.indexer.topk_indices`` (a stable descending sort: higher
score first, equal scores to the lower index, -0.0 equal to 0.0): each score becomes one int64
key, its order-preserving integer image in the high 32 bits and 2^32 - 1 - i in the low ones,
so all keys are distinct and "larger key" is exactly "chosen first". Merging a block into the
running best uses the bitonic step: best sorted descending, the block sorted ascending, their
elementwise maximum holds the top ``BLOCK_N`` of the union, which is sorted again. Slots whose
score is -inf (not visible, or fewer than k visible) come out as -1.

Portable style (PLATFORM.md §4): fp32 maths before ``tl.dot``; vector masks only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from policy.indexer import check_kernel_args, index_scores, topk_indices


@triton.jit
def _ordered(score):
    """fp32 [N] -> int64 [N]: the same order as the floats (-0.0 taken as 0.0)."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(tl.int64)


@triton.jit
def _fp4_keys(k_ptr, rows, valid, C: tl.constexpr, QBLOCK: tl.constexpr, E: tl.constexpr):
    """Decode MXFP4 rows (``rows`` [N] entry offsets of E bytes) -> fp32 [N, C]."""
    offs_c = tl.arange(0, C)
    base = k_ptr + rows[:, None] * E
    byte = tl.load(base + offs_c[None, :] // 2, mask=valid[:, None], other=0).to(tl.int32)
    code = (byte >> ((offs_c[None, :] % 2) * 4)) & 0xF
    mag = code & 7
    ex = mag >> 1
    half = (mag & 1).to(tl.float32) * 0.5
    # e2m1: exponent field 0 -> 0 / 0.5 (subnormal), else (1 + m/2) * 2^(e - 1)
    val = tl.where(ex == 0, half, (1.0 + half) * tl.exp2((ex - 1).to(tl.float32)))
    val = tl.where((code & 8) != 0, -val, val)
    sbyte = tl.load(base + C // 2 + offs_c[None, :] // QBLOCK, mask=valid[:, None], other=127).to(
        tl.float32
    )
    return val * tl.exp2(sbyte - 127.0)


@triton.jit
def _indexer_topk_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    nvis_ptr,
    out_ptr,
    score_ptr,
    S,
    H,
    NMAX,
    KOUT,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_wb,
    stride_ws,
    stride_kb,
    stride_kn,
    stride_ob,
    stride_os,
    stride_sb,
    stride_ss,
    C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr,
    QBLOCK: tl.constexpr,
    E: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < H
    q = tl.load(
        q_ptr + b * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_c[None, :],
        mask=hmask[:, None],
        other=0.0,
    ).to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + s * stride_ws + offs_h, mask=hmask, other=0.0)
    w = w.to(tl.float32)
    nvis = tl.load(nvis_ptr + row)
    low = tl.full([BLOCK_N], 0xFFFFFFFF, tl.int64)
    floor = _ordered(tl.full([BLOCK_N], float("-inf"), tl.float32))
    best = floor << 32  # below every real key
    for start in range(0, NMAX, BLOCK_N):
        idx = start + offs_n
        valid = idx < nvis
        if PACKED:
            keys = _fp4_keys(k_ptr + b * stride_kb, idx, valid, C, QBLOCK, E)
        else:
            kp = k_ptr + b * stride_kb + idx[:, None] * stride_kn + offs_c[None, :]
            keys = tl.load(kp, mask=valid[:, None], other=0.0).to(tl.float32)
        logits = tl.maximum(tl.dot(q, tl.trans(keys)), 0.0)  # [BLOCK_H, BLOCK_N]
        score = tl.sum(w[:, None] * logits, axis=0)
        score = tl.where(valid, score, float("-inf"))
        if WRITE_SCORES:
            sp = score_ptr + b * stride_sb + s * stride_ss + idx
            tl.store(sp, score, mask=idx < NMAX)
        key = (_ordered(score) << 32) | (low - idx.to(tl.int64))
        best = tl.sort(tl.maximum(best, tl.sort(key, descending=False)), descending=True)
    chosen = (low - (best & low)).to(tl.int32)
    chosen = tl.where((best >> 32) == floor, -1, chosen)
    op = out_ptr + b * stride_ob + s * stride_os + offs_n
    tl.store(op, chosen, mask=offs_n < KOUT)


def triton_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    nvis: torch.Tensor,
    k: int,
    *,
    packed_block: int | None = None,
    return_scores: bool = False,
):
    """Fused indexer scores + causal top-k (module doc).

    Args:
        q: [B, S, h, c] indexer queries (already rotated / quantised as the reference does).
        w: [B, S, h] head weights.
        keys: [B, N, c] float keys, or [B, N, c / 2 + c / packed_block] uint8 MXFP4 rows.
        nvis: [B, S] int, entries visible to each query (keys 0 .. nvis - 1; clamped to N).
        k: entries to choose.
        packed_block: the MXFP4 scale block when ``keys`` are packed rows (else None).
        return_scores: also return the scores [B, S, N] (-inf where not visible).
    Returns:
        idx [B, S, min(k, N)] int64, -1 = none; (idx, scores) with ``return_scores``.
    """
    b, s, h, c = q.shape
    n = keys.shape[1]
    packed = packed_block is not None
    if c < 16 or c & (c - 1):
        raise ValueError(f"indexer head dim must be a power of two >= 16, got {c}")
    check_kernel_args(q, w, keys, nvis, packed_block)
    kout = min(k, n)
    out = torch.full((b, s, kout), -1, dtype=torch.int32, device=q.device)
    scores = torch.full((b, s, n), float("-inf"), device=q.device) if return_scores else out
    if b * s and kout:
        q = q.contiguous()
        w = w.contiguous()
        keys = keys.contiguous()
        nv = nvis.clamp(0, n).to(torch.int32).contiguous()
        nmax = int(nv.max())
        _indexer_topk_kernel[(b * s,)](
            q,
            w,
            keys,
            nv,
            out,
            scores,
            s,
            h,
            nmax,
            kout,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            w.stride(0),
            w.stride(1),
            keys.stride(0),
            keys.stride(1),
            out.stride(0),
            out.stride(1),
            scores.stride(0),
            scores.stride(1),
            C=c,
            BLOCK_H=max(16, triton.next_power_of_2(h)),
            BLOCK_N=max(16, triton.next_power_of_2(kout)),
            PACKED=packed,
            QBLOCK=packed_block or 32,
            E=keys.shape[2],
            WRITE_SCORES=return_scores,
        )
    out = out.long()
    return (out, scores) if return_scores else out


def indexer_topk_torch(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    nvis: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The torch reference of ``triton_indexer_topk`` on float keys [B, N, c]: the model's own
    ``index_scores`` and ``topk_indices`` -> idx [B, S, min(k, N)]."""
    n = keys.shape[1]
    visible = torch.arange(n, device=q.device) < nvis[..., None]
    return topk_indices(index_scores(q, w, keys), visible, k)


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
