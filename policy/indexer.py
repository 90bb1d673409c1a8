"""Lightning indexer of CSA layers: scores I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]) and the
top-k choice of compressed entries under the causal rule (s + 1) * m <= t + 1.

Letters: B batch, S queries, N compressed entries, h indexer heads, c indexer head dim, k top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from policy.compressor import Compressor, quantize_index
from policy.config import V4Config
from policy.kernels import MAX_BLOCK_ELEMS
from policy.layers import Linear, QLinear
from policy.quant import bf16_index_scores, bf16_index_weights
from policy.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: V4Config, ratio: int):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.topk = cfg.index_topk
        self.wq_b = QLinear(cfg.q_lora_rank, self.n_heads * self.head_dim, cfg.numerics)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads)
        self.compressor = Compressor(cfg, ratio, self.head_dim, for_indexer=True)

    def queries(
        self,
        qr: torch.Tensor,
        x: torch.Tensor,
        pos: torch.Tensor,
        inv_freq: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qr [B, S, d_c], x [B, S, d], pos [B, S] -> q [B, S, h, c] fp32, w [B, S, h] fp32
        (numerics "official": BF16, ``policy.quant.bf16_index_weights``).

        ``rope``: the ``rope_tables`` of pos when the caller has them."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = quantize_index(apply_rope(q, pos, inv_freq, tables=rope), self.cfg)
        scale = self.head_dim**-0.5 * self.n_heads**-0.5
        if self.cfg.numerics == "official":
            return q, bf16_index_weights(self.weights_proj(x), scale)
        return q, self.weights_proj(x).float() * scale


def index_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, numerics: str = "reference"
) -> torch.Tensor:
    """q [B, S, h, c], w [B, S, h], keys k [B, N, c] -> scores [B, S, N] fp32 (numerics
    "official": computed in BF16 by ``policy.quant.bf16_index_scores``, returned as fp32).

    Long sequences run in query chunks so the [B, S, h, N] logits never exist at once. The
    scores only feed the top-k choice, which has no gradient: no autograd graph is built.
    """
    b, s, h, _ = q.shape
    step = max(1, MAX_BLOCK_ELEMS // max(1, b * h * k.shape[1]))
    if s > step:
        return torch.cat(
            [
                index_scores(q[:, i : i + step], w[:, i : i + step], k, numerics)
                for i in range(0, s, step)
            ],
            dim=1,
        )
    if numerics == "official":
        return bf16_index_scores(q, w, k).float()
    with torch.no_grad():
        logits = torch.matmul(q.float().flatten(1, 2), k.float().transpose(1, 2))  # [B, S*h, N]
        logits = logits.relu_().unflatten(1, (s, h))  # [B, S, h, N]
        return torch.matmul(w.float().unsqueeze(-2), logits).squeeze(-2)


def check_kernel_args(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    nvis: torch.Tensor,
    packed_block: int | None,
) -> None:
    """The shapes a fused indexer kernel takes (``triton_indexer_topk``, ``cpu_indexer_topk``):
    q [B, S, h, c], w [B, S, h], nvis [B, S] and keys [B, N, c], or [B, N, c / 2 + c /
    packed_block] uint8 MXFP4 rows when ``packed_block`` is set. Raises ValueError naming the
    value that does not fit."""
    b, s, h, c = q.shape
    packed = packed_block is not None
    want = c // 2 + c // packed_block if packed else c
    if keys.dim() != 3 or keys.shape[0] != b or keys.shape[2] != want:
        raise ValueError(f"keys shape {tuple(keys.shape)} does not fit q {tuple(q.shape)}")
    if packed and keys.dtype != torch.uint8:
        raise ValueError(f"packed keys must be uint8, got {keys.dtype}")
    if w.shape != (b, s, h) or nvis.shape != (b, s):
        raise ValueError(f"w {tuple(w.shape)} / nvis {tuple(nvis.shape)} do not fit q")


def topk_indices(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries: scores, visible [B, S, N] -> indices [B, S, min(k, N)], -1 = none.

    Order and ties are those of a stable descending sort: higher score first, equal scores (e.g.
    several all-ReLU-zero ones; -0.0 equals 0.0) to the lower index, so the choice does not
    depend on how many invisible entries follow: the full forward, a chunk of it and the cached
    decode pick the same set. No sort of whole rows: a partial selection (``torch.topk`` of
    k + 1) finds a k-set with the right scores; a row whose (k+1)-th score ties the k-th (the set
    is then ambiguous) is redone by ``_topk_exact``; the k chosen are then put in order.
    """
    n = scores.shape[-1]
    k = min(k, n)
    masked = scores.float().masked_fill(~visible, float("-inf"))
    val, idx = masked.topk(min(k + 1, n), dim=-1)  # sorted: the (k+1)-th shows a tie at the cut
    if k < n:
        tied = (val[..., k] == val[..., k - 1]) & (val[..., k] > float("-inf"))
        idx = idx[..., :k]
        if bool(tied.any()):  # invisible (-inf) ties only pick entries reported as -1
            idx[tied] = _topk_exact(masked[tied], k)
    idx = idx.sort(dim=-1).values  # by index, then stably by score: (score desc, index asc)
    val, order = masked.gather(-1, idx).sort(dim=-1, descending=True, stable=True)
    return idx.gather(-1, order).masked_fill(val == float("-inf"), -1)


def _topk_exact(masked: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k set of rows masked [R, N] fp32 with ties to the lower index: ``torch.topk``
    on one distinct int64 key per entry (the order-preserving integer image of the score in the
    high 32 bits, N - 1 - index in the low ones). -> indices [R, k]."""
    n = masked.shape[-1]
    bits = (masked + 0.0).view(torch.int32)  # + 0.0: -0.0 -> +0.0, equal as in a sort
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # same order as the floats
    tie = torch.arange(n - 1, -1, -1, device=masked.device)  # lower index -> larger key
    return (order * (1 << 32) + tie).topk(k, dim=-1).indices
