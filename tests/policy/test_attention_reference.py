"""Each attention layer kind against the naive reference that materialises the full attention
rows with explicit visibility rules (policy.kernels.reference).

Tolerance: fp32 model; kv_dtype float32 -> atol/rtol 2e-5 (pure float reordering); kv_dtype fp8
-> atol 1e-4 (the same FP8/FP4 fake-quantisation on both sides; a rare rounding-boundary flip
from float reordering is allowed for at most 0.5% of outputs).
"""

import pytest
import torch

from policy.attention import Attention
from policy.config import V4Config
from policy.kernels import sources_attention, sparse_attention
from policy.kernels.reference import reference_attention


def _layer(kind: str, kv_dtype: str, seed: int = 0) -> Attention:
    cfg = V4Config.from_preset("tiny", kv_dtype=kv_dtype)
    layer_id = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == kind)
    torch.manual_seed(seed)
    attn = Attention(cfg, layer_id)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("ape") or name == "attn_sink":
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return attn


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
@pytest.mark.parametrize("kv_dtype", ["float32", "fp8"])
def test_layer_matches_reference(kind, kv_dtype):
    attn = _layer(kind, kv_dtype)
    torch.manual_seed(1)
    s = 40  # window 8 wraps 5x, 10 CSA blocks (top-k 3 of up to 10), 2 HCA blocks of 16
    x = torch.randn(2, s, attn.cfg.hidden_size)
    pos = torch.arange(s).expand(2, s)
    got = attn(x, pos)
    want = reference_attention(attn, x)
    if kv_dtype == "float32":
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:
        bad = ((got - want).abs() > 1e-4 + 1e-4 * want.abs()).float().mean()
        assert bad <= 0.005, f"{bad:.4f} of outputs differ"


def test_csa_topk_is_binding():
    """With top-k smaller than the visible set the choice changes the output."""
    attn = _layer("csa", "float32")
    x = torch.randn(1, 40, attn.cfg.hidden_size)
    pos = torch.arange(40)[None]
    base = attn(x, pos)
    attn.cfg.index_topk = 100  # every visible entry
    try:
        wide = attn(x, pos)
    finally:
        attn.cfg.index_topk = 3
    assert torch.allclose(base[:, :15], wide[:, :15], atol=1e-6)  # <= 3 entries visible
    assert not torch.allclose(base[:, 20:], wide[:, 20:], atol=1e-4)


def test_sink_in_denominator_only():
    q = torch.randn(1, 1, 2, 8)
    kv = torch.randn(1, 3, 8)
    allowed = torch.ones(1, 1, 3, dtype=torch.bool)
    no_sink = sparse_attention(q, kv, allowed, torch.full((2,), -1e9), 1.0)
    with_sink = sparse_attention(q, kv, allowed, torch.zeros(2), 1.0)
    logits = torch.einsum("bshc,bnc->bshn", q, kv)
    z = logits.exp().sum(-1)
    torch.testing.assert_close(with_sink, no_sink * (z / (z + 1))[..., None])


def test_query_chunking_is_exact(monkeypatch):
    """Long prefills run queries in chunks; the result must not change."""
    import policy.indexer
    import policy.kernels

    attn = _layer("csa", "float32")
    x = torch.randn(2, 40, attn.cfg.hidden_size)
    pos = torch.arange(40).expand(2, 40)
    whole = attn(x, pos)
    monkeypatch.setattr(policy.kernels, "MAX_BLOCK_ELEMS", 2 * 4 * 60 * 7)
    monkeypatch.setattr(policy.indexer, "MAX_BLOCK_ELEMS", 2 * 2 * 10 * 7)
    torch.testing.assert_close(attn(x, pos), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_sources_attention_is_attention_over_the_joined_keys(bf16, monkeypatch):
    """The decode step's softmax over the ring and the compressed entries, kept apart, equals
    the one over their concatenation: rows that see nothing in one source, a source no query
    sees, an empty source, and query chunks."""
    import policy.kernels

    g = torch.Generator().manual_seed(3)
    b, s, h, c = 2, 5, 3, 16
    q = torch.randn(b, s, h, c, generator=g)
    kvs = [torch.randn(b, n, c, generator=g) for n in (7, 0, 11, 4)]
    allowed = [torch.rand(b, s, kv.shape[1], generator=g) < 0.6 for kv in kvs]
    allowed[0][:, 1] = False  # query 1 sees nothing of the first source
    allowed[3][:] = False  # nobody sees the last source
    sink = torch.randn(h, generator=g)
    want = sparse_attention(q, torch.cat(kvs, 1), torch.cat(allowed, -1), sink, 0.25, bf16)
    got = sources_attention(q, list(zip(kvs, allowed, strict=True)), sink, 0.25, bf16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(policy.kernels, "MAX_BLOCK_ELEMS", b * h * 22 * 2)  # chunks of 2 queries
    chunked = sources_attention(q, list(zip(kvs, allowed, strict=True)), sink, 0.25, bf16)
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=0)
    assert torch.equal(
        sources_attention(q, [(kvs[1], allowed[1])], sink, 0.25), torch.zeros_like(q)
    )
