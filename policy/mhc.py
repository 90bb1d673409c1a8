"""Manifold-constrained hyper-connections (mHC): pre-mix, post-mix and Sinkhorn combination.

Letters: B batch, S sequence, n hc_mult streams, d model width.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from policy.layers import as_dtype, f32


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """Unweighted-RMS-normalised mix logits: x [B, S, n, d], fn [M, n*d] -> [B, S, M] fp32."""
    xf = f32(x.flatten(2))  # [B, S, n*d]
    rsqrt = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(xf, f32(fn)) * rsqrt


def sinkhorn_split(
    mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mixes [B, S, (2+n)*n] into pre [B,S,n], post [B,S,n] and comb [B,S,n,n] (fp32).

    comb: softmax over rows + eps, one column normalisation, then ``iters - 1`` times (row,
    column): ``iters`` column normalisations in all, ending on a column one (reference order).

    Without autograd on CPU (decode, evaluation) the normalisations run in place through numpy,
    whose per-call cost is a fraction of torch's on these [.., n, n] tiles: the same fp32 sums
    (sequential over n <= 4 elements in both), additions and divisions in the same order, so the
    result is bitwise the torch loop's (tested); otherwise the torch loop runs.
    """
    # scale[0] on the n pre logits, scale[1] on the n post ones, scale[2] on the n*n comb ones
    z = mixes * scale.index_select(0, _group_index(n, scale.device))
    z = z + base
    pre = torch.sigmoid(z[..., :n]) + eps
    post = 2 * torch.sigmoid(z[..., n : 2 * n])
    comb = z[..., 2 * n :].unflatten(-1, (n, n))
    eps_t = _scalar(eps, comb.dtype, comb.device)  # no per-op scalar wrapping
    comb = comb.softmax(-1) + eps_t
    if _numpy_ok(comb, n):
        return pre, post, _sinkhorn_numpy(comb, iters, eps)
    comb = comb / (comb.sum(-2, keepdim=True) + eps_t)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps_t)
        comb = comb / (comb.sum(-2, keepdim=True) + eps_t)
    return pre, post, comb


@functools.cache
def _group_index(n: int, device: torch.device) -> torch.Tensor:
    """[(2+n)*n] int64: which of the three scales each mix logit takes (n x 0, n x 1, n*n x 2)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor([0] * n + [1] * n + [2] * (n * n), device=device)


@functools.cache
def _scalar(v: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor v (made once per dtype and device; never written to)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(v, dtype=dtype, device=device)


NUMPY_MAX_ROWS = 32  # above this many [n, n] tiles torch's vectorised loop is faster


def _numpy_ok(comb: torch.Tensor, n: int) -> bool:
    """The numpy loop applies: fp32 on CPU, no autograd, n <= 4 (both libraries sum so few
    contiguous elements sequentially; at larger n their vectorised orders differ), and at most
    ``NUMPY_MAX_ROWS`` tiles (decode-sized; both loops give the same values at any size)."""
    return (
        n <= 4
        and comb.numel() <= NUMPY_MAX_ROWS * n * n
        and comb.device.type == "cpu"
        and comb.dtype == torch.float32
        and not (torch.is_grad_enabled() and comb.requires_grad)
    )


def _sinkhorn_numpy(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The normalisation loop of ``sinkhorn_split`` in place on comb [..., n, n] (fp32, CPU,
    contiguous, owned by the caller): column, then ``iters - 1`` times (row, column)."""
    c = comb.numpy()
    e = np.float32(eps)
    rows = np.empty_like(c[..., :1])  # [..., n, 1]
    cols = np.empty_like(c[..., :1, :])  # [..., 1, n]
    red, add, div = np.add.reduce, np.add, np.divide
    red(c, -2, None, cols, True)
    add(cols, e, cols)
    div(c, cols, c)
    for _ in range(iters - 1):
        red(c, -1, None, rows, True)
        add(rows, e, rows)
        div(c, rows, c)
        red(c, -2, None, cols, True)
        add(cols, e, cols)
        div(c, cols, c)
    return comb


def hc_pre(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Collapse streams: y = sum_j pre_j X_j. x [B,S,n,d], pre [B,S,n] -> [B,S,d] (x.dtype)."""
    return as_dtype((pre.unsqueeze(-1) * f32(x)).sum(dim=2), x.dtype)


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """X'[k] = post_k F + sum_j comb[j, k] X[j].  f [B,S,d], x [B,S,n,d] -> [B,S,n,d]."""
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, f32(x))
    return as_dtype(post.unsqueeze(-1) * f32(f).unsqueeze(-2) + mixed, x.dtype)
