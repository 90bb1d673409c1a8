"""The Hadamard rotation of indexer queries and keys returns BF16 before FP4 (the official rule),
on the full, prefill and decode paths.
"""

import pytest
import torch

from policy.compressor import hadamard, quantize_index
from policy.config import V4Config
from policy.kv_cache import LayerCache
from policy.quant import dequantize_fp4, quantize_fp4
from tests.policy.test_kv_cache import _attn_layer

BF16 = torch.bfloat16


# ------------------------------------------------------------------ the Hadamard fix
def _fp4_rule(x: torch.Tensor) -> torch.Tensor:
    """The indexer rule on a rotation x (fp32): round to BF16, then MXFP4 (block 32)."""
    packed, scale = quantize_fp4(x.to(BF16).float(), 32)
    return dequantize_fp4(packed, scale, 32)


@torch.no_grad()
def test_indexer_fp4_keys_and_queries_quantise_the_bf16_rotation():
    """Prefill then decode with an FP8 cache stores FP4 indexer keys equal to the rule applied to
    the fp32 rotation that the same layer (same weights, same path) stores in a float32 cache."""
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(3))
    keys = {}
    for kv_dtype in ("fp8", "float32"):
        attn = _attn_layer("csa", kv_dtype)
        cache = LayerCache(attn.cfg, attn.layer_id, 2, 64, "cpu")
        lens = torch.tensor([5, 12])
        attn(x[:, :12], torch.arange(12).expand(2, 12), cache, lens)  # prefill
        for p in range(5, 20):  # decode row 0 from 5, row 1 from 12 (clamped, ignored later)
            pos = torch.tensor([p, max(p, 12)])
            attn(x[torch.arange(2), pos][:, None], pos[:, None], cache)
        keys[kv_dtype] = cache.index.read(5).clone()  # 5 complete blocks of 4 in both rows
    rot32 = keys["float32"]
    assert torch.equal(keys["fp8"], _fp4_rule(rot32))
    # the rule is not the FP4 of the fp32 rotation (what the keys were before the fix)
    packed, scale = quantize_fp4(rot32, 32)
    assert not torch.equal(keys["fp8"], dequantize_fp4(packed, scale, 32))

    qs = {}
    for kv_dtype in ("fp8", "float32"):
        attn = _attn_layer("csa", kv_dtype)
        pos = torch.arange(20).expand(2, 20)
        qr = attn.q_norm(attn.wq_a(x))
        qs[kv_dtype] = attn.indexer.queries(qr, x, pos, attn.inv_freq)[0]
    assert torch.equal(qs["fp8"], _fp4_rule(qs["float32"]))


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_unquantised_index_formats_keep_their_rounding(kv_dtype):
    """kv_dtype float32 / bfloat16 (no FP4): the rotation is rounded to kv_dtype only."""
    cfg = V4Config.from_preset("tiny", kv_dtype=kv_dtype)
    x = torch.randn(5, 128)
    assert torch.equal(quantize_index(x, cfg), hadamard(x).to(getattr(torch, kv_dtype)).float())
