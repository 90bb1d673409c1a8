"""KV-cache layout and memory arithmetic of DeepSeek-V4 (V4_SPEC.md §8), and its baselines.

One cache entry (a raw window token or a compressed entry) with ``kv_dtype="fp8"``, at the
official dims (head_dim 512, RoPE 64, scale block 64) is 584 bytes, in vLLM's byte order:

    [0, 448)    448 nope dims, FP8 e4m3
    [448, 576)  64 RoPE dims, BF16
    [576, 583)  7 ue8m0 scales, one per 64 nope dims
    [583, 584)  1 pad byte (the scale field is padded to a multiple of 8 bytes)

With ``kv_dtype="bfloat16"`` / ``"float32"`` an entry is head_dim values of that dtype.

An indexer key (CSA layers only) is ``index_head_dim`` values: FP4 e2m1 packed two per byte plus
one ue8m0 scale per 32 dims (128 dims: 64 + 4 = 68 B); optionally FP8 e4m3 plus one fp32 scale
for the whole key (128 + 4 = 132 B, vLLM's FP8 option); unquantised caches store it in kv_dtype.

Accounting of ``kv_cache_bytes(cfg, T, batch)`` (every term times ``batch``), over the MAIN layers
only: the MTP block's attention is used for the training loss, not when decoding, so its window
is not part of the decode cache (the published 10% / 7% figures also count main layers only).

- window ring: every layer keeps ``sliding_window`` entries, allocated in full whatever T is;
- compressed main KV: floor(T / m) entries per CSA (m = csa_ratio) or HCA (m = ratio) layer —
  tokens of an unfinished block live in the compressor state, not in an entry;
- indexer keys: floor(T / m) per CSA layer;
- compressor tail state (fp32, fixed per sequence), kv and gate-score buffers of
  [coff·m, coff·c] each (coff = 2 with CSA's overlap, else 1): CSA main 2·[2m, 2·head_dim],
  CSA indexer 2·[2m, 2·index_head_dim], HCA 2·[m, head_dim].

At official dims the amortised growth is 163 B/token per CSA layer ((584 + 68) / 4) and
4.5625 B/token per HCA layer (584 / 128): Flash 3,514.25 B/token, Pro 5,031.44 B/token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from policy.quant import (
    SCALE_DTYPE,
    dequantize_fp4,
    dequantize_fp8,
    quantize_fp4,
    quantize_fp8,
)

_ITEMSIZE = {"bfloat16": 2, "float32": 4}
INDEX_DTYPES = ("fp4", "fp8", "bfloat16", "float32")
STATE_BYTES_PER_VALUE = 4  # compressor state is fp32

# Baselines of V4_SPEC.md §8.2.
V32_LAYERS = 61
V32_MLA_ENTRY_BYTES = 656  # 512 FP8 nope + 16 B fp32 scales + 64 BF16 RoPE dims
V32_INDEX_ENTRY_BYTES = 132  # 128 FP8 + one fp32 scale


def mla_v32_bytes(
    context_len: int,
    batch: int = 1,
    layers: int = V32_LAYERS,
    entry_bytes: int = V32_MLA_ENTRY_BYTES,
    index_bytes: int = V32_INDEX_ENTRY_BYTES,
) -> int:
    """V3.2-style MLA cache: layers · T · (656 + 132) bytes (FP8 latent + FP8 indexer key).

    All-BF16 accounting (vLLM's): entry_bytes=1152 (576 dims), index_bytes=256.
    """
    return layers * context_len * (entry_bytes + index_bytes) * batch


def gqa_bf16_bytes(
    context_len: int, layers: int, batch: int = 1, kv_heads: int = 8, head_dim: int = 128
) -> int:
    """BF16 GQA cache: layers · T · (K and V) · kv_heads · head_dim · 2 bytes."""
    return layers * context_len * 2 * kv_heads * head_dim * 2 * batch


def _attr(cfg: Any, name: str, default: Any = None) -> Any:
    if hasattr(cfg, name):
        return getattr(cfg, name)
    if default is None:
        raise ValueError(f"config {type(cfg).__name__} lacks the field {name!r}")
    return default


@dataclass(frozen=True)
class KVLayout:
    """Per-entry byte layout and per-layer plan of the cache (see module doc).

    Built from any config object with the V4Config field names (attribute access only).
    """

    kv_dtype: str
    head_dim: int
    nope_dims: int
    rope_dims: int
    scale_block: int
    main_entry_bytes: int
    index_dims: int
    index_dtype: str
    index_block: int
    index_entry_bytes: int
    window: int
    ratios: tuple[int, ...]  # main layers only (MTP excluded)
    kinds: tuple[str, ...]  # "swa" | "csa" | "hca" per main layer

    @classmethod
    def from_config(cls, cfg: Any, *, index_dtype: str | None = None) -> KVLayout:
        """Layout of ``cfg``'s cache. ``index_dtype``: "fp4" (default with kv_dtype "fp8", the
        official MXFP4 keys) or "fp8" (132-byte keys); unquantised caches use kv_dtype."""
        kv_dtype = _attr(cfg, "kv_dtype")
        if kv_dtype not in ("fp8", *_ITEMSIZE):
            raise ValueError(f"kv_dtype must be fp8, bfloat16 or float32, got {kv_dtype!r}")
        head_dim = int(_attr(cfg, "head_dim"))
        rope = int(_attr(cfg, "qk_rope_head_dim"))
        block = int(_attr(cfg, "kv_quant_block", 64))
        nope = head_dim - rope
        idx_dims = int(_attr(cfg, "index_head_dim"))
        idx_block = int(_attr(cfg, "index_quant_block", 32))
        if index_dtype is None:
            index_dtype = "fp4" if kv_dtype == "fp8" else kv_dtype
        if index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
        if kv_dtype == "fp8":
            if nope % block:
                raise ValueError(f"nope dims {nope} not divisible by kv_quant_block={block}")
            main = nope + 2 * rope + _pad8(nope // block)
        else:
            main = head_dim * _ITEMSIZE[kv_dtype]
        if index_dtype == "fp4":
            if idx_dims % idx_block or idx_block % 2:
                raise ValueError(
                    f"index_head_dim {idx_dims} not divisible by index_quant_block={idx_block}"
                )
            idx = idx_dims // 2 + idx_dims // idx_block
        elif index_dtype == "fp8":
            idx = idx_dims + 4
        else:
            idx = idx_dims * _ITEMSIZE[index_dtype]
        n_layers = int(_attr(cfg, "num_hidden_layers"))
        ratios = tuple(int(r) for r in _attr(cfg, "compress_ratios")[:n_layers])
        if len(ratios) != n_layers:
            raise ValueError(f"compress_ratios has {len(ratios)} entries for {n_layers} layers")
        csa = int(_attr(cfg, "csa_ratio", 4))
        kinds = tuple("swa" if r == 0 else ("csa" if r == csa else "hca") for r in ratios)
        return cls(
            kv_dtype=kv_dtype,
            head_dim=head_dim,
            nope_dims=nope,
            rope_dims=rope,
            scale_block=block,
            main_entry_bytes=main,
            index_dims=idx_dims,
            index_dtype=index_dtype,
            index_block=idx_block,
            index_entry_bytes=idx,
            window=int(_attr(cfg, "sliding_window")),
            ratios=ratios,
            kinds=kinds,
        )

    # ------------------------------------------------------------------ layer counts
    @property
    def n_layers(self) -> int:
        return len(self.ratios)

    def count(self, kind: str) -> int:
        """Number of main layers of ``kind`` ("swa", "csa" or "hca")."""
        return sum(k == kind for k in self.kinds)

    # ------------------------------------------------------------------ per-layer bytes
    def state_bytes(self, layer: int) -> int:
        """Fixed compressor tail state of one layer (fp32 kv + score buffers), one sequence."""
        m, kind = self.ratios[layer], self.kinds[layer]
        if kind == "swa":
            return 0
        if kind == "hca":
            return 2 * m * self.head_dim * STATE_BYTES_PER_VALUE
        main = 2 * (2 * m) * (2 * self.head_dim)
        index = 2 * (2 * m) * (2 * self.index_dims)
        return (main + index) * STATE_BYTES_PER_VALUE

    def layer_bytes(self, layer: int, context_len: int) -> dict[str, int]:
        """Bytes of one main layer for one sequence of ``context_len`` tokens, by part."""
        m, kind = self.ratios[layer], self.kinds[layer]
        n = context_len // m if m else 0
        return {
            "window": self.window * self.main_entry_bytes,
            "compressed": n * self.main_entry_bytes,
            "indexer": n * self.index_entry_bytes if kind == "csa" else 0,
            "state": self.state_bytes(layer),
        }

    def breakdown(self, context_len: int, batch: int = 1) -> dict[str, int]:
        """Whole-cache bytes by part (window, compressed, indexer, state) and their total."""
        _check_len(context_len, batch)
        parts = {"window": 0, "compressed": 0, "indexer": 0, "state": 0}
        for layer in range(self.n_layers):
            for k, v in self.layer_bytes(layer, context_len).items():
                parts[k] += v * batch
        parts["total"] = sum(parts.values())
        return parts

    def amortised_bytes_per_token(self) -> float:
        """Growth of the cache per extra token (T → ∞): Σ_CSA (b_kv + b_idx)/m + Σ_HCA b_kv/m."""
        total = 0.0
        for m, kind in zip(self.ratios, self.kinds, strict=True):
            if kind == "csa":
                total += (self.main_entry_bytes + self.index_entry_bytes) / m
            elif kind == "hca":
                total += self.main_entry_bytes / m
        return total

    # ------------------------------------------------------------------ byte packing
    def pack_main(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [..., head_dim] (float) -> entries uint8 [..., main_entry_bytes] (fp8 layout only).

        Nope dims are quantised (FP8 e4m3, one ue8m0 scale per ``scale_block``); RoPE dims are
        rounded to BF16.
        """
        return self._pack_main(kv)[0]

    def pack_main_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pack_main`` and the fp32 values the entries hold, ``unpack_main`` of them bit for
        bit, from the same rounding (no second pass over the bytes: the cache's decode mirror
        is written with every entry)."""
        packed, q, s, rope16 = self._pack_main(kv)
        return packed, torch.cat((dequantize_fp8(q, s, self.scale_block), rope16.float()), dim=-1)

    def _pack_main(self, kv: torch.Tensor):
        """-> (entries, FP8 nope values, their scales, BF16 RoPE dims)."""
        self._need_fp8("pack_main")
        if kv.shape[-1] != self.head_dim:
            raise ValueError(f"kv last dim {kv.shape[-1]} != head_dim {self.head_dim}")
        q, s = quantize_fp8(kv[..., : self.nope_dims], self.scale_block)
        rope16 = kv[..., self.nope_dims :].to(torch.bfloat16).contiguous()
        rope = rope16.view(torch.uint8)
        pad = self.main_entry_bytes - self.nope_dims - rope.shape[-1] - s.shape[-1]
        zeros = torch.zeros(*kv.shape[:-1], pad, dtype=torch.uint8, device=kv.device)
        packed = torch.cat((q.view(torch.uint8), rope, s.view(torch.uint8), zeros), dim=-1)
        return packed, q, s, rope16

    def unpack_main(self, buf: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Entries uint8 [..., main_entry_bytes] -> kv [..., head_dim] in ``dtype``."""
        self._need_fp8("unpack_main")
        if buf.dtype != torch.uint8 or buf.shape[-1] != self.main_entry_bytes:
            raise ValueError(
                f"entries must be uint8 [..., {self.main_entry_bytes}], got {buf.dtype} "
                f"{tuple(buf.shape)}"
            )
        n, r = self.nope_dims, self.rope_dims
        q = buf[..., :n].contiguous().view(torch.float8_e4m3fn)
        rope = buf[..., n : n + 2 * r].contiguous().view(torch.bfloat16)
        s = buf[..., n + 2 * r : n + 2 * r + n // self.scale_block].contiguous().view(SCALE_DTYPE)
        nope = dequantize_fp8(q, s, self.scale_block, dtype)
        return torch.cat((nope, rope.to(dtype)), dim=-1)

    def pack_index(self, k: torch.Tensor) -> torch.Tensor:
        """Indexer keys [..., index_dims] -> uint8 [..., index_entry_bytes] (fp4 or fp8 keys).

        fp4: packed e2m1 then ue8m0 scales; fp8: e4m3 then one fp32 scale (a power of two).
        """
        if k.shape[-1] != self.index_dims:
            raise ValueError(f"key last dim {k.shape[-1]} != index_head_dim {self.index_dims}")
        if self.index_dtype == "fp4":
            p, s = quantize_fp4(k, self.index_block)
            return torch.cat((p, s.view(torch.uint8)), dim=-1)
        if self.index_dtype == "fp8":
            q, s = quantize_fp8(k, self.index_dims)
            s32 = s.float().contiguous().view(torch.uint8)
            return torch.cat((q.view(torch.uint8), s32), dim=-1)
        raise ValueError(f"pack_index needs index_dtype fp4 or fp8, got {self.index_dtype!r}")

    def unpack_index(self, buf: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [..., index_entry_bytes] -> keys [..., index_dims] in ``dtype``."""
        if buf.dtype != torch.uint8 or buf.shape[-1] != self.index_entry_bytes:
            raise ValueError(
                f"index entries must be uint8 [..., {self.index_entry_bytes}], got {buf.dtype} "
                f"{tuple(buf.shape)}"
            )
        d = self.index_dims
        if self.index_dtype == "fp4":
            s = buf[..., d // 2 :].contiguous().view(SCALE_DTYPE)
            return dequantize_fp4(buf[..., : d // 2], s, self.index_block, dtype)
        if self.index_dtype == "fp8":
            q = buf[..., :d].contiguous().view(torch.float8_e4m3fn)
            s = buf[..., d:].contiguous().view(torch.float32)
            return (q.float() * s).to(dtype)
        raise ValueError(f"unpack_index needs index_dtype fp4 or fp8, got {self.index_dtype!r}")

    def _need_fp8(self, what: str) -> None:
        if self.kv_dtype != "fp8":
            raise ValueError(f"{what} applies to kv_dtype 'fp8' only, not {self.kv_dtype!r}")


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _check_len(context_len: int, batch: int) -> None:
    if not isinstance(context_len, int) or context_len < 0:
        raise ValueError(f"context_len must be an int >= 0, got {context_len!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")


def kv_cache_bytes(cfg: Any, context_len: int, batch: int = 1, **layout_kw: Any) -> int:
    """Bytes of a cache holding ``batch`` sequences of ``context_len`` tokens (module doc)."""
    return KVLayout.from_config(cfg, **layout_kw).breakdown(context_len, batch)["total"]


def kv_cache_bytes_per_token(cfg: Any, context_len: int, **layout_kw: Any) -> float:
    """kv_cache_bytes(cfg, T) / T for one sequence: fixed parts included, amortised over T."""
    if not isinstance(context_len, int) or context_len < 1:
        raise ValueError(f"context_len must be an int >= 1, got {context_len!r}")
    return kv_cache_bytes(cfg, context_len, **layout_kw) / context_len
