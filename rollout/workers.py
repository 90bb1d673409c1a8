"""Ray: RolloutWorker actors and the pool that schedules task groups on them.

This is the only module of the project that imports ``ray``; the agent loop, tasks, rewards and
storage it wires together are plain Python, and the rollout job (``rollout.job``) and the
training loop (``rollout.train``) drive it through :class:`RolloutPool`.

- :class:`RolloutWorker` (an async actor): one policy engine, a sandbox pool, and many agent
  loops at once (``workers.concurrency``), so that one episode's tool call runs while others
  generate. ``run_group(group)`` runs the group's G episodes (a GRPO group), scores each with the
  reward functions while its sandbox is still live, and returns the G trajectories. Given a log
  directory, each episode's sandbox calls go through its command log, so a group run again
  replays the calls it already made (``rollout.cmdlogs``).
- :class:`RolloutPool`: long-lived workers that run batches of groups (``submit``, then
  ``finished`` or ``collect``), take new weights (``set_weights``), and survive worker deaths.
- :class:`LearnerGroup`: ``learner.num_ranks`` Learner actors joined by ``torch.distributed``,
  used by the training loop like one ``rollout.learner.Learner``; :func:`run_training` wires a
  learner (in the driver for one rank, else a LearnerGroup), a RolloutPool and the
  ``rollout.train.Trainer`` together.
- :func:`connect` / :func:`disconnect`: an embedded Ray, or the cluster of ``--address`` /
  ``RAY_ADDRESS`` (as under ``ray job submit``).

A worker that dies mid-run: every group it had in flight fails with a ``RayActorError`` and goes
back to the queue; the worker is restarted by Ray (``workers.max_restarts``) or, once it has no
restarts left, replaced by a new actor. A group is re-run at most ``workers.max_group_retries``
times. Results are taken only from completed calls, so nothing is lost or returned twice.
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
import threading  # noqa: E402
from collections import Counter, deque  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError  # noqa: E402

from rollout.cmdlogs import command_log_dir, open_log, run_identity  # noqa: E402
from rollout.config import Config, checkpoint_file, from_dict  # noqa: E402
from rollout.types import Trajectory  # noqa: E402

__all__ = [
    "Group",
    "JobError",
    "LearnerGroup",
    "RolloutPool",
    "RolloutWorker",
    "check_resources",
    "connect",
    "disconnect",
    "episode_seed",
    "make_learner",
    "run_training",
]

log = logging.getLogger("rollout")


class JobError(RuntimeError):
    """The run cannot go on (a group failed too often, every worker is gone, ...)."""


@dataclass(frozen=True)
class Group:
    """One task instance and how many episodes to run from it (a GRPO group)."""

    group_id: str
    instance: Any  # rollout.tasks.Instance
    size: int
    temperature: float | None = None  # None: the config's sampling.temperature


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
    built then. ``log_dir``: the run's command log directory
    (``rollout.cmdlogs.command_log_dir``, reachable from every worker); None: no logs.
    """

    def __init__(
        self,
        config: dict[str, Any],
        index: int = 0,
        backend_factory: Callable[[Any], Any] | None = None,
        tokenizer_json: str | None = None,
        log_dir: str | None = None,
    ) -> None:
        self.config = from_dict(config)
        self.index = index
        self._backend_factory = backend_factory
        self._tokenizer_json = tokenizer_json
        self._log_dir = log_dir
        self._identity = run_identity(self.config)
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
        """One episode on its own sandbox, scored while the sandbox is live, then released.

        With a log directory the episode's calls go through its command log; before a reward
        that reads the sandbox scores it, the sandbox is brought to the state the replayed calls
        imply (``restore``; not after a sandbox failure, which such rewards score 0 unread)."""
        from rollout.agent import run_episode

        loop = asyncio.get_running_loop()
        async with self._slots:
            sandbox = await loop.run_in_executor(None, self._pool.acquire)
            log = None
            try:
                if self._log_dir is not None:
                    log = await loop.run_in_executor(
                        None, open_log, self._log_dir, self._identity, group.group_id, sample_index
                    )
                tools = sandbox if log is None else log.attach(sandbox)
                traj = await run_episode(
                    self._backend,
                    tools,
                    group.instance,
                    self._limits,
                    tokenizer=self._tokenizer,
                    sampling=dataclasses.replace(
                        self._sampling,
                        seed=episode_seed(self.config.run.seed, group.group_id, sample_index),
                        **({} if group.temperature is None else {"temperature": group.temperature}),
                    ),
                    trajectory_id=f"{group.group_id}#{sample_index}",
                    group_id=group.group_id,
                    sample_index=sample_index,
                    thinking_mode=self.config.sampling.thinking_mode,
                )
                if log is not None:
                    if self._reward.needs_sandbox and traj.finish_reason != "sandbox_error":
                        await loop.run_in_executor(None, tools.restore)
                    stats = tools.stats
                    traj.metadata["cmdlog"] = {
                        k: stats[k] for k in ("replayed", "executed", "restored")
                    }
                await loop.run_in_executor(
                    None, self._reward.score, traj, group.instance.verifier, sandbox
                )
            finally:
                if log is not None:
                    await loop.run_in_executor(None, log.close)
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

    ``log_dir`` goes to every worker: the run's command log directory (``rollout.cmdlogs``), so a
    group re-run after a worker died replays the calls it made; None: no logs.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend_factory: Callable[[Any], Any] | None = None,
        tokenizer_json: str | None = None,
        log_dir: str | None = None,
    ) -> None:
        self.config = config
        self._actor_args = (config.to_dict(), backend_factory, tokenizer_json, log_dir)
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
        check_resources(config)
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
        config, backend_factory, tokenizer_json, log_dir = self._actor_args
        return cls.remote(config, index, backend_factory, tokenizer_json, log_dir)

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

    def set_weights(self, state_dict: dict[str, Any] | ray.ObjectRef, version: int) -> None:
        """New weights for every worker (put in the object store once; a state dict already
        there, e.g. a learner actor's result, is passed as its ObjectRef); returns when every
        live worker holds them. Groups started afterwards sample with ``version``."""
        ref = state_dict if isinstance(state_dict, ray.ObjectRef) else ray.put(state_dict)
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
            if not isinstance(exc, JobError):
                wrapped = JobError(f"the rollout pool stopped: {exc!r}")
                wrapped.__cause__, exc = exc, wrapped
            with self._cond:
                self._error = exc
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


def check_resources(config: Config) -> None:
    """Refuse a worker size the cluster can never place (it would wait forever)."""
    w = config.workers
    have = ray.cluster_resources()
    for key, per in (("CPU", w.num_cpus), ("GPU", w.num_gpus)):
        if per > have.get(key, 0.0):
            raise JobError(
                f"workers.num_{key.lower()}s = {per:g} per worker, but the Ray cluster has "
                f"{have.get(key, 0.0):g} {key} in all: no worker could ever start"
            )


def _check_group(group: Group, trajectories: list[Trajectory]) -> None:
    indices = sorted(t.sample_index for t in trajectories)
    ids = {t.group_id for t in trajectories}
    if indices != list(range(group.size)) or ids != {group.group_id}:
        raise JobError(
            f"group {group.group_id!r} came back with samples {indices} of groups {sorted(ids)}; "
            f"expected samples 0..{group.size - 1} of that group"
        )


# ------------------------------------------------------------------------------------------------
# The learner side
# ------------------------------------------------------------------------------------------------


class LearnerGroup:
    """``learner.num_ranks`` Learner actors joined by ``torch.distributed``, used like one
    ``rollout.learner.Learner`` (``train_step``, ``sft_step``, ``reset_optimizer``,
    ``weights``, ``save``, ``load``, ``version``, ``close``).

    - Every rank gets the whole batch (one ``ray.put``), trains on its share (sequences rank,
      rank + N, ...) and the gradients are summed over the ranks before the optimizer step
      (``Learner``), so every rank holds the same parameters after each step.
    - Rendezvous: a TCP store served by this object in the driver, on a port the system picks
      when it binds (no port is chosen first and bound later, so nothing can take it between);
      rank 0 is pinned to the driver's node, the other ranks go wherever Ray places them. gloo
      on CPU, NCCL when the ranks see a GPU.
    - Rank 0 publishes the weights (``weights()`` returns an ObjectRef of its state dict: the
      rollout workers fetch it from rank 0's object store without a copy through the driver)
      and writes checkpoints (in the run directory on the driver's node). ``load`` reads a
      checkpoint in the driver and sends its files to every rank.
    - The ranks are placed at once (each waits for the others in the rendezvous): when
      ``num_ranks * learner.num_cpus`` plus ``reserve_cpus`` (the rollout workers that run
      beside them) exceed the cluster's CPUs, the constructor refuses before starting any.
    - A rank that fails ends the group (``JobError``): the process group cannot lose a member;
      the run resumes from its last checkpoint.
    """

    def __init__(self, config: Config, *, reserve_cpus: float = 0.0) -> None:
        import torch.distributed as dist
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from rollout.learner import Learner

        c = config.learner
        n, cpus = c.num_ranks, c.num_cpus
        have = ray.cluster_resources().get("CPU", 0.0)
        if n * cpus + reserve_cpus > have:
            beside = (
                f" beside the {reserve_cpus:g} CPUs of the rollout workers" if reserve_cpus else ""
            )
            raise JobError(
                f"learner.num_ranks = {n} ranks x learner.num_cpus = {cpus:g} need "
                f"{n * cpus:g} CPUs{beside}, but the Ray cluster has {have:g} CPUs in all: "
                "lower learner.num_ranks or learner.num_cpus, or add nodes"
            )
        self.config = config
        self.version = 0
        self.actors: list[Any] = []
        ip = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(ip, 0, is_master=True, wait_for_workers=False)
        store = f"{ip}:{self._store.port}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cls = ray.remote(Learner)
        settings = config.to_dict()
        try:
            for rank in range(n):
                options: dict[str, Any] = {"num_cpus": cpus, "max_restarts": 0}
                if rank == 0:
                    options["scheduling_strategy"] = here
                actor = cls.options(**options).remote(settings, rank=rank, store=store)
                self.actors.append(actor)
            self._gather([a.info.remote() for a in self.actors], "start")
        except BaseException:
            self.close()
            raise

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every rank's result; the first failure ends the group (the others would wait for the
        failed rank in the next collective forever)."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                results[index[ref]] = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                self.close()
                raise JobError(
                    f"learner rank {index[ref]} failed to {what}: {exc}; the learner group is "
                    "stopped (`--resume` continues from the last checkpoint)"
                ) from exc
        return results

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        if not self.actors:
            raise JobError("the learner group is closed")
        calls = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return self._gather(calls, method.replace("_", " "))

    def train_step(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """One GRPO step on every rank; rank 0's metrics (the reduced ones are equal on all)."""
        metrics = self._all("train_step", ray.put(list(trajectories)))[0]
        self.version = int(metrics["version"])
        return metrics

    def sft_step(self, samples: list[Any], lr: float | None = None) -> dict[str, float]:
        return self._all("sft_step", ray.put(list(samples)), lr=lr)[0]

    def reset_optimizer(self) -> None:
        self._all("reset_optimizer")

    def weights(self) -> tuple[Any, int]:
        """``(ObjectRef of rank 0's state dict, version)`` for ``RolloutPool.set_weights``."""
        if not self.actors:
            raise JobError("the learner group is closed")
        return self.actors[0].state_dict.remote(), self.version

    def state_dicts(self) -> list[dict[str, Any]]:
        """Every rank's weights (tests: the ranks agree)."""
        return self._all("state_dict")

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Any:
        """Rank 0 writes the checkpoint (on the driver's node: the path is made absolute here)."""
        target = os.path.abspath(path)
        if not self.actors:
            raise JobError("the learner group is closed")
        return self._gather([self.actors[0].save.remote(target, extra)], "save")[0]

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Every rank restores the checkpoint at ``path`` (read here, sent to each rank)."""
        from rollout.learner import checkpoint_files

        extra = self._all("load", ray.put(checkpoint_files(path)))[0]
        self.version = self._all("info")[0]["version"]
        return extra

    def close(self) -> None:
        """Leave the process group and end the actors."""
        actors, self.actors = self.actors, []
        if actors:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10.0)
        for a in actors:
            ray.kill(a, no_restart=True)
        self._store = None  # stops serving the rendezvous


def make_learner(config: Config, *, reserve_cpus: float = 0.0) -> Any:
    """The run's learner: one ``rollout.learner.Learner`` in this process for
    ``learner.num_ranks = 1``, else a :class:`LearnerGroup`."""
    if config.learner.num_ranks == 1:
        from rollout.learner import Learner

        return Learner(config)
    return LearnerGroup(config, reserve_cpus=reserve_cpus)


def run_training(
    config: Config,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool | None = None,
    on_step: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """A training run (``rollout.train.Trainer``) on this Ray cluster: the learner (in this
    process, or a LearnerGroup), rollouts on a RolloutPool started once the run's tokenizer is
    known. Returns the learning summary."""
    from rollout.train import Trainer

    check_resources(config)
    w = config.workers
    learner = make_learner(config, reserve_cpus=w.num_workers * w.num_cpus)
    try:
        return Trainer(
            config,
            run_dir,
            sampler_factory=lambda tokenizer_json: RolloutPool(
                config, tokenizer_json=tokenizer_json, log_dir=command_log_dir(config, run_dir)
            ),
            learner=learner,
            resume=resume,
            progress=progress,
            on_step=on_step,
            group_type=Group,
        ).run()
    finally:
        learner.close()


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
    start an embedded instance sized for the workers (and the learner ranks of a training run
    with ``learner.num_ranks > 1``). Returns True when this call started Ray
    (the caller then calls :func:`disconnect`); False when Ray was already up or joined."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
        return True
    for key, value in _LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    w, lr = config.workers, config.learner
    need = w.num_workers * w.num_cpus
    if lr.num_ranks > 1 and (config.sft.steps or config.rl.steps):
        need += lr.num_ranks * lr.num_cpus  # learner ranks are actors beside the workers
    cpus = max(os.cpu_count() or 1, math.ceil(need))
    ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    return True


def disconnect() -> None:
    ray.shutdown()
