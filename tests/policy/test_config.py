"""V4Config: presets, official config.json parsing, validation errors naming the field."""

import json

import pytest

from policy.config import V4Config

OFFICIAL_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "vocab_size": 129280,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 2048,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"},
    "expert_dtype": "fp4",
}


@pytest.mark.parametrize("name", ["tiny", "demo", "flash", "pro"])
def test_presets_build(name):
    cfg = V4Config.from_preset(name)
    kinds = {cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)}
    if name in ("tiny", "demo", "flash"):
        assert kinds == {"swa", "csa", "hca"}
    assert cfg.layer_kind(cfg.num_hidden_layers) == "swa"  # MTP block


def test_demo_has_every_mechanism():
    cfg = V4Config.from_preset("demo")
    assert cfg.num_hash_layers >= 1 and cfg.num_hash_layers < cfg.num_hidden_layers
    assert cfg.num_nextn_predict_layers == 1 and cfg.o_groups > 1
    assert cfg.vocab_size == 512


def test_from_json_official(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(OFFICIAL_FLASH))
    cfg = V4Config.from_json(p)
    ref = V4Config.from_preset("flash")
    for f in ("hidden_size", "compress_ratios", "index_topk", "rope_scaling", "head_dim"):
        assert getattr(cfg, f) == getattr(ref, f), f
    raw = dict(OFFICIAL_FLASH, rope_scaling=None)
    p.write_text(json.dumps(raw))
    assert V4Config.from_json(p).rope_scaling is None


def test_from_json_inference_aliases(tmp_path):
    raw = {
        "vocab_size": 129280,
        "dim": 4096,
        "moe_inter_dim": 2048,
        "n_layers": 43,
        "n_hash_layers": 3,
        "n_heads": 64,
        "n_routed_experts": 256,
        "n_activated_experts": 6,
        "score_func": "sqrtsoftplus",
        "route_scale": 1.5,
        "q_lora_rank": 1024,
        "head_dim": 512,
        "rope_head_dim": 64,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "window_size": 128,
        "original_seq_len": 65536,
        "rope_theta": 10000,
        "rope_factor": 16,
        "beta_fast": 32,
        "beta_slow": 1,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "compress_ratios": OFFICIAL_FLASH["compress_ratios"],
        "compress_rope_theta": 160000,
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(raw))
    cfg = V4Config.from_json(p)
    assert cfg.hidden_size == 4096 and cfg.sliding_window == 128
    assert cfg.rope_scaling["factor"] == 16


@pytest.mark.parametrize(
    "field,value",
    [
        ("kv_dtype", "int8"),
        ("compress_ratios", (0, 4)),
        ("head_dim", 100),
        ("index_head_dim", 96),
        ("o_groups", 3),
        ("num_hash_layers", 9),
        ("num_experts_per_tok", 99),
        ("hidden_size", 0),
        ("qk_rope_head_dim", 7),
        ("attn_impl", "cuda"),
    ],
)
def test_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        V4Config.from_preset("tiny", **{field: value})


def test_unknown_preset():
    with pytest.raises(ValueError, match="nope"):
        V4Config.from_preset("nope")


@pytest.mark.parametrize(
    "key,value",
    [
        ("scoring_func", "softmax"),
        ("tie_word_embeddings", True),
        ("num_key_value_heads", 8),
        ("norm_topk_prob", False),
        ("hidden_act", "gelu"),
        ("topk_method", "greedy"),
    ],
)
def test_from_json_rejects_unsupported(tmp_path, key, value):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(dict(OFFICIAL_FLASH, **{key: value})))
    with pytest.raises(ValueError, match=key):
        V4Config.from_json(p)
