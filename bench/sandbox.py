"""dsec against bubblewrap, side by side in one run: latency, throughput and idle memory.

    python bench/sandbox.py [--rounds 200] [--warmup 5] [--throughput-seconds 3] [--idle 200]
                            [--fleet-rounds 5] [--replay-rounds 10] [--keep-nice]

Latency cases run interleaved round-robin (the order rotates every round), so load changes on a
shared machine hit every case alike; only ratios measured within one run are meaningful. The bwrap
baseline is its safe-as-root form (all capabilities dropped, new session, every namespace). Writes
bench/results/sandbox.json and prints a table with each target and PASS / MISS. The fleet rows
(issue 11) time a copy-on-write fork of 8 sandboxes from a snapshot of a 50 MB / 5,000-file
workspace against creating 8 and copying the files in (tar through stdin), the pool's acquire
latency with 4 concurrent users, and a 50-call trajectory replayed from its command log against
re-executing it (and recording it). Progress bars show only on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import dsec

RESULTS = Path(__file__).parent / "results" / "sandbox.json"
LIMITS = dict(memory_bytes=512 << 20, max_pids=128, timeout=30.0, max_output_bytes=1 << 20)


def progress(iterable, **kw):  # type: ignore[no-untyped-def]
    """tqdm on a terminal, the bare iterable when output is redirected (logs stay readable)."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), **kw)


# ------------------------------------------------------------------------------ bubblewrap


def ensure_bwrap() -> str:
    """Path of bwrap, installing Debian's bubblewrap package when it is missing."""
    found = shutil.which("bwrap")
    if found:
        return found
    print("bwrap not found: installing bubblewrap with apt-get", file=sys.stderr)
    install = ["apt-get", "install", "-y", "-q", "bubblewrap"]
    if subprocess.run(install).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(install, check=True)
    found = shutil.which("bwrap")
    if not found:
        raise SystemExit("bubblewrap installed but bwrap is still not on PATH")
    return found


def bwrap_argv(bwrap: str) -> list[str]:
    """The safe-as-root bwrap sandbox: ro binds of the system dirs (symlinks where the host has
    merged /usr), tmpfs /tmp, fresh /proc and /dev, no capabilities, new session."""
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    return [*argv, "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]


def run_quiet(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------------------ statistics


def stats_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)

    def pct(p: float) -> float:
        return ordered[min(n - 1, round(p * (n - 1)))] * 1e3

    return {
        "n": n,
        "min": ordered[0] * 1e3,
        "p10": pct(0.10),
        "median": statistics.median(ordered) * 1e3,
        "p99": pct(0.99),
        "mean": statistics.fmean(ordered) * 1e3,
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_ok(result: dsec.ExecResult, what: str) -> None:
    if result.exit_code != 0:
        raise SystemExit(f"{what} failed in the sandbox: {result!r}")


# ------------------------------------------------------------------------------ latency


def latency(bwrap: str, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    base = bwrap_argv(bwrap)
    live = dsec.Sandbox(**LIMITS)
    check_ok(live.exec(["/bin/true"]), "/bin/true")
    check_ok(live.run_python("pass"), "run_python")

    def cold() -> None:  # the default: takes the spare kept for LIMITS, one more starts
        with dsec.Sandbox(**LIMITS) as sb:
            check_ok(sb.exec(["/bin/true"]), "/bin/true")

    def no_spare() -> None:  # the start itself, on the caller's path
        with dsec.Sandbox(spare=False, **LIMITS) as sb:
            check_ok(sb.exec(["/bin/true"]), "/bin/true")

    cases: dict[str, Callable[[], object]] = {
        "host fork+exec /bin/true": lambda: run_quiet(["/bin/true"]),
        "bwrap /bin/true": lambda: run_quiet([*base, "/bin/true"]),
        "bwrap python3 -c pass": lambda: run_quiet([*base, "python3", "-c", "pass"]),
        "dsec create + exec /bin/true + close": cold,
        "dsec create (spare=False) + exec /bin/true + close": no_spare,
        "dsec exec /bin/true (live sandbox)": lambda: check_ok(live.exec(["/bin/true"]), "true"),
        "dsec run_python('pass') (live sandbox)": lambda: check_ok(live.run_python("pass"), "py"),
    }
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(warmup):
            for name in names:
                cases[name]()
        for r in progress(range(rounds), desc="latency rounds", unit="round"):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(timed(cases[name]))
    finally:
        live.close()
        dsec.stop_spares()
    return {name: stats_ms(s) for name, s in samples.items()}


# ------------------------------------------------------------------------------ throughput


def throughput(
    workers: int, seconds: float, make_worker: Callable[[], Callable[[], None]]
) -> float:
    """Execs per second of `workers` threads, each running its own launcher for `seconds`."""
    launchers = [make_worker() for _ in range(workers)]
    counts = [0] * workers
    start_line = threading.Barrier(workers + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        start_line.wait()
        while not stop.is_set():
            launchers[i]()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def concurrency(bwrap: str, workers: int, seconds: float, repeats: int) -> dict[str, list[float]]:
    base = bwrap_argv(bwrap)
    sandboxes: list[dsec.Sandbox] = []

    def dsec_worker() -> Callable[[], None]:
        sb = dsec.Sandbox(**LIMITS)
        sandboxes.append(sb)
        return lambda: check_ok(sb.exec(["/bin/true"]), "/bin/true")

    def bwrap_worker() -> Callable[[], None]:
        return lambda: run_quiet([*base, "/bin/true"])

    out: dict[str, list[float]] = {"bwrap": [], "dsec": []}
    try:
        for _ in progress(range(repeats), desc=f"throughput ({workers} workers)", unit="pair"):
            out["bwrap"].append(throughput(workers, seconds, bwrap_worker))
            out["dsec"].append(throughput(workers, seconds, dsec_worker))
            for sb in sandboxes:
                sb.close()
            sandboxes.clear()
    finally:
        for sb in sandboxes:
            sb.close()
    return out


# ------------------------------------------------------------------------------ fleet (issue 11)

FLEET_FILES, FLEET_FILE_BYTES, GROUP = 5000, 10_000, 8
FLEET_LIMITS = {**LIMITS, "disk_bytes": 128 << 20}
MAKE_FILES = f"""
import os
for d in range({FLEET_FILES} // 100):
    os.makedirs(f"repo/d{{d}}")
    for i in range(100):
        with open(f"repo/d{{d}}/f{{i}}", "wb") as f:
            f.write(os.urandom({FLEET_FILE_BYTES}))
"""


def workspace_tar(sb: dsec.Sandbox) -> bytes:
    """The sandbox's repo/ as an uncompressed tar (read through the file API)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in range(FLEET_FILES // 100):
            for i in range(100):
                name = f"repo/d{d}/f{i}"
                data = sb.read_file(name)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fleet_fork(rounds: int) -> dict[str, dict[str, float]]:
    """GRPO group start: fork 8 from a snapshot vs create 8 + copy the files in, interleaved."""
    with dsec.Sandbox(**FLEET_LIMITS) as prep:
        check_ok(prep.exec(["python3", "-c", MAKE_FILES], timeout=120), "make files")
        snap = prep.snapshot()
        tar = workspace_tar(prep)
    probe = f"repo/d{FLEET_FILES // 100 - 1}/f99"

    def fork() -> list[dsec.Sandbox]:
        return snap.fork(GROUP, **FLEET_LIMITS)

    def copy() -> list[dsec.Sandbox]:
        group = []
        for _ in range(GROUP):
            sb = dsec.Sandbox(**FLEET_LIMITS)
            group.append(sb)
            check_ok(sb.exec(["tar", "xf", "-"], stdin=tar, timeout=120), "tar x")
        return group

    cases = {"fork 8 from the snapshot": fork, "create 8 + copy the files in": copy}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    with snap:
        for r in progress(range(rounds + 1), desc="fleet fork rounds", unit="round"):
            for name in list(cases)[r % 2 :] + list(cases)[: r % 2]:
                start = time.perf_counter()
                group = cases[name]()
                took = time.perf_counter() - start
                try:
                    for sb in group:  # untimed: every sandbox holds the whole workspace
                        check_ok(sb.exec(["test", "-s", probe]), "probe file")
                finally:
                    for sb in group:
                        sb.close()
                if r > 0:  # round 0 warms the caches
                    samples[name].append(took)
    out = {name: stats_ms(s) for name, s in samples.items()}
    out["workspace"] = {
        "files": float(snap.files),
        "bytes": float(snap.bytes),
        "tar_bytes": float(len(tar)),
    }
    return out


def pool_acquire(users: int, iterations: int) -> dict[str, float]:
    """Acquire latency of SandboxPool(size=users) with `users` threads, each acquiring, running
    /bin/true and releasing in a loop."""
    waits: list[float] = []
    lock = threading.Lock()
    with dsec.SandboxPool(users, **LIMITS) as pool:

        def user() -> None:
            for _ in range(iterations):
                start = time.perf_counter()
                sb = pool.acquire(timeout=60)
                took = time.perf_counter() - start
                try:
                    check_ok(sb.exec(["/bin/true"]), "/bin/true")
                finally:
                    pool.release(sb)
                with lock:
                    waits.append(took)

        threads = [threading.Thread(target=user) for _ in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {**stats_ms(waits), "users": float(users), "acquires": float(len(waits))}


TRAJECTORY_CALLS = 50


def agent_trajectory(sb: dsec.Sandbox | dsec.LoggedSandbox) -> list[object]:
    """50 tool calls in the agent's mix: shell commands, Python, file writes and reads, each
    step building on the files of the ones before."""
    out: list[object] = []
    for i in range(TRAJECTORY_CALLS):
        kind = i % 4
        if kind == 0:
            out.append(sb.exec(f"echo step {i} >> notes.txt && wc -l < notes.txt"))
        elif kind == 1:
            out.append(sb.run_python(f"print(sum(range({i} * 1000)))"))
        elif kind == 2:
            sb.write_file(f"src/m{i}.py", f"X = {i}\n" * 100, parents=True)
            out.append(None)
        else:
            out.append(sb.read_file(f"src/m{i - 1}.py"))
    return out


def outputs(results: list[object]) -> list[object]:
    """What each call returned (stdout of a command, bytes of a read; all deterministic)."""
    return [getattr(r, "stdout", r) for r in results]


def replay_trajectory(rounds: int) -> dict[str, dict[str, float]]:
    """A 50-call trajectory re-executed on a fresh sandbox, recorded through a command log
    (fsync per record, and without fsync) and replayed from that log (the log opened and
    read included), interleaved; sandbox creation untimed."""
    scratch = Path(tempfile.mkdtemp(prefix="dsec-bench-log-"))
    log_path = scratch / "reference.log"
    with (
        dsec.CommandLog(log_path, task="bench", trajectory="t") as log,
        dsec.Sandbox(**LIMITS) as sb,
    ):
        reference = agent_trajectory(log.attach(sb))
    n = 0

    def execute(sb: dsec.Sandbox) -> list[object]:
        return agent_trajectory(sb)

    def record(sb: dsec.Sandbox) -> list[object]:
        nonlocal n
        n += 1
        with dsec.CommandLog(scratch / f"r{n}.log", task="bench", trajectory="t") as log:
            return agent_trajectory(log.attach(sb))

    def record_no_fsync(sb: dsec.Sandbox) -> list[object]:
        nonlocal n
        n += 1
        log = dsec.CommandLog(scratch / f"r{n}.log", task="bench", trajectory="t", fsync="never")
        with log:
            return agent_trajectory(log.attach(sb))

    def replay(sb: dsec.Sandbox) -> list[object]:
        with dsec.CommandLog(log_path, task="bench", trajectory="t") as log:
            rs = log.attach(sb)
            out = agent_trajectory(rs)
            if rs.stats["replayed"] != TRAJECTORY_CALLS:
                raise SystemExit(f"the replay ran calls: {rs.stats}")
            return out

    cases = {
        "re-execute": execute,
        "record (fsync per record)": record,
        "record (no fsync)": record_no_fsync,
        "replay": replay,
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for r in progress(range(rounds + 1), desc="replay rounds", unit="round"):
            for name in list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]:
                with dsec.Sandbox(**LIMITS) as sb:
                    start = time.perf_counter()
                    out = cases[name](sb)
                    took = time.perf_counter() - start
                if outputs(out) != outputs(reference):
                    raise SystemExit(f"{name}: the outputs differ from the recorded ones")
                if r > 0:  # round 0 warms the caches
                    samples[name].append(took)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: stats_ms(s) for name, s in samples.items()}


# ------------------------------------------------------------------------------ idle memory


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    return tree


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def sandbox_memory(sandboxes: list[dsec.Sandbox], spawn_s: float) -> dict[str, float]:
    """PSS and process count per sandbox (each process tree read once)."""
    trees = [process_tree(sb.pid) for sb in sandboxes]
    per = [pss_kib(tree) for tree in trees]
    return {
        "count": len(sandboxes),
        "spawn_s": spawn_s,
        "pss_kib_median": statistics.median(per),
        "pss_kib_max": max(per),
        "pss_mib_total": sum(per) / 1024,
        "processes_per_sandbox": statistics.median(len(tree) for tree in trees),
    }


def idle_memory(bwrap: str, count: int) -> dict[str, dict[str, float]]:
    """PSS per idle sandbox: dsec (the init's host pid and all its descendants) and bwrap
    (`sleep` inside: outer bwrap, its pid-1 child and the payload)."""
    out = {}
    sandboxes: list[dsec.Sandbox] = []
    try:
        start = time.perf_counter()
        for _ in progress(range(count), desc="idle dsec sandboxes", unit="sandbox"):
            sb = dsec.Sandbox(**LIMITS)
            check_ok(sb.exec(["/bin/true"]), "/bin/true")
            sandboxes.append(sb)
        out["dsec"] = sandbox_memory(sandboxes, time.perf_counter() - start)
        # The same sandboxes once each has served a run_python call: its warm interpreter stays.
        start = time.perf_counter()
        for sb in progress(sandboxes, desc="warm Python workers", unit="sandbox"):
            check_ok(sb.run_python("pass"), "run_python")
        out["dsec_with_python_worker"] = sandbox_memory(sandboxes, time.perf_counter() - start)
    finally:
        for sb in sandboxes:
            sb.close()

    base = bwrap_argv(bwrap)
    procs_b: list[subprocess.Popen] = []
    try:
        start = time.perf_counter()
        for _ in progress(range(count), desc="idle bwrap sandboxes", unit="sandbox"):
            procs_b.append(subprocess.Popen([*base, "sleep", "600"], stdin=subprocess.DEVNULL))
        spawn_s = time.perf_counter() - start
        time.sleep(1.0)  # let every bwrap reach its payload
        per = [pss_kib(process_tree(p.pid)) for p in procs_b]
        out["bwrap"] = {
            "count": count,
            "spawn_s": spawn_s,
            "pss_kib_median": statistics.median(per),
            "pss_kib_max": max(per),
            "pss_mib_total": sum(per) / 1024,
            "processes_per_sandbox": statistics.median(len(process_tree(p.pid)) for p in procs_b),
        }
    finally:
        for p in procs_b:
            p.kill()
        for p in procs_b:
            p.wait()
    return out


# ------------------------------------------------------------------------------ report


def targets(lat: dict, conc: dict, idle: dict, fleet: dict, pool: dict, replay: dict) -> list[dict]:
    med = {name: s["median"] for name, s in lat.items()}
    bw_true, bw_py = med["bwrap /bin/true"], med["bwrap python3 -c pass"]
    conc_ratio = statistics.median(conc["dsec"]) / statistics.median(conc["bwrap"])
    pss_mib = idle["dsec"]["pss_kib_median"] / 1024
    rows = [
        (
            "create + exec /bin/true + close (default: a spare)",
            "median <= 1.0x bwrap /bin/true",
            med["dsec create + exec /bin/true + close"] / bw_true,
            "x",
            lambda v: v <= 1.0,
        ),
        (
            "create + exec /bin/true + close, spare=False",
            "reported",
            med["dsec create (spare=False) + exec /bin/true + close"] / bw_true,
            "x",
            None,
        ),
        (
            "exec /bin/true in a live sandbox",
            "median <= 0.2x bwrap /bin/true",
            med["dsec exec /bin/true (live sandbox)"] / bw_true,
            "x",
            lambda v: v <= 0.2,
        ),
        (
            "run_python('pass') in a live sandbox",
            "median <= 0.25x bwrap python3 -c pass",
            med["dsec run_python('pass') (live sandbox)"] / bw_py,
            "x",
            lambda v: v <= 0.25,
        ),
        (
            "execs/s, 4 concurrent sandboxes",
            ">= 2x bwrap with 4 concurrent launchers",
            conc_ratio,
            "x",
            lambda v: v >= 2.0,
        ),
        (
            f"{idle['dsec']['count']} idle sandboxes",
            "PSS per sandbox <= 2 MiB",
            pss_mib,
            " MiB",
            lambda v: v <= 2.0,
        ),
    ]
    out = [
        {
            "case": case,
            "target": target,
            "measured": round(value, 3),
            "unit": unit.strip(),
            "pass": None if ok is None else bool(ok(value)),
        }
        for case, target, value, unit, ok in rows
    ]
    fork_ratio = (
        fleet["fork 8 from the snapshot"]["median"]
        / fleet["create 8 + copy the files in"]["median"]
    )
    out.append(
        {
            "case": "fork G=8 from a snapshot of a 50 MB / 5,000-file workspace",
            "target": "median <= 0.1x create 8 + copy the files in",
            "measured": round(fork_ratio, 3),
            "unit": "x",
            "pass": fork_ratio <= 0.1,
        }
    )
    out.append(
        {
            "case": f"pool acquire latency, {int(pool['users'])} concurrent users (p50 / p99)",
            "target": "reported",
            "measured": f"{pool['median']:.2f} / {pool['p99']:.2f}",
            "unit": "ms",
            "pass": None,
        }
    )
    replay_ratio = replay["replay"]["median"] / replay["re-execute"]["median"]
    out.append(
        {
            "case": f"replay of a {TRAJECTORY_CALLS}-call trajectory vs re-executing it",
            "target": "reported",
            "measured": round(replay_ratio, 4),
            "unit": "x",
            "pass": None,
        }
    )
    warm = idle["dsec_with_python_worker"]["pss_kib_median"] / 1024
    out.append(
        {
            "case": "idle sandboxes after one run_python (warm worker kept)",
            "target": "reported",
            "measured": round(warm, 3),
            "unit": "MiB",
            "pass": None,
        }
    )
    return out


def print_report(
    lat: dict, conc: dict, idle: dict, fleet: dict, pool: dict, replay: dict, rows: list[dict]
) -> None:
    console = Console()
    table = Table(title="latency (ms), interleaved in one run")
    for col in ("case", "min", "p10", "median", "p99"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, s in lat.items():
        table.add_row(name, *(f"{s[k]:.2f}" for k in ("min", "p10", "median", "p99")))
    console.print(table)
    table = Table(title="throughput (execs/s) and idle memory")
    table.add_column("measure")
    table.add_column("bwrap", justify="right")
    table.add_column("dsec", justify="right")
    table.add_column("dsec + warm Python", justify="right")
    table.add_row(
        "execs/s, 4 workers (median of repeats)",
        f"{statistics.median(conc['bwrap']):.0f}",
        f"{statistics.median(conc['dsec']):.0f}",
        "",
    )
    kinds = ("bwrap", "dsec", "dsec_with_python_worker")
    for key, label in (
        ("pss_kib_median", "PSS per idle sandbox (KiB, median)"),
        ("processes_per_sandbox", "processes per sandbox"),
        ("spawn_s", "time to start them all (s)"),
    ):
        digits = 2 if key == "spawn_s" else 1
        table.add_row(label, *(f"{idle[k][key]:.{digits}f}" for k in kinds))
    console.print(table)
    table = Table(title="fleet (ms): group start, pool acquire, trajectory replay")
    for col in ("case", "min", "p10", "median", "p99"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name in ("fork 8 from the snapshot", "create 8 + copy the files in"):
        s = fleet[name]
        table.add_row(name, *(f"{s[k]:.1f}" for k in ("min", "p10", "median", "p99")))
    table.add_row(
        f"pool acquire, {int(pool['users'])} users",
        *(f"{pool[k]:.2f}" for k in ("min", "p10", "median", "p99")),
    )
    for name, s in replay.items():
        table.add_row(
            f"{TRAJECTORY_CALLS}-call trajectory: {name}",
            *(f"{s[k]:.1f}" for k in ("min", "p10", "median", "p99")),
        )
    console.print(table)
    table = Table(title="targets")
    for col in ("case", "target", "measured", "result"):
        table.add_column(col)
    for row in rows:
        verdict = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "info"}[row["pass"]]
        table.add_row(
            row["case"],
            row["target"],
            f"{row['measured']}{row['unit'] and ' ' + row['unit']}",
            verdict,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="latency rounds (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up rounds (default 5)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent launchers (default 4)")
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=3.0,
        help="seconds per throughput measurement (default 3)",
    )
    parser.add_argument(
        "--throughput-repeats",
        type=int,
        default=3,
        help="bwrap/dsec throughput pairs, alternated (default 3)",
    )
    parser.add_argument("--idle", type=int, default=200, help="idle sandboxes (default 200)")
    parser.add_argument(
        "--fleet-rounds", type=int, default=5, help="fork vs copy rounds (default 5)"
    )
    parser.add_argument(
        "--pool-iterations", type=int, default=25, help="acquires per pool user (default 25)"
    )
    parser.add_argument(
        "--replay-rounds",
        type=int,
        default=10,
        help="re-execute / record / replay rounds of the 50-call trajectory (default 10)",
    )
    parser.add_argument(
        "--keep-nice",
        action="store_true",
        help="do not raise this process's priority (a machine shared with other measurements)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)
    for name in (
        "rounds",
        "workers",
        "throughput_repeats",
        "idle",
        "fleet_rounds",
        "pool_iterations",
        "replay_rounds",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.throughput_seconds <= 0:
        parser.error("--warmup must be >= 0 and --throughput-seconds > 0")

    bwrap = ensure_bwrap()
    if not args.keep_nice:
        with contextlib.suppress(OSError):
            os.nice(-15)  # as in SANDBOX.md §6; harmless where not permitted
    load_before = os.getloadavg()
    lat = latency(bwrap, args.rounds, args.warmup)
    conc = concurrency(bwrap, args.workers, args.throughput_seconds, args.throughput_repeats)
    idle = idle_memory(bwrap, args.idle)
    fleet = fleet_fork(args.fleet_rounds)
    pool = pool_acquire(args.workers, args.pool_iterations)
    replay = replay_trajectory(args.replay_rounds)
    rows = targets(lat, conc, idle, fleet, pool, replay)
    print_report(lat, conc, idle, fleet, pool, replay, rows)

    report = {
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "bwrap": subprocess.run(
                [bwrap, "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bwrap_argv": bwrap_argv(bwrap),
        "sandbox_limits": LIMITS,
        "latency_ms": lat,
        "throughput_execs_per_s": conc,
        "idle": idle,
        "fleet_fork_ms": fleet,
        "pool_acquire_ms": pool,
        "trajectory_replay_ms": replay,
        "targets": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
