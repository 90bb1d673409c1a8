"""The training job: SFT warm start, then GRPO on the rollout workers, in one run directory.

No Ray here: sampling goes through a *sampler* (``rollout.workers.RolloutPool``: RolloutWorker
actors with their sandboxes) and the update through a *learner* (``rollout.learner.Learner`` in
this process, or ``rollout.workers.LearnerGroup`` for data-parallel ranks). Per RL step k:

1. the step's task groups: ``task.num_prompts`` train instances drawn with a seed derived from
   ``run.seed`` and k (the same on a resumed run), ``task.group_size`` episodes each;
2. the sampler runs them with the current weights (tools in sandboxes, scored on the live
   sandbox); each trajectory carries the policy version it was sampled with;
3. the learner's GRPO step (staleness filter, group advantages, policy loss), version += 1;
4. the new weights go to the workers (``AsyncEngine.load_weights``);
5. the trajectories are stored (``rollout.store``; their command logs are deleted,
   ``rollout.cmdlogs``), one ``metrics.jsonl`` record is appended, and
   a checkpoint is written (the previous one is removed unless it is a multiple of
   ``rl.checkpoint_every``).

Held-out evaluation (``rl.eval_prompts`` test instances, one episode each) runs before the first
step, every ``rl.eval_every`` steps and after the last. ``rl.mode = "async"``: the batch of step
k+1 is submitted before step k trains, so generation overlaps learning and the batch is one
version old (``learner.max_staleness`` bounds it).

Resume (``resume=True``): the newest checkpoint gives the learner (weights, optimizer, RNG) and
the next step; metrics records and stored batches after it are dropped, and the run continues
at that step with the same instances. A run killed during SFT starts SFT again.

At the end the run directory holds ``reward_curve.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rollout.cmdlogs import command_log_dir, remove_log_dir, remove_logs
from rollout.config import TRAIN_RESUME_FREE, Config, changed_settings
from rollout.learner import latest_checkpoint

__all__ = ["Sampler", "TrainError", "Trainer", "eval_groups", "step_groups"]

STEP_SEED_STRIDE = 1_000_003  # step k of run seed s draws its instances with s * STRIDE + 1 + k


class TrainError(RuntimeError):
    """The training run cannot start or continue (the message says why)."""


class Sampler(Protocol):
    """What the loop needs from the rollout side (``rollout.workers.RolloutPool``)."""

    def set_weights(self, state_dict: dict[str, Any], version: int) -> None: ...

    def submit(self, groups: list[Any]) -> Any: ...

    def collect(self, handle: Any) -> list[Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Group:
    """A task group (the fields rollout.workers.Group has)."""

    group_id: str
    instance: Any
    size: int
    temperature: float | None = None


def step_groups(config: Config, step: int, group_type: Callable[..., Any] = _Group) -> list[Any]:
    """The task groups of RL step ``step`` (deterministic for the config and step)."""
    from rollout.tasks import get_task

    task = get_task(config.task.name, **config.task.options)
    seed = config.run.seed * STEP_SEED_STRIDE + 1 + step
    instances = task.instances("train", config.task.num_prompts, seed=seed)
    return [group_type(f"s{step}/{i.id}", i, config.task.group_size) for i in instances]


def eval_groups(config: Config, group_type: Callable[..., Any] = _Group) -> list[Any]:
    """The held-out set: ``rl.eval_prompts`` test instances, one episode each, sampled at
    ``rl.eval_temperature``."""
    from rollout.tasks import get_task

    task = get_task(config.task.name, **config.task.options)
    instances = task.instances("test", config.rl.eval_prompts, seed=config.run.seed)
    t = config.rl.eval_temperature
    return [group_type(f"eval/{i.id}", i, 1, t) for i in instances]


def tool_use_rate(trajectories: list[Any]) -> float:
    """Share of episodes with at least one tool call that ran (ok)."""
    if not trajectories:
        return 0.0
    return sum(any(c.ok for c in t.tool_calls) for t in trajectories) / len(trajectories)


def accuracy(trajectories: list[Any]) -> float:
    if not trajectories:
        return 0.0
    return sum(t.reward >= 1.0 for t in trajectories) / len(trajectories)


class Trainer:
    """One training run: ``Trainer(config, run_dir, sampler_factory, learner).run()``.

    ``sampler_factory(tokenizer_json)`` starts the rollout side once the tokenizer is known;
    ``learner`` is a Learner (or a LearnerGroup). ``on_step(trainer, record)`` is called after
    each RL step's record is written (tests kill the run there).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike[str],
        *,
        sampler_factory: Callable[[str | None], Sampler],
        learner: Any,
        resume: bool = False,
        progress: bool | None = None,
        on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
        group_type: Callable[..., Any] = _Group,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.sampler_factory = sampler_factory
        self.learner = learner
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.on_step = on_step
        self.group_type = group_type
        self.sampler: Sampler | None = None
        self.tokenizer_json: str | None = None
        self.records: list[dict[str, Any]] = []

    # -- set-up ----------------------------------------------------------------------------------

    def _open(self) -> tuple[Any, int, bool]:
        """The store, the first RL step to run and whether SFT is still to do."""
        from rollout.store import RunStore

        stored = self.run_dir / "config.json"
        if stored.exists() and not self.resume:
            raise TrainError(
                f"run directory {self.run_dir} already holds a run; pass --resume to continue it"
            )
        if self.resume and stored.exists():
            _check_same_run(json.loads(stored.read_text()), self.config)
        store = RunStore(self.run_dir)
        store.write_config(self.config.to_dict())
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is None:
            _truncate_metrics(self.run_dir, lambda r: False)
            return store, 0, True
        extra = self.learner.load(ckpt)
        start = int(extra["next_step"])
        _truncate_metrics(self.run_dir, lambda r: r.get("step", -1) < start or r["kind"] == "sft")
        self.records = _read_metrics(self.run_dir)
        return store, start, False

    def _tokenizer(self) -> str | None:
        """The run's tokenizer.json text (bpe), trained once and kept in the run directory."""
        if self.config.tokenizer.kind == "byte":
            return None
        from rollout.bpe import load_or_train
        from rollout.sft import render_text

        c = self.config
        n = max(c.tokenizer.corpus_prompts, c.sft.demonstrations if c.sft.steps else 0)
        return load_or_train(
            self.run_dir / "tokenizer.json",
            lambda: [render_text(d, c.sampling.thinking_mode) for d in self._demos(n)],
            c.tokenizer.vocab_size,
        )

    def _demos(self, n: int) -> list[Any]:
        import dsec
        from rollout.sft import demonstrations, sandbox_tool

        c = self.config
        with dsec.Sandbox(
            memory_bytes=c.sandbox.memory_mb << 20, max_pids=c.sandbox.max_pids
        ) as sb:
            return demonstrations(
                c.task.name,
                n,
                seed=c.run.seed,
                tool_fraction=c.sft.tool_fraction,
                call_fraction=c.sft.call_fraction,
                run_tool=sandbox_tool(sb),
                options=c.task.options,
            )

    def _tokenizer_object(self) -> Any:
        from policy.tokenizer import ByteTokenizer, OfficialTokenizer

        if self.tokenizer_json is None:
            return ByteTokenizer()
        return OfficialTokenizer(self.tokenizer_json)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """SFT (unless resumed past it), the RL steps, the plot and the summary."""
        t_run = time.perf_counter()
        store, start, do_sft = self._open()
        self.tokenizer_json = self._tokenizer()
        if do_sft and self.config.sft.steps:
            self._sft()
        if do_sft:
            self.learner.reset_optimizer()
            self._checkpoint(0, force=True)
        self.sampler = self.sampler_factory(self.tokenizer_json)
        try:
            self._publish()
            self._rl(store, start)
        finally:
            self.sampler.close()
        remove_log_dir(command_log_dir(self.config, self.run_dir))
        summary = self._finish(time.perf_counter() - t_run)
        return summary

    def _sft(self) -> None:
        from rollout.sft import demonstration_samples, run_sft

        c = self.config
        t0 = time.perf_counter()
        demos = self._demos(c.sft.demonstrations)
        samples = demonstration_samples(demos, self._tokenizer_object(), c.sampling.thinking_mode)
        bar = _Bar(c.sft.steps, "sft", self.progress)

        def on_step(step: int, m: dict[str, float]) -> None:
            bar.update(loss=m["sft_loss"])
            if step % 10 == 0 or step == c.sft.steps - 1:
                self._record({"kind": "sft", "sft_step": step, **m})

        run_sft(
            self.learner,
            samples,
            steps=c.sft.steps,
            batch_size=c.sft.batch_size,
            lr=c.sft.lr,
            seed=c.run.seed,
            schedule=c.sft.schedule,
            warmup_steps=c.sft.warmup_steps,
            on_step=on_step,
        )
        bar.close()
        self._sft_seconds = time.perf_counter() - t0

    def _publish(self) -> float:
        t0 = time.perf_counter()
        state, version = self.learner.weights()
        self.sampler.set_weights(state, version)
        return time.perf_counter() - t0

    def _evaluate(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        groups = eval_groups(self.config, self.group_type)
        trajs = self.sampler.collect(self.sampler.submit(groups))
        # not stored, and sampled again at the next evaluation with other weights
        remove_logs(command_log_dir(self.config, self.run_dir), [g.group_id for g in groups])
        row = {
            "kind": "eval",
            "step": step,
            "version": self.learner.version,
            "accuracy": accuracy(trajs),
            "tool_use": tool_use_rate(trajs),
            "episodes": len(trajs),
            "eval_s": time.perf_counter() - t0,
        }
        self._record(row)
        return row

    def _rl(self, store: Any, start: int) -> None:
        c = self.config
        steps = c.rl.steps
        if start == 0 or not any(r["kind"] == "eval" for r in self.records):
            self._evaluate(start)
        bar = _Bar(steps, "grpo", self.progress, initial=start)
        pending = None
        for step in range(start, steps):
            t_step = time.perf_counter()
            if pending is None:
                pending = self.sampler.submit(step_groups(c, step, self.group_type))
            t0 = time.perf_counter()
            trajs = self.sampler.collect(pending)
            rollout_wait = time.perf_counter() - t0
            pending = None
            if c.rl.mode == "async" and step + 1 < steps:
                pending = self.sampler.submit(step_groups(c, step + 1, self.group_type))
            learn = self.learner.train_step(trajs)
            sync_s = self._publish()
            store.write_groups(trajs)
            remove_logs(command_log_dir(c, self.run_dir), {t.group_id for t in trajs})
            record = self._step_record(step, trajs, learn, rollout_wait, sync_s, t_step)
            self._record(record)
            bar.update(reward=record["reward"], tools=record["tool_use"])
            last = step == steps - 1
            if (c.rl.eval_every and ((step + 1) % c.rl.eval_every == 0 or last)) or last:
                self._evaluate(step + 1)
            self._checkpoint(step + 1)
            if self.on_step is not None:
                self.on_step(self, record)
        bar.close()

    def _step_record(
        self,
        step: int,
        trajs: list[Any],
        learn: dict[str, float],
        rollout_wait: float,
        sync_s: float,
        t_step: float,
    ) -> dict[str, Any]:
        from reward import summarize

        m = summarize(trajs)
        episode = {
            f"episode/{p}_s": sum(t.timings.get(p, 0.0) for t in trajs)
            for p in ("generate", "tools", "score")
        }
        return {
            "kind": "rl",
            "step": step,
            "version": self.learner.version,
            "reward": m.get("reward/mean", 0.0),
            "pass_rate": m.get("pass_rate", 0.0),
            "tool_use": tool_use_rate(trajs),
            "frac_reward_zero_std": m.get("frac_reward_zero_std", 0.0),
            "sampled_versions": sorted({t.policy_version for t in trajs}),
            "trajectories": len(trajs),
            "response_tokens_mean": m.get("response_tokens/mean", 0.0),
            **{f"learner/{k}": v for k, v in learn.items()},
            "time/rollout_wait_s": rollout_wait,
            "time/learn_s": learn.get("learn_s", 0.0),
            "time/sync_s": sync_s,
            "time/step_s": time.perf_counter() - t_step,
            **episode,
        }

    def _record(self, row: dict[str, Any]) -> None:
        row = {**row, "time": round(time.time(), 3)}
        self.records.append(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _checkpoint(self, next_step: int, *, force: bool = False) -> None:
        root = self.run_dir / "checkpoints"
        self.learner.save(root / f"step-{next_step:06d}", extra={"next_step": next_step})
        every = self.config.rl.checkpoint_every
        for old in root.glob("step-*"):
            n = int(old.name.split("-")[1].split(".")[0])
            if n < next_step and n % every and n != 0:
                shutil.rmtree(old, ignore_errors=True)

    # -- the end ---------------------------------------------------------------------------------

    def _finish(self, elapsed: float) -> dict[str, Any]:
        evals = [r for r in self.records if r["kind"] == "eval"]
        steps = [r for r in self.records if r["kind"] == "rl"]
        keys = ("time/rollout_wait_s", "time/learn_s", "time/sync_s", "time/step_s")
        mean = {k: _mean([r[k] for r in steps]) for k in keys}
        for p in ("generate", "tools", "score"):
            mean[f"episode/{p}_s"] = _mean([r[f"episode/{p}_s"] for r in steps])
        summary = {
            "run_dir": str(self.run_dir),
            "steps": len(steps),
            "elapsed_s": elapsed,
            "eval_accuracy_first": evals[0]["accuracy"] if evals else None,
            "eval_accuracy_last": evals[-1]["accuracy"] if evals else None,
            "eval_tool_use_first": evals[0]["tool_use"] if evals else None,
            "eval_tool_use_last": evals[-1]["tool_use"] if evals else None,
            "eval_curve": [(r["step"], r["accuracy"], r["tool_use"]) for r in evals],
            "train_reward_curve": [(r["step"], r["reward"]) for r in steps],
            "logprob_gap_mean": _mean([r.get("learner/logprob_gap_mean", 0.0) for r in steps]),
            "logprob_gap_max": max(
                (r.get("learner/logprob_gap_max", 0.0) for r in steps), default=0.0
            ),
            "dropped_stale": sum(r.get("learner/dropped_stale", 0.0) for r in steps),
            "mean_step_times": mean,
            "mode": self.config.rl.mode,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(self.records, self.run_dir / "reward_curve.png")
        return summary


# ------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a kill
    return rows


def _truncate_metrics(run_dir: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite metrics.jsonl with the records ``keep`` accepts (atomically)."""
    path = run_dir / "metrics.jsonl"
    rows = [r for r in _read_metrics(run_dir) if keep(r)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _check_same_run(stored: dict[str, Any], config: Config) -> None:
    """A resumed run must be the same run: only where it runs (workers, engine sizes, the run
    directory, sandbox.command_log) and how long (rl.steps) may change."""
    changed = changed_settings(config.to_dict(), stored, TRAIN_RESUME_FREE)
    if changed:
        raise TrainError(
            "--resume: the config differs from the stored run in " + ", ".join(changed)
        )


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """reward_curve.png: train reward and tool use per step, held-out accuracy at each eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "rl"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot([r["step"] + 1 for r in steps], [r["reward"] for r in steps], label="train reward")
        ax.plot(
            [r["step"] + 1 for r in steps],
            [r["tool_use"] for r in steps],
            label="train tool use",
            alpha=0.6,
        )
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["accuracy"] for r in evals],
            "o-",
            label="held-out accuracy",
        )
    ax.set_xlabel("RL step (policy version)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("GRPO on arith_tool")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(summary: dict[str, Any]) -> None:
    """The learning summary as a table (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = summary["mean_step_times"]
    rows = [
        ("run directory", summary["run_dir"]),
        ("RL steps (mode)", f"{summary['steps']} ({summary['mode']})"),
        ("job time", f"{summary['elapsed_s']:.1f} s"),
        (
            "held-out accuracy",
            f"{_fmt(summary['eval_accuracy_first'])} -> {_fmt(summary['eval_accuracy_last'])}",
        ),
        (
            "held-out tool use",
            f"{_fmt(summary['eval_tool_use_first'])} -> {_fmt(summary['eval_tool_use_last'])}",
        ),
        (
            "accuracy curve (step: acc)",
            ", ".join(f"{s}: {a:.2f}" for s, a, _ in summary["eval_curve"]),
        ),
        (
            "logprob gap (mean / max)",
            f"{summary['logprob_gap_mean']:.4f} / {summary['logprob_gap_max']:.4f}",
        ),
        ("dropped as stale", f"{summary['dropped_stale']:.0f}"),
        (
            "step time: rollout wait / learn / sync / total",
            " / ".join(
                f"{t[k]:.2f} s"
                for k in ("time/rollout_wait_s", "time/learn_s", "time/sync_s", "time/step_s")
            ),
        ),
        (
            "episode seconds per step: generate / tools / score",
            " / ".join(f"{t[f'episode/{p}_s']:.1f}" for p in ("generate", "tools", "score")),
        ),
    ]
    table = Table(title="learning summary", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


class _Bar:
    """tqdm on a terminal; plain lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0) -> None:
        self.bar = None
        self.desc, self.n, self.total = desc, initial, total
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, **values: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
            self.bar.update(1)
        elif self.desc != "sft" or self.n % 20 == 0 or self.n == self.total:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
            print(f"{self.desc} {self.n}/{self.total}: {shown}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
