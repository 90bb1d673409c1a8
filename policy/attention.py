"""V4 attention: one shared-KV head (MQA) over a sliding window plus, per layer kind, compressed
entries (CSA: top-k chosen by the lightning indexer; HCA: all causal ones), with an attention
sink, partial interleaved RoPE (inverse RoPE on the output) and a grouped output projection.

Letters: B batch, S tokens, H heads, c head dim, W window, N compressed entries, m ratio,
g output groups, d_g per-group rank.

Three callers share the same projections:
- full sequence from position 0, no cache (training);
- cached extend, S tokens per row appended at per-row positions (prefill, continuation);
- one decode token per row at per-row positions: keys = [W ring slots | chosen compressed],
  through ``attention_core`` (by ``cfg.attn_impl``, the torch ``sparse_attention`` or the Triton
  gathered-index kernel).
The first two follow ``cfg.attn_path``: "blocksparse" (policy.kernels.blocksparse) runs on
the timeline [W tokens before the first query (the ring in position order) | S new kv] plus the
compressed entries, one query chunk at a time (queries, indexer top-k, attention and output
projection per chunk), each query reading its window and its visible (HCA) or indexer-chosen
(CSA, gathered) entries only. "dense" (the reference) builds keys [S raw kv | N compressed] (full) or [W ring slots |
S new kv | N compressed] (extend) under a dense [B, S, keys] mask for ``attention_core``.
``cfg.numerics == "official"`` rounds the same way on every path: the dense and decode cores
are ``policy.quant.bf16_attention``, the block-sparse chunks take BF16 operands in q·K and P·V.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from policy.compressor import Compressor, quantize_kv
from policy.config import V4Config
from policy.indexer import Indexer, index_scores, topk_indices
from policy.kernels import attention_core, sources_attention
from policy.kernels.blocksparse import CompressedKeys, chunk_attention, chunk_queries, timeline
from policy.kernels.cpu_indexer import cpu_indexer_topk
from policy.layers import Linear, QLinear, RMSNorm, unit_rms
from policy.quant import bf16_attention, bf16_unit_rms
from policy.rope import apply_rope, rope_inv_freq, rope_tables


class Attention(nn.Module):
    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.kind = cfg.layer_kind(layer_id)
        self.ratio = cfg.compress_ratios[layer_id]
        h, c, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.n_heads, self.head_dim, self.window = h, c, cfg.sliding_window
        self.groups, self.o_rank = cfg.o_groups, cfg.o_lora_rank
        self.softmax_scale = c**-0.5
        self.wq_a = QLinear(d, cfg.q_lora_rank, cfg.numerics)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = QLinear(cfg.q_lora_rank, h * c, cfg.numerics)
        self.wkv = QLinear(d, c, cfg.numerics)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps)
        # official 2-D weight [g * d_g, h * c / g], used as [g, d_g, h * c / g]
        self.wo_a = Linear(h * c // self.groups, self.groups * self.o_rank)
        self.wo_b = QLinear(self.groups * self.o_rank, d, cfg.numerics)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        if self.kind != "swa":
            self.compressor = Compressor(cfg, self.ratio, c)
        if self.kind == "csa":
            self.indexer = Indexer(cfg, self.ratio)
        self.register_buffer("inv_freq", rope_inv_freq(cfg, self.kind != "swa"), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cache=None,
        fill_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, d], pos [B, S] -> [B, S, d].

        cache None: full causal sequence from position 0. cache with ``fill_lengths`` [B]: each
        row appends its first fill_lengths[b] tokens at its cache position (prefill when the
        cache is empty, continuation otherwise). cache alone: one decode token per row (S == 1)
        at pos[:, 0], read from and written to the cache.
        """
        cfg, s = self.cfg, x.shape[1]
        rope = rope_tables(pos, self.inv_freq, x.device)  # shared by q, kv, output, indexer
        kv = apply_rope(self.kv_norm(self.wkv(x)), pos, self.inv_freq, tables=rope)  # [B, S, c]
        official = cfg.numerics == "official"
        if official:  # the official rounding, once: the cache's own quantisation keeps it exact
            kv = quantize_kv(kv, cfg)
        decode = cache is not None and fill_lengths is None
        if cfg.attn_path == "blocksparse" and not decode:
            return self._blocksparse(x, kv, pos, cache, fill_lengths, rope)
        qr, q = self._queries(x, pos, rope)
        if cache is None:
            keys, allowed = self._full_keys(x, qr, quantize_kv(kv, cfg), rope)
        elif fill_lengths is not None:
            keys, allowed = self._extend_keys(x, qr, kv, pos, cache, fill_lengths, rope)
        else:  # the cache quantises on write; reads return the stored values
            assert s == 1, "decode takes one token per row"
            if cfg.attn_impl == "triton":  # kernels on the stored cache bytes
                from policy.kernels.triton_compressed_attn import decode_attention

                o = decode_attention(self, x, qr, q, kv, pos, cache, rope)
                return self._output(o, pos, rope)
            sources = self._decode_sources(x, qr, kv, pos, cache, rope)
            o = sources_attention(q, sources, self.attn_sink, self.softmax_scale, official)
            return self._output(o, pos, rope)
        if official:
            o = bf16_attention(q, keys, allowed, self.attn_sink, self.softmax_scale)
        else:
            o = attention_core(q, keys, allowed, self.attn_sink, self.softmax_scale, cfg.core_impl)
        return self._output(o, pos, rope)

    def _queries(self, x, pos, rope):
        """x [B, S, d] -> (qr [B, S, d_c], q [B, S, H, c] unit-RMS, RoPE at pos)."""
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        norm = bf16_unit_rms if self.cfg.numerics == "official" else unit_rms
        q = apply_rope(norm(q, self.cfg.rms_norm_eps), pos, self.inv_freq, tables=rope)
        return qr, q

    def _output(self, o, pos, rope):
        """Attention output o [B, S, H, c] -> inverse RoPE -> grouped projection [B, S, d]."""
        o = apply_rope(o, pos, self.inv_freq, inverse=True, tables=rope)
        o = o.flatten(2).unflatten(-1, (self.groups, -1))  # [B, S, g, H*c/g]
        wo_a = self.wo_a.weight.view(self.groups, self.o_rank, -1)  # [g, d_g, H*c/g]
        o = torch.einsum("bsgi,goi->bsgo", o, wo_a)
        return self.wo_b(o.flatten(2))

    # ------------------------------------------------------------------ full sequence
    def _full_keys(self, x, qr, kv, rope):
        """keys [B, S + N, c], allowed [B, S, S + N] for a sequence from position 0."""
        b, s, _ = x.shape
        t = torch.arange(s, device=x.device)
        win = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - self.window)  # [S, S]
        keys, allowed = [kv], [win.expand(b, s, s)]
        if self.kind != "swa":
            comp, ik = self._full_entries(x)  # [B, N, c], [B, N, c_I] | None
            n = comp.shape[1]
            vis = (torch.arange(1, n + 1, device=x.device) * self.ratio)[None] <= t[:, None] + 1
            vis = vis.expand(b, s, n)  # [B, S, N]: (i + 1) * m <= t + 1
            if self.kind == "csa":
                pos = t.expand(b, s)
                iq, iw = self.indexer.queries(qr, x, pos, self.inv_freq, rope)
                vis = self._select(index_scores(iq, iw, ik, self.cfg.numerics), vis)
            keys.append(comp)
            allowed.append(vis)
        return torch.cat(keys, dim=1), torch.cat(allowed, dim=-1)

    def _full_entries(self, x):
        """Compressed entries [B, N, c] of a sequence from position 0, and the indexer keys
        [B, N, c_I] (CSA; None otherwise)."""
        comp = self.compressor(x, self.inv_freq)
        ik = self.indexer.compressor(x, self.inv_freq) if self.kind == "csa" else None
        return comp, ik

    def _select(self, scores: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """Indexer scores, visibility [B, S, N] -> the top-k chosen entries as a mask [B, S, N]."""
        b, s, n = vis.shape
        idx = topk_indices(scores, vis, self.cfg.index_topk)
        sel = torch.zeros(b, s, n + 1, dtype=torch.bool, device=vis.device)
        return sel.scatter_(-1, idx.masked_fill(idx < 0, n), True)[..., :n]

    # ------------------------------------------------------------------ cached extend
    def _extend_keys(self, x, qr, kv, pos, cache, lengths, rope):
        """Append lengths[b] tokens (right-padded x [B, S, d]) to each row of the cache at its
        positions pos [B, S] = cache position + 0..S-1: keys [B, W + S + N, c], allowed
        [B, S, W + S + N] over [window ring | new tokens | compressed entries].

        Continues the ring, the compressors' partial blocks and the indexer exactly where the
        row stopped; with an empty cache this is the prefill. Padded queries (t >= lengths[b])
        produce unused outputs and write nothing.
        """
        b, s, _ = x.shape
        w, m, dev = self.window, self.ratio, x.device
        p0 = pos[:, 0]  # [B] first new position of each row
        slot = torch.arange(w, device=dev)
        held = (p0[:, None] - 1) - (p0[:, None] - 1 - slot) % w  # [B, W] position in each slot
        ring_ok = (held[:, None, :] >= 0) & (held[:, None, :] > pos[:, :, None] - w)
        t = torch.arange(s, device=dev)
        own = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - w)  # [S, S]
        keys = [torch.cat((cache.window.read(w), quantize_kv(kv, self.cfg)), dim=1)]
        allowed = [torch.cat((ring_ok, own.expand(b, s, s)), dim=-1)]
        self._write_ring(cache, kv, pos, lengths)  # after it was read above
        if self.kind == "swa":
            return torch.cat(keys, dim=1), torch.cat(allowed, dim=-1)
        n = self._extend_entries(x, pos, lengths, cache)
        vis = (torch.arange(1, n + 1, device=dev) * m)[None, None] <= pos[:, :, None] + 1
        if self.kind == "csa":
            iq, iw = self.indexer.queries(qr, x, pos, self.inv_freq, rope)
            scores = index_scores(iq, iw, cache.index.read(n), self.cfg.numerics)
            vis = self._select(scores, vis)
        keys.append(cache.comp.read(n))
        allowed.append(vis)
        return torch.cat(keys, dim=1), torch.cat(allowed, dim=-1)

    def _write_ring(self, cache, kv, pos, lengths):
        """The last W new tokens of each row (kv [B, S, c]) go to the ring."""
        w, t = self.window, torch.arange(kv.shape[1], device=kv.device)
        new = (t[None, :] < lengths[:, None]) & (t[None, :] >= lengths[:, None] - w)
        rr, tt = new.nonzero(as_tuple=True)
        cache.window.write(rr, pos[rr, tt] % w, kv[rr, tt])

    def _extend_entries(self, x, pos, lengths, cache) -> int:
        """Run the compressors (and the indexer's) over the appended tokens, store the blocks
        they complete; returns n, the entries the longest row holds after the append."""
        out = self.compressor.extend(x, pos, lengths, cache.kv_state, cache.sc_state, self.inv_freq)
        if out is not None:
            cache.comp.write(*out)
        if self.kind == "csa":
            iout = self.indexer.compressor.extend(
                x, pos, lengths, cache.ikv_state, cache.isc_state, self.inv_freq
            )
            if iout is not None:
                cache.index.write(*iout)
        return int(((pos[:, 0] + lengths) // self.ratio).max())

    # ------------------------------------------------------------------ block-sparse
    def _blocksparse(self, x, kv, pos, cache, lengths, rope):
        """Full sequence (cache None) or cached extend, block-sparse: x [B, S, d], kv [B, S, c]
        -> [B, S, d]. Keys and compressed entries are built for all S tokens; queries, indexer
        choice, attention and output projection run per chunk of ``chunk_queries`` (its rule
        bounds every per-chunk tensor). The extend writes the ring, the compressed entries and
        the indexer keys exactly as the dense extend does."""
        cfg, w = self.cfg, self.window
        prev = prev_ok = comp = ik = None
        if cache is None:
            if self.kind != "swa":
                comp, ik = self._full_entries(x)
        else:
            prev, prev_ok = self._ring_in_order(cache, pos[:, 0])
            self._write_ring(cache, kv, pos, lengths)
            if self.kind != "swa":
                n = self._extend_entries(x, pos, lengths, cache)
                comp = cache.comp.read(n)
                ik = cache.index.read(n) if self.kind == "csa" else None
        part = None
        if comp is not None:
            part = CompressedKeys(comp, self.ratio, pos)
            if self.kind == "csa":
                part.topk = min(cfg.index_topk, comp.shape[1])
                part.select_row = 6 * comp.shape[1]  # scores, keys, masks per entry
        kvp, prev_ok = timeline(quantize_kv(kv, cfg), w, prev, prev_ok)
        step = chunk_queries(x.shape[0], self.n_heads, self.head_dim, w, part)
        sink, scale = self.attn_sink, self.softmax_scale
        outs = []
        for a in range(0, x.shape[1], step):
            sl = slice(a, a + step)
            xc, pc, rc = x[:, sl], pos[:, sl], (rope[0][:, sl], rope[1][:, sl])
            qr, q = self._queries(xc, pc, rc)
            if self.kind == "csa":
                iq, iw = self.indexer.queries(qr, xc, pc, self.inv_freq, rc)
                part.select = functools.partial(self._select_chunk, part, iq, iw, ik)
            o = chunk_attention(
                q, kvp, prev_ok, a, w, part, sink, scale, cfg.core_impl, cfg.numerics
            )
            outs.append(self._output(o, pc, rc))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _ring_in_order(self, cache, p0):
        """The ring as the W tokens before each row's first new position p0 [B], oldest first:
        prev [B, W, c] (a copy: the ring is written next), prev_ok [B, W] (position >= 0)."""
        w = self.window
        held = p0[:, None] - w + torch.arange(w, device=p0.device)  # [B, W] positions
        ring = cache.window.read(w)
        return ring.gather(1, (held % w)[..., None].expand(-1, -1, ring.shape[-1])), held >= 0

    def _select_chunk(self, part, iq, iw, ik, a, e, n):
        """Indexer choice of the chunk's queries a..e-1 (iq [B, e - a, h, c_I], iw [B, e - a,
        h]) among the first n entries: indices [B, e - a, <= k], -1 = none."""
        if self.cfg.attn_impl == "triton":  # fused scores + top-k
            from policy.kernels.triton_indexer import triton_indexer_topk

            nvis = (part.pos[:, a:e] + 1) // self.ratio
            return triton_indexer_topk(iq, iw, ik[:, :n], nvis, self.cfg.index_topk)
        scores = index_scores(iq, iw, ik[:, :n], self.cfg.numerics)  # [B, L, n]
        return topk_indices(scores, part.mask(a, e, n), self.cfg.index_topk)

    # ------------------------------------------------------------------ decode
    def _decode_sources(self, x, qr, kv, pos, cache, rope):
        """The keys of one token per row, by source: [(ring [B, W, c], allowed [B, 1, W])] and,
        for HCA, (its visible entries [B, N, c], allowed [B, 1, N]), both views of the cache,
        never joined. CSA gives one source, the ring joined with its K chosen entries (they are
        gathered, a copy either way; one source is half the softmax's small ops)."""
        p = pos[:, 0]  # [B]
        b, w, m = x.shape[0], self.window, self.ratio
        rows = torch.arange(b, device=x.device)
        cache.window.write(rows, p % w, kv[:, 0])
        ring = cache.window.read(w)  # [B, W, c]
        slot = torch.arange(w, device=x.device)
        held = p[:, None] - (p[:, None] - slot) % w  # position held by each slot
        keys, allowed = [ring], [held >= 0]
        if self.kind != "swa":
            entry, emit = self.compressor.step(x, p, cache.kv_state, cache.sc_state, self.inv_freq)
            if entry is not None:  # some row completed a block
                er, es = rows[emit], (p // m)[emit]
                cache.comp.write(er, es, entry[emit])
            nvis = (p + 1) // m  # [B] visible compressed entries
            n = int(nvis.max())
            if self.kind == "csa":
                ientry, _ = self.indexer.compressor.step(
                    x, p, cache.ikv_state, cache.isc_state, self.inv_freq
                )
                if ientry is not None:  # the same rows complete the indexer's block
                    cache.index.write(er, es, ientry[emit])
                iq, iw = self.indexer.queries(qr, x, pos, self.inv_freq, rope)
                k = self.cfg.index_topk
                if self.cfg.attn_impl == "cpu":  # native: scores + top-k on the stored keys
                    stored, block = cache.index.stored(n)
                    idx = cpu_indexer_topk(iq, iw, stored, nvis[:, None], k, packed_block=block)
                else:
                    scores = index_scores(iq, iw, cache.index.read(n), self.cfg.numerics)
                    vis = torch.arange(n, device=x.device)[None, None] < nvis[:, None, None]
                    idx = topk_indices(scores, vis, k)
                idx = idx[:, 0]  # [B, K]
                keys = [torch.cat((ring, cache.comp.gather(idx.clamp(min=0))), dim=1)]
                allowed = [torch.cat((allowed[0], idx >= 0), dim=1)]
            else:
                keys.append(cache.comp.read(n))
                allowed.append(torch.arange(n, device=x.device)[None] < nvis[:, None])
        return [(k, a[:, None]) for k, a in zip(keys, allowed, strict=True)]
