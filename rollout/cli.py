"""``python -m rollout``: the rollout job.

    python -m rollout run CONFIG [--out DIR] [--address ADDR] [--set key=value ...] [--resume]

``run`` checks the config (a bad key or value exits with status 2 before anything starts),
starts an embedded Ray instance (or joins the cluster at ``--address`` / ``RAY_ADDRESS``, as
under ``ray job submit --working-dir . -- python -m rollout run CONFIG``), runs every task group
on RolloutWorker actors, stores the trajectories in the run directory (``--out``, default
``run.out_dir/run.name``) and prints a summary table. A config with ``sft.steps`` or
``rl.steps`` > 0 is a training run instead (``rollout.train``: SFT warm start, then GRPO steps
on the same workers; ``learner.num_ranks`` > 1 trains on that many data-parallel learner
actors). ``--resume`` continues a run directory, skipping the groups (or, for training, the
steps) it already holds. Exit status: 0 done, 1 the job failed, 2 bad usage or
config, 130 interrupted (the stored groups stay; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollout.native_import import use_built_dsec

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _in_job_copy() -> bool:
    """True inside a ``ray job submit`` driver whose job ships a working directory (the job
    then runs in a temporary copy of it)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m rollout", description="Multi-turn rollouts with sandboxed tools on Ray."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the rollout job of a TOML config")
    run.add_argument("config", type=Path, help="the job's TOML config (see configs/)")
    run.add_argument("--out", type=Path, help="run directory (default: run.out_dir/run.name)")
    run.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set task.num_prompts=4 (repeatable)",
    )
    run.add_argument("--resume", action="store_true", help="continue the run directory")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    use_built_dsec()  # before the config check imports the tasks (and with them dsec)
    from rollout.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = args.out or Path(config.run.out_dir) / config.run.name
    if not run_dir.is_absolute() and _in_job_copy():
        print(
            f"warning: the run directory {run_dir} is relative, so it lands in this job's "
            f"temporary copy of the working directory ({run_dir.resolve()}); pass --out with "
            "an absolute path to keep the run",
            file=sys.stderr,
        )
    run_dir = run_dir.resolve()
    if (run_dir / "config.json").exists() and not args.resume:
        print(
            f"error: {run_dir} already holds a run: pass --resume to continue it, or --out DIR",
            file=sys.stderr,
        )
        return EXIT_USAGE

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rollout import workers
    from rollout.job import RolloutJob
    from rollout.train import TrainError

    started = workers.connect(config, args.address)
    try:
        if config.sft.steps or config.rl.steps:
            print_train_summary(_train(config, run_dir, args.resume))
        else:
            print_summary(RolloutJob(config, run_dir, resume=args.resume).run())
    except (workers.JobError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"interrupted: `--resume` continues the run in {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if started:
            workers.disconnect()
    return 0


def _train(config: Any, run_dir: Path, resume: bool) -> dict[str, Any]:
    """A training run (``sft.steps`` or ``rl.steps`` > 0): the learner in this process (or
    ``learner.num_ranks`` Learner actors), the rollouts on a RolloutPool (rollout.train)."""
    from rollout import workers

    return workers.run_training(config, run_dir, resume=resume)


def print_train_summary(summary: dict[str, Any]) -> None:
    """The end-of-training table: held-out accuracy and tool use before and after."""

    def pair(first: Any, last: Any) -> str | None:
        return None if first is None else f"{first:.3f} -> {last:.3f}"

    times = summary.get("mean_step_times", {})
    rows = [
        ("run directory", summary["run_dir"]),
        ("RL steps", summary["steps"]),
        ("time", f"{summary['elapsed_s']:.1f} s"),
        ("held-out accuracy", pair(summary["eval_accuracy_first"], summary["eval_accuracy_last"])),
        ("held-out tool use", pair(summary["eval_tool_use_first"], summary["eval_tool_use_last"])),
        (
            "step time (rollout wait / learn)",
            " / ".join(
                f"{times.get(k, 0.0):.1f} s" for k in ("time/rollout_wait_s", "time/learn_s")
            ),
        ),
    ]
    _print_table("training summary", rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    """A two-column rich table of the rows whose value is not None."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for name, value in rows:
        if value is not None:
            table.add_row(name, _fmt(value))
    Console().print(table)


def print_summary(summary: Any) -> None:
    """The end-of-run table (rich; plain text when stdout is not a terminal)."""

    m = summary.metrics
    seconds = max(summary.elapsed_s - summary.ready_s, 1e-9)  # after the workers were ready
    rows = [
        ("run directory", summary.run_dir),
        (
            "groups",
            f"{summary.groups_stored} run, {summary.groups_skipped} already stored, "
            f"{summary.groups_total} in all",
        ),
        ("trajectories (this run)", summary.trajectories),
        ("time", f"{summary.elapsed_s:.1f} s ({summary.ready_s:.1f} s to start the workers)"),
        ("trajectories / s", summary.trajectories / seconds),
        ("sampled tokens / s", summary.sampled_tokens / seconds),
        ("reward mean", m.get("reward/mean")),
        ("pass rate", m.get("pass_rate")),
        ("turns mean", m.get("turns/mean")),
        (
            "tool calls (errors)",
            f"{m.get('tool_calls/total', 0)} ({m.get('tool_errors/total', 0)})",
        ),
        (
            "finish reasons",
            ", ".join(
                f"{k.split('/', 1)[1]} {v}"
                for k, v in sorted(m.items())
                if k.startswith("finish_reason/") and v
            ),
        ),
        (
            "time in generate / tools / score",
            " / ".join(
                f"{m.get(f'timing/{p}/total', 0.0):.1f} s" for p in ("generate", "tools", "score")
            ),
        ),
        (
            "worker failures (requeued groups)",
            f"{summary.worker_failures} ({summary.requeued_groups})",
        ),
    ]
    _print_table("rollout summary", rows)
