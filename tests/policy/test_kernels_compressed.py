"""Compressed-attention kernels (policy.kernels.triton_indexer, triton_compressed_attn) under the
Triton interpreter (TRITON_INTERPRET=1, set in conftest) against their torch references, and the
decode step of CSA / HCA layers with attn_impl="triton" against the torch decode. The tie test
also runs the CPU indexer (policy.kernels.cpu_indexer; its other tests: test_cpu_indexer.py).

Tolerances:
- indexer scores: 2e-5 absolute on scores of magnitude <= ~5 (fp32, only the summation order
  differs: the kernel sums 128-dim dots and heads in another order than torch's matmuls). The
  top-k choice is checked exactly: against ``topk_indices`` on the kernel's own scores (so the
  tie rule is tested bit for bit), and against the full torch reference where the scores are
  exact in any order (integer-valued inputs, all-equal scores).
- attention: 2e-6 absolute (outputs are O(1) averages of O(1) keys; the same decoded values,
  fp32 online softmax vs a two-pass one).
- decode layer: 1e-5 absolute on the layer output (the cache bytes are identical; only the
  summation order differs) and the same bytes in every cache store afterwards.
- prefill / continuation: 1e-5 on the layer output; the pooling kernel normalises its softmax
  in another order (entries differ by ~1e-7 before quantisation), which may move a stored
  FP8 / FP4 value across a rounding boundary, so at most 1% of the stored bytes may differ.
- pooling: 1e-6 absolute (fp32 softmax-weighted sums of O(1) values).

The layer tests run under ``torch.no_grad()``, not ``inference_mode``: the compressor caches its
Hadamard matrix per device on first use, and one first built under inference mode cannot be
used by a later autograd test in the same process.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from policy.attention import Attention
from policy.config import V4Config
from policy.indexer import index_scores, topk_indices
from policy.kernels.cpu_indexer import cpu_indexer_topk
from policy.kernels.triton_compressed_attn import (
    Entries,
    compressed_attention_torch,
    triton_compressed_attention,
)
from policy.kernels.triton_indexer import indexer_topk_torch, triton_indexer_topk
from policy.kv_layout import KVLayout

CFG = V4Config.from_preset("tiny")  # head_dim 128 (64 nope + 64 RoPE), indexer dim 128
LAYOUT = KVLayout.from_config(CFG)

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET unset",
)


def _visible(nvis, n):
    return torch.arange(n) < nvis[..., None]


# ---------------------------------------------------------------------------- indexer
@pytest.mark.parametrize("packed", [False, True])
def test_indexer_scores_and_topk(packed):
    # N = 33: two full blocks of 16 and one key in a third; rows with 0 (padded query), 3 (fewer
    # than k), 16 (a block boundary) and 33 visible entries
    g = torch.Generator().manual_seed(1)
    b, s, h, c, n, k = 2, 2, 3, 128, 33, 5
    q = torch.randn(b, s, h, c, generator=g)
    w = torch.randn(b, s, h, generator=g)
    keys = torch.randn(b, n, c, generator=g)
    nvis = torch.tensor([[0, 3], [16, 33]])
    if packed:
        stored = LAYOUT.pack_index(keys)  # MXFP4 rows, 68 bytes
        keys = LAYOUT.unpack_index(stored)
        idx, sc = triton_indexer_topk(q, w, stored, nvis, k, packed_block=32, return_scores=True)
    else:
        idx, sc = triton_indexer_topk(q, w, keys, nvis, k, return_scores=True)
    vis = _visible(nvis, n)
    want = index_scores(q, w, keys).masked_fill(~vis, float("-inf"))
    torch.testing.assert_close(sc, want, atol=2e-5, rtol=0)
    assert idx.shape == (b, s, k)
    assert torch.equal(idx, topk_indices(sc, vis, k))
    assert (idx[0, 0] == -1).all() and (idx[0, 1, 3:] == -1).all()
    assert torch.equal(idx, indexer_topk_torch(q, w, keys, nvis, k))  # no near-ties here


@pytest.mark.parametrize("kernel", [triton_indexer_topk, cpu_indexer_topk], ids=["triton", "cpu"])
def test_indexer_ties_and_exact_scores(kernel):
    # integer-valued q, keys and weights: every score is exact whatever the summation order, and
    # equal scores abound (all-equal keys; scores clipped to 0 by the ReLU, +0 and -0 alike),
    # so the kernel must follow the reference's tie rule (lower index first) exactly
    g = torch.Generator().manual_seed(2)
    b, s, h, c, n, k = 1, 3, 2, 128, 20, 17  # k > 16: a 32-wide running best, one block
    q = torch.randint(-2, 3, (b, s, h, c), generator=g).float()
    w = torch.randint(-2, 3, (b, s, h), generator=g).float()
    keys = torch.randint(-1, 2, (b, n, c), generator=g).float()
    keys[:, 5:12] = keys[:, 4:5]  # a run of equal keys
    q[0, 1] = 0.0  # every score 0
    w[0, 2] = -w[0, 2].abs() - 1  # negative weights: -0.0 from w * relu(0)
    nvis = torch.tensor([[20, 20, 14]])
    got = kernel(q, w, keys, nvis, k)
    assert torch.equal(got, indexer_topk_torch(q, w, keys, nvis, k))
    assert torch.equal(got[0, 1], torch.arange(k))  # all equal: the lowest indices, in order
    same = torch.ones(b, n, c)
    assert torch.equal(kernel(q, w, same, nvis, 4), indexer_topk_torch(q, w, same, nvis, 4))


def test_indexer_bad_inputs():
    q, w = torch.zeros(1, 1, 2, 128), torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="does not fit"):
        triton_indexer_topk(q, w, torch.zeros(1, 4, 64), torch.ones(1, 1), 2)
    with pytest.raises(ValueError, match="packed keys must be uint8"):
        triton_indexer_topk(q, w, torch.zeros(1, 4, 68), torch.ones(1, 1), 2, packed_block=32)


# ---------------------------------------------------------------------------- attention
def _sources(g, b, n_win, n_comp, packed):
    ring = torch.randn(b, n_win, 128, generator=g)
    comp = torch.randn(b, n_comp, 128, generator=g) * 2
    if not packed:
        return Entries(ring), Entries(comp)
    pk = (LAYOUT.nope_dims, LAYOUT.scale_block)
    return Entries(LAYOUT.pack_main(ring), *pk), Entries(LAYOUT.pack_main(comp), *pk)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_index_and_count_modes(packed):
    g = torch.Generator().manual_seed(3)
    b, s, h, c = 2, 2, 3, 128
    q = torch.randn(b, s, h, c, generator=g) * 0.3
    sink = torch.randn(h, generator=g)
    win, comp = _sources(g, b, 8, 37, packed)
    if packed:  # the stored bytes decode to the layout's own unpacking
        assert torch.equal(win.decode(c), LAYOUT.unpack_main(win.data))
    win_idx = torch.tensor([[0, 1, 2, -1, 4, 5, 6, 7], [3, -1, -1, -1, -1, -1, -1, -1]])
    win_idx = win_idx.expand(b, s, 8)
    comp_idx = torch.tensor([[[36, 0, 17, -1, 16], [-1] * 5], [[1, 2, 3, 4, 5], [32, -1, 9, 8, 7]]])
    count = torch.tensor([[0, 16], [17, 37]])  # none, a block boundary, odd, all
    cases = [{}, {"comp": comp, "comp_idx": comp_idx}, {"comp": comp, "comp_count": count}]
    for extra in cases:
        got = triton_compressed_attention(q, sink, c**-0.5, win, win_idx, **extra, block_k=16)
        want = compressed_attention_torch(q, sink, c**-0.5, win, win_idx, **extra)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # a row with no key at all gives 0 (only the sink in the denominator)
    none = torch.full((b, s, 8), -1)
    got = triton_compressed_attention(q, sink, c**-0.5, win, none, comp, comp_count=count * 0)
    assert torch.equal(got, torch.zeros_like(got))


def test_attention_bad_inputs():
    q, sink = torch.zeros(1, 1, 2, 128), torch.zeros(2)
    win = Entries(torch.zeros(1, 4, 128))
    idx = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of comp_idx and comp_count"):
        triton_compressed_attention(q, sink, 1.0, win, idx, win)
    with pytest.raises(ValueError, match=r"sink shape \(3,\) != \(2,\)"):
        triton_compressed_attention(q, torch.zeros(3), 1.0, win, idx)


# ---------------------------------------------------------------------------- decode layer
def _layer(kind, kv_dtype):
    cfg = V4Config.from_preset("tiny", kv_dtype=kv_dtype)
    layer_id = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == kind)
    torch.manual_seed(0)
    attn = Attention(cfg, layer_id)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("ape") or name == "attn_sink":
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    tri = copy.deepcopy(attn)
    tri.cfg = cfg.replace(attn_impl="triton")
    return attn, tri


@pytest.mark.parametrize(("kind", "kv_dtype"), [("csa", "fp8"), ("hca", "fp8"), ("csa", "float32")])
def test_decode_layer_equals_torch(kind, kv_dtype):
    # padded batch: rows prefilled with 13 and 6 tokens, then decode steps that cross the CSA
    # block (m = 4), window (W = 8) and HCA block (m' = 16) boundaries; tiny top-k 3 < visible
    from policy.kv_cache import LayerCache

    ref, tri = _layer(kind, kv_dtype)
    cfg = ref.cfg
    torch.manual_seed(1)
    x = torch.randn(2, 13, cfg.hidden_size)
    lengths = torch.tensor([13, 6])
    pos = torch.arange(13).expand(2, 13)
    caches = []
    with torch.no_grad():  # not inference_mode (module doc)
        cache = LayerCache(cfg, ref.layer_id, 2, 32, "cpu")
        ref(x, pos, cache, lengths)
        caches = [cache, copy.deepcopy(cache)]
        p = lengths.clone()
        for _ in range(4):
            xt = torch.randn(2, 1, cfg.hidden_size)
            want = ref(xt, p[:, None], caches[0])
            got = tri(xt, p[:, None], caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            p += 1
    for a, b in zip(caches[0].tensors(), caches[1].tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_prefill_and_continuation_equal_torch(kind):
    # the cached extend (engine prefill, then a continuation off the block grid) through the
    # block-sparse path: attention kernel on the timeline + entries, fused indexer top-k,
    # pooling kernel; padded rows of different lengths
    from policy.kv_cache import LayerCache

    ref, tri = _layer(kind, "fp8")
    cfg = ref.cfg
    torch.manual_seed(2)
    outs, caches = [], []
    for layer in (ref, tri):
        torch.manual_seed(2)
        cache = LayerCache(cfg, layer.layer_id, 2, 48, "cpu")
        with torch.no_grad():  # not inference_mode (module doc)
            x = torch.randn(2, 19, cfg.hidden_size)
            y = layer(x, torch.arange(19).expand(2, 19), cache, torch.tensor([19, 11]))
            x2 = torch.randn(2, 6, cfg.hidden_size)
            pos2 = torch.tensor([[19], [11]]) + torch.arange(6)
            y2 = layer(x2, pos2, cache, torch.tensor([6, 6]))
        outs.append((y[0], y[1, :11], y2))
        caches.append(cache)
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(caches[0].tensors(), caches[1].tensors(), strict=True):
        if a.dtype == torch.uint8:  # FP8 / FP4 bytes of entries pooled in another order
            assert (a != b).float().mean() <= 0.01
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- compressor
@pytest.mark.parametrize(("ratio", "head_dim"), [(4, 128), (16, 64)])
def test_pool_kernel_equals_compressor_pool(ratio, head_dim):
    # CSA (overlap: 2m slots, halves of 2c channels) and HCA (m slots); the first entry's
    # previous-block slots at -inf (weight 0), as the full forward builds them
    from policy.compressor import Compressor
    from policy.kernels.triton_compressor import triton_pool

    comp = Compressor(CFG, ratio, head_dim)
    width = comp.wkv.weight.shape[0]
    g = torch.Generator().manual_seed(ratio)
    kv = torch.randn(2, 3, comp.slots, width, generator=g)
    score = torch.randn(2, 3, comp.slots, width, generator=g) * 3
    if comp.overlap:
        kv[:, 0, :ratio] = 0.0
        score[:, 0, :ratio] = float("-inf")
    got = triton_pool(kv, score, ratio, comp.overlap)
    torch.testing.assert_close(got, comp.pool(kv, score), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- GPU
@requires_gpu
def test_gpu_kernels_match_torch():
    # bf16 queries on the device (bf16 dots: exact for FP8 x 2^k and BF16 key values)
    g = torch.Generator().manual_seed(5)
    b, s, h, c, n = 2, 3, 16, 128, 300
    q = (torch.randn(b, s, h, c, generator=g) * 0.3).cuda()
    w = torch.randn(b, s, h, generator=g).cuda()
    keys = torch.randn(b, n, c, generator=g)
    stored = LAYOUT.pack_index(keys).cuda()
    nvis = torch.tensor([[0, 7, 300], [150, 299, 64]]).cuda()
    idx, sc = triton_indexer_topk(q, w, stored, nvis, 64, packed_block=32, return_scores=True)
    vis = _visible(nvis.cpu(), n)
    want = index_scores(q.cpu(), w.cpu(), LAYOUT.unpack_index(stored.cpu()))
    torch.testing.assert_close(sc.cpu(), want.masked_fill(~vis, float("-inf")), atol=1e-4, rtol=0)
    assert torch.equal(idx.cpu(), topk_indices(sc.cpu(), vis, 64))
    win, comp = _sources(g, b, 128, n, True)
    win, comp = Entries(win.data.cuda(), *win[1:]), Entries(comp.data.cuda(), *comp[1:])
    win_idx = torch.arange(128).expand(b, s, 128).cuda()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qd = q.to(dtype)
        sink = torch.randn(h, generator=g).cuda()
        for extra in ({"comp_idx": idx}, {"comp_count": nvis}):
            got = triton_compressed_attention(qd, sink, c**-0.5, win, win_idx, comp, **extra)
            want = compressed_attention_torch(
                qd.float(), sink, c**-0.5, win, win_idx, comp, **extra
            )
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)
