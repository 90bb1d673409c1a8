"""Training losses on loss-mask tokens: the GRPO family (shared RL.md §2-3) and SFT, plus the
helpers a learner needs around them (logprobs, entropy, padded batches, micro-batches).

Letters: B sequences, T predicted positions, V vocabulary, N tokens (flattened B x T).

Alignment (the one convention every per-token tensor here follows): a sequence is
``prompt_ids + response_ids`` of length L; the model reads ``input_ids = seq[:-1]`` and entry
``[b, t]`` of every [B, T] tensor is about ``targets[b, t] = seq[t + 1]``, scored by
``logits[b, t]``. Response token j (absolute position P + j) therefore sits at t = P + j - 1.
``make_batch`` builds this layout; sequences are right-padded, so a causal model's logits at real
positions do not depend on the padding.

Losses are to be minimised (loss = -J). Each loss returns ``(loss, metrics)``: a scalar tensor
and a dict of floats. Normalisers can be given globally (``num_tokens`` / ``num_seqs``) so that
micro-batch losses add up to the full-batch loss (``make_micro_batches`` sets them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Settings of the clipped policy-gradient loss.

    Attributes:
        agg: aggregation over tokens: ``token-mean`` (DAPO, every token weighs the same),
            ``seq-mean-token-mean`` (GRPO original: mean per sequence, then over sequences) or
            ``seq-mean-token-sum-norm`` (Dr.GRPO: sum per sequence / ``norm_length``, mean over
            sequences).
        eps_low: lower clip, the ratio is clipped at 1 - eps_low (0 <= eps_low < 1).
        eps_high: upper clip, at 1 + eps_high (clip-higher: eps_high > eps_low lets rare tokens
            grow; DAPO uses 0.2 / 0.28).
        norm_length: Dr.GRPO's constant L_norm (e.g. the maximum generation length); required by
            and only used with ``seq-mean-token-sum-norm``.
        tis_cap: truncated importance sampling: each token's loss is weighted by
            min(pi_old / pi_rollout, tis_cap), detached, where pi_old is ``old_logprobs`` and
            pi_rollout the sampling engine's ``rollout_logprobs``. None disables it.
        dual_clip: dual clip constant c > 1: for negative advantages the per-token loss is
            bounded by -c * A. None disables it.
        kl_coef: weight of the KL to a reference policy (0 = off; needs ``ref_logprobs``).
        kl_estimator: ``k1`` (delta), ``k2`` (delta^2 / 2) or ``k3`` (exp(-delta) - 1 + delta),
            with delta = logp - logp_ref on the sampled tokens.
    """

    agg: str = "token-mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    norm_length: int | None = None
    tis_cap: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self) -> None:
        _check_agg(self.agg, self.norm_length)
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0 (or None), got {self.tis_cap}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator {self.kl_estimator!r}; choose from {KL_ESTIMATORS}"
            )


def _check_agg(agg: str, norm_length: int | None) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {agg!r}; choose from {AGG_MODES}")
    if agg == "seq-mean-token-sum-norm" and (norm_length is None or norm_length <= 0):
        raise ValueError(f"{agg} (Dr.GRPO) needs norm_length > 0, got {norm_length}")


# ---------------------------------------------------------------------------- per-token helpers
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] as gather - logsumexp: logits [B, T, V], targets [B, T] ->
    [B, T] fp32. Saves no [B, T, V] log-softmax for backward (logsumexp keeps only its output)."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B, T, V] and targets [B, T] must agree, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    logits = logits.float()
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [..., V] -> [...] fp32, no grad (a metric).

    Computed ``chunk_tokens`` rows at a time as logsumexp(z) - sum softmax(z) z, so the extra
    memory is chunk_tokens x V whatever the batch size.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_tokens):
        z = flat[i : i + chunk_tokens].float()
        lse = torch.logsumexp(z, dim=-1)
        out[i : i + chunk_tokens] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out.reshape(logits.shape[:-1])


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman's k1/k2/k3).

    With delta = logprobs - ref_logprobs (so r = pi_ref / pi = exp(-delta)): k1 = delta = -log r,
    k2 = delta^2 / 2, k3 = r - 1 - log r >= 0 (delta clamped to [-20, 20] inside the exp).
    """
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        return torch.exp(-delta.clamp(-20.0, 20.0)) - 1.0 + delta
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose from {KL_ESTIMATORS}")


def aggregate(
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    agg: str,
    *,
    norm_length: int | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values [B, T] over the masked tokens to a scalar (see PolicyLossConfig).

    num_tokens / num_seqs replace this batch's own counts (masked tokens; sequences with at least
    one masked token) so that the sum over micro-batches equals the full-batch value.
    """
    _check_agg(agg, norm_length)
    mask = loss_mask.to(values.dtype)
    values = torch.where(mask > 0, values, 0.0)  # an inf off the mask must not become nan
    if agg == "token-mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / max(float(n), 1.0)
    per_seq = (values * mask).sum(-1)  # [B]
    seq_tokens = mask.sum(-1)
    g = (seq_tokens > 0).sum() if num_seqs is None else num_seqs
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / seq_tokens.clamp(min=1.0)
    else:
        per_seq = per_seq / float(norm_length)
    return per_seq.sum() / max(float(g), 1.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(torch.where(mask > 0, x, 0.0).sum() / mask.sum().clamp(min=1.0))


def _check_shapes(ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if ref.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(ref.shape)}")
    for name, t in tensors.items():
        if t is None:
            continue
        ok = t.shape == ref.shape or (name == "advantages" and t.shape == ref.shape[:1])
        if not ok:
            want = "[B] or [B, T]" if name == "advantages" else "[B, T]"
            raise ValueError(
                f"{name} must be {want} matching logprobs {tuple(ref.shape)}, got {tuple(t.shape)}"
            )


# ---------------------------------------------------------------------------- losses
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped token-level policy gradient (GRPO / DAPO / Dr.GRPO) with optional TIS and KL.

    Per masked token, with rho = exp(logprobs - old_logprobs) and A the advantage:
    l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) (then min(l, -c A) for A < 0 when
    dual_clip is set), times the detached TIS weight min(exp(old - rollout), tis_cap) when both
    tis_cap and rollout_logprobs are given; the loss is aggregate(l) + kl_coef aggregate(KL).

    Args:
        logprobs: [B, T] learner logprobs of the targets, with grad.
        old_logprobs: [B, T] logprobs the ratio is taken against: the sampling logprobs, or the
            learner's recomputed ones at the start of the step (then pass the sampling ones as
            ``rollout_logprobs``).
        advantages: [B] per sequence or [B, T] per token.
        loss_mask: [B, T], 1 on tokens the policy sampled.
        rollout_logprobs: [B, T] sampling-engine logprobs when they differ from old_logprobs
            (needed by TIS; default: old_logprobs).
        ref_logprobs: [B, T] reference-policy logprobs (needed when kl_coef > 0).
        entropy: [B, T] per-token entropy (``token_entropy``), only reported.
        num_tokens, num_seqs: global normalisers for micro-batching (see ``aggregate``).
    Returns:
        loss (scalar) and metrics: ``pg_loss``, ``ratio_mean``, ``ratio_max``, ``clip_frac_low``
        (rho < 1 - eps_low with A < 0: gradient cut), ``clip_frac_high`` (rho > 1 + eps_high with
        A > 0), ``logprob_gap_mean`` / ``logprob_gap_max`` (|learner - rollout| logprob),
        ``tokens``; ``tis_weight_mean`` / ``tis_capped_frac``, ``kl``, ``entropy`` when used.
        Means are over this call's masked tokens.
    """
    _check_shapes(
        logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        loss_mask=loss_mask,
        rollout_logprobs=rollout_logprobs,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs")
    if cfg.tis_cap is not None and rollout_logprobs is None:
        raise ValueError(
            f"tis_cap={cfg.tis_cap} needs rollout_logprobs (the sampling logprobs) besides "
            "old_logprobs (the learner's recomputed ones)"
        )
    mask = loss_mask.float()
    on = mask > 0
    adv = advantages.float()
    adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv
    ratio = torch.exp(torch.where(on, logprobs - old_logprobs, 0.0))  # 1 off the mask
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)
    if cfg.dual_clip is not None:
        per_token = torch.where(adv < 0, per_token.clamp(max=-cfg.dual_clip * adv), per_token)

    metrics: dict[str, float] = {}
    if cfg.tis_cap is not None:
        w = torch.exp(torch.where(on, old_logprobs - rollout_logprobs, 0.0)).detach()
        metrics["tis_capped_frac"] = _masked_mean((w > cfg.tis_cap).float(), mask)
        w = w.clamp(max=cfg.tis_cap)
        metrics["tis_weight_mean"] = _masked_mean(w, mask)
        per_token = per_token * w

    norm = {"norm_length": cfg.norm_length, "num_tokens": num_tokens, "num_seqs": num_seqs}
    pg = aggregate(per_token, mask, cfg.agg, **norm)
    loss = pg
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.agg, **norm)

    with torch.no_grad():
        r = ratio.detach()
        rollout = old_logprobs if rollout_logprobs is None else rollout_logprobs
        gap = (logprobs.detach() - rollout).abs()
        metrics["pg_loss"] = float(pg.detach())
        metrics["ratio_mean"] = _masked_mean(r, mask)
        metrics["ratio_max"] = float(r[on].max()) if on.any() else 0.0
        metrics["clip_frac_low"] = _masked_mean(((r < 1 - cfg.eps_low) & (adv < 0)).float(), mask)
        metrics["clip_frac_high"] = _masked_mean(((r > 1 + cfg.eps_high) & (adv > 0)).float(), mask)
        metrics["logprob_gap_mean"] = _masked_mean(gap, mask)
        metrics["logprob_gap_max"] = float(gap[on].max()) if on.any() else 0.0
        metrics["tokens"] = float(mask.sum())
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.detach().float(), mask)
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    agg: str = "token-mean",
    norm_length: int | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on masked tokens: aggregate(-logprobs) over loss_mask [B, T].

    With the default token-mean it equals F.cross_entropy over the masked positions. Metrics:
    ``sft_loss``, ``tokens``.
    """
    _check_shapes(logprobs, loss_mask=loss_mask)
    mask = loss_mask.float()
    loss = aggregate(
        -logprobs,
        mask,
        agg,
        norm_length=norm_length,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    return loss, {"sft_loss": float(loss.detach()), "tokens": float(mask.sum())}


# ---------------------------------------------------------------------------- batches
class TokenSample(Protocol):
    """What ``make_batch`` reads from a trajectory (``rollout.Trajectory`` has these fields)."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    loss_mask: Sequence[int]
    logprobs: Sequence[float]


@dataclass
class Batch:
    """Padded tensors for one forward pass (alignment in the module doc).

    Attributes:
        input_ids: [B, T] ``seq[:-1]``, right-padded with pad_id.
        targets: [B, T] ``seq[1:]``, right-padded with pad_id.
        loss_mask: [B, T] float, the response loss mask moved to the predicting positions.
        old_logprobs: [B, T] float, the sampling logprobs at the same positions (0 elsewhere).
        advantages: [B] float, one per sequence.
        lengths: [B] long, real positions per row (len(seq) - 1).
        num_tokens, num_seqs: normalisers the losses should use (this batch's own counts, or the
            whole batch's when this is a micro-batch).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    lengths: torch.Tensor
    num_tokens: float
    num_seqs: float

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            k: getattr(self, k).to(device)
            for k in ("input_ids", "targets", "loss_mask", "old_logprobs", "advantages", "lengths")
        }
        return replace(self, **moved)


def _check_sample(i: int, s: TokenSample) -> None:
    n = len(s.response_ids)
    if len(s.loss_mask) != n or len(s.logprobs) != n:
        raise ValueError(
            f"sample {i}: response_ids ({n}), loss_mask ({len(s.loss_mask)}) and logprobs "
            f"({len(s.logprobs)}) must have the same length"
        )
    if len(s.prompt_ids) < 1:
        raise ValueError(f"sample {i}: prompt_ids is empty (the first token has no predictor)")
    if n < 1:
        raise ValueError(f"sample {i}: response_ids is empty")
    bad = sorted({m for m in s.loss_mask if m not in (0, 1)})
    if bad:
        raise ValueError(f"sample {i}: loss_mask values must be 0 or 1, got {bad}")


def make_batch(
    samples: Sequence[TokenSample],
    advantages: Sequence[float] | None = None,
    *,
    pad_id: int = 0,
) -> Batch:
    """Pad variable-length samples into a Batch: response token j of a sample with a P-token
    prompt is targets[b, P + j - 1], with its loss_mask and logprob at that same index.

    advantages: one per sample (zeros when None, e.g. for SFT).
    """
    if not samples:
        raise ValueError("make_batch needs at least one sample")
    if advantages is not None and len(advantages) != len(samples):
        raise ValueError(f"{len(advantages)} advantages for {len(samples)} samples")
    for i, s in enumerate(samples):
        _check_sample(i, s)
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    b, t = len(samples), max(lengths)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    targets = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t)
    old = torch.zeros(b, t)
    for i, s in enumerate(samples):
        seq = torch.tensor([*s.prompt_ids, *s.response_ids], dtype=torch.long)
        first, last = len(s.prompt_ids) - 1, lengths[i]  # response j sits at first + j
        input_ids[i, :last] = seq[:-1]
        targets[i, :last] = seq[1:]
        m = torch.tensor(s.loss_mask, dtype=torch.float32)
        mask[i, first:last] = m
        old[i, first:last] = torch.tensor(s.logprobs, dtype=torch.float32) * m
    adv = torch.zeros(b) if advantages is None else torch.tensor(advantages, dtype=torch.float32)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        loss_mask=mask,
        old_logprobs=old,
        advantages=adv,
        lengths=torch.tensor(lengths, dtype=torch.long),
        num_tokens=float(mask.sum()),
        num_seqs=float((mask.sum(-1) > 0).sum()),
    )


def split_by_token_budget(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches whose padded size (rows x longest) stays within
    token_budget; a sequence is never split, and one longer than the budget is alone.

    Sequences are taken longest first (less padding); indices within a group are ascending.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"sequence lengths must be >= 1, got {list(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def make_micro_batches(
    samples: Sequence[TokenSample],
    advantages: Sequence[float] | None = None,
    *,
    token_budget: int,
    pad_id: int = 0,
) -> list[Batch]:
    """Split samples by ``split_by_token_budget`` (on model input lengths) into Batches that carry
    the whole batch's num_tokens / num_seqs, so losses computed per micro-batch with those
    normalisers and back-propagated one after another accumulate the full-batch gradient."""
    if advantages is not None and len(advantages) != len(samples):
        raise ValueError(f"{len(advantages)} advantages for {len(samples)} samples")
    for i, s in enumerate(samples):
        _check_sample(i, s)
    num_tokens = float(sum(sum(s.loss_mask) for s in samples))
    num_seqs = float(sum(any(s.loss_mask) for s in samples))
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    out = []
    for g in split_by_token_budget(lengths, token_budget):
        adv = None if advantages is None else [advantages[i] for i in g]
        mb = make_batch([samples[i] for i in g], adv, pad_id=pad_id)
        out.append(replace(mb, num_tokens=num_tokens, num_seqs=num_seqs))
    return out


def forward_logprobs(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch: Batch,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model(batch.input_ids) -> logits [B, T, V]`` and return (logprobs [B, T] with grad,
    entropy [B, T] without grad, or None when not asked) of softmax(logits / temperature): the
    distribution the engine sampled from at that temperature, whose logprobs it reported
    (``policy.sampling``). Temperature 0 (greedy) means the plain softmax, as in the engine."""
    if isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    logits = model(batch.input_ids)
    if temperature not in (0, 1):
        logits = logits.float() / temperature
    logprobs = token_logprobs(logits, batch.targets)
    return logprobs, (token_entropy(logits) if entropy else None)
