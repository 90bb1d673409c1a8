"""Rollout throughput of ``arith_tool``: agent loops overlapped with tool execution vs sequential,
1 vs 2 workers, and where an episode's time goes.

Each case is a real run of the job (``rollout.job.RolloutJob`` on an embedded Ray, real
sandboxes, trajectories stored in a temporary run directory) over the same prompts:

- sequential: ``workers.concurrency = 1``: one episode at a time per worker (generate, then
  execute the tool, then generate again);
- overlapped: ``workers.concurrency = --concurrency``: many agent loops per worker, so one
  episode's tool call runs while the engine batches the others' generation;
- 1 or 2 workers, 1 CPU each.

Two policies:

- ``demo``: the demo preset through the policy engine, in the demo's prompt format (BPE
  tokenizer trained on the task's prompts, chat mode; random weights seeded by run.seed:
  throughput does not depend on them). Such a model rarely writes a well-formed tool call, so
  its episodes are mostly generation and the tool share is small.
- ``scripted``: a ``ScriptedBackend`` that solves the task: it calls the python tool with the
  expression, then answers with the printed number (pass rate 1.0). No model: the tool-bound
  side (sandbox calls, sandbox recycling, encoding).

Throughput counts from the first worker ready to the last group stored (worker start-up, i.e.
building the model and the first sandboxes, is left out and shown apart). tokens/s counts
sampled tokens. Time shares are over the summed episode time (timings total + score):
``generate`` (waiting for the backend), ``tools`` (sandbox calls), ``score`` (the reward), and
``other`` (file placement, parsing, encoding).

Run: ``python bench/rollout.py [--quick]``. Writes bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _key, _value in {  # loopback-only local Ray, no notices (shared/PLATFORM.md §5)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

from rollout import workers  # noqa: E402
from rollout.config import load_config  # noqa: E402
from rollout.job import RolloutJob  # noqa: E402
from rollout.store import iter_trajectories  # noqa: E402


def solve_arith(context: str, turn: int) -> str:
    """The scripted policy (chat mode): turn 0 calls python on the expression, turn 1 answers."""
    import re

    from policy import chat

    if turn == 0:
        expr = re.search(r"Compute (\S+) with python", context).group(1)
        call = {"name": "python", "arguments": {"code": f"print({expr})"}}
        message = {"content": "", "tool_calls": [call]}
    else:
        printed = re.findall(r"stdout:\n(-?\d+)", context) or ["no result"]
        message = {"content": printed[-1], "tool_calls": []}
    return chat.render_assistant(message, "chat")


def scripted_backend(tokenizer):
    from rollout.backends import ScriptedBackend

    return ScriptedBackend(solve_arith, tokenizer)


def run_case(policy: str, concurrency: int, num_workers: int, args) -> dict:
    overrides = [
        "policy.preset=demo",
        "tokenizer.kind=bpe",  # the demo's prompt format (configs/demo.toml)
        "sampling.thinking_mode=chat",
        f"task.num_prompts={args.prompts if policy == 'demo' else args.scripted_prompts}",
        f"task.group_size={args.group_size}",
        # a scripted turn is a whole DSML tool call: never cut it off
        f"sampling.max_new_tokens={args.new_tokens if policy == 'demo' else 512}",
        "limits.max_turns=2",
        "limits.deadline=300",
        f"engine.max_batch={max(8, concurrency)}",
        f"workers.num_workers={num_workers}",
        "workers.num_cpus=1",
        f"workers.concurrency={concurrency}",
        "run.groups_per_batch=4",
    ]
    config = load_config(None, overrides)
    factory = scripted_backend if policy == "scripted" else None
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        job = RolloutJob(config, Path(tmp) / "run", progress="none", backend_factory=factory)
        summary = job.run()
        trajectories = list(iter_trajectories(Path(tmp) / "run"))
    busy = summary.elapsed_s - summary.ready_s
    phase = {
        p: sum(t.timings.get(p, 0.0) for t in trajectories) for p in ("generate", "tools", "score")
    }
    episode = sum(t.timings.get("total", 0.0) + t.timings.get("score", 0.0) for t in trajectories)
    shares = {p: v / episode for p, v in phase.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {
        "policy": policy,
        "mode": "sequential" if concurrency == 1 else "overlapped",
        "concurrency": concurrency,
        "workers": num_workers,
        "trajectories": len(trajectories),
        "sampled_tokens": summary.sampled_tokens,
        "tool_calls": sum(len(t.tool_calls) for t in trajectories),
        "pass_rate": summary.metrics.get("pass_rate", 0.0),
        "startup_s": summary.ready_s,
        "busy_s": busy,
        "traj_per_s": len(trajectories) / busy,
        "tokens_per_s": summary.sampled_tokens / busy,
        "share": shares,
        "episode_s_mean": episode / max(1, len(trajectories)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts")
    ap.add_argument("--prompts", type=int, default=6, help="task groups per demo-policy case")
    ap.add_argument(
        "--scripted-prompts", type=int, default=24, help="task groups per scripted case"
    )
    ap.add_argument("--group-size", type=int, default=4, help="episodes per group (G)")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per turn")
    ap.add_argument("--concurrency", type=int, default=8, help="agent loops per worker")
    ap.add_argument("--policies", nargs="+", default=["demo", "scripted"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.scripted_prompts = 2, 8

    probe = load_config(None, ["workers.num_workers=2", "workers.num_cpus=1"])
    started = workers.connect(probe)
    rows = []
    try:
        print(
            f"arith_tool, G={args.group_size}, {args.prompts} prompts (demo policy, at most "
            f"{args.new_tokens} new tokens x 2 turns) or {args.scripted_prompts} (scripted); "
            f"overlapped = {args.concurrency} agent loops per worker"
        )
        header = (
            f"{'policy':>8} {'mode':>10} {'workers':>7} {'traj/s':>7} {'tok/s':>7} "
            f"{'gen%':>5} {'tools%':>6} {'score%':>6} {'other%':>6} {'start s':>7} {'pass':>5}"
        )
        print(header)
        for policy in args.policies:
            for num_workers in (1, 2):
                for concurrency in (1, args.concurrency):
                    t0 = time.perf_counter()
                    row = run_case(policy, concurrency, num_workers, args)
                    row["wall_s"] = time.perf_counter() - t0
                    rows.append(row)
                    sh = row["share"]
                    print(
                        f"{policy:>8} {row['mode']:>10} {num_workers:>7} "
                        f"{row['traj_per_s']:>7.2f} {row['tokens_per_s']:>7.1f} "
                        f"{100 * sh['generate']:>5.1f} {100 * sh['tools']:>6.1f} "
                        f"{100 * sh['score']:>6.2f} {100 * sh['other']:>6.1f} "
                        f"{row['startup_s']:>7.1f} {row['pass_rate']:>5.2f}",
                        flush=True,
                    )
                    if policy == "scripted" and row["pass_rate"] < 1.0:
                        print("  warning: the scripted policy should solve every instance")
    finally:
        if started:
            workers.disconnect()

    ratios = {}
    by = {(r["policy"], r["mode"], r["workers"]): r for r in rows}
    print("\nratios (trajectories/s)")
    for policy in args.policies:
        for n in (1, 2):
            seq, ovl = by[(policy, "sequential", n)], by[(policy, "overlapped", n)]
            key = f"{policy}/overlapped_vs_sequential/{n}_workers"
            ratios[key] = ovl["traj_per_s"] / seq["traj_per_s"]
        for mode in ("sequential", "overlapped"):
            one, two = by[(policy, mode, 1)], by[(policy, mode, 2)]
            ratios[f"{policy}/2_vs_1_workers/{mode}"] = two["traj_per_s"] / one["traj_per_s"]
    for key, value in ratios.items():
        print(f"  {key:<45} {value:5.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": "arith_tool",
        "preset": "demo",
        "prompts": args.prompts,
        "scripted_prompts": args.scripted_prompts,
        "group_size": args.group_size,
        "max_new_tokens": args.new_tokens,
        "max_turns": 2,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "quick": args.quick,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
