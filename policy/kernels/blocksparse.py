"""Block-sparse attention over a sequence of new tokens: each query reads its window and its
compressed entries only, so no tensor has a [S, S] (or [S, all keys]) shape.

Letters: B batch, S queries, H heads, c head dim, W window, C queries per chunk, J = C / W window
blocks per chunk, N compressed entries, n entries visible to a chunk, K entries chosen per query.

Keys of row b lie on one timeline: ``prev`` [B, W, c], the W tokens before the first query
(oldest first: the cache's window ring in position order; nothing at position 0), then the S new
tokens ``kv`` [B, S, c]. New token t (0-based) sees:
- window: new tokens u with t - W < u <= t, and prev slot j when t < j and prev_ok[b, j];
- compressed (``CompressedKeys``): HCA every entry i with (i + 1) m <= pos[b, t] + 1, read as keys
  shared by the chunk; CSA only the entries its indexer chose (``select``), gathered per query.
One softmax runs over window and compressed logits with the sink in the denominator only, the
same function as ``policy.kernels.sparse_attention`` on the dense mask (numerics "official": as
``policy.quant.bf16_attention``, q·K and P·V with BF16 operands).

Window blocks: a chunk's queries form J blocks of W; block j reads the 2W timeline keys
[previous W | own W] and masks the band i < r <= i + W (query offset i, key offset r): 2W logits
per query, one batched matmul per chunk.

Chunk rule (``chunk_queries``): C is the largest multiple of W (at least W) with
B * C * r <= MAX_BLOCK_ELEMS, r = H (c + 2W + K + n_HCA) + K c + r_select the elements one query
holds in a chunk: its query and output rows, window and compressed logits, gathered CSA keys and
the selection's scores (r_select, about 6 N for the indexer). With autograd off, memory is the
timeline O(S c) plus O(MAX_BLOCK_ELEMS) per chunk; with autograd on, each chunk keeps
O(C (H (c + 2W + K + n_HCA) + K c)) for the backward: O(S (W + K)) per layer (times H and c),
plus the HCA term S H N/m'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import policy.kernels as kernels
from policy.layers import as_dtype, f32


@dataclass
class CompressedKeys:
    """Compressed entries of one layer and the rule that picks each query's share of them.

    Attributes:
        entries: [B, N, c] compressed KV entries (keys and values).
        ratio: compression ratio m: entry i is visible at position p iff (i + 1) m <= p + 1.
        pos: [B, S] absolute position of every query.
        select: CSA only: select(a, e, n) -> indices [B, e - a, <= topk] (-1 = none) into the
            first n entries, chosen for queries a..e-1; None (HCA): every visible entry.
        topk: K, the most indices ``select`` returns per query (0 for HCA).
        select_row: elements per query that ``select`` materialises (for the chunk rule).
    """

    entries: torch.Tensor
    ratio: int
    pos: torch.Tensor
    select: Callable[[int, int, int], torch.Tensor] | None = None
    topk: int = 0
    select_row: int = 0

    def visible(self, a: int, e: int) -> int:
        """n: entries visible to the most advanced of queries a..e-1 (at most N)."""
        last = int(self.pos[:, a:e].max()) + 1
        return min(self.entries.shape[1], last // self.ratio)

    def mask(self, a: int, e: int, n: int) -> torch.Tensor:
        """[B, e - a, n] bool: entry i visible to query t iff (i + 1) m <= pos + 1."""
        ends = torch.arange(1, n + 1, device=self.pos.device) * self.ratio
        return ends <= self.pos[:, a:e, None] + 1


def chunk_queries(b: int, h: int, c: int, w: int, comp: CompressedKeys | None) -> int:
    """Queries per chunk C: the largest multiple of W (>= W) with B * C * r <= MAX_BLOCK_ELEMS,
    r = H (c + 2W + K + n_HCA) + K c + select_row: the elements one query holds in a chunk (its
    query and output rows, window and compressed logits, gathered CSA keys, selection temps)."""
    row = h * (c + 2 * w)
    if comp is not None:
        shared = comp.entries.shape[1] if comp.select is None else 0
        row += h * (comp.topk + shared) + comp.topk * c + comp.select_row
    return w * max(1, kernels.MAX_BLOCK_ELEMS // (b * w * row))


def timeline(
    kv: torch.Tensor, w: int, prev: torch.Tensor | None = None, prev_ok: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv [B, S, c] (and the W tokens before it, prev [B, W, c] / prev_ok [B, W]; None: none)
    -> (keys [B, W + S + pad, c] fp32 = [prev | kv | zeros up to a multiple of W], prev_ok)."""
    b, s, c = kv.shape
    if prev is None:
        prev = kv.new_zeros(b, w, c)
        prev_ok = torch.zeros(b, w, dtype=torch.bool, device=kv.device)
    pad = kv.new_zeros(b, -s % w, c, dtype=torch.float32)
    return torch.cat((f32(prev), f32(kv), pad), dim=1), prev_ok


def chunk_attention(
    qc: torch.Tensor,
    kvp: torch.Tensor,
    prev_ok: torch.Tensor,
    a: int,
    w: int,
    comp: CompressedKeys | None,
    sink: torch.Tensor,
    scale: float,
    impl: str = "torch",
    numerics: str = "reference",
) -> torch.Tensor:
    """Queries a..a+L-1 (a a multiple of W): qc [B, L, H, c], the ``timeline`` kvp / prev_ok
    -> o [B, L, H, c] in qc's dtype. impl "torch" (autograd) or "triton" (forward only);
    numerics "reference" (fp32) or "official" (BF16 operands of q·K and P·V, torch only)."""
    if impl == "torch":
        return _chunk_torch(qc, kvp, prev_ok, a, w, comp, sink, scale, numerics == "official")
    if impl != "triton":
        raise ValueError(f"attention impl must be 'torch' or 'triton', got {impl!r}")
    if numerics != "reference":
        raise ValueError(f"attention impl 'triton' has reference numerics only, got {numerics!r}")
    kernels.check_triton(qc, kvp, sink)
    return _chunk_triton(qc, kvp, prev_ok, a, w, comp, sink, scale)


# --------------------------------------------------------------------------- torch chunk
def _window_allowed(prev_ok: torch.Tensor, a: int, j: int, w: int) -> torch.Tensor:
    """[B|1, J, W, 2W] bool: key r of block j visible to its query i (band i < r <= i + W; in
    the sequence's first block the W keys before it exist only where prev_ok)."""
    i = torch.arange(w, device=prev_ok.device)
    r = torch.arange(2 * w, device=prev_ok.device)
    band = (r[None] > i[:, None]) & (r[None] <= i[:, None] + w)  # [W, 2W]
    if a > 0:
        return band[None, None]
    ok = torch.ones(prev_ok.shape[0], j, 2 * w, dtype=torch.bool, device=prev_ok.device)
    ok[:, 0, :w] = prev_ok
    return band & ok[:, :, None, :]


def _compressed_logits(qc, comp, a, e, scale, bf16):
    """Compressed part of queries a..e-1, qc [B, L, H, c] fp32 -> (logits [B, L, H, n|K]
    masked, values [B, n, c] shared or [B, L, K, c] gathered; rounded to BF16 when ``bf16``),
    or None when nothing is visible."""
    n = comp.visible(a, e)
    if n == 0:
        return None
    if comp.select is None:  # HCA: all visible entries, shared by the chunk
        vals = kernels.operand(comp.entries[:, :n], bf16)
        logits = torch.einsum("bshc,bnc->bshn", qc, vals) * scale
        return logits.masked_fill(~comp.mask(a, e, n)[:, :, None], float("-inf")), vals
    idx = comp.select(a, e, n)  # [B, L, K]
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
    vals = kernels.operand(comp.entries[rows, idx.clamp(min=0)], bf16)  # [B, L, K, c]
    logits = torch.einsum("bshc,bskc->bshk", qc, vals) * scale
    return logits.masked_fill(~(idx >= 0)[:, :, None], float("-inf")), vals


def _chunk_torch(q, kvp, prev_ok, a, w, comp, sink, scale, bf16=False):
    """Output [B, L, H, c] of queries a..e-1 (q [B, L, H, c]): window blocks + compressed.
    ``bf16``: the official numerics: BF16 q, keys / values and probabilities in the products
    (accumulated in fp32); the max, exp and denominator stay fp32, on the unrounded p."""
    ln = q.shape[1]
    e = a + ln
    j = -(-ln // w)  # window blocks; the last one padded with zero queries
    qc = kernels.operand(q, bf16)
    qb = F.pad(qc, (0, 0, 0, 0, 0, j * w - ln)).unflatten(1, (j, w))  # [B, J, W, H, c]
    kc = kernels.operand(kvp[:, a : a + (j + 1) * w], bf16).unflatten(
        1, (j + 1, w)
    )  # [B, J+1, W, c]
    keys = torch.cat((kc[:, :-1], kc[:, 1:]), dim=2)  # [B, J, 2W, c]
    lw = torch.einsum("bjihc,bjrc->bjihr", qb, keys) * scale
    allowed = _window_allowed(prev_ok, a, j, w)[:, :, :, None, :]
    lw = lw.masked_fill(~allowed, float("-inf")).flatten(1, 2)[:, :ln]  # [B, L, H, 2W]
    part = None if comp is None else _compressed_logits(qc, comp, a, e, scale, bf16)
    sink = f32(sink)
    mx = lw.amax(dim=-1)  # [B, L, H]; finite: every query sees itself
    if part is not None:
        mx = torch.maximum(mx, part[0].amax(dim=-1))
    mx = torch.maximum(mx, sink).detach()  # any shift gives the same softmax
    pw = torch.exp(lw - mx[..., None])
    denom = pw.sum(dim=-1) + torch.exp(sink - mx)
    pw = F.pad(kernels.operand(pw, bf16), (0, 0, 0, 0, 0, j * w - ln)).unflatten(1, (j, w))
    o = torch.einsum("bjihr,bjrc->bjihc", pw, keys).flatten(1, 2)[:, :ln]
    if part is not None:
        logits, vals = part
        pc = torch.exp(logits - mx[..., None])
        denom = denom + pc.sum(dim=-1)
        pc = kernels.operand(pc, bf16)
        if vals.dim() == 3:
            o = o + torch.einsum("bshn,bnc->bshc", pc, vals)
        else:
            o = o + torch.einsum("bshk,bskc->bshc", pc, vals)
    return as_dtype(o / denom[..., None], q.dtype)


# --------------------------------------------------------------------------- triton chunk
def _chunk_triton(q, kvp, prev_ok, a, w, comp, sink, scale):
    """The same chunk through the compressed-attention Triton kernel: window keys named by
    index lists into the timeline, compressed entries read in place (CSA: the chosen indices;
    HCA: the first ``count`` visible ones), nothing concatenated or gathered."""
    from policy.kernels.triton_compressed_attn import Entries, triton_compressed_attention

    ln = q.shape[1]
    e = a + ln
    dev = q.device
    loc = torch.arange(ln, device=dev)[:, None] + 1 + torch.arange(w, device=dev)  # [L, W]
    u = a - w + loc  # timeline position of each window key (< 0: the prev slots)
    ok = torch.where(u >= 0, True, prev_ok[:, (u + w).clamp(0, w - 1)])  # [B, L, W]
    win_idx = torch.where(ok, a + loc, -1)
    n = 0 if comp is None else comp.visible(a, e)
    if n == 0:
        return triton_compressed_attention(q, sink, scale, Entries(kvp), win_idx)
    entries = Entries(comp.entries[:, :n])
    if comp.select is None:
        count = ((comp.pos[:, a:e] + 1) // comp.ratio).clamp(0, n)
        return triton_compressed_attention(
            q, sink, scale, Entries(kvp), win_idx, entries, comp_count=count
        )
    cidx = comp.select(a, e, n)
    return triton_compressed_attention(q, sink, scale, Entries(kvp), win_idx, entries, cidx)
