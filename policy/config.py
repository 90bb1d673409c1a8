"""V4Config: one documented dataclass for every DeepSeek-V4 size, from `tiny` to `pro`.

Presets: ``tiny`` (unit tests, seconds on CPU), ``demo`` (trains on 2 CPU cores in minutes, every
mechanism present), ``flash`` and ``pro`` (the official ``config.json`` values). ``from_json``
reads an official ``config.json`` (or the ``inference/config.json`` aliases).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KV_DTYPES = ("fp8", "bfloat16", "float32")
ATTN_IMPLS = ("torch", "triton", "cpu")
ATTN_PATHS = ("blocksparse", "dense")
NUMERICS = ("reference", "official")


@dataclass
class V4Config:
    """Architecture of a DeepSeek-V4 model (names follow the official ``config.json``).

    Attributes:
        vocab_size: number of token ids (embedding and head rows).
        hidden_size: model width d.
        num_hidden_layers: number of main transformer blocks (MTP blocks not included).
        num_attention_heads: query heads n_h (one shared KV head for all of them).
        head_dim: width c of every query / key / value head; the last ``qk_rope_head_dim``
            dims carry RoPE, the others are "nope" dims (FP8 in the KV cache).
        qk_rope_head_dim: rotary dims at the end of each head (also used by the indexer heads).
        q_lora_rank: query down-projection width d_c (shared with the indexer queries).
        o_groups: number of groups g of the grouped output projection.
        o_lora_rank: per-group intermediate width d_g of the output projection.
        sliding_window: window n_win of raw tokens every query attends to (itself included).
        compress_ratios: one entry per layer then one per MTP block: 0 = sliding window only,
            ``csa_ratio`` = CSA (overlapping compressor + indexer top-k), any other value = HCA.
        csa_ratio: the ratio that marks a CSA layer (4 in the official models).
        index_n_heads: lightning-indexer heads n_h^I.
        index_head_dim: lightning-indexer head width c^I (power of two, multiple of 32).
        index_topk: compressed entries each query selects in a CSA layer.
        n_routed_experts: routed experts E per MoE layer.
        n_shared_experts: shared experts (same width as a routed one, summed into one expert).
        num_experts_per_tok: experts chosen per token.
        moe_intermediate_size: hidden width of one expert.
        num_hash_layers: first layers that route by the fixed ``tid2eid`` token-id table.
        routed_scaling_factor: multiplier of the normalised routing weights.
        swiglu_limit: clamp of the SwiGLU gate (above) and up (both sides) projections; 0 = off.
        hc_mult: number of mHC residual streams.
        hc_sinkhorn_iters: Sinkhorn iterations of the mHC combination matrix.
        hc_eps: epsilon of the mHC gates and Sinkhorn normalisations.
        rms_norm_eps: epsilon of every RMSNorm (and of the mHC RMS step).
        rope_theta: RoPE base of sliding-window-only layers (no YaRN).
        compress_rope_theta: RoPE base of CSA/HCA layers (with YaRN when ``rope_scaling`` is set).
        rope_scaling: YaRN parameters (``factor``, ``original_max_position_embeddings``,
            ``beta_fast``, ``beta_slow``) applied on compressed layers, or None for plain RoPE.
        max_position_embeddings: longest supported context.
        num_nextn_predict_layers: number of MTP blocks.
        bos_token_id: id of the begin-of-sequence token.
        eos_token_id: id of the end-of-sequence token.
        kv_dtype: "fp8" (default: FP8 e4m3 KV nope dims with ue8m0 scales per 64 dims, BF16 RoPE
            dims, FP4 indexer keys and queries, as in the reference); "bfloat16" / "float32"
            store KV in that dtype and switch every KV / indexer quantisation off.
        kv_quant_block: FP8 scale block of the KV nope dims (64).
        index_quant_block: FP4 (MXFP4) scale block of the indexer keys and queries (32).
        dtype: parameter dtype name ("float32" for CPU training, "bfloat16" as in the release).
        attn_impl: attention kernels: "torch" (default; dense-mask kernel of policy.kernels) or
            "triton" (Triton kernels of policy.kernels, forward only: compressed attention over
            the window and the chosen / visible entries, decode reading the cache's stored FP8
            bytes, fused indexer scores + top-k, compressor pooling; on CPU tensors it needs
            the Triton interpreter, TRITON_INTERPRET=1) or "cpu" (the torch kernels, with the
            decode step's lightning indexer fused with its top-k in a native CPU kernel that
            reads the indexer keys as stored, policy.kernels.cpu_indexer; built by
            ``make build``): the fastest CPU decode.
        attn_path: how the full-sequence forward and the cached extend lay out their keys:
            "blocksparse" (default; per query chunk only the window slice and the visible or
            selected compressed entries, policy.kernels.blocksparse: memory O(S (W + k))) or
            "dense" (all S raw tokens and N entries under a [B, S, S + N] mask: the quadratic
            reference). Both give the same outputs and gradients; decode is the same for both.
        numerics: "reference" (default: fp32 quantisers and index scores, no activation
            quantisation) or "official" (the rounding of DeepSeek's inference kernels: FP8
            activations at every GEMM whose weight is FP8 / FP4 in the official checkpoint,
            BF16 before every quantiser, amax floors, BF16 index scores, attention with BF16
            operands; see policy.quant). Every path follows it: full forward (training, the
            learner's logprobs), prefill, cached extend and decode, on either ``attn_path``.
            "official" needs ``attn_impl`` "torch": the Triton and CPU kernels compute in
            reference numerics only.
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = ()
    csa_ratio: int = 4
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    kv_dtype: str = "fp8"
    kv_quant_block: int = 64
    index_quant_block: int = 32
    dtype: str = "float32"
    attn_impl: str = "torch"
    attn_path: str = "blocksparse"
    numerics: str = "reference"

    def __post_init__(self) -> None:
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "sliding_window",
            "csa_ratio",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "hc_mult",
            "hc_sinkhorn_iters",
            "max_position_embeddings",
            "kv_quant_block",
            "index_quant_block",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("num_hash_layers", "n_shared_experts", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.attn_path not in ATTN_PATHS:
            raise ValueError(f"attn_path must be one of {ATTN_PATHS}, got {self.attn_path!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.numerics == "official" and self.attn_impl != "torch":
            raise ValueError(
                f"numerics='official' needs attn_impl='torch' (the Triton / CPU kernels do not apply "
                f"the official rounding), got attn_impl={self.attn_impl!r}"
            )
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        rd = self.qk_rope_head_dim
        if rd <= 0 or rd % 2 or rd >= self.head_dim:
            raise ValueError(
                f"qk_rope_head_dim must be even and in (0, head_dim={self.head_dim}), got {rd!r}"
            )
        if self.kv_dtype == "fp8" and (self.head_dim - rd) % self.kv_quant_block:
            raise ValueError(
                f"head_dim - qk_rope_head_dim = {self.head_dim - rd} must be divisible by "
                f"kv_quant_block={self.kv_quant_block} when kv_dtype='fp8'"
            )
        ih = self.index_head_dim
        if ih & (ih - 1) or ih % self.index_quant_block or ih <= rd:
            raise ValueError(
                f"index_head_dim must be a power of two, divisible by index_quant_block="
                f"{self.index_quant_block} and > qk_rope_head_dim={rd}, got {ih!r}"
            )
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError(
                f"o_groups={self.o_groups} must divide num_attention_heads * head_dim = "
                f"{self.num_attention_heads * self.head_dim}"
            )
        if self.num_attention_heads % self.o_groups:
            raise ValueError(
                f"o_groups={self.o_groups} must divide num_attention_heads="
                f"{self.num_attention_heads}"
            )
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n:
            raise ValueError(
                f"compress_ratios must have num_hidden_layers + num_nextn_predict_layers = {n} "
                f"entries, got {len(self.compress_ratios)}: {self.compress_ratios!r}"
            )
        for r in self.compress_ratios:
            if r < 0 or (r and r != self.csa_ratio and r < 2):
                raise ValueError(f"compress_ratios entries must be 0 or >= 2, got {r!r}")
        if self.num_hash_layers > self.num_hidden_layers:
            raise ValueError(
                f"num_hash_layers={self.num_hash_layers} must be <= num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be <= n_routed_experts="
                f"{self.n_routed_experts}"
            )
        if self.rope_scaling is not None:
            need = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
            missing = [k for k in need if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling lacks keys {missing}: {self.rope_scaling!r}")

    # ----------------------------------------------------------------- derived quantities
    @property
    def nope_head_dim(self) -> int:
        """Dims of a KV vector without RoPE (FP8 in the cache)."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def core_impl(self) -> str:
        """The attention core of ``attn_impl``: "triton", else "torch" ("cpu" runs the torch
        cores; only its decode indexer is native)."""
        return "triton" if self.attn_impl == "triton" else "torch"

    def layer_kind(self, layer_id: int) -> str:
        """ "swa", "csa" or "hca" for block ``layer_id`` (MTP blocks follow the main layers)."""
        r = self.compress_ratios[layer_id]
        return "swa" if r == 0 else ("csa" if r == self.csa_ratio else "hca")

    @property
    def torch_dtype(self):
        """The torch dtype named by ``dtype`` (torch is imported lazily)."""
        import torch

        return getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> V4Config:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------------- constructors
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> V4Config:
        """One of ``tiny``, ``demo``, ``flash``, ``pro``, with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> V4Config:
        """Read an official ``config.json`` (or ``inference/config.json`` key aliases)."""
        raw = json.loads(Path(path).read_text())
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> V4Config:
        """Build from a dict with official ``config.json`` keys.

        Keys that only describe the release (``quantization_config``, ``expert_dtype``,
        ``torch_dtype``, ...) are ignored: weights are held unquantised in ``dtype`` (float32
        unless overridden) and the KV format follows ``kv_dtype``.
        """
        raw = dict(raw)
        for alias, key in _ALIASES.items():
            if alias in raw and key not in raw:
                raw[key] = raw.pop(alias)
        if "rope_factor" in raw and "rope_scaling" not in raw:
            raw["rope_scaling"] = {
                "type": "yarn",
                "factor": raw["rope_factor"],
                "original_max_position_embeddings": raw.get("original_seq_len", 65536),
                "beta_fast": raw.get("beta_fast", 32),
                "beta_slow": raw.get("beta_slow", 1),
            }
        # keys of the official config whose only supported value is the V4 one
        fixed = {
            "scoring_func": "sqrtsoftplus",
            "score_func": "sqrtsoftplus",
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "num_key_value_heads": 1,
        }
        for key, want in fixed.items():
            if key in raw and raw[key] != want:
                raise ValueError(f"{key} must be {want!r} for DeepSeek-V4, got {raw[key]!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "compress_ratios" in kwargs:
            kwargs["compress_ratios"] = tuple(kwargs["compress_ratios"])
        kwargs.setdefault("dtype", "float32")
        return cls(**{**kwargs, **overrides})


_ALIASES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers",
    "n_activated_experts": "num_experts_per_tok",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "n_mtp_layers": "num_nextn_predict_layers",
}

_FLASH = dict(
    vocab_size=129280,
    hidden_size=4096,
    num_hidden_layers=43,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    sliding_window=128,
    compress_ratios=(0, 0, *([4, 128] * 20), 4, 0),
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=6,
    moe_intermediate_size=2048,
    num_hash_layers=3,
    routed_scaling_factor=1.5,
    dtype="bfloat16",
)

_PRESETS: dict[str, dict[str, Any]] = {
    "flash": _FLASH,
    "pro": {
        **_FLASH,
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "o_groups": 16,
        "compress_ratios": (128, 128, *([4, 128] * 29), 4, 0),
        "index_topk": 1024,
        "n_routed_experts": 384,
        "moe_intermediate_size": 3072,
        "routed_scaling_factor": 2.5,
    },
    # Unit tests: every branch, tiny widths. Window 8, CSA m=4, HCA m'=16.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=128,
        qk_rope_head_dim=64,
        q_lora_rank=64,
        o_groups=2,
        o_lora_rank=32,
        sliding_window=8,
        compress_ratios=(0, 4, 16, 4, 0),
        index_n_heads=2,
        index_head_dim=128,
        index_topk=3,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_hash_layers=1,
        hc_sinkhorn_iters=20,
        max_position_embeddings=4096,
    ),
    # Trains on 2 CPU cores in minutes: SWA, CSA + indexer, HCA, hash and learned MoE, MTP.
    "demo": dict(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=128,
        qk_rope_head_dim=64,
        q_lora_rank=96,
        o_groups=2,
        o_lora_rank=64,
        sliding_window=32,
        compress_ratios=(0, 4, 32, 4, 0),
        index_n_heads=4,
        index_head_dim=128,
        index_topk=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        num_hash_layers=1,
        max_position_embeddings=16384,
    ),
}


def yarn_ramp_bounds(cfg: V4Config, base: float) -> tuple[int, int]:
    """YaRN correction range (low, high) over the rotary frequency index (reference formula)."""
    assert cfg.rope_scaling is not None
    dim = cfg.qk_rope_head_dim
    orig = cfg.rope_scaling["original_max_position_embeddings"]

    def corr(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(corr(cfg.rope_scaling["beta_fast"]))
    high = math.ceil(corr(cfg.rope_scaling["beta_slow"]))
    return max(low, 0), min(high, dim - 1)
