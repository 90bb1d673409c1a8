"""Naive reference of one V4 attention layer, written from the spec with explicit loops.

It recomputes everything from the layer's weights (queries, KV, compressor blocks slot by slot,
indexer scores, top-k, window) and materialises, for every query, the full attention row over
[raw tokens | compressed entries] with the visibility rules spelled out:
- window: raw token s visible to t iff t - W < s <= t;
- compressed entry i visible iff (i + 1) * m <= t + 1; HCA uses all of them; CSA only the
  ``index_topk`` best by indexer score (ties to the lower index);
- the sink adds exp(sink_h) to the denominator only.
RoPE here is complex multiplication on (x[2i], x[2i+1]) pairs, independent of ``policy.rope``.
Slow by design: tests only.
"""

from __future__ import annotations

import math

import torch

from policy.quant import fake_quant_fp4, fake_quant_fp8


def _freqs(cfg, compressed: bool) -> torch.Tensor:
    rd = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    f = [base ** (-2 * i / rd) for i in range(rd // 2)]
    if compressed and cfg.rope_scaling is not None:
        y = cfg.rope_scaling
        orig = y["original_max_position_embeddings"]

        def corr(r):
            return rd * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(y["beta_fast"])), 0)
        high = min(math.ceil(corr(y["beta_slow"])), rd - 1)
        high = high + 0.001 if low == high else high
        for i in range(rd // 2):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            f[i] = f[i] / y["factor"] * ramp + f[i] * (1 - ramp)
    return torch.tensor(f, dtype=torch.float64)


def _rope(v: torch.Tensor, t: int, freqs: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Rotate the last 2*len(freqs) dims of v [..., c] to position t (sign -1: inverse)."""
    rd = 2 * len(freqs)
    pairs = v[..., -rd:].double().reshape(*v.shape[:-1], rd // 2, 2)
    z = torch.view_as_complex(pairs.contiguous()) * torch.polar(
        torch.ones_like(freqs), sign * t * freqs
    )
    rot = torch.view_as_real(z).reshape(*v.shape[:-1], rd).to(v.dtype)
    return torch.cat((v[..., :-rd], rot), dim=-1)


def _rms(v: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    v = v.float()
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return v * w.float() if w is not None else v


def _kv_quant(v: torch.Tensor, cfg) -> torch.Tensor:
    if cfg.kv_dtype == "fp8":
        nope = cfg.head_dim - cfg.qk_rope_head_dim
        rope = v[..., nope:].to(torch.bfloat16).float()
        return torch.cat((fake_quant_fp8(v[..., :nope], cfg.kv_quant_block), rope), -1)
    return v.to(getattr(torch, cfg.kv_dtype)).float()


def _hadamard(n: int) -> torch.Tensor:
    h = torch.tensor([[1.0]])
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def _index_quant(v: torch.Tensor, cfg) -> torch.Tensor:
    v = v.float() @ _hadamard(v.shape[-1])
    if cfg.kv_dtype == "fp8":  # the rotation returns BF16, which FP4 then quantises
        return fake_quant_fp4(v.to(torch.bfloat16).float(), cfg.index_quant_block)
    return v.to(getattr(torch, cfg.kv_dtype)).float()


def reference_compress(comp, x: torch.Tensor, freqs: torch.Tensor, is_index: bool) -> list:
    """Entries of one sequence x [S, d] built block by block: list of [c] fp32 tensors."""
    cfg, m, c = comp.cfg, comp.ratio, comp.head_dim
    kv = x.float() @ comp.wkv.weight.float().T  # [S, C]
    sc = x.float() @ comp.wgate.weight.float().T
    out = []
    for i in range(x.shape[0] // m):
        vals, gates = [], []
        if comp.overlap:  # previous block, first halves (absent for block 0)
            for j in range(m * (i - 1), m * i):
                if j >= 0:
                    vals.append(kv[j, :c])
                    gates.append(sc[j, :c] + comp.ape[j % m, :c])
            lo = c
        else:
            lo = 0
        for j in range(m * i, m * (i + 1)):
            vals.append(kv[j, lo : lo + c])
            gates.append(sc[j, lo : lo + c] + comp.ape[j % m, lo : lo + c])
        w = torch.softmax(torch.stack(gates), dim=0)  # per channel, over slots
        e = (w * torch.stack(vals)).sum(0)
        e = _rms(e.to(comp.wkv.weight.dtype), comp.norm.weight, cfg.rms_norm_eps)
        e = _rope(e.to(comp.wkv.weight.dtype), m * i, freqs).float()
        out.append(_index_quant(e, cfg) if is_index else _kv_quant(e, cfg))
    return out


@torch.no_grad()
def reference_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Output [B, S, d] of ``attn`` (a policy.attention.Attention) on x [B, S, d], positions 0..S-1."""
    cfg = attn.cfg
    h, c, w, m = attn.n_heads, attn.head_dim, attn.window, attn.ratio
    eps = cfg.rms_norm_eps
    freqs = _freqs(cfg, attn.kind != "swa")
    outs = []
    for xb in x:  # one sequence at a time
        s_len = xb.shape[0]
        qr = _rms(xb.float() @ attn.wq_a.weight.float().T, attn.q_norm.weight, eps)
        qr = qr.to(x.dtype)
        q = (qr.float() @ attn.wq_b.weight.float().T).view(s_len, h, c)
        kv = _rms(xb.float() @ attn.wkv.weight.float().T, attn.kv_norm.weight, eps)
        comp, idx_keys = [], []
        if attn.kind != "swa":
            comp = reference_compress(attn.compressor, xb, freqs, False)
        if attn.kind == "csa":
            ind = attn.indexer
            idx_keys = reference_compress(ind.compressor, xb, freqs, True)
        rows = []
        for t in range(s_len):
            qt = _rope(_rms(q[t], None, eps).to(x.dtype), t, freqs).float()  # [H, c]
            keys = [
                _kv_quant(_rope(kv[s].to(x.dtype), s, freqs).float(), cfg)
                for s in range(max(0, t - w + 1), t + 1)
            ]  # window
            visible = [i for i in range(len(comp)) if (i + 1) * m <= t + 1]
            if attn.kind == "csa" and visible:
                qi = (qr[t].float() @ ind.wq_b.weight.float().T).view(ind.n_heads, -1)
                qi = _index_quant(_rope(qi.to(x.dtype), t, freqs).float(), cfg)
                wt = xb[t].float() @ ind.weights_proj.weight.float().T
                wt = wt * ind.head_dim**-0.5 * ind.n_heads**-0.5
                score = {i: float((wt * torch.relu(qi @ idx_keys[i])).sum()) for i in visible}
                ranked = sorted(visible, key=lambda i: (-score[i], i))
                visible = sorted(ranked[: cfg.index_topk])
            keys += [comp[i] for i in visible]
            k = torch.stack(keys).double()  # [n_keys, c]
            o = torch.zeros(h, c, dtype=torch.float64)
            for hh in range(h):
                logits = (qt[hh].double() @ k.T) * c**-0.5
                sink = attn.attn_sink[hh].double()
                mx = torch.maximum(logits.max(), sink)
                p = torch.exp(logits - mx)
                o[hh] = (p[:, None] * k).sum(0) / (p.sum() + torch.exp(sink - mx))
            rows.append(_rope(o.float().to(x.dtype), t, freqs, sign=-1.0))
        o = torch.stack(rows)  # [S, H, c]
        g = attn.groups
        o = o.reshape(s_len, g, -1).float()
        wo_a = attn.wo_a.weight.float().view(g, attn.o_rank, -1)
        mid = torch.stack([o[:, j] @ wo_a[j].T for j in range(g)], dim=1)  # [S, g, d_g]
        outs.append(mid.reshape(s_len, -1).to(x.dtype).float() @ attn.wo_b.weight.float().T)
    return torch.stack(outs).to(x.dtype)
