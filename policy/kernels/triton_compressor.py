"""Triton kernel of the compressor's gated pooling (CSA overlapping windows, HCA blocks).

Letters: M entries, L slots per entry (2m with overlap, m without), C projection width,
c head dim (C = 2c with overlap, else c).

For entry r and channel j the kernel takes the slot values and gate logits of ``kv`` / ``score``
[M, L, C] and returns

    entry[r, j] = sum_s softmax_s(score[r, s, ch(s, j)]) * kv[r, s, ch(s, j)],

ch(s, j) = j, except with overlap, where slots m..2m-1 (the entry's own block) read channel
c + j and slots 0..m-1 (the previous block) channel j: ``Compressor.pool`` without building
the two sliced and concatenated slot tensors. A slot with gate -inf has weight 0 (the first
block's missing previous slots). One program per (entry, channel tile); fp32 maths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_kernel(
    kv_ptr,
    sc_ptr,
    o_ptr,
    L,
    M_HALF,
    stride_km,
    stride_ks,
    stride_sm,
    stride_ss,
    stride_om,
    CH: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_L)
    if OVERLAP:  # own-block slots read the second half of the channels
        ch = offs_c[None, :] + tl.where(offs_s >= M_HALF, CH, 0)[:, None]
    else:
        ch = offs_c[None, :] + 0 * offs_s[:, None]
    mask = (offs_s < L)[:, None] & (offs_c < CH)[None, :]
    kv = tl.load(kv_ptr + r * stride_km + offs_s[:, None] * stride_ks + ch, mask=mask, other=0.0)
    sc = tl.load(
        sc_ptr + r * stride_sm + offs_s[:, None] * stride_ss + ch, mask=mask, other=float("-inf")
    )
    sc = sc.to(tl.float32)
    mx = tl.max(sc, axis=0)
    p = tl.exp(sc - mx[None, :])
    out = tl.sum(p * kv.to(tl.float32), axis=0) / tl.sum(p, axis=0)
    tl.store(o_ptr + r * stride_om + offs_c, out, mask=offs_c < CH)


def triton_pool(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Gated pooling (module doc): slot tensors kv, score [..., L, C] -> entries [..., c] fp32."""
    if kv.shape != score.shape:
        raise ValueError(f"kv {tuple(kv.shape)} and score {tuple(score.shape)} differ")
    *lead, slots, width = kv.shape
    c = width // 2 if overlap else width
    if slots != (2 * ratio if overlap else ratio):
        raise ValueError(f"{slots} slots for ratio {ratio} (overlap {overlap})")
    kv2 = kv.reshape(-1, slots, width)
    sc2 = score.reshape(-1, slots, width)
    kv2 = kv2 if kv2.stride(-1) == 1 else kv2.contiguous()
    sc2 = sc2 if sc2.stride(-1) == 1 else sc2.contiguous()
    m = kv2.shape[0]
    out = torch.empty(m, c, dtype=torch.float32, device=kv.device)
    if m:
        block_c = min(64, triton.next_power_of_2(c))
        _pool_kernel[(m, triton.cdiv(c, block_c))](
            kv2,
            sc2,
            out,
            slots,
            ratio,
            kv2.stride(0),
            kv2.stride(1),
            sc2.stride(0),
            sc2.stride(1),
            out.stride(0),
            CH=c,
            BLOCK_L=triton.next_power_of_2(slots),
            BLOCK_C=block_c,
            OVERLAP=overlap,
        )
    return out.reshape(*lead, c)
