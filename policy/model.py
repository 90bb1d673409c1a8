"""V4Model: embeddings, mHC residual streams, SWA / CSA / HCA attention blocks with MoE, the mHC
head, and the MTP block. Parameter names equal the official checkpoint keys (V4_SPEC.md §9.2).

Letters: B batch, S tokens, n hc_mult streams, d model width, V vocabulary.

Entry points:
- ``forward(ids)`` -> logits [B, S, V]; ``forward(ids, return_mtp=True)`` -> (logits,
  mtp_logits [B, S-1, V]) where mtp_logits[:, t] predicts ids[:, t + 2];
- ``loss(ids, mtp_weight=0.0)``: next-token cross-entropy (+ mtp_weight x the MTP loss);
- ``prefill(ids, lengths, cache)`` / ``decode(ids, cache)``: the cached path of the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.attention import Attention
from policy.config import V4Config
from policy.kv_cache import KVCache
from policy.layers import Linear, QLinear, RMSNorm
from policy.mhc import hc_mixes, hc_post, hc_pre, sinkhorn_split
from policy.moe import MoE


class Block(nn.Module):
    """Attention then MoE, each wrapped as X <- hc_post(F(norm(hc_pre(X))), X)."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.hc_mult
        mix = (2 + n) * n
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.ffn = MoE(cfg, layer_id)
        f32 = torch.float32
        self.hc_attn_fn = nn.Parameter(torch.empty(mix, n * d, dtype=f32))
        self.hc_attn_base = nn.Parameter(torch.zeros(mix, dtype=f32))
        self.hc_attn_scale = nn.Parameter(torch.ones(3, dtype=f32))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix, n * d, dtype=f32))
        self.hc_ffn_base = nn.Parameter(torch.zeros(mix, dtype=f32))
        self.hc_ffn_scale = nn.Parameter(torch.ones(3, dtype=f32))

    def _split(self, x, fn, scale, base):
        c = self.cfg
        mixes = hc_mixes(x, fn, c.rms_norm_eps)
        return sinkhorn_split(mixes, scale, base, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps)

    def forward(self, x, ids, pos, cache=None, fill_lengths=None) -> torch.Tensor:
        """x [B, S, n, d], ids [B, S], pos [B, S] -> [B, S, n, d]."""
        pre, post, comb = self._split(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        a = self.attn(self.attn_norm(hc_pre(x, pre)), pos, cache, fill_lengths)
        x = hc_post(a, x, post, comb)
        pre, post, comb = self._split(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        f = self.ffn(self.ffn_norm(hc_pre(x, pre)), ids)
        return hc_post(f, x, post, comb)


def hc_head(x, fn, scale, base, cfg: V4Config) -> torch.Tensor:
    """Collapse the streams with pre-weights only: x [B, S, n, d] -> [B, S, d]."""
    mixes = hc_mixes(x, fn, cfg.rms_norm_eps)  # [B, S, n]
    pre = torch.sigmoid(mixes * scale + base) + cfg.hc_eps
    return hc_pre(x, pre)


class MTPBlock(Block):
    """Multi-token prediction: a block fed with h_proj(hnorm(H)) + e_proj(enorm(embed(next)))."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__(cfg, layer_id)
        d, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj = QLinear(d, d, cfg.numerics)
        self.h_proj = QLinear(d, d, cfg.numerics)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward_mtp(self, h, emb, ids, pos) -> torch.Tensor:
        """h [B, S, n, d] main streams, emb [B, S, d] next-token embeddings -> [B, S, d]."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        x = super().forward(x, ids, pos)
        return self.norm(
            hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg)
        )


class V4Model(nn.Module):
    def __init__(self, cfg: V4Config):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = Linear(d, cfg.vocab_size)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        first = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPBlock(cfg, first + i) for i in range(cfg.num_nextn_predict_layers)
        )
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()
        self.to(cfg.torch_dtype)
        self._keep_fp32()

    def _keep_fp32(self) -> None:
        """ape, attn_sink, hc_* and gate.bias stay fp32 whatever the model dtype (§9.1)."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ape", "attn_sink", "bias") or leaf.startswith("hc_"):
                p.data = p.data.float()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) matrices and embeddings, unit norms, zero biases / sinks / ape, fn ~ N(0, std)."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_scale") or (leaf == "weight" and p.dim() == 1):
                p.fill_(1.0)
            elif leaf in ("ape", "attn_sink", "bias") or leaf.endswith("_base"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    # ------------------------------------------------------------------ forward paths
    def _streams(self, ids, pos, cache=None, fill_lengths=None) -> torch.Tensor:
        """ids [B, S] -> final residual streams [B, S, n, d]."""
        x = self.embed(ids).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)
        for i, layer in enumerate(self.layers):
            lc = None if cache is None else cache.layers[i]
            x = layer(x, ids, pos, lc, fill_lengths)
        return x

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm output [..., d] -> fp32 logits [..., V]."""
        return F.linear(h.float(), self.head.weight.float())

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        y = hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg)
        return self._logits(self.norm(y))

    def forward(self, input_ids: torch.Tensor, return_mtp: bool = False):
        """Full causal forward from position 0, no cache.

        Args:
            input_ids: [B, S] token ids.
            return_mtp: also return the MTP logits [B, S-1, V] (entry t predicts token t + 2).
        Returns:
            logits [B, S, V] fp32 (and mtp_logits when asked).
        """
        b, s = input_ids.shape
        if s > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        pos = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self._streams(input_ids, pos)
        logits = self._head(x)
        if not return_mtp:
            return logits
        if not self.mtp:
            raise ValueError("return_mtp=True needs num_nextn_predict_layers >= 1")
        nxt = input_ids[:, 1:]
        h = self.mtp[0].forward_mtp(x[:, :-1], self.embed(nxt), nxt, pos[:, :-1])
        return logits, self._logits(h)

    def loss(self, input_ids: torch.Tensor, mtp_weight: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy over input_ids [B, S], plus mtp_weight x the MTP
        (token t + 2) cross-entropy when mtp_weight > 0."""
        v = self.cfg.vocab_size
        if mtp_weight > 0:
            logits, mtp = self(input_ids, return_mtp=True)
        else:
            logits = self(input_ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))
        if mtp_weight > 0 and input_ids.shape[1] > 2:
            tgt = input_ids[:, 2:].reshape(-1)
            loss = loss + mtp_weight * F.cross_entropy(mtp[:, :-1].reshape(-1, v), tgt)
        return loss

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache):
        """Right-padded prompts [B, S] with lengths [B] into an empty cache.

        Returns logits [B, V] at each row's last prompt token; cache.pos becomes lengths.
        """
        if bool((cache.pos != 0).any()):
            raise ValueError(f"prefill needs an empty cache, got positions {cache.pos.tolist()}")
        return self.extend(input_ids, lengths, cache)

    @torch.inference_mode()
    def extend(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Append right-padded tokens [B, S] (lengths [B] >= 1) to each row at cache.pos.

        Only the new tokens are computed; the window ring, the compressors' partial blocks and
        the indexer continue where each row stopped (an empty cache makes this the prefill).
        Returns logits [B, V] at each row's last new token (``all_logits``: [B, S, V] at every
        new token); cache.pos advances by lengths.
        """
        b, s = input_ids.shape
        lengths = lengths.to(cache.pos.device)
        end = cache.pos + lengths
        if int(lengths.min()) < 1 or int(lengths.max()) > s or int(end.max()) > cache.capacity:
            raise ValueError(
                f"extend lengths {lengths.tolist()} must be in [1, S={s}] and fit the cache "
                f"capacity {cache.capacity} from positions {cache.pos.tolist()}"
            )
        pos = cache.pos[:, None] + torch.arange(s, device=input_ids.device)
        x = self._streams(input_ids, pos, cache, lengths)
        cache.pos.copy_(end)
        if all_logits:
            return self._head(x)
        last = x[torch.arange(b, device=x.device), lengths - 1][:, None]  # [B, 1, n, d]
        return self._head(last)[:, 0]

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, input_ids [B] at positions cache.pos -> logits [B, V]."""
        if int(cache.pos.max()) >= cache.capacity:
            raise ValueError(
                f"cache capacity {cache.capacity} reached (positions {cache.pos.tolist()})"
            )
        pos = cache.pos[:, None].clone()
        x = self._streams(input_ids[:, None], pos, cache)
        cache.pos += 1
        return self._head(x)[:, 0]

    def new_cache(self, batch: int, capacity: int, mirror: bool = True) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``capacity`` tokens on the model's device
        (``mirror``: the dequantised decode mirror, see policy.kv_cache)."""
        return KVCache(self.cfg, batch, capacity, self.embed.weight.device, mirror)
