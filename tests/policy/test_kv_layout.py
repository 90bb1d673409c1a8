"""KV-cache layout arithmetic (policy/kv_layout.py) against V4_SPEC.md §8."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from policy.kv_layout import (
    KVLayout,
    gqa_bf16_bytes,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    mla_v32_bytes,
)
from policy.quant import fake_quant_fp4, fake_quant_fp8

M = 2**20


def spec_config(name: str, **over) -> SimpleNamespace:
    """The attention fields of V4_SPEC.md §1.1 (independent of policy.config)."""
    ratios = {
        "flash": (0, 0, *([4, 128] * 20), 4, 0),
        "pro": (128, 128, *([4, 128] * 29), 4, 0),
    }[name]
    fields = dict(
        num_hidden_layers=len(ratios) - 1,
        compress_ratios=ratios,
        head_dim=512,
        qk_rope_head_dim=64,
        kv_quant_block=64,
        index_head_dim=128,
        index_quant_block=32,
        sliding_window=128,
        csa_ratio=4,
        kv_dtype="fp8",
    )
    return SimpleNamespace(**{**fields, **over})


def test_official_entry_sizes() -> None:
    lay = KVLayout.from_config(spec_config("flash"))
    assert (lay.nope_dims, lay.rope_dims, lay.scale_block) == (448, 64, 64)
    assert lay.main_entry_bytes == 584 and lay.index_entry_bytes == 68
    assert KVLayout.from_config(spec_config("flash"), index_dtype="fp8").index_entry_bytes == 132
    bf = KVLayout.from_config(spec_config("flash", kv_dtype="bfloat16"))
    assert (bf.main_entry_bytes, bf.index_entry_bytes) == (1024, 256)
    f32 = KVLayout.from_config(spec_config("pro", kv_dtype="float32"))
    assert (f32.main_entry_bytes, f32.index_entry_bytes) == (2048, 512)


def test_layer_plan_excludes_mtp() -> None:
    fl = KVLayout.from_config(spec_config("flash"))
    assert fl.n_layers == 43 and (fl.count("swa"), fl.count("csa"), fl.count("hca")) == (2, 21, 20)
    pro = KVLayout.from_config(spec_config("pro"))
    assert pro.n_layers == 61 and (pro.count("swa"), pro.count("csa"), pro.count("hca")) == (
        0,
        30,
        31,
    )
    assert pro.kinds[:3] == ("hca", "hca", "csa")


def test_amortised_bytes_per_token_match_spec() -> None:
    assert KVLayout.from_config(spec_config("flash")).amortised_bytes_per_token() == 3514.25
    assert KVLayout.from_config(spec_config("pro")).amortised_bytes_per_token() == pytest.approx(
        5031.4375, abs=0
    )


def test_ratios_vs_v32_at_one_million_tokens() -> None:
    v32 = mla_v32_bytes(M)
    assert v32 == 61 * M * 788 and v32 / M == 48068
    flash = kv_cache_bytes(spec_config("flash"), M)
    pro = kv_cache_bytes(spec_config("pro"), M)
    assert flash / v32 == pytest.approx(0.073, abs=0.0005)
    assert pro / v32 == pytest.approx(0.105, abs=0.0005)
    assert kv_cache_bytes_per_token(spec_config("flash"), M) * M == flash
    # 2% of a BF16 GQA-8 cache with the same layer count (V4_SPEC §8.2: 2.00% / 2.02%).
    assert flash / gqa_bf16_bytes(M, 43) == pytest.approx(0.0200, abs=0.0003)
    assert pro / gqa_bf16_bytes(M, 61) == pytest.approx(0.0202, abs=0.0003)


def test_exact_accounting_flash() -> None:
    """Every term of the module doc, written out for Flash at T = 1000, batch 3."""
    t, b = 1000, 3
    window = 43 * 128 * 584
    compressed = 21 * (t // 4) * 584 + 20 * (t // 128) * 584
    indexer = 21 * (t // 4) * 68
    state = 21 * (2 * 8 * 1024 + 2 * 8 * 256) * 4 + 20 * (2 * 128 * 512) * 4
    assert window == 3_214_336
    parts = KVLayout.from_config(spec_config("flash")).breakdown(t, b)
    assert parts == {
        "window": b * window,
        "compressed": b * compressed,
        "indexer": b * indexer,
        "state": b * state,
        "total": b * (window + compressed + indexer + state),
    }
    assert kv_cache_bytes(spec_config("flash"), t, b) == parts["total"]
    # Tokens of an unfinished block are not entries yet.
    assert kv_cache_bytes(spec_config("flash"), 1003) == kv_cache_bytes(spec_config("flash"), t)


def test_pack_main_round_trip_equals_fake_quant() -> None:
    lay = KVLayout.from_config(spec_config("flash"))
    torch.manual_seed(0)
    kv = torch.randn(3, 5, 512) * 4
    buf = lay.pack_main(kv)
    assert buf.dtype == torch.uint8 and buf.shape == (3, 5, 584)
    assert bool((buf[..., 583] == 0).all())
    want = torch.cat((fake_quant_fp8(kv[..., :448], 64), kv[..., 448:].bfloat16().float()), -1)
    assert torch.equal(lay.unpack_main(buf), want)
    # vLLM byte order: [448 B nope][128 B rope][7 B scales][pad]
    assert torch.equal(
        buf[..., 448:576].contiguous().view(torch.bfloat16), kv[..., 448:].bfloat16()
    )


def test_pack_main_values_are_the_unpacked_bytes() -> None:
    # the values written beside the bytes (the cache's decode mirror) are unpack_main of them,
    # bit for bit, over wide magnitudes, signed zeros, a NaN and an infinity
    lay = KVLayout.from_config(spec_config("flash"))
    torch.manual_seed(3)
    kv = torch.randn(5, 7, lay.head_dim) * torch.exp2(torch.randint(-30, 30, (5, 7, 1)).float())
    kv[0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    kv[0, 1, 5] = float("inf")
    packed, values = lay.pack_main_values(kv)
    assert torch.equal(packed, lay.pack_main(kv))
    want = lay.unpack_main(packed)
    assert torch.equal(values.view(torch.int32), want.view(torch.int32))


def test_pack_index_round_trip() -> None:
    torch.manual_seed(1)
    k = torch.randn(7, 128)
    fp4 = KVLayout.from_config(spec_config("flash"))
    buf = fp4.pack_index(k)
    assert buf.shape == (7, 68)
    assert torch.equal(fp4.unpack_index(buf), fake_quant_fp4(k, 32))
    fp8 = KVLayout.from_config(spec_config("flash"), index_dtype="fp8")
    buf = fp8.pack_index(k)
    assert buf.shape == (7, 132)
    assert torch.equal(fp8.unpack_index(buf), fake_quant_fp8(k, 128))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"kv_dtype must be.*'fp16'"):
        KVLayout.from_config(spec_config("flash", kv_dtype="fp16"))
    with pytest.raises(ValueError, match=r"index_dtype must be.*'int4'"):
        KVLayout.from_config(spec_config("flash"), index_dtype="int4")
    with pytest.raises(ValueError, match="lacks the field 'head_dim'"):
        KVLayout.from_config(SimpleNamespace(kv_dtype="fp8"))
    with pytest.raises(ValueError, match="context_len must be an int >= 0, got -1"):
        kv_cache_bytes(spec_config("pro"), -1)
    with pytest.raises(ValueError, match="context_len must be an int >= 1, got 0"):
        kv_cache_bytes_per_token(spec_config("pro"), 0)
    lay = KVLayout.from_config(spec_config("flash", kv_dtype="bfloat16"))
    with pytest.raises(ValueError, match="kv_dtype 'fp8' only, not 'bfloat16'"):
        lay.pack_main(torch.zeros(1, 512))


# ------------------------------------------------------------------ with V4Config and the real cache


@pytest.mark.parametrize(("preset", "ratio"), [("flash", 0.073), ("pro", 0.105)])
def test_presets_match_spec_config_and_published_ratio(preset: str, ratio: float) -> None:
    from policy.config import V4Config

    cfg = V4Config.from_preset(preset)
    assert KVLayout.from_config(cfg) == KVLayout.from_config(spec_config(preset))
    assert kv_cache_bytes(cfg, M) / mla_v32_bytes(M) == pytest.approx(ratio, abs=0.0005)
    assert KVLayout.from_config(cfg).amortised_bytes_per_token() == pytest.approx(
        {"flash": 3514.25, "pro": 5031.4375}[preset], abs=1e-9
    )


@pytest.mark.parametrize("kv_dtype", ["fp8", "bfloat16", "float32"])
@pytest.mark.parametrize(("context", "batch"), [(1, 1), (100, 2), (1000, 1), (1029, 3)])
def test_demo_cache_allocates_what_the_formula_says(kv_dtype: str, context: int, batch: int):
    from policy.config import V4Config
    from policy.kv_cache import KVCache

    cfg = V4Config.from_preset("demo", kv_dtype=kv_dtype)
    cache = KVCache(cfg, batch, context)
    assert cache.nbytes() == kv_cache_bytes(cfg, context, batch)
    parts = KVLayout.from_config(cfg).breakdown(context, batch)
    assert cache.entry_nbytes() == parts["total"] - parts["state"]
