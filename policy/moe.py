"""Mixture of experts: sqrt-softplus router (bias for selection only), hash routing on the first
layers, clamped-SwiGLU experts and one shared expert.

Letters: T tokens (B*S flattened), d model width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.config import V4Config
from policy.layers import QLinear, as_dtype, f32


class Expert(nn.Module):
    """SwiGLU FFN with the V4 clamp: gate <= limit, up in [-limit, limit]."""

    def __init__(self, dim: int, inter: int, limit: float, numerics: str = "reference"):
        super().__init__()
        self.w1 = QLinear(dim, inter, numerics)  # gate
        self.w2 = QLinear(inter, dim, numerics)  # down
        self.w3 = QLinear(dim, inter, numerics)  # up
        self.limit = limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d], weights [T, 1] (routing weight, applied before w2) -> [T, d]."""
        gate = f32(self.w1(x))
        up = f32(self.w3(x))
        if self.limit > 0:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = weights * h
        return self.w2(as_dtype(h, x.dtype))


class Gate(nn.Module):
    """Router. Learned layers select top-k of (scores + bias); hash layers use ``tid2eid``."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__()
        self.topk = cfg.num_experts_per_tok
        self.route_scale = cfg.routed_scaling_factor
        self.hash = layer_id < cfg.num_hash_layers
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.hash:
            # fixed token-id -> experts table [V, k] (distinct experts per token)
            self.register_buffer(
                "tid2eid", _hash_table(cfg.vocab_size, cfg.n_routed_experts, self.topk, layer_id)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d], ids [T] -> (weights [T, k] fp32, indices [T, k] int64)."""
        scores = F.softplus(F.linear(f32(x), f32(self.weight))).sqrt()  # [T, E]
        if self.hash:
            indices = self.tid2eid[ids].long()
        else:
            indices = (scores + f32(self.bias)).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices


def _hash_table(vocab: int, n_experts: int, k: int, layer_id: int) -> torch.Tensor:
    """A fixed pseudo-random token-id -> k distinct experts table [V, k] (int64), the same for
    every model built with these sizes (the official one is loaded from the checkpoint)."""
    device = torch.empty(0).device  # honours a surrounding `with torch.device(...)`
    if device.type == "meta":
        return torch.empty(vocab, k, dtype=torch.int64)
    g = torch.Generator().manual_seed(1234 + layer_id)
    r = torch.rand(vocab, n_experts, generator=g, device="cpu")
    return r.argsort(dim=-1)[:, :k].contiguous().to(device)


class MoE(nn.Module):
    """Routed experts + shared expert: y = sum_i g_i E_i(x) + Shared(x)."""

    def __init__(self, cfg: V4Config, layer_id: int):
        super().__init__()
        d, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Gate(cfg, layer_id)
        self.experts = nn.ModuleList(
            Expert(d, inter, cfg.swiglu_limit, cfg.numerics) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = Expert(
            d, inter * cfg.n_shared_experts, cfg.swiglu_limit, cfg.numerics
        )

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, d], ids [B, S] -> [B, S, d]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, ids.reshape(-1))
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for e, expert in enumerate(self.experts):
            if counts[e] == 0:
                continue
            tok, slot = torch.where(indices == e)
            y.index_put_((tok,), expert(x[tok], weights[tok, slot, None]).float(), accumulate=True)
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
