"""The native CPU indexer kernel (policy.kernels.cpu_indexer, policy/rust/kernels) against the
torch reference, and the decode of CSA layers with attn_impl="cpu" against the torch decode.

Tolerances:
- scores: 2e-5 absolute on scores of magnitude <= ~5 (fp32; the decoded values are exact, only
  the summation order of the dots and of the heads differs from torch's matmuls). The top-k
  choice is checked exactly: against ``topk_indices`` on the kernel's own scores (the tie rule,
  bit for bit) and against the full torch reference where scores are exact in any order
  or have no near-ties (the tie test with integer inputs and all-equal scores runs for both
  kernels in test_kernels_compressed.py).
- decode layer: 1e-5 absolute on the layer output and identical cache bytes afterwards (the
  same entries are chosen; only the indexer's summation order differs).
"""

from __future__ import annotations

import copy

import pytest
import torch

from policy.config import V4Config
from policy.indexer import index_scores, topk_indices
from policy.kernels import cpu_indexer
from policy.kernels.cpu_indexer import cpu_indexer_topk
from policy.kernels.triton_indexer import indexer_topk_torch
from policy.kv_cache import LayerCache
from policy.kv_layout import KVLayout
from policy.quant import fake_quant_fp4
from tests.policy.test_kv_cache import _attn_layer

CFG = V4Config.from_preset("tiny")  # indexer dim 128, MXFP4 block 32
LAYOUT = KVLayout.from_config(CFG)


def _visible(nvis, n):
    return torch.arange(n) < nvis[..., None]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("heads", [3, 4, 9])  # tails of the four-head vector path, and none
@pytest.mark.parametrize("fp4_queries", [False, True])  # FP4-rounded, as the model's are
def test_scores_and_topk_equal_the_reference(packed, heads, fp4_queries):
    # odd N; rows with 0 (padded query), 3 (fewer than k), 16 and all 33 visible entries, odd
    # and even counts (the kernel scores entries in pairs)
    g = torch.Generator().manual_seed(heads)
    b, s, c, n, k = 2, 2, 128, 33, 5
    q = torch.randn(b, s, heads, c, generator=g)
    if fp4_queries:  # as the indexer's queries are (policy.compressor.quantize_index)
        q = fake_quant_fp4(q, 32)
    w = torch.randn(b, s, heads, generator=g)
    keys = torch.randn(b, n, c, generator=g)
    nvis = torch.tensor([[0, 3], [16, 33]])
    if packed:
        stored = LAYOUT.pack_index(keys)  # MXFP4 rows, 68 bytes
        keys = LAYOUT.unpack_index(stored)
        idx, sc = cpu_indexer_topk(q, w, stored, nvis, k, packed_block=32, return_scores=True)
    else:
        idx, sc = cpu_indexer_topk(q, w, keys, nvis, k, return_scores=True)
    vis = _visible(nvis, n)
    want = index_scores(q, w, keys).masked_fill(~vis, float("-inf"))
    torch.testing.assert_close(sc, want, atol=2e-5, rtol=0)
    assert idx.shape == (b, s, k) and idx.dtype == torch.int64
    assert torch.equal(idx, topk_indices(sc, vis, k))
    assert (idx[0, 0] == -1).all() and (idx[0, 1, 3:] == -1).all()
    assert torch.equal(idx, indexer_topk_torch(q, w, keys, nvis, k))  # no near-ties here


@pytest.mark.parametrize("block", [32, 64, 16])  # 16: the portable decode
def test_packed_keys_read_in_place_from_a_cache_slice(block):
    # keys as the decode passes them: the first n entries of a bigger cache (batch stride of the
    # capacity, not of n), several batch rows with their own visible counts
    g = torch.Generator().manual_seed(block)
    layout = KVLayout.from_config(CFG.replace(index_quant_block=block))
    b, s, h, c, cap, n, k = 3, 1, 4, 128, 50, 41, 7
    stored = layout.pack_index(torch.randn(b, cap, c, generator=g) * 3)
    q = torch.randn(b, s, h, c, generator=g)
    q[1] = fake_quant_fp4(q[1], 32)  # one row rounded as the model's queries are
    w = torch.rand(b, s, h, generator=g)
    nvis = torch.tensor([[41], [40], [2]])
    view = stored[:, :n]
    assert not view.is_contiguous()
    idx, sc = cpu_indexer_topk(q, w, view, nvis, k, packed_block=block, return_scores=True)
    keys = layout.unpack_index(view)
    want = index_scores(q, w, keys).masked_fill(~_visible(nvis, n), float("-inf"))
    torch.testing.assert_close(sc, want, atol=1e-4, rtol=1e-6)
    assert torch.equal(idx, topk_indices(sc, _visible(nvis, n), k))
    assert torch.equal(idx, indexer_topk_torch(q, w, keys, nvis, k))


def test_empty_and_k_larger_than_the_entries():
    q, w = torch.randn(2, 1, 4, 128), torch.rand(2, 1, 4)
    keys = torch.randn(2, 3, 128)
    got = cpu_indexer_topk(q, w, keys, torch.tensor([[3], [1]]), 16)
    assert got.shape == (2, 1, 3)  # min(k, N) slots
    assert (got[1, 0, 1:] == -1).all() and got[1, 0, 0] == 0
    assert cpu_indexer_topk(q, w, keys[:, :0], torch.zeros(2, 1), 4).shape == (2, 1, 0)
    assert cpu_indexer_topk(q, w, keys, torch.ones(2, 1), 0).shape == (2, 1, 0)
    assert cpu_indexer_topk(q[:, :0], w[:, :0], keys, torch.ones(2, 0), 2).shape == (2, 0, 2)


def test_bad_inputs_are_refused_by_name():
    q, w, nv = torch.zeros(1, 1, 2, 128), torch.zeros(1, 1, 2), torch.ones(1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_indexer_topk(q, w, torch.zeros(1, 4, 64), nv, 2)
    with pytest.raises(ValueError, match="packed keys must be uint8"):
        cpu_indexer_topk(q, w, torch.zeros(1, 4, 68), nv, 2, packed_block=32)
    with pytest.raises(ValueError, match="float keys must be float32"):
        cpu_indexer_topk(q, w, torch.zeros(1, 4, 128, dtype=torch.bfloat16), nv, 2)
    with pytest.raises(
        ValueError, match="packed_block must be even and divide the head dim 128: 48"
    ):
        cpu_indexer_topk(q, w, torch.zeros(1, 4, 66, dtype=torch.uint8), nv, 2, packed_block=48)
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        cpu_indexer_topk(q, w, torch.zeros(1, 4, 128), nv, -1)
    with pytest.raises(ValueError, match=r"w \(1, 1, 3\)"):
        cpu_indexer_topk(q, torch.zeros(1, 1, 3), torch.zeros(1, 4, 128), nv, 2)


def test_a_missing_library_names_the_build_step(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_indexer, "LIBRARY", tmp_path / "_v4cpu.so")
    cpu_indexer._library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="make build"):
            cpu_indexer_topk(
                torch.zeros(1, 1, 2, 128),
                torch.zeros(1, 1, 2),
                torch.zeros(1, 4, 128),
                torch.ones(1, 1),
                2,
            )
    finally:
        cpu_indexer._library.cache_clear()


def test_config_accepts_cpu_and_keeps_official_numerics_on_torch():
    assert CFG.replace(attn_impl="cpu").core_impl == "torch"
    assert CFG.replace(attn_impl="triton").core_impl == "triton"
    with pytest.raises(ValueError, match="attn_impl='cpu'"):
        CFG.replace(attn_impl="cpu", numerics="official")


# ---------------------------------------------------------------------------- decode layer
@pytest.mark.parametrize("kv_dtype", ["fp8", "float32"])
def test_csa_decode_equals_torch(kv_dtype):
    # padded batch: rows prefilled with 13 and 6 tokens, then decode steps that cross CSA block
    # (m = 4) and window boundaries; the tiny top-k is below the visible count
    ref = _attn_layer("csa", kv_dtype)
    cfg, layer_id = ref.cfg, ref.layer_id
    fast = copy.deepcopy(ref)
    fast.cfg = cfg.replace(attn_impl="cpu")
    x = torch.randn(2, 13, cfg.hidden_size)
    lengths = torch.tensor([13, 6])
    with torch.no_grad():
        cache = LayerCache(cfg, layer_id, 2, 40, "cpu")
        ref(x, torch.arange(13).expand(2, 13), cache, lengths)
        own = LayerCache(fast.cfg, layer_id, 2, 40, "cpu")  # its own cache: no index mirror
        fast(x, torch.arange(13).expand(2, 13), own, lengths)
        assert own.index.mirror is None and (
            kv_dtype == "float32" or cache.index.mirror is not None
        )
        caches = [cache, own]
        p = lengths.clone()
        for _ in range(12):
            xt = torch.randn(2, 1, cfg.hidden_size)
            want = ref(xt, p[:, None], caches[0])
            got = fast(xt, p[:, None], caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            p += 1
    assert int(p.min()) // ref.ratio > cfg.index_topk  # the choice was a real top-k
    for a, b in zip(caches[0].tensors(), caches[1].tensors(), strict=True):
        assert torch.equal(a, b)
