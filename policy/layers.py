"""Small layers: weighted RMSNorm (fp32 math), unit RMS, a bias-free Linear and its variant for
the GEMMs whose weight is FP8 / FP4 in the official checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.quant import act_quant_linear


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without a dispatch when ``t`` is fp32 already (hot decode paths)."""
    return t if t.dtype == torch.float32 else t.float()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a dispatch when ``t`` has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim; math in fp32, result in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = f32(x)
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return as_dtype(xf * f32(self.weight), x.dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim with no weight (the per-head query norm), in fp32."""
    xf = f32(x)
    return as_dtype(xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps), x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` without bias and without its own init: V4Model.reset_parameters initialises
    every weight, and skipping the per-layer kaiming init keeps meta-device builds of the
    official sizes fast."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        pass


class QLinear(Linear):
    """A ``Linear`` whose weight is FP8 or FP4 in the official checkpoint. With numerics
    "official" its input follows the FP8 activation rule and the product accumulates in fp32
    per 128-wide K block (``policy.quant.act_quant_linear``); with "reference" it is a Linear.
    The weight itself stays in the model's dtype (``policy.checkpoint.round_to_official`` rounds
    weights to the checkpoint formats)."""

    def __init__(self, in_features: int, out_features: int, numerics: str = "reference"):
        super().__init__(in_features, out_features)
        self.numerics = numerics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics == "official":
            return act_quant_linear(x, self.weight)
        return F.linear(x, self.weight)
