"""The episodes' command logs: a resumed group replays the tool calls it already made.

With ``sandbox.command_log = true`` (the default) every episode's sandbox calls go through a
``dsec.CommandLog`` (see ``dsec.replay``) in the run directory::

    RUN_DIR/cmdlogs/<group id, %-quoted>/<sample index>.log

A group that runs again before it was stored (``--resume`` after an interruption, or a retry
after a worker died) opens the same logs: its episodes have the same seeds, so while generation
reproduces the same tokens the same calls come back and get their recorded results without
running; from the first call that differs, everything runs for real on the restored sandbox.
Once a group's trajectories are stored (or, for the held-out evaluation, collected) its logs are
deleted, so the directory holds only the groups in flight. Each trajectory's
``metadata["cmdlog"]`` counts its calls ``replayed`` and ``executed``, and the replayed calls
``restored`` (run again to give a reward that reads the sandbox the episode's state; a reward
that does not read it costs no re-run); a rollout job's metrics record sums the replayed calls
(``tools/replayed``).

A log belongs to one run: its task id is :func:`run_identity` (a digest of the settings a resume
may not change) and its trajectory id ``<group id>#<sample index>``. A log written by another run
(a run directory reused with another config), or one damaged, is refused and left as it is: the
episode raises ``dsec.LogError`` naming the file (and both identities), its group fails and is
retried, and once its retries are spent the run stops with that error. Remove the file (or
``RUN_DIR/cmdlogs``), or set ``sandbox.command_log = false``.

Durability: ``fsync="never"``. A record is written before its call returns, so a killed worker
loses nothing; only a machine crash can lose the tail of a log, which is dropped when the log is
opened again, and those calls then run for real. A log saves work, it is never the only copy of
a result: syncing every call would cost a disk flush per tool call for nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rollout.config import JOB_RESUME_FREE, TRAIN_RESUME_FREE, Config, resume_kept

__all__ = [
    "LOG_DIR",
    "command_log_dir",
    "open_log",
    "remove_log_dir",
    "remove_logs",
    "run_identity",
]

LOG_DIR = "cmdlogs"
FSYNC = "never"  # see the module doc


def command_log_dir(config: Config, run_dir: str | os.PathLike[str]) -> str | None:
    """Where a run's command logs go (an absolute path every worker is given); None when
    ``sandbox.command_log`` is off."""
    if not config.sandbox.command_log:
        return None
    return os.path.join(os.path.abspath(run_dir), LOG_DIR)


def run_identity(config: Config) -> str:
    """The task id of a run's logs: the task name and a digest of every setting a resumed
    run keeps (the same on every worker and after ``--resume``)."""
    kept = resume_kept(config.to_dict(), JOB_RESUME_FREE | TRAIN_RESUME_FREE)
    text = json.dumps(kept, sort_keys=True, default=repr)
    return f"{config.task.name}/{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _group_dir(root: str | os.PathLike[str], group_id: str) -> Path:
    # quoted, dots included: a group id never names a parent or a nested directory
    return Path(root) / quote(group_id, safe="").replace(".", "%2E")


def open_log(root: str, identity: str, group_id: str, sample_index: int) -> Any:
    """The ``dsec.CommandLog`` of one episode, created with its directory if needed."""
    import dsec

    folder = _group_dir(root, group_id)
    folder.mkdir(parents=True, exist_ok=True)
    return dsec.CommandLog(
        folder / f"{sample_index}.log",
        task=identity,
        trajectory=f"{group_id}#{sample_index}",
        fsync=FSYNC,
    )


def remove_logs(root: str | None, group_ids: Iterable[str]) -> None:
    """Deletes the logs of groups that are done (no-op when ``root`` is None)."""
    if root is None:
        return
    for group_id in group_ids:
        shutil.rmtree(_group_dir(root, group_id), ignore_errors=True)


def remove_log_dir(root: str | None) -> None:
    """At the end of a run: removes the log directory if no log is left in it (the logs of
    groups that never got stored stay, for a resume)."""
    if root is None:
        return
    with contextlib.suppress(OSError):  # missing, or logs left in it
        os.rmdir(root)
