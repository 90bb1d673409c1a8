"""Attention kernel shared by the full forward and the cached decode.

Letters: B batch, S queries, H heads, N keys, c head dim.
The naive reference that builds the full attention matrix from the visibility rules lives in
``policy.kernels.reference``.
"""

from __future__ import annotations

import os

import torch

from policy.layers import as_dtype, f32
from policy.quant import round_to

# Largest [B, S_chunk, H, N] logits block materialised at once (fp32 elements): long prefills
# run their queries in chunks so memory stays O(S * N / chunks), not O(S * N * H * B).
MAX_BLOCK_ELEMS = 1 << 24


def allowed_to_indices(allowed: torch.Tensor) -> torch.Tensor:
    """Dense visibility allowed [B, S, N] bool -> index lists [B, S, K] int64 (K = most keys
    any query sees; each row's keys in ascending order, then -1 padding)."""
    k = int(allowed.sum(-1).max()) if allowed.numel() else 0
    order = (~allowed).to(torch.uint8).argsort(dim=-1, stable=True)[..., :k]  # allowed first
    return order.masked_fill(~allowed.gather(-1, order), -1)


def attention_core(
    q: torch.Tensor,
    kv: torch.Tensor,
    allowed: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    impl: str = "torch",
) -> torch.Tensor:
    """``sparse_attention`` by implementation ``impl``: "torch" (that function) or "triton"
    (the gathered-index Triton kernel on the allowed keys; no autograd). Same shapes."""
    if impl == "torch":
        return sparse_attention(q, kv, allowed, sink, scale)
    if impl != "triton":
        raise ValueError(f"attention impl must be 'torch' or 'triton', got {impl!r}")
    check_triton(q, kv, sink)
    return triton_gathered(q, kv, allowed_to_indices(allowed), sink, scale)


def check_triton(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor) -> None:
    """Raise ValueError where the Triton core cannot run: CPU tensors without the interpreter,
    or inputs that need a gradient (the kernel has no backward)."""
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attn_impl 'triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 "
            "set before triton is imported)"
        )
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad or sink.requires_grad):
        raise ValueError("attn_impl 'triton' has no backward; train with attn_impl 'torch'")


def triton_ready(*tensors: torch.Tensor) -> bool:
    """True where a Triton kernel can replace a torch op on ``tensors``: on CUDA or under the
    interpreter (TRITON_INTERPRET=1), with no gradient needed (the kernels have no backward)."""
    dev = tensors[0].device
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def triton_gathered(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """The Triton kernel on q [B, S, H, c], kv [B, N, c], index lists idx [B, S, K] (-1 = none)
    -> o [B, S, H, c]; kv follows q's dtype when q is bf16 / fp16, else fp32."""
    from policy.kernels.triton_sparse_attn import triton_sparse_attention

    kv = kv.to(q.dtype) if q.dtype in (torch.bfloat16, torch.float16) else kv.float()
    q = q if q.dtype in (torch.bfloat16, torch.float16) else q.float()
    return triton_sparse_attention(q, kv, idx, sink, scale)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    allowed: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    bf16: bool = False,
) -> torch.Tensor:
    """Shared-KV (MQA) attention over an allowed key set, with a per-head sink.

    The sink logit enters the softmax denominator only: o = sum_n e^(l_n) kv_n / (sum_n e^(l_n)
    + e^(sink)), so the weights may sum to less than one. Math in fp32; ``bf16`` (the official
    numerics, ``policy.quant.bf16_attention``): q, kv and the probabilities are rounded to BF16
    as operands of the two products (accumulated in fp32, straight-through gradient), while the
    max, exp and denominator stay fp32 on the unrounded probabilities.

    Args:
        q: [B, S, H, c] queries.
        kv: [B, N, c] keys, which are also the values.
        allowed: [B, S, N] bool, which keys each query sees.
        sink: [H] sink logits.
        scale: softmax scale (c ** -0.5).
        bf16: BF16 operands (see above).
    Returns:
        o: [B, S, H, c] in q's dtype.
    """
    return sources_attention(q, [(kv, allowed)], sink, scale, bf16)


def sources_attention(
    q: torch.Tensor,
    sources: list[tuple[torch.Tensor, torch.Tensor]],
    sink: torch.Tensor,
    scale: float,
    bf16: bool = False,
) -> torch.Tensor:
    """``sparse_attention`` over the keys of several sources in one softmax, without joining
    them: sources [(kv [B, N_i, c], allowed [B, S, N_i]), ...] (the decode step's window ring
    and its compressed entries, each a view of the cache) give the result of
    ``sparse_attention`` on the concatenated keys, up to the order of the fp32 sums."""
    b, s, h, _ = q.shape
    sources = [src for src in sources if src[0].shape[1]]
    if not sources:  # no key at all: the weights are all zero
        return torch.zeros_like(q)
    n = sum(kv.shape[1] for kv, _ in sources)
    step = max(1, MAX_BLOCK_ELEMS // max(1, b * h * n))
    if s > step:
        parts = [
            sources_attention(
                q[:, i : i + step],
                [(kv, a[:, i : i + step]) for kv, a in sources],
                sink,
                scale,
                bf16,
            )
            for i in range(0, s, step)
        ]
        return torch.cat(parts, dim=1)
    qf, sink = operand(q, bf16), f32(sink)
    kvfs = [operand(kv, bf16) for kv, _ in sources]
    qrows = qf.flatten(1, 2)  # [B, S*H, c]: matmul, not einsum (its parsing costs per call)
    logits = [
        (torch.matmul(qrows, kvf.transpose(1, 2)).unflatten(1, (s, h)) * scale).masked_fill(
            ~allowed[:, :, None, :], float("-inf")
        )
        for kvf, (_, allowed) in zip(kvfs, sources, strict=True)
    ]
    mx = sink.expand(b, s, h)
    for lg in logits:  # any shift gives the same softmax
        mx = torch.maximum(mx, lg.amax(dim=-1))
    mx = mx.detach()
    ps = [torch.exp(lg - mx[..., None]) for lg in logits]
    denom = torch.exp(sink - mx)
    o = None
    for p, kvf in zip(ps, kvfs, strict=True):
        denom = denom + p.sum(dim=-1)
        part = torch.matmul(operand(p, bf16).flatten(1, 2), kvf).unflatten(1, (s, h))
        o = part if o is None else o + part
    return as_dtype(o / denom[..., None], q.dtype)


def operand(t: torch.Tensor, bf16: bool) -> torch.Tensor:
    """An attention product's operand in fp32, rounded to BF16 first when ``bf16`` (the
    rounding has a straight-through gradient)."""
    return round_to(f32(t), torch.bfloat16) if bf16 else f32(t)
