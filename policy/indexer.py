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
from policy.layers import Linear
from policy.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: V4Config, ratio: int):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.topk = cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
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
        """qr [B, S, d_c], x [B, S, d], pos [B, S] -> q [B, S, h, c] fp32, w [B, S, h] fp32.

        ``rope``: the ``rope_tables`` of pos when the caller has them."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = quantize_index(apply_rope(q, pos, inv_freq, tables=rope), self.cfg)
        w = self.weights_proj(x).float() * (self.head_dim**-0.5 * self.n_heads**-0.5)
        return q, w


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B, S, h, c], w [B, S, h], keys k [B, N, c] -> scores [B, S, N] fp32.

    Long sequences run in query chunks so the [B, S, h, N] logits never exist at once.
    """
    b, s, h, _ = q.shape
    step = max(1, MAX_BLOCK_ELEMS // max(1, b * h * k.shape[1]))
    if s > step:
        return torch.cat(
            [index_scores(q[:, i : i + step], w[:, i : i + step], k) for i in range(0, s, step)],
            dim=1,
        )
    logits = torch.einsum("bshc,bnc->bshn", q.float(), k.float()).relu()
    return torch.einsum("bshn,bsh->bsn", logits, w.float())


def topk_indices(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries: scores, visible [B, S, N] -> indices [B, S, min(k, N)], -1 = none.

    Ties (e.g. several all-ReLU-zero scores) go to the lower index (stable sort), so the choice
    does not depend on how many invisible entries follow: the full forward and the cached decode
    pick the same set.
    """
    k = min(k, scores.shape[-1])
    masked = scores.masked_fill(~visible, float("-inf"))
    val, idx = masked.sort(dim=-1, descending=True, stable=True)
    val, idx = val[..., :k], idx[..., :k]
    return idx.masked_fill(val == float("-inf"), -1)
