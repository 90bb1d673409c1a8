"""CPU lightning-indexer kernel: scores over the stored indexer keys fused with the causal top-k,
in Rust (``policy/rust/kernels``, built by ``make build`` into ``policy/kernels/_v4cpu.so``)
and called through ctypes.

The same contract as ``triton_indexer_topk`` (order, ties, -1 slots; see ``topk_indices``), for
CPU tensors: keys are read as stored, fp32 vectors or the cache's MXFP4 rows
(``KVLayout.pack_index``), one decoded key at a time, so a decode step reads n / m * (c / 2 +
c / 32) bytes per CSA layer instead of the n / m * c * 4 of the fp32 decode mirror and
materialises nothing of size n / m. On x86-64 with AVX2 + FMA the decode and the dot products
are vectorised (one byte shuffle per 32 codes, FMA dots); elsewhere the portable loop runs.

Scores equal ``policy.indexer.index_scores`` up to summation order (the decoded values are exact
and so are the products of FP4-rounded queries with them; the kernel sums each head's dot and
then the heads in its own order). Single-threaded: the caller's other work keeps the threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from policy.indexer import check_kernel_args

LIBRARY = Path(__file__).with_name("_v4cpu.so")


class Args(ctypes.Structure):
    """``IndexerArgs`` of policy/rust/kernels/src/lib.rs, field for field."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("batch_stride", ctypes.c_int64),
        ("entry_stride", ctypes.c_int64),
        ("nvis", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("scores", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("per_batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("block", ctypes.c_int64),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    if not LIBRARY.exists():
        raise RuntimeError(
            f"attn_impl 'cpu' needs the CPU kernels library {LIBRARY.name}, which is not built: "
            "run `make build` (it builds policy/rust/kernels), or use attn_impl 'torch'"
        )
    lib = ctypes.CDLL(str(LIBRARY))
    lib.v4_indexer_topk.argtypes = [ctypes.POINTER(Args)]
    lib.v4_indexer_topk.restype = ctypes.c_int32
    return lib


def cpu_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    nvis: torch.Tensor,
    k: int,
    *,
    packed_block: int | None = None,
    return_scores: bool = False,
):
    """Fused indexer scores + causal top-k on CPU tensors (module doc).

    Args:
        q: [B, S, h, c] indexer queries (already rotated / quantised as the reference does).
        w: [B, S, h] head weights.
        keys: [B, N, c] fp32 keys, or [B, N, c / 2 + c / packed_block] uint8 MXFP4 rows; any
            batch and entry strides (a slice of the cache), contiguous within an entry.
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
    for name, t in (("q", q), ("w", w), ("keys", keys), ("nvis", nvis)):
        if t.device.type != "cpu":
            raise ValueError(f"cpu_indexer_topk takes CPU tensors, got {name} on {t.device}")
    if c < 2 or c % 2:
        raise ValueError(f"indexer head dim must be even, got {c}")
    if packed and (packed_block < 2 or packed_block % 2 or c % packed_block):
        raise ValueError(f"packed_block must be even and divide the head dim {c}: {packed_block}")
    check_kernel_args(q, w, keys, nvis, packed_block)
    if not packed and keys.dtype != torch.float32:
        raise ValueError(f"float keys must be float32, got {keys.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    kout = min(k, n)
    out = torch.empty((b, s, kout), dtype=torch.int64)
    scores = torch.full((b, s, n), float("-inf")) if return_scores else None
    if b * s == 0 or n == 0 or (kout == 0 and scores is None):
        return out if scores is None else (out, scores)  # nothing to score or to choose
    if keys.stride(2) != 1:
        keys = keys.contiguous()
    q = q.detach().float().contiguous()
    w = w.detach().float().contiguous()
    nv = nvis.to(torch.int64).contiguous()
    item = keys.element_size()
    args = Args(
        q.data_ptr(),
        w.data_ptr(),
        keys.data_ptr(),
        keys.stride(0) * item,
        keys.stride(1) * item,
        nv.data_ptr(),
        out.data_ptr(),
        None if scores is None else scores.data_ptr(),
        b * s,
        max(s, 1),
        h,
        c,
        n,
        kout,
        packed_block or 0,
    )
    if _library().v4_indexer_topk(ctypes.byref(args)) != 0:
        raise ValueError(f"v4_indexer_topk refused q {tuple(q.shape)} keys {tuple(keys.shape)}")
    return (out, scores) if return_scores else out
