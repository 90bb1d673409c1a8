"""The learner: the trained copy of the policy, its optimizer, and the GRPO and SFT updates.

Plain Python (no Ray): ``rollout.workers`` wraps it as a Ray actor, tests use it directly.

- The policy is built like a rollout worker builds it (``train_config.model_config``, seeded by
  ``run.seed``), so version 0 is the same model on both sides.
- :meth:`Learner.train_step` (GRPO): trajectories sampled more than ``learner.max_staleness``
  versions ago are dropped and counted; group advantages come from ``reward.group_advantages``;
  groups whose rewards are all equal carry no signal and are skipped when
  ``learner.skip_zero_std``; the clipped policy loss (``policy.losses``) runs on loss-mask tokens
  with the sampling logprobs as the old logprobs (one update per batch; with ``tis_cap`` the
  learner recomputes the old logprobs and weights tokens by the truncated rollout ratio); the
  metrics include the rollout-vs-learner logprob gap on the sampled tokens. Each step adds one to
  ``version``.
- :meth:`Learner.sft_step`: cross-entropy on the loss-mask tokens of demonstrations.
- Micro-batches by ``learner.token_budget`` padded tokens, normalised by the whole batch's token
  and sequence counts, so accumulating them gives the full-batch gradient.
- Data parallel: with ``learner.num_ranks`` = N > 1 every rank is given the whole batch, works
  on its share (sequences rank, rank + N, ...), and the gradients are summed over the ranks with
  ``torch.distributed`` (gloo on CPU, NCCL on GPU) before clipping and the optimizer step, so
  all ranks hold the same parameters after every step, equal to one rank's on the same batch.
- Checkpoints: a directory with ``model.safetensors``, ``optimizer.safetensors`` (AdamW moments
  and step counts by parameter name) and ``learner.json`` (version, step counters, the torch RNG
  state), written to a temporary directory and renamed, so a killed process leaves either the
  old or the new checkpoint.

Muon is not offered: AdamW with clipping is what the CPU demo needs, and a Muon that is not
tested against a reference would be a guess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rollout.config import Config, from_dict

__all__ = ["Learner", "Sample", "checkpoint_files", "latest_checkpoint"]


@dataclass
class Sample:
    """A token sequence to learn from (``policy.losses.TokenSample``): SFT demonstrations."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]


class Learner:
    """The trained policy. With ``learner.num_ranks`` > 1 it joins the data-parallel group as
    ``rank``, through ``store`` (``"host:port"`` of a ``torch.distributed.TCPStore`` that the
    caller serves, as ``rollout.workers.LearnerGroup`` does) or ``init_method`` (e.g.
    ``tcp://127.0.0.1:PORT``: rank 0 serves the store on that port)."""

    def __init__(
        self,
        config: Config | dict[str, Any],
        *,
        rank: int = 0,
        init_method: str | None = None,
        store: str | None = None,
        device: str | None = None,
    ) -> None:
        import policy
        from policy.losses import PolicyLossConfig
        from rollout.train_config import model_config

        self.config = config if isinstance(config, Config) else from_dict(config)
        c = self.config.learner
        self.world_size = c.num_ranks
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        self.rank = rank
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.world_size > 1:
            self._join(init_method, store)
        torch.manual_seed(self.config.run.seed)
        self.model = policy.V4Model(model_config(self.config)).to(self.device)
        self.model.train()
        self._params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = self._new_optimizer()
        self.loss_cfg = PolicyLossConfig(
            agg=c.loss,
            eps_low=c.clip_low,
            eps_high=c.clip_high,
            norm_length=c.norm_length or None,
            tis_cap=c.tis_cap or None,
        )
        self.version = 0  # policy version: the number of RL updates applied
        self.rl_steps = 0
        self.sft_steps = 0
        self.dropped_stale = 0  # trajectories dropped for staleness, over the whole run

    # -- set-up ----------------------------------------------------------------------------------

    def _join(self, init_method: str | None, store: str | None) -> None:
        import torch.distributed as dist

        if (init_method is None) == (store is None):
            raise ValueError(
                f"learner.num_ranks = {self.world_size} needs one of init_method and store, "
                f"got init_method={init_method!r}, store={store!r}"
            )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if dist.is_initialized():
            return
        if store is None:
            dist.init_process_group(
                backend, init_method=init_method, rank=self.rank, world_size=self.world_size
            )
            return
        host, _, port = store.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"store must be 'host:port', got {store!r}")
        client = dist.TCPStore(host, int(port), is_master=False)
        dist.init_process_group(backend, store=client, rank=self.rank, world_size=self.world_size)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        c = self.config.learner
        return torch.optim.AdamW(
            [p for _, p in self._params],
            lr=c.lr,
            betas=tuple(c.betas),
            weight_decay=c.weight_decay,
        )

    def reset_optimizer(self) -> None:
        """A fresh optimizer (between the SFT stage and RL: moments of one objective are not
        carried into the other)."""
        self.optimizer = self._new_optimizer()

    def rl_lr(self) -> float:
        """The learning rate of the next RL update: ``learner.lr``, reached linearly over the
        first ``learner.warmup_steps`` updates. A fresh Adam moves every parameter by about lr
        on its first steps whatever the gradient's size; RL gradients on a few groups are
        noisy, so full-size first steps can undo what the warm start learned."""
        c = self.config.learner
        if not c.warmup_steps:
            return c.lr
        return c.lr * min(1.0, (self.rl_steps + 1) / c.warmup_steps)

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "version": self.version}

    # -- updates ---------------------------------------------------------------------------------

    def train_step(self, trajectories: Sequence[Any]) -> dict[str, float]:
        """One GRPO update on a batch of scored trajectories (every rank gets the same batch).
        Returns metrics; ``version`` increases by one even when nothing was left to train on."""
        from reward import group_advantages

        start = time.perf_counter()
        c = self.config.learner
        fresh = [t for t in trajectories if self.version - t.policy_version <= c.max_staleness]
        stale = len(trajectories) - len(fresh)
        self.dropped_stale += stale
        groups: dict[str, list[Any]] = defaultdict(list)
        for t in fresh:
            groups[t.group_id].append(t)
        samples, advantages, zero_std = [], [], 0
        for ts in groups.values():
            adv = group_advantages([t.reward for t in ts], c.advantage)
            if c.skip_zero_std and not any(adv):
                zero_std += 1
                continue
            samples += ts
            advantages += adv
        lr = self.rl_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = self._update(samples, advantages, sft=False)
        metrics["lr"] = lr
        metrics.update(
            trajectories=float(len(trajectories)),
            trained=float(len(samples)),
            dropped_stale=float(stale),
            dropped_stale_total=float(self.dropped_stale),
            groups_zero_std=float(zero_std),
            staleness_mean=(
                sum(self.version - t.policy_version for t in fresh) / len(fresh) if fresh else 0.0
            ),
        )
        self.version += 1
        self.rl_steps += 1
        metrics["version"] = float(self.version)
        metrics["learn_s"] = time.perf_counter() - start
        return metrics

    def sft_step(self, samples: Sequence[Any], lr: float | None = None) -> dict[str, float]:
        """One supervised step on demonstrations (cross-entropy on loss-mask tokens)."""
        start = time.perf_counter()
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        metrics = self._update(list(samples), None, sft=True)
        self.sft_steps += 1
        metrics["learn_s"] = time.perf_counter() - start
        return metrics

    def _update(
        self, samples: list[Any], advantages: list[float] | None, *, sft: bool
    ) -> dict[str, float]:
        from policy.losses import forward_logprobs, make_micro_batches, policy_loss, sft_loss

        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        maxima: dict[str, float] = {}
        tokens = 0.0
        if samples:
            num_tokens = float(sum(sum(s.loss_mask) for s in samples))
            num_seqs = float(sum(any(s.loss_mask) for s in samples))
            mine = list(range(self.rank, len(samples), self.world_size))
            shard = [samples[i] for i in mine]
            adv = None if advantages is None else [advantages[i] for i in mine]
            pad = 0
            batches = (
                make_micro_batches(shard, adv, token_budget=self.config.learner.token_budget)
                if shard
                else []
            )
            for mb in batches:
                mb = replace(mb, num_tokens=num_tokens, num_seqs=num_seqs).to(self.device)
                norm = {"num_tokens": mb.num_tokens, "num_seqs": mb.num_seqs}
                if sft:
                    logprobs, _ = forward_logprobs(self.model, mb, entropy=False)
                    loss, m = sft_loss(logprobs, mb.loss_mask, agg="token-mean", **norm)
                else:
                    # the policy being trained is the one the workers sample from: softmax of
                    # the logits at the sampling temperature (their logprobs are of it too)
                    temp = self.config.sampling.temperature
                    old, rollout = mb.old_logprobs, None
                    if self.loss_cfg.tis_cap is not None:
                        with torch.no_grad():
                            old, _ = forward_logprobs(
                                self.model, mb, entropy=False, temperature=temp
                            )
                        rollout = mb.old_logprobs
                    logprobs, entropy = forward_logprobs(self.model, mb, temperature=temp)
                    loss, m = policy_loss(
                        logprobs,
                        old,
                        mb.advantages,
                        mb.loss_mask,
                        self.loss_cfg,
                        rollout_logprobs=rollout,
                        entropy=entropy,
                        **norm,
                    )
                loss.backward()
                n = m.pop("tokens")
                tokens += n
                pad += int(mb.input_ids.numel())
                for k, v in m.items():
                    if k.endswith("_max"):
                        maxima[k] = max(maxima.get(k, 0.0), v)
                    elif k in ("pg_loss", "sft_loss"):
                        sums[k] += v  # already normalised by the whole batch: they add up
                    else:
                        sums[k] += v * n
            sums["padded_tokens"] = float(pad)
        grad_norm = self._reduce_and_step(bool(samples))
        # one fixed list of keys on every rank, so the collectives match even for an empty shard
        if sft:
            added, meaned, maxed = ("sft_loss", "padded_tokens"), (), ()
        else:
            added = ("pg_loss", "padded_tokens")
            meaned = (
                "ratio_mean",
                "clip_frac_low",
                "clip_frac_high",
                "logprob_gap_mean",
                "entropy",
            ) + (("tis_weight_mean", "tis_capped_frac") if self.loss_cfg.tis_cap else ())
            maxed = ("ratio_max", "logprob_gap_max")
        keys = ("tokens", *added, *meaned)
        totals = self._all_sum(
            torch.tensor([tokens] + [sums.get(k, 0.0) for k in keys[1:]], dtype=torch.float64)
        ).tolist()
        out = dict(zip(keys, totals, strict=True))
        for k in meaned:
            out[k] /= max(out["tokens"], 1.0)
        highest = self._all_max([maxima.get(k, 0.0) for k in maxed])
        out.update(zip(maxed, highest, strict=True))
        out["grad_norm"] = grad_norm
        return out

    def _reduce_and_step(self, any_samples: bool) -> float:
        """Sum the gradients over the ranks, clip, step. Returns the global grad norm."""
        if not any_samples:
            return 0.0
        params = [p for _, p in self._params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world_size > 1:
            import torch.distributed as dist

            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p, g in zip(params, grads, strict=True):
                n = g.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        else:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        clip = self.config.learner.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        self.optimizer.step()
        return float(norm)

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _all_max(self, values: list[float]) -> list[float]:
        if self.world_size > 1 and values:
            import torch.distributed as dist

            t = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.tolist()
        return values

    # -- publishing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights on the CPU (parameters and buffers), detached copies."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """``(state_dict, version)``: what the rollout workers load (``AsyncEngine.load_weights``)."""
        return self.state_dict(), self.version

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint directory at ``path`` (replaced atomically). ``extra`` (JSON) is
        stored with the learner state (the training loop's own counters)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(model, str(tmp / "model.safetensors"))
        save_file(self._optimizer_tensors(), str(tmp / "optimizer.safetensors"))
        state = {
            "version": self.version,
            "rl_steps": self.rl_steps,
            "sft_steps": self.sft_steps,
            "dropped_stale": self.dropped_stale,
            "lr": [g["lr"] for g in self.optimizer.param_groups],
            "extra": extra or {},
        }
        (tmp / "learner.json").write_text(json.dumps(state, indent=1))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def load(self, path: str | os.PathLike[str] | dict[str, bytes]) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save` (its directory, or its files as
        ``{name: bytes}``, as :func:`checkpoint_files` reads them); returns its ``extra``."""
        from safetensors.torch import load as load_bytes

        files = path if isinstance(path, dict) else checkpoint_files(path)
        model = load_bytes(files["model.safetensors"])
        self.model.load_state_dict({k: v.to(self.device) for k, v in model.items()})
        state = json.loads(files["learner.json"])
        self.reset_optimizer()
        self._load_optimizer(load_bytes(files["optimizer.safetensors"]), state["lr"])
        torch.set_rng_state(load_bytes(files["rng.safetensors"])["torch"])
        self.version = state["version"]
        self.rl_steps = state["rl_steps"]
        self.sft_steps = state["sft_steps"]
        self.dropped_stale = state["dropped_stale"]
        return state["extra"]

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self._params:
            for key, value in self.optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                out[f"{name}::{key}"] = t.detach().to("cpu").contiguous()
        return out

    def _load_optimizer(self, tensors: dict[str, torch.Tensor], lrs: list[float]) -> None:
        by_name = dict(self._params)
        for key, value in tensors.items():
            name, _, slot = key.rpartition("::")
            if name not in by_name:
                raise ValueError(f"optimizer state for unknown parameter {name!r}")
            p = by_name[name]
            self.optimizer.state[p][slot] = value.to(p.device) if slot != "step" else value
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "learner.json", "rng.safetensors")


def checkpoint_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """A checkpoint directory's files as ``{name: bytes}`` (what a learner rank on another node
    loads: only the driver's node holds the run directory)."""
    return {name: (Path(path) / name).read_bytes() for name in CHECKPOINT_FILES}


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run directory's newest complete checkpoint (``checkpoints/step-NNNNNN``), or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.suffix == "" and (p / "learner.json").is_file()]
    return max(done, key=lambda p: p.name, default=None)
