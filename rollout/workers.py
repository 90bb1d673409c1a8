"""Ray: RolloutWorker actors, the pool that schedules task groups on them, and the rollout job.

This is the only module of the project that imports ``ray``; the agent loop, tasks, rewards and
storage it wires together are plain Python.

- :class:`RolloutWorker` (an async actor): one policy engine, a sandbox pool, and many agent
  loops at once (``workers.concurrency``), so that one episode's tool call runs while others
  generate. ``run_group(group)`` runs the group's G episodes (a GRPO group), scores each with the
  reward functions while its sandbox is still live, and returns the G trajectories.
- :class:`RolloutPool`: long-lived workers that run batches of groups (``submit``, then
  ``finished`` or ``collect``), take new weights (``set_weights``), and survive worker deaths.
- :class:`RolloutJob` (``python -m rollout run``): every group of the config on a pool, each
  finished group stored once (``rollout.store``) in batches of ``run.groups_per_batch`` groups,
  one ``metrics.jsonl`` record per batch; ``--resume`` skips the groups already stored.

A worker that dies mid-run: every group it had in flight fails with a ``RayActorError`` and goes
back to the queue; the worker is restarted by Ray (``workers.max_restarts``) or, once it has no
restarts left, replaced by a new actor. A group is re-run at most ``workers.max_group_retries``
times. Results are taken only from completed calls and the store skips stored groups, so nothing
is lost or stored twice.
"""

from __future__ import annotations

from rollout.native_import import use_built_dsec

use_built_dsec()  # before anything imports dsec (see rollout.native_import)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, deque  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError  # noqa: E402

from rollout.config import Config, ConfigError, checkpoint_file, from_dict  # noqa: E402
from rollout.store import RunStore  # noqa: E402
from rollout.types import Trajectory  # noqa: E402

__all__ = [
    "Group",
    "JobError",
    "RolloutJob",
    "RolloutPool",
    "RolloutWorker",
    "RunSummary",
    "connect",
    "disconnect",
    "episode_seed",
    "make_groups",
]

log = logging.getLogger("rollout")


class JobError(RuntimeError):
    """The run cannot complete (a group failed too often, every worker is gone, ...)."""


@dataclass(frozen=True)
class Group:
    """One task instance and how many episodes to run from it (a GRPO group)."""

    group_id: str
    instance: Any  # rollout.tasks.Instance
    size: int


def make_groups(config: Config) -> list[Group]:
    """The run's task groups: ``task.num_prompts`` instances of ``task.split`` (seeded by
    ``run.seed``), each run ``task.group_size`` times. A group's id is its instance id, so a
    resumed run recognises the groups it already stored."""
    from rollout.tasks import get_task

    task = get_task(config.task.name, **config.task.options)
    instances = task.instances(config.task.split, config.task.num_prompts, seed=config.run.seed)
    return [Group(inst.id, inst, config.task.group_size) for inst in instances]


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------


class RolloutWorker:
    """Runs task groups: one engine, one sandbox pool, up to ``concurrency`` agent loops.

    Used as a Ray actor (``ray.remote(RolloutWorker)``; every method is async, so calls
    interleave on the actor's event loop). Everything heavy is built on the first call, in the
    actor's process: the policy (the preset's model, seeded with ``run.seed`` so every worker
    holds the same weights, or the checkpoint; on the GPU when ``workers.num_gpus > 0``), the
    engine and the sandbox pool.

    ``tokenizer_json``: the tokenizer.json text of the run's tokenizer (None: the byte-level
    tokenizer); the model's vocabulary follows the config (``rollout.train_config.model_config``).
    ``backend_factory(tokenizer) -> rollout.backends.Backend`` replaces the policy engine by
    another backend (e.g. a ``ScriptedBackend`` to debug a task without a model); no model is
    built then.
    """

    def __init__(
        self,
        config: dict[str, Any],
        index: int = 0,
        backend_factory: Callable[[Any], Any] | None = None,
        tokenizer_json: str | None = None,
    ) -> None:
        self.config = from_dict(config)
        self.index = index
        self._backend_factory = backend_factory
        self._tokenizer_json = tokenizer_json
        self._engine: Any = None
        self._version: int | None = None  # of weights loaded after start (None: initial ones)
        self._weights_lock = asyncio.Lock()
        self._setup_lock: asyncio.Lock | None = None
        self._ready = False

    async def _setup(self) -> None:
        if self._ready:
            return
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._ready:
                return
            c = self.config
            loop = asyncio.get_running_loop()
            # sandbox calls and pool acquire/release block a thread each: never let them starve
            threads = 2 * c.workers.concurrency + 4
            loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="rollout"))
            self._slots = asyncio.Semaphore(c.workers.concurrency)
            self._limits, self._sampling, self._reward = _episode_settings(c)
            self._pool = await loop.run_in_executor(None, self._make_pool)
            self._backend = await loop.run_in_executor(None, self._make_backend)
            self._ready = True

    def _make_pool(self):
        import dsec

        s = self.config.sandbox
        return dsec.SandboxPool(
            self.config.workers.concurrency,
            memory_bytes=s.memory_mb << 20,
            max_pids=s.max_pids,
            timeout=s.timeout,
        )

    def _make_backend(self):
        from policy.tokenizer import ByteTokenizer, OfficialTokenizer
        from rollout.train_config import model_config

        c = self.config
        cfg = model_config(c)
        text = self._tokenizer_json
        self._tokenizer = OfficialTokenizer(text) if text is not None else ByteTokenizer()
        if self._tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {self._tokenizer.vocab_size} ids but the "
                f"{c.policy.preset!r} model only {cfg.vocab_size}"
            )
        if self._backend_factory is not None:
            return self._backend_factory(self._tokenizer)

        import torch

        import policy
        from rollout.backends import EngineBackend

        torch.manual_seed(c.run.seed)
        model = policy.V4Model(cfg)
        if c.policy.checkpoint:
            policy.load(model, checkpoint_file(c.policy.checkpoint))
        if c.workers.num_gpus > 0:
            model = model.to("cuda")  # Ray has set CUDA_VISIBLE_DEVICES for this actor
        self._engine = policy.AsyncEngine(
            model.eval(),
            max_batch=c.engine.max_batch,
            max_context=c.engine.max_context,
            kv_budget_bytes=c.engine.kv_budget_bytes or None,
        )
        return EngineBackend(self._engine)

    async def ready(self) -> dict[str, Any]:
        """Builds the worker if needed; returns ``{"index", "pid"}``."""
        await self._setup()
        return {"index": self.index, "pid": os.getpid()}

    async def pid(self) -> int:
        return os.getpid()

    async def load_weights(self, state_dict: dict[str, Any], version: int) -> None:
        """New policy weights (e.g. from the learner, through the object store); generations
        started afterwards report ``version``."""
        await self._setup()
        if self._engine is None:
            raise RuntimeError("this worker runs a backend without a policy engine")
        self._engine.load_weights(state_dict, version)
        self._version = version

    async def run_group(self, group: Group, weights: tuple[Any, int] | None = None) -> list:
        """The group's ``size`` episodes, run concurrently and scored; in sample order.

        ``weights``: ``(ObjectRef of a state dict, version)`` the group must be sampled with;
        loaded first when this worker holds another version (e.g. after Ray restarted it)."""
        await self._setup()
        if weights is not None and weights[1] != self._version:
            async with self._weights_lock:
                if weights[1] != self._version:
                    await self.load_weights(await weights[0], weights[1])
        episodes = [self._episode(group, i) for i in range(group.size)]
        return list(await asyncio.gather(*episodes))

    async def _episode(self, group: Group, sample_index: int) -> Trajectory:
        """One episode on its own sandbox, scored while the sandbox is live, then released."""
        from rollout.agent import run_episode

        loop = asyncio.get_running_loop()
        async with self._slots:
            sandbox = await loop.run_in_executor(None, self._pool.acquire)
            try:
                traj = await run_episode(
                    self._backend,
                    sandbox,
                    group.instance,
                    self._limits,
                    tokenizer=self._tokenizer,
                    sampling=dataclasses.replace(
                        self._sampling,
                        seed=episode_seed(self.config.run.seed, group.group_id, sample_index),
                    ),
                    trajectory_id=f"{group.group_id}#{sample_index}",
                    group_id=group.group_id,
                    sample_index=sample_index,
                    thinking_mode=self.config.sampling.thinking_mode,
                )
                await loop.run_in_executor(
                    None, self._reward.score, traj, group.instance.verifier, sandbox
                )
            finally:
                await loop.run_in_executor(None, self._pool.release, sandbox)
        return traj

    async def shutdown(self) -> None:
        """Closes the sandbox pool and the engine (the actor may then be killed)."""
        if self._ready:
            self._pool.close()
            if self._engine is not None:
                await self._engine.shutdown()
            self._ready = False


def episode_seed(run_seed: int, group_id: str, sample_index: int) -> int:
    """The sampling seed of one episode: the same on every worker and after a resume, and
    different for every sample of a group."""
    digest = hashlib.sha256(f"{run_seed}/{group_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:5], "big")  # < 2**40: room for the agent's per-turn offsets


def _episode_settings(c: Config):
    """The agent loop's Limits, the SamplingParams and the reward of a config."""
    from policy.engine import SamplingParams
    from reward import make_reward
    from rollout.agent import Limits
    from rollout.tasks import get_task

    limits = Limits(
        max_turns=c.limits.max_turns,
        max_context_tokens=c.limits.max_context_tokens or c.engine.max_context,
        max_new_tokens=c.sampling.max_new_tokens,
        tool_timeout=c.limits.tool_timeout,
        deadline=c.limits.deadline,
        max_tool_output_chars=c.limits.max_tool_output_chars,
    )
    sampling = SamplingParams(
        temperature=c.sampling.temperature, top_p=c.sampling.top_p, top_k=c.sampling.top_k
    )
    spec = c.reward_spec() or get_task(c.task.name, **c.task.options).reward
    return limits, sampling, make_reward(spec)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker position: its actor, the groups it has in flight and its health check."""

    index: int
    actor: Any
    inflight: dict[Any, tuple[int, Group, Any]] = field(default_factory=dict)  # ref: batch, ...
    check: Any = None  # ObjectRef of a pending ready(): the slot gets no work until it returns
    replacements: int = 0


class RolloutPool:
    """Long-lived RolloutWorker actors that run batches of task groups, fault tolerant.

    ``RolloutPool(config)`` starts ``workers.num_workers`` actors and returns once every one is
    ready. ``submit(groups) -> handle`` queues a batch; ``finished(handle)`` yields each group's
    trajectories as the group completes, ``collect(handle)`` all of them in submission order.
    Several batches may be in flight (e.g. step k+1 sampling while step k trains).
    ``set_weights(state_dict, version)`` sends new weights to every worker through the object
    store (once); every group carries a reference to the current weights, so a worker that Ray
    restarted (with its initial weights) loads them again before it samples.

    Scheduling runs on a background thread: each worker holds a few groups at a time (enough to
    fill its ``workers.concurrency`` agent loops), so a slow worker takes fewer. A worker that
    dies: its groups go back to the front of the queue (at most ``workers.max_group_retries``
    times each), and the worker is restarted by Ray or replaced by a new actor. A group's
    trajectories come only from a completed call, so none is lost or returned twice.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend_factory: Callable[[Any], Any] | None = None,
        tokenizer_json: str | None = None,
    ) -> None:
        self.config = config
        self._actor_args = (config.to_dict(), backend_factory, tokenizer_json)
        self.stats: Counter[str] = Counter()
        self.slots: list[_Slot] = []
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Group]] = deque()
        self._batches: dict[int, dict[str, Any]] = {}
        self._attempts: Counter[tuple[int, str]] = Counter()
        self._handles = itertools.count()
        self._weights: tuple[Any, int] | None = None
        self._error: BaseException | None = None
        self._closed = False
        _check_resources(config)
        try:
            self.slots = [_Slot(i, self._new_actor(i)) for i in range(config.workers.num_workers)]
            for slot in self.slots:
                slot.check = slot.actor.ready.remote()
            while any(s.check is not None for s in self.slots):  # every worker ready first
                self._step(timeout=5.0)
        except BaseException:
            self._stop_actors()
            raise
        self._thread = threading.Thread(target=self._loop, name="rollout-pool", daemon=True)
        self._thread.start()

    def _new_actor(self, index: int) -> Any:
        w = self.config.workers
        cls = ray.remote(RolloutWorker).options(
            num_cpus=w.num_cpus,
            num_gpus=w.num_gpus,
            max_restarts=w.max_restarts,
            max_task_retries=0,  # the pool re-queues: a group never runs twice at once
            max_concurrency=max(64, 4 * w.concurrency),
        )
        config, backend_factory, tokenizer_json = self._actor_args
        return cls.remote(config, index, backend_factory, tokenizer_json)

    # -- the public side (any thread) -----------------------------------------------------------

    def submit(self, groups: list[Group]) -> int:
        """Queue a batch of groups; returns its handle."""
        with self._cond:
            self._raise_if_failed()
            handle = next(self._handles)
            ids = [g.group_id for g in groups]
            if len(set(ids)) != len(ids):
                raise ValueError("a batch lists the same group id twice")
            self._batches[handle] = {"groups": ids, "done": {}, "order": []}
            self._queue.extend((handle, g) for g in groups)
            self._cond.notify_all()
        return handle

    def finished(self, handle: int) -> Iterator[list[Trajectory]]:
        """Each group's trajectories (sample order) as the group completes; ends with the batch."""
        yielded = 0
        while True:
            with self._cond:
                batch = self._batches[handle]
                while self._error is None and len(batch["order"]) == yielded:
                    self._cond.wait()
                self._raise_if_failed()
                ready = [batch["done"][g] for g in batch["order"][yielded:]]
            for trajectories in ready:
                yielded += 1
                yield trajectories
            if yielded == len(batch["groups"]):
                with self._cond:
                    self._batches.pop(handle, None)
                return

    def collect(self, handle: int) -> list[Trajectory]:
        """Every trajectory of a batch, groups in submission order (blocks until complete)."""
        with self._cond:
            order = list(self._batches[handle]["groups"])
        done = {group[0].group_id: group for group in self.finished(handle)}
        return [t for group_id in order for t in done[group_id]]

    def set_weights(self, state_dict: dict[str, Any], version: int) -> None:
        """New weights for every worker (put in the object store once); returns when every live
        worker holds them. Groups started afterwards sample with ``version``."""
        ref = ray.put(state_dict)
        with self._cond:
            self._raise_if_failed()
            self._weights = (ref, version)
            slots = list(self.slots)
        for call in [s.actor.load_weights.remote(ref, version) for s in slots]:
            # a dead or restarting worker: its next group brings the weights along
            with contextlib.suppress(RayActorError):
                ray.get(call)

    def close(self) -> None:
        """Stop scheduling, close every worker's sandboxes and engine, end the actors."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)
        self._stop_actors()

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise JobError("the rollout pool is closed")

    # -- scheduling (the pool's thread) ---------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._queue or self._busy())
                    if self._closed:
                        return
                self._step(timeout=0.5)
        except BaseException as exc:  # handed to whoever waits on a batch
            with self._cond:
                self._error = exc if isinstance(exc, JobError) else JobError(f"{exc!r}")
                self._error.__cause__ = exc
                self._cond.notify_all()

    def _busy(self) -> bool:
        return any(s.inflight or s.check is not None for s in self.slots)

    def _step(self, timeout: float) -> None:
        """Give idle workers work, then handle whatever finished within ``timeout``."""
        c = self.config
        per_worker = math.ceil(c.workers.concurrency / c.task.group_size) + 1
        with self._cond:
            for slot in self.slots:
                while slot.check is None and self._queue and len(slot.inflight) < per_worker:
                    handle, group = self._queue.popleft()
                    ref = slot.actor.run_group.remote(group, self._weights)
                    slot.inflight[ref] = (handle, group, slot.actor)
            refs = {ref: (s, "group") for s in self.slots for ref in s.inflight}
            refs.update({s.check: (s, "check") for s in self.slots if s.check is not None})
        if not refs:
            if self._queue:
                raise JobError("every worker is gone; groups are left unfinished")
            return
        done, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        for ref in done:
            slot, kind = refs[ref]
            if kind == "check":
                self._on_check(slot, ref)
            else:
                self._on_result(slot, ref)

    def _on_result(self, slot: _Slot, ref: Any) -> None:
        """A run_group call finished: keep its trajectories, or re-queue the group."""
        with self._cond:
            handle, group, actor = slot.inflight.pop(ref)
        try:
            trajectories = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            self._requeue(handle, group, exc)
            if isinstance(exc, RayActorError) and slot.check is None and actor is slot.actor:
                self.stats["worker_failures"] += 1
                log.warning("worker %d died; its groups go back to the queue", slot.index)
                slot.check = slot.actor.ready.remote()
            return
        _check_group(group, trajectories)
        with self._cond:
            batch = self._batches.get(handle)
            if batch is not None and group.group_id not in batch["done"]:  # never twice
                batch["done"][group.group_id] = trajectories
                batch["order"].append(group.group_id)
                self._cond.notify_all()

    def _requeue(self, handle: int, group: Group, exc: Exception) -> None:
        key = (handle, group.group_id)
        self._attempts[key] += 1
        if self._attempts[key] > self.config.workers.max_group_retries:
            raise JobError(
                f"group {group.group_id!r} failed {self._attempts[key]} times "
                f"(workers.max_group_retries = {self.config.workers.max_group_retries}); "
                f"last error: {exc}"
            ) from exc
        if not isinstance(exc, RayActorError):
            log.warning("group %s failed and is re-queued: %s", group.group_id, exc)
        self.stats["requeued_groups"] += 1
        with self._cond:
            self._queue.appendleft((handle, group))

    def _on_check(self, slot: _Slot, ref: Any) -> None:
        """A worker's ready() came back: it takes work again, or it is dead for good (then a
        new actor takes its place)."""
        slot.check = None
        try:
            ray.get(ref)
        except ActorDiedError as exc:
            self._replace(slot, exc)
            return
        except RayActorError:  # unavailable while Ray restarts it: ask again
            slot.check = slot.actor.ready.remote()
        except RayTaskError as exc:  # set-up failed: a config or host problem, not bad luck
            raise JobError(f"worker {slot.index} could not start: {exc}") from exc

    def _replace(self, slot: _Slot, error: Exception) -> None:
        self.stats["worker_failures"] += 1
        if slot.replacements >= max(1, self.config.workers.max_restarts):
            log.warning("worker %d is dead and is not replaced: %s", slot.index, error)
            with self._cond:
                self.slots.remove(slot)
            for handle, group, _ in slot.inflight.values():
                self._requeue(handle, group, error)
            return
        slot.replacements += 1
        self.stats["workers_replaced"] += 1
        log.warning("worker %d is dead; starting a new one", slot.index)
        slot.actor = self._new_actor(slot.index)
        slot.check = slot.actor.ready.remote()

    def _stop_actors(self) -> None:
        slots, self.slots = self.slots, []
        closing = [s.actor.shutdown.remote() for s in slots]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30.0)
        for s in slots:
            ray.kill(s.actor, no_restart=True)


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


def _check_resources(config: Config) -> None:
    w = config.workers
    have = ray.cluster_resources()
    for key, per in (("CPU", w.num_cpus), ("GPU", w.num_gpus)):
        if per > have.get(key, 0.0):
            raise JobError(
                f"workers.num_{key.lower()}s = {per:g} per worker, but the Ray cluster has "
                f"{have.get(key, 0.0):g} {key} in all: no worker could ever start"
            )


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
        _check_resources(self.config)
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
        """Store the buffered groups as one batch and append its metrics record."""
        trajectories = [t for group in buffer for t in group]
        store.write_groups(trajectories)
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


def _check_group(group: Group, trajectories: list[Trajectory]) -> None:
    indices = sorted(t.sample_index for t in trajectories)
    ids = {t.group_id for t in trajectories}
    if indices != list(range(group.size)) or ids != {group.group_id}:
        raise JobError(
            f"group {group.group_id!r} came back with samples {indices} of groups {sorted(ids)}; "
            f"expected samples 0..{group.size - 1} of that group"
        )


def _check_resumable(stored: dict[str, Any], config: Config) -> None:
    """A resumed run must produce the same kind of trajectories: only the run's location, the
    workers and engine sizes, and the number of prompts may change."""
    free = {("run", "out_dir"), ("run", "name"), ("task", "num_prompts")}
    free_sections = {"workers", "engine"}
    now = config.to_dict()
    try:
        old = from_dict(stored).to_dict()
    except ConfigError as exc:
        raise JobError(f"the run directory's config.json cannot be read back: {exc}") from exc
    changed = [
        f"{section}.{key}"
        for section, values in now.items()
        if section not in free_sections
        for key, value in values.items()
        if (section, key) not in free and old[section][key] != value
    ]
    if changed:
        raise JobError("--resume: the config differs from the stored run in " + ", ".join(changed))


def _summarize(trajectories: list[Trajectory]) -> dict[str, Any]:
    """``reward.summarize`` plus the seconds spent per phase, summed over the episodes."""
    from reward import summarize

    out = dict(summarize(trajectories))
    for phase in ("generate", "tools", "score"):
        out[f"timing/{phase}/total"] = sum(t.timings.get(phase, 0.0) for t in trajectories)
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


# ------------------------------------------------------------------------------------------------
# Connecting to Ray
# ------------------------------------------------------------------------------------------------

_LOOPBACK_ENV = {  # an embedded instance is single-node and private (shared/PLATFORM.md §5)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def connect(config: Config, address: str | None = None) -> bool:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (as under ``ray job submit``), else
    start an embedded instance sized for the workers. Returns True when this call started Ray
    (the caller then calls :func:`disconnect`); False when Ray was already up or joined."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
        return True
    for key, value in _LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    w = config.workers
    cpus = max(os.cpu_count() or 1, math.ceil(w.num_workers * w.num_cpus))
    ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    return True


def disconnect() -> None:
    ray.shutdown()
