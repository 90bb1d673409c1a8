"""The rollout job (``python -m rollout run`` without training): every task group of a config
on a :class:`rollout.workers.RolloutPool`, each finished group stored once.

``RolloutJob(config, run_dir).run()`` builds the groups (``task.num_prompts`` instances of
``task.split``, ``task.group_size`` episodes each), skips those the run directory already holds
(``--resume``), stores the others as they finish in batches of ``run.groups_per_batch`` groups
(``rollout.store``: atomic batch files, a group at most once; the stored groups' command logs are
then deleted, ``rollout.cmdlogs``), appends one ``metrics.jsonl`` record per batch
(``reward.summarize`` of the batch plus progress and failure counts), and returns a
:class:`RunSummary`. Progress: a tqdm bar on a terminal, one line per batch otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.cmdlogs import command_log_dir, remove_log_dir, remove_logs
from rollout.config import JOB_RESUME_FREE, Config, ConfigError, changed_settings, from_dict
from rollout.store import RunStore
from rollout.types import Trajectory
from rollout.workers import Group, JobError, RolloutPool, check_resources

__all__ = ["JobError", "RolloutJob", "RunSummary", "make_groups"]


def make_groups(config: Config) -> list[Group]:
    """The run's task groups: ``task.num_prompts`` instances of ``task.split`` (seeded by
    ``run.seed``), each run ``task.group_size`` times. A group's id is its instance id, so a
    resumed run recognises the groups it already stored."""
    from rollout.tasks import get_task

    task = get_task(config.task.name, **config.task.options)
    instances = task.instances(config.task.split, config.task.num_prompts, seed=config.run.seed)
    return [Group(inst.id, inst, config.task.group_size) for inst in instances]


def _run_tokenizer(config: Config, run_dir: Path) -> str | None:
    """The ``tokenizer.json`` text the workers use, or None for the byte-level tokenizer:
    ``policy.tokenizer`` when given; for ``tokenizer.kind = "bpe"`` the run directory's
    tokenizer.json, trained on rendered prompts of the task on first use (``rollout.bpe``)."""
    if config.policy.tokenizer:
        return Path(config.policy.tokenizer).read_text(encoding="utf-8")
    if config.tokenizer.kind != "bpe":
        return None
    from policy import chat
    from rollout.bpe import load_or_train
    from rollout.tasks import get_task

    def corpus() -> list[str]:
        task = get_task(config.task.name, **config.task.options)
        instances = task.instances("train", config.tokenizer.corpus_prompts, config.run.seed)
        mode = config.sampling.thinking_mode
        return [chat.encode(i.messages, mode, tools=i.tools or None) for i in instances]

    return load_or_train(run_dir / "tokenizer.json", corpus, config.tokenizer.vocab_size)


@dataclass
class RunSummary:
    """What a run did (the CLI prints it as the summary table)."""

    run_dir: str
    groups_total: int
    groups_skipped: int  # already stored when the run started (--resume)
    groups_stored: int  # stored by this run
    trajectories: int  # stored by this run
    sampled_tokens: int  # sampled by this run
    elapsed_s: float
    ready_s: float  # seconds until every worker was ready (model built, sandboxes warm)
    requeued_groups: int
    worker_failures: int  # worker deaths seen (failed calls or a failed readiness check)
    workers_replaced: int  # dead workers replaced by a new actor (no Ray restarts left)
    metrics: dict[str, Any] = field(default_factory=dict)  # reward.summarize of the whole run


class RolloutJob:
    """One rollout run: ``RolloutJob(config, run_dir).run()`` (Ray must be initialised).

    Runs every task group of the config not stored yet on a :class:`RolloutPool`, stores the
    groups in batches of ``run.groups_per_batch`` (``rollout.store``; a group at most once) and
    appends one ``metrics.jsonl`` record per batch.

    ``progress``: "bar" (tqdm), "log" (a line per stored batch) or "none"; None picks "bar" on
    a terminal, else "log". ``on_batch(job, batch_number)`` is called after each stored batch;
    ``job.pool.slots[i].actor`` are the worker handles while the run is going.
    ``backend_factory`` goes to every worker (see :class:`RolloutWorker`).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        progress: str | None = None,
        on_batch: Callable[[RolloutJob, int], None] | None = None,
        backend_factory: Callable[[Any], Any] | None = None,
    ) -> None:
        if progress is None:
            progress = "bar" if sys.stderr.isatty() else "log"
        if progress not in ("bar", "log", "none"):
            raise ValueError(f"progress must be 'bar', 'log', 'none' or None, got {progress!r}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.on_batch = on_batch
        self.backend_factory = backend_factory
        self.pool: RolloutPool | None = None

    def _open_store(self) -> RunStore:
        existing = self.run_dir / "config.json"
        if existing.exists() and not self.resume:
            raise JobError(
                f"run directory {self.run_dir} already holds a run; pass --resume to continue "
                "it, or choose another --out"
            )
        store = RunStore(self.run_dir)
        if self.resume and existing.exists():
            _check_resumable(store.read_config(), self.config)
        store.write_config(self.config.to_dict())
        return store

    def run(self) -> RunSummary:
        """Run every group not stored yet; returns the summary. Raises JobError if it cannot."""
        groups = make_groups(self.config)
        check_resources(self.config)
        store = self._open_store()
        pending = [g for g in groups if not store.has_group(g.group_id)]
        t_start = time.perf_counter()
        ready = t_start
        totals: Counter[str] = Counter()
        bar = _Progress(len(pending), mode=self.progress, skipped=len(groups) - len(pending))
        buffer: list[list[Trajectory]] = []
        try:
            if pending:
                self.pool = RolloutPool(
                    self.config,
                    backend_factory=self.backend_factory,
                    tokenizer_json=_run_tokenizer(self.config, self.run_dir),
                    log_dir=command_log_dir(self.config, self.run_dir),
                )
                ready = time.perf_counter()
                for done, trajectories in enumerate(self.pool.finished(self.pool.submit(pending))):
                    buffer.append(trajectories)
                    bar.update(1)
                    last = done + 1 == len(pending)
                    if len(buffer) >= self.config.run.groups_per_batch or last:
                        row = self._flush(store, buffer, t_start, done + 1)
                        buffer = []
                        totals.update(trajectories=row["trajectories"], tokens=row["tokens"])
                        bar.log_batch(row)
                        if self.on_batch is not None:
                            self.on_batch(self, row["batch"])
        finally:
            bar.close()
            if self.pool is not None:
                self.pool.close()
        remove_log_dir(command_log_dir(self.config, self.run_dir))
        stats = self.pool.stats if self.pool is not None else Counter()
        return RunSummary(
            run_dir=str(self.run_dir),
            groups_total=len(groups),
            groups_skipped=len(groups) - len(pending),
            groups_stored=len(pending),
            trajectories=totals["trajectories"],
            sampled_tokens=totals["tokens"],
            elapsed_s=time.perf_counter() - t_start,
            ready_s=ready - t_start,
            requeued_groups=stats["requeued_groups"],
            worker_failures=stats["worker_failures"],
            workers_replaced=stats["workers_replaced"],
            metrics=_summarize(list(store.iter_trajectories())),
        )

    def _flush(self, store, buffer, t_start, groups_done) -> dict[str, Any]:
        """Store the buffered groups as one batch, delete their command logs, append the
        batch's metrics record."""
        trajectories = [t for group in buffer for t in group]
        store.write_groups(trajectories)
        remove_logs(command_log_dir(self.config, self.run_dir), [g[0].group_id for g in buffer])
        stats = self.pool.stats if self.pool is not None else Counter()
        row = {
            "batch": store.num_batches - 1,
            "groups": len(buffer),
            "groups_done": groups_done,
            "trajectories": len(trajectories),
            "tokens": sum(t.num_sampled for t in trajectories),
            "elapsed_s": round(time.perf_counter() - t_start, 3),
            "requeued_groups": stats["requeued_groups"],
            "worker_failures": stats["worker_failures"],
            **_summarize(trajectories),
        }
        store.append_metrics(row)
        return row


def _check_resumable(stored: dict[str, Any], config: Config) -> None:
    """A resumed run must produce the same kind of trajectories: only the run's location, the
    workers and engine sizes, the number of prompts and ``sandbox.command_log`` may change."""
    try:
        old = from_dict(stored).to_dict()
    except ConfigError as exc:
        raise JobError(f"the run directory's config.json cannot be read back: {exc}") from exc
    changed = changed_settings(config.to_dict(), old, JOB_RESUME_FREE)
    if changed:
        raise JobError("--resume: the config differs from the stored run in " + ", ".join(changed))


def _summarize(trajectories: list[Trajectory]) -> dict[str, Any]:
    """``reward.summarize`` plus the seconds spent per phase, summed over the episodes, and the
    sandbox calls replayed from command logs (``tools/replayed``)."""
    from reward import summarize

    out = dict(summarize(trajectories))
    for phase in ("generate", "tools", "score"):
        out[f"timing/{phase}/total"] = sum(t.timings.get(phase, 0.0) for t in trajectories)
    out["tools/replayed"] = sum(
        t.metadata.get("cmdlog", {}).get("replayed", 0) for t in trajectories
    )
    return out


class _Progress:
    """A tqdm bar ("bar"), one plain line per stored batch ("log"), or nothing ("none")."""

    def __init__(self, total: int, *, mode: str, skipped: int) -> None:
        self.total, self.mode = total, mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="group", desc="rollout", dynamic_ncols=True)
        elif mode == "log" and skipped:
            print(f"resuming: {skipped} groups already stored, {total} to run", flush=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_batch(self, row: dict[str, Any]) -> None:
        reward = row.get("reward/mean")
        if self.bar is not None and reward is not None:
            self.bar.set_postfix(reward=f"{reward:.3f}")
        if self.mode != "log":
            return
        print(
            f"batch {row['batch']}: {row['groups']} groups ({row['groups_done']}/{self.total}), "
            f"{row['trajectories']} trajectories"
            + (f", reward {reward:.3f}" if reward is not None else "")
            + f", {row['elapsed_s']:.1f} s",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
