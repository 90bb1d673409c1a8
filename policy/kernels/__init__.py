"""Attention kernel shared by the full forward and the cached decode.

Letters: B batch, S queries, H heads, N keys, c head dim.
The naive reference that builds the full attention matrix from the visibility rules lives in
``policy.kernels.reference``.
"""

from __future__ import annotations

import torch

from policy.layers import as_dtype, f32

# Largest [B, S_chunk, H, N] logits block materialised at once (fp32 elements): long prefills
# run their queries in chunks so memory stays O(S * N / chunks), not O(S * N * H * B).
MAX_BLOCK_ELEMS = 1 << 24


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Shared-KV (MQA) attention over an allowed key set, with a per-head sink.

    The sink logit enters the softmax denominator only: o = sum_n e^(l_n) kv_n / (sum_n e^(l_n)
    + e^(sink)), so the weights may sum to less than one. Math in fp32.

    Args:
        q: [B, S, H, c] queries.
        kv: [B, N, c] keys, which are also the values.
        allowed: [B, S, N] bool, which keys each query sees.
        sink: [H] sink logits.
        scale: softmax scale (c ** -0.5).
    Returns:
        o: [B, S, H, c] in q's dtype.
    """
    b, s, h, _ = q.shape
    step = max(1, MAX_BLOCK_ELEMS // max(1, b * h * kv.shape[1]))
    if s > step:
        parts = [
            sparse_attention(q[:, i : i + step], kv, allowed[:, i : i + step], sink, scale)
            for i in range(0, s, step)
        ]
        return torch.cat(parts, dim=1)
    kvf, sink = f32(kv), f32(sink)
    logits = torch.einsum("bshc,bnc->bshn", f32(q), kvf) * scale
    logits = logits.masked_fill(~allowed[:, :, None, :], float("-inf"))
    mx = torch.maximum(logits.amax(dim=-1), sink)  # [B, S, H]
    p = torch.exp(logits - mx[..., None])
    denom = p.sum(dim=-1) + torch.exp(sink - mx)
    o = torch.einsum("bshn,bnc->bshc", p, kvf) / denom[..., None]
    return as_dtype(o, q.dtype)
