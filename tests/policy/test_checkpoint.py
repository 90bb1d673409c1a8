"""Official-layout and own checkpoints (policy/checkpoint.py).

The official round trip is exact: the source model's weights are first rounded through the same
storage formats (``round_to_official``: FP8 128×128 tiles, MXFP4 experts, BF16 rest), so the
loaded model must reproduce its state dict and logits bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from policy.checkpoint import (
    CheckpointMismatchError,
    load,
    load_official,
    official_tensor_specs,
    read_config,
    round_to_official,
    save,
    save_official,
)
from policy.config import V4Config
from policy.model import V4Model

F8, E8, I8 = torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8
BF16, F32, I64 = torch.bfloat16, torch.float32, torch.int64


def _model(seed: int, cfg: V4Config | None = None) -> V4Model:
    torch.manual_seed(seed)
    return V4Model(cfg or V4Config.from_preset("tiny"))


def _ids(cfg: V4Config) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[V4Model, Path]:
    """A tiny model rounded to the official formats and written as several shards."""
    src = round_to_official(_model(0))
    d = tmp_path_factory.mktemp("official")
    paths = save_official(src, d, shard_bytes=150_000)
    assert len(paths) >= 3
    return src, d


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def test_official_files_use_the_official_dtypes(official) -> None:
    src, d = official
    tensors = _all_tensors(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert all(
        index["weight_map"][k[:-6] + "scale"] == index["weight_map"][k]
        for k in tensors
        if k.endswith(".weight") and k[:-6] + "scale" in tensors
    )
    want = {
        "layers.1.attn.wq_b.weight": (F8, (512, 64)),
        "layers.1.attn.wq_b.scale": (E8, (4, 1)),
        "layers.1.attn.wo_a.weight": (F8, (64, 256)),
        "layers.1.attn.wo_a.scale": (E8, (1, 2)),
        "layers.1.attn.indexer.wq_b.weight": (F8, (256, 64)),
        "layers.1.ffn.shared_experts.w2.weight": (F8, (64, 32)),
        "layers.1.ffn.experts.7.w1.weight": (I8, (32, 32)),
        "layers.1.ffn.experts.7.w1.scale": (E8, (32, 2)),
        "layers.1.ffn.experts.7.w2.weight": (I8, (64, 16)),
        "layers.1.ffn.experts.7.w2.scale": (E8, (64, 1)),
        "layers.1.attn.compressor.wkv.weight": (BF16, (256, 64)),
        "layers.1.attn.compressor.ape": (F32, (4, 256)),
        "layers.1.attn.attn_sink": (F32, (4,)),
        "layers.1.ffn.gate.bias": (F32, (8,)),
        "layers.0.ffn.gate.tid2eid": (I64, (512, 2)),
        "layers.0.hc_attn_fn": (F32, (24, 256)),
        "mtp.0.e_proj.weight": (F8, (64, 64)),
        "mtp.0.enorm.weight": (BF16, (64,)),
        "embed.weight": (BF16, (512, 64)),
        "hc_head_scale": (F32, (1,)),
    }
    for k, (dtype, shape) in want.items():
        assert (tensors[k].dtype, tuple(tensors[k].shape)) == (dtype, shape), k
    specs = official_tensor_specs(src.state_dict())
    assert specs == {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    assert json.loads((d / "config.json").read_text())["compress_ratios"] == [0, 4, 16, 4, 0]


def test_load_official_reproduces_logits(official) -> None:
    src, d = official
    dst = _model(1)
    cfg = src.cfg
    assert not torch.equal(dst(_ids(cfg)), src(_ids(cfg)))
    report = load_official(dst, d, progress=False)
    assert report.ok and sorted(report.loaded) == sorted(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst(_ids(cfg)), src(_ids(cfg)))


def test_load_official_into_a_bfloat16_model(tmp_path) -> None:
    cfg = V4Config.from_preset("tiny", dtype="bfloat16")
    src = round_to_official(_model(8, cfg))
    save_official(src, tmp_path)
    dst = _model(9, cfg)
    assert load_official(dst, tmp_path, progress=False).ok
    assert dst.embed.weight.dtype == torch.bfloat16
    assert torch.equal(dst(_ids(cfg)), src(_ids(cfg)))


def test_load_official_from_dict_file_prefix_and_scale_inv(official, tmp_path) -> None:
    src, d = official
    tensors = _all_tensors(d)
    # HF-style prefix and scale name; without an index file.
    renamed = {}
    for k, t in tensors.items():
        k2 = k[:-5] + "weight_scale_inv" if k == "layers.2.attn.wq_a.scale" else k
        renamed["model." + k2] = t
    single = tmp_path / "one.safetensors"
    save_file(renamed, str(single))
    want = src.state_dict()
    for source in (renamed, single):
        dst = _model(2)
        assert load_official(dst, source, progress=False).ok
        assert all(torch.equal(v, want[k]) for k, v in dst.state_dict().items())
    # A directory of shards without the index json.
    nodir = tmp_path / "noindex"
    nodir.mkdir()
    for f in d.glob("model-*.safetensors"):
        (nodir / f.name).write_bytes(f.read_bytes())
    dst = _model(3)
    assert load_official(dst, nodir, progress=False).ok
    assert torch.equal(dst.state_dict()["head.weight"], src.state_dict()["head.weight"])


def test_bad_keys_and_shapes_are_named(official) -> None:
    src, d = official
    tensors = _all_tensors(d)
    del tensors["layers.3.attn.wkv.weight"], tensors["layers.3.attn.wkv.scale"]
    tensors["layers.9.attn.bogus"] = torch.zeros(3)
    tensors["norm.weight"] = torch.zeros(65, dtype=BF16)
    del tensors["layers.1.attn.wq_a.scale"]  # FP8 weight without its scale
    tensors["layers.2.ffn.experts.0.w1.scale"] = tensors["layers.2.ffn.experts.0.w1.scale"][:, :1]
    tensors["mtp.0.embed.weight"] = torch.zeros(512, 64, dtype=BF16)  # skipped like convert.py
    dst = _model(4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(dst, tensors, progress=False)
    msg = str(err.value)
    for name in (
        "layers.3.attn.wkv.weight",
        "layers.9.attn.bogus",
        "norm.weight: checkpoint [65] vs model [64]",
        "layers.1.attn.wq_a.weight",
        "no layers.1.attn.wq_a.scale",
        "layers.2.ffn.experts.0.w1.weight: fp4 scale",
    ):
        assert name in msg, name
    assert "mtp.0.embed.weight" not in msg
    # Strict failure writes nothing.
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    report = load_official(dst, tensors, strict=False, progress=False)
    assert report.missing == ["layers.3.attn.wkv.weight"]
    assert report.unexpected == ["layers.9.attn.bogus"]
    assert len(report.mismatched) == 3 and report.skipped == ["mtp.0.embed.weight"]
    assert torch.equal(dst.state_dict()["head.weight"], src.state_dict()["head.weight"])
    assert torch.equal(dst.state_dict()["norm.weight"], before["norm.weight"])


def test_load_official_bad_arguments(tmp_path) -> None:
    model = _model(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(model, tmp_path / "nope", progress=False)
    with pytest.raises(FileNotFoundError, match="no model"):
        load_official(model, tmp_path, progress=False)
    with pytest.raises(ValueError, match="got int"):
        load_official(model, 3, progress=False)
    with torch.device("meta"):
        meta = V4Model(V4Config.from_preset("tiny"))
    with pytest.raises(ValueError, match="meta device"):
        load_official(meta, {}, progress=False)


def test_own_save_and_load(tmp_path) -> None:
    cfg = V4Config.from_preset("tiny", kv_dtype="bfloat16")
    src = _model(6, cfg)
    path = save(src, tmp_path / "ck" / "m.safetensors")
    assert read_config(path) == cfg
    ids = _ids(cfg)
    want = src(ids)
    for got in (load(path), load(cfg, path), load(_model(7, cfg), path)):
        assert got.cfg == cfg and torch.equal(got(ids), want)
    other = V4Config.from_preset("tiny", o_lora_rank=16)
    with pytest.raises(CheckpointMismatchError, match=r"attn\.wo_a\.weight: checkpoint"):
        load(other, path)
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        read_config(_plain_file(tmp_path))


def _plain_file(tmp_path: Path) -> Path:
    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(p))
    return p


# ------------------------------------------------------------------ official key names and shapes


def _common_rows(p: dict) -> dict:
    d, dc = p["d"], p["dc"]
    return {
        "attn_norm.weight": (BF16, (d,)),
        "ffn_norm.weight": (BF16, (d,)),
        "hc_attn_fn": (F32, (24, 4 * d)),
        "hc_ffn_fn": (F32, (24, 4 * d)),
        "hc_attn_base": (F32, (24,)),
        "hc_ffn_base": (F32, (24,)),
        "hc_attn_scale": (F32, (3,)),
        "hc_ffn_scale": (F32, (3,)),
        "attn.wq_a.weight": (F8, (dc, d)),
        "attn.wq_a.scale": (E8, p["wq_a_s"]),
        "attn.q_norm.weight": (BF16, (dc,)),
        "attn.wq_b.weight": (F8, p["wq_b"]),
        "attn.wq_b.scale": (E8, p["wq_b_s"]),
        "attn.wkv.weight": (F8, (512, d)),
        "attn.wkv.scale": (E8, p["wkv_s"]),
        "attn.kv_norm.weight": (BF16, (512,)),
        "attn.wo_a.weight": (F8, p["wo_a"]),
        "attn.wo_a.scale": (E8, p["wo_a_s"]),
        "attn.wo_b.weight": (F8, p["wo_b"]),
        "attn.wo_b.scale": (E8, p["wo_b_s"]),
        "attn.attn_sink": (F32, (p["nh"],)),
        "ffn.gate.weight": (BF16, (p["E"], d)),
        "ffn.shared_experts.w1.weight": (F8, p["sh13"]),
        "ffn.shared_experts.w3.weight": (F8, p["sh13"]),
        "ffn.shared_experts.w1.scale": (E8, p["sh13_s"]),
        "ffn.shared_experts.w3.scale": (E8, p["sh13_s"]),
        "ffn.shared_experts.w2.weight": (F8, p["sh2"]),
        "ffn.shared_experts.w2.scale": (E8, p["sh2_s"]),
    }


def _expert_rows(p: dict, e: int) -> dict:
    return {
        f"ffn.experts.{e}.w1.weight": (I8, p["ex13"]),
        f"ffn.experts.{e}.w3.weight": (I8, p["ex13"]),
        f"ffn.experts.{e}.w1.scale": (E8, p["ex13_s"]),
        f"ffn.experts.{e}.w3.scale": (E8, p["ex13_s"]),
        f"ffn.experts.{e}.w2.weight": (I8, p["ex2"]),
        f"ffn.experts.{e}.w2.scale": (E8, p["ex2_s"]),
    }


def _hca_rows(d: int) -> dict:
    return {
        "attn.compressor.wkv.weight": (BF16, (512, d)),
        "attn.compressor.wgate.weight": (BF16, (512, d)),
        "attn.compressor.ape": (F32, (128, 512)),
        "attn.compressor.norm.weight": (BF16, (512,)),
    }


def _csa_rows(p: dict) -> dict:
    d = p["d"]
    return {
        "attn.compressor.wkv.weight": (BF16, (1024, d)),
        "attn.compressor.wgate.weight": (BF16, (1024, d)),
        "attn.compressor.ape": (F32, (4, 1024)),
        "attn.compressor.norm.weight": (BF16, (512,)),
        "attn.indexer.wq_b.weight": (F8, (8192, p["dc"])),
        "attn.indexer.wq_b.scale": (E8, p["iwq_s"]),
        "attn.indexer.weights_proj.weight": (BF16, (64, d)),
        "attn.indexer.compressor.wkv.weight": (BF16, (256, d)),
        "attn.indexer.compressor.wgate.weight": (BF16, (256, d)),
        "attn.indexer.compressor.ape": (F32, (4, 256)),
        "attn.indexer.compressor.norm.weight": (BF16, (128,)),
    }


# Numbers copied from the tables of V4_SPEC.md §9.2.
SPEC = {
    "flash": dict(
        d=4096,
        dc=1024,
        nh=64,
        E=256,
        wq_a_s=(8, 32),
        wq_b=(32768, 1024),
        wq_b_s=(256, 8),
        wkv_s=(4, 32),
        wo_a=(8192, 4096),
        wo_a_s=(64, 32),
        wo_b=(4096, 8192),
        wo_b_s=(32, 64),
        iwq_s=(64, 8),
        ex13=(2048, 2048),
        ex13_s=(2048, 128),
        ex2=(4096, 1024),
        ex2_s=(4096, 64),
        sh13=(2048, 4096),
        sh13_s=(16, 32),
        sh2=(4096, 2048),
        sh2_s=(32, 16),
        proj_s=(32, 32),
        kinds={0: "swa", 2: "csa", 3: "hca"},
    ),
    "pro": dict(
        d=7168,
        dc=1536,
        nh=128,
        E=384,
        wq_a_s=(12, 56),
        wq_b=(65536, 1536),
        wq_b_s=(512, 12),
        wkv_s=(4, 56),
        wo_a=(16384, 4096),
        wo_a_s=(128, 32),
        wo_b=(7168, 16384),
        wo_b_s=(56, 128),
        iwq_s=(64, 12),
        ex13=(3072, 3584),
        ex13_s=(3072, 224),
        ex2=(7168, 1536),
        ex2_s=(7168, 96),
        sh13=(3072, 7168),
        sh13_s=(24, 56),
        sh2=(7168, 3072),
        sh2_s=(56, 24),
        proj_s=(56, 56),
        kinds={0: "hca", 2: "csa", 3: "hca"},
    ),
}


def _expected_layer(p: dict, kind: str, hash_layer: bool) -> dict:
    rows = _common_rows(p)
    for e in range(p["E"]):
        rows.update(_expert_rows(p, e))
    rows["ffn.gate.tid2eid" if hash_layer else "ffn.gate.bias"] = (
        (I64, (129280, 6)) if hash_layer else (F32, (p["E"],))
    )
    if kind == "hca":
        rows.update(_hca_rows(p["d"]))
    elif kind == "csa":
        rows.update(_csa_rows(p))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_meta_model_has_the_official_keys_and_shapes(preset: str, meta_model) -> None:
    p = SPEC[preset]
    d = p["d"]
    model = meta_model(preset)
    specs = official_tensor_specs(model.state_dict())

    def under(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in specs.items() if k.startswith(prefix)}

    for layer, kind in p["kinds"].items():  # one SWA (Flash), CSA and HCA layer each
        assert under(f"layers.{layer}.") == _expected_layer(p, kind, hash_layer=layer < 3), layer
    mtp = _expected_layer(p, "swa", hash_layer=False)
    mtp.update(
        {
            "e_proj.weight": (F8, (d, d)),
            "e_proj.scale": (E8, p["proj_s"]),
            "h_proj.weight": (F8, (d, d)),
            "h_proj.scale": (E8, p["proj_s"]),
            "enorm.weight": (BF16, (d,)),
            "hnorm.weight": (BF16, (d,)),
            "norm.weight": (BF16, (d,)),
            "hc_head_fn": (F32, (4, 4 * d)),
            "hc_head_base": (F32, (4,)),
            "hc_head_scale": (F32, (1,)),
        }
    )
    assert under("mtp.0.") == mtp
    top = {k: v for k, v in specs.items() if not k.startswith(("layers.", "mtp."))}
    assert top == {
        "embed.weight": (BF16, (129280, d)),
        "head.weight": (BF16, (129280, d)),
        "norm.weight": (BF16, (d,)),
        "hc_head_fn": (F32, (4, 4 * d)),
        "hc_head_base": (F32, (4,)),
        "hc_head_scale": (F32, (1,)),
    }
    # Every other layer matches the rows of its kind (§1.2 schedule).
    cfg = model.cfg
    for layer in range(cfg.num_hidden_layers):
        want = _expected_layer(p, cfg.layer_kind(layer), hash_layer=layer < 3)
        assert under(f"layers.{layer}.") == want, layer
    n_indexer = sum(1 for k in specs if k.endswith("attn.indexer.wq_b.weight"))
    assert n_indexer == (21 if preset == "flash" else 30)
