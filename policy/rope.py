"""Partial interleaved rotary embeddings (RoPE) on the last ``qk_rope_head_dim`` dims, with YaRN.

Angles are computed from explicit integer positions (``pos [B, S]``), so prefill, decode with
per-row positions and compressed entries (position m*i) all share one function.
"""

from __future__ import annotations

import torch

from policy.config import V4Config, yarn_ramp_bounds


def rope_inv_freq(cfg: V4Config, compressed: bool) -> torch.Tensor:
    """Inverse frequencies [rd/2] (fp32) of a layer: YaRN-scaled on compressed layers."""
    rd = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    if compressed and cfg.rope_scaling is not None:
        low, high = yarn_ramp_bounds(cfg, base)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rd // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        factor = float(cfg.rope_scaling["factor"])
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_tables(
    pos: torch.Tensor, inv_freq: torch.Tensor, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, rd/2] fp32 of the angles pos * inv_freq (shareable by several
    ``apply_rope`` calls at the same positions). pos [B, S] int, inv_freq [rd/2] fp32."""
    if device is not None and inv_freq.device != torch.device(device):
        inv_freq = inv_freq.to(device)
    ang = pos.to(torch.float32)[..., None] * inv_freq  # [B, S, rd/2]
    return ang.cos(), ang.sin()


def apply_rope(
    x: torch.Tensor,
    pos: torch.Tensor,
    inv_freq: torch.Tensor,
    inverse: bool = False,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate the last ``2*len(inv_freq)`` dims of ``x`` by the interleaved-pair RoPE.

    Args:
        x: [B, S, ..., D] (any dtype); the rotary dims are the last rd = 2*len(inv_freq).
        pos: [B, S] integer positions.
        inv_freq: [rd/2] fp32.
        inverse: rotate by the conjugate (position -t), used on the attention output.
        tables: ``rope_tables(pos, inv_freq)`` when already computed (the same values).
    Returns:
        same shape and dtype as ``x``; the nope dims are untouched.
    """
    rd = inv_freq.numel() * 2
    cos, sin = tables if tables is not None else rope_tables(pos, inv_freq, x.device)
    for _ in range(x.dim() - cos.dim()):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if inverse:
        sin = -sin
    nope, rot = x[..., :-rd], x[..., -rd:]
    if rot.dtype != torch.float32:
        rot = rot.float()
    x0, x1 = rot[..., 0::2], rot[..., 1::2]  # interleaved pairs (x[2i], x[2i+1])
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return torch.cat((nope, out), dim=-1)
