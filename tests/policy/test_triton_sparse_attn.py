"""Triton CSA sparse-attention core under the interpreter (TRITON_INTERPRET=1, set in conftest)
against a naive float64 loop, the gathered torch version and the dense-mask kernel of
policy.kernels. Tolerances: fp32 inputs 2e-5 absolute (outputs are O(1)); bf16 inputs 1e-2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from policy.config import V4Config
from policy.kernels import allowed_to_indices, sparse_attention
from policy.kernels.triton_sparse_attn import (
    gathered_sparse_attention_torch,
    triton_sparse_attention,
)
from policy.model import V4Model


def naive(q, kv, idx, sink, scale) -> torch.Tensor:
    """Loop over rows and heads in float64, straight from the formula."""
    b, s, h, c = q.shape
    out = torch.zeros(b, s, h, c, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            keys = [kv[bi, j].double() for j in idx[bi, si].tolist() if j >= 0]
            for hi in range(h):
                num = torch.zeros(c, dtype=torch.float64)
                den = torch.exp(sink[hi].double())
                for k in keys:
                    w = torch.exp((q[bi, si, hi].double() @ k) * scale)
                    num += w * k
                    den += w
                out[bi, si, hi] = num / den
    return out


def make_case(b, s, h, c, n, k, dtype, seed, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s, h, c, generator=g) * 0.3).to(dtype)
    kv = torch.randn(b, n, c, generator=g).to(dtype)
    idx = torch.stack(
        [torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(s)]) for _ in range(b)]
    ).to(torch.int32)
    idx[torch.rand(b, s, k, generator=g) < 0.2] = -1  # holes ("no key")
    if empty_row:
        idx[0, 0] = -1
    sink = torch.randn(h, generator=g)
    return q, kv, idx, sink, c**-0.5


@pytest.mark.parametrize(
    ("b", "s", "h", "c", "n", "k", "block_k"),
    [(1, 3, 16, 128, 160, 40, 32), (2, 2, 3, 64, 96, 17, 16), (1, 2, 5, 128, 128, 128, 64)],
)
def test_matches_naive_fp32(b, s, h, c, n, k, block_k) -> None:
    q, kv, idx, sink, scale = make_case(b, s, h, c, n, k, torch.float32, seed=h, empty_row=True)
    got = triton_sparse_attention(q, kv, idx, sink, scale, block_k=block_k)
    want = naive(q, kv, idx, sink, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=0)
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))  # only the sink
    tor = gathered_sparse_attention_torch(q, kv, idx, sink, scale)
    assert torch.allclose(tor.double(), want, atol=2e-5, rtol=0)
    # Same result as the dense-mask kernel with the index list turned into a mask.
    allowed = torch.zeros(b, s, n, dtype=torch.bool)
    bi, si, ki = (idx >= 0).nonzero(as_tuple=True)
    allowed[bi, si, idx[bi, si, ki].long()] = True
    dense = sparse_attention(q, kv, allowed, sink, scale)
    assert torch.allclose(got, dense, atol=2e-5, rtol=0)


def test_bf16_inputs() -> None:
    q, kv, idx, sink, scale = make_case(1, 2, 16, 128, 144, 48, torch.bfloat16, seed=7)
    got = triton_sparse_attention(q, kv, idx, sink, scale)
    assert got.dtype == torch.bfloat16
    want = naive(q.float(), kv.float(), idx, sink, scale)
    assert torch.allclose(got.double(), want, atol=1e-2, rtol=0)


def test_bad_inputs() -> None:
    q, kv, idx, sink, scale = make_case(1, 1, 2, 64, 32, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="power of two >= 16, got 48"):
        triton_sparse_attention(q[..., :48], kv[..., :48], idx, sink, scale)
    with pytest.raises(ValueError, match=r"sink shape \(3,\) != \(2,\)"):
        triton_sparse_attention(q, kv, idx, torch.zeros(3), scale)
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        triton_sparse_attention(q, kv, idx.float(), sink, scale)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16, got 24"):
        triton_sparse_attention(q, kv, idx, sink, scale, block_k=24)


def test_allowed_to_indices_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(2, 5, 11, generator=g) < 0.4
    allowed[1, 2] = False  # a query that sees nothing
    idx = allowed_to_indices(allowed)
    assert idx.shape[-1] == int(allowed.sum(-1).max())
    back = torch.zeros_like(allowed)
    bi, si, ki = (idx >= 0).nonzero(as_tuple=True)
    back[bi, si, idx[bi, si, ki]] = True
    assert torch.equal(back, allowed)
    assert (idx[1, 2] == -1).all()


def test_model_with_triton_attention_equals_torch() -> None:
    # whole tiny model (SWA, CSA with top-k, HCA), full forward and cached decode: the Triton
    # core gives the torch core's logits up to float summation order
    torch.manual_seed(0)
    cfg = V4Config.from_preset("tiny", kv_dtype="float32")
    ref = V4Model(cfg).eval()
    tri = V4Model(dataclasses.replace(cfg, attn_impl="triton")).eval()
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tri(ids), ref(ids), atol=1e-5, rtol=0)
    outs = []
    for model in (ref, tri):
        cache = model.new_cache(2, 12)
        logits = [model.prefill(ids[:, :6], torch.tensor([6, 4]), cache)]
        for t in range(3):
            logits.append(model.decode(ids[:, 6 + t], cache))
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no backward"):
        tri.loss(ids)
