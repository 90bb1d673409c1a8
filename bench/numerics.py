"""Reference vs official numerics (``V4Config.numerics``) on a 128-wide model.

Prints, for each model dtype:
- the median |logit difference| between "reference" and "official" over every position and
  vocabulary entry of a full forward (same weights, same tokens), absolute and relative to the
  median |logit|; and the share of CSA top-k sets that differ between the two modes;
- the rollout-vs-learner logprob gap in each mode: tokens sampled by the engine (cached prefill
  + decode, temperature 1), then scored by the learner's full forward
  (``policy.losses.forward_logprobs``, same weights): median and max |gap| over the sampled
  tokens, and how many tokens differ by more than 1e-3.

Run: ``python bench/numerics.py`` (``--help`` for sizes). The model is the ``demo`` preset
(d = 128, SWA / CSA / HCA layers, MoE, FP8 KV cache; the block-sparse attention layout that
training and the engine use by default, ``--attn-path dense`` for the quadratic one) with its
random initialisation, the head scaled so that the logits are not near-uniform.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from policy.config import V4Config  # noqa: E402
from policy.engine import Engine, SamplingParams  # noqa: E402
from policy.losses import forward_logprobs, make_batch  # noqa: E402
from policy.model import V4Model  # noqa: E402


def build(args, dtype: str, numerics: str) -> V4Model:
    torch.manual_seed(args.seed)
    cfg = V4Config.from_preset(
        args.preset, dtype=dtype, numerics=numerics, attn_path=args.attn_path
    )
    model = V4Model(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(args.head_scale)
    return model


def topk_sets(model: V4Model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The CSA layers' chosen entry sets [B, S, k] (sorted; one per layer, or per query chunk
    of the block-sparse layout) during a full forward."""
    from policy import attention

    seen: list[torch.Tensor] = []
    topk = attention.topk_indices

    def record(scores, visible, k):
        idx = topk(scores, visible, k)
        seen.append(idx.sort(dim=-1).values)
        return idx

    attention.topk_indices = record
    try:
        with torch.no_grad():
            model(ids)
    finally:
        attention.topk_indices = topk
    return seen


def logit_difference(args, dtype: str) -> None:
    ref = build(args, dtype, "reference")
    off = build(args, dtype, "official")
    ids = torch.randint(0, ref.cfg.vocab_size, (args.batch, args.seq), generator=_gen(args))
    with torch.no_grad():
        a, b = ref(ids), off(ids)
    diff = (a - b).abs().median().item()
    scale = a.abs().median().item()
    changed = [
        (x != y).any(-1).flatten()
        for x, y in zip(topk_sets(ref, ids), topk_sets(off, ids), strict=True)
    ]
    share = torch.cat(changed).float().mean().item()
    print(
        f"{dtype:9} median |logit ref - official| = {diff:.3e}  (median |logit| {scale:.3e}, "
        f"{100 * diff / scale:.1f}%); CSA top-k sets changed: {100 * share:.0f}%"
    )


def _gen(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed + 1)


def logprob_gap(args, dtype: str, numerics: str) -> None:
    model = build(args, dtype, numerics)
    g = _gen(args)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17)]
    prompts = prompts * (args.batch // 2 or 1)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=args.seed)
    gens = Engine(model, max_batch=len(prompts), max_context=args.seq).generate(prompts, params)
    samples = [
        SimpleNamespace(
            prompt_ids=p,
            response_ids=r.token_ids,
            loss_mask=[1] * len(r.token_ids),
            logprobs=r.logprobs,
        )
        for p, r in zip(prompts, gens, strict=True)
    ]
    batch = make_batch(samples)
    with torch.no_grad():
        lp, _ = forward_logprobs(model, batch, entropy=False)
    gap = (lp - batch.old_logprobs)[batch.loss_mask.bool()].abs()
    print(
        f"{dtype:9} {numerics:9} rollout vs learner |logprob gap| on {gap.numel()} sampled "
        f"tokens: median {gap.median().item():.2e}, max {gap.max().item():.2e}, "
        f"{int((gap > 1e-3).sum())} above 1e-3"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seq", type=int, default=256, help="forward length (and engine context)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--head-scale", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn-path", default="blocksparse", choices=("blocksparse", "dense"))
    args = ap.parse_args()
    t0 = time.time()
    for dtype in args.dtypes.split(","):
        logit_difference(args, dtype)
        for numerics in ("reference", "official"):
            logprob_gap(args, dtype, numerics)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
