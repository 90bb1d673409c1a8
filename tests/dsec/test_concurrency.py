"""Concurrent use from threads and asyncio: calls on one sandbox serialise, different sandboxes
run in parallel, the GIL is released while a call blocks, and the pool bounds usage."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from sandbox_helpers import find_by_marker

import dsec


def test_many_threads_on_one_sandbox_get_their_own_results():
    with dsec.Sandbox() as sb, ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: sb.exec(f"echo {i}").stdout, range(40)))
    assert results == [f"{i}\n".encode() for i in range(40)]


def test_parallel_sandboxes_in_threads():
    boxes = [dsec.Sandbox() for _ in range(4)]
    try:

        def work(i: int) -> bytes:
            sb = boxes[i % 4]
            sb.write_file(f"f{i}", str(i))
            return sb.exec(f"cat f{i}").stdout + sb.run_python(f"print({i} * 2)").stdout

        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(work, range(16)))
        assert got == [f"{i}{i * 2}\n".encode() for i in range(16)]
    finally:
        for sb in boxes:
            sb.close()


def test_gil_is_released_while_a_call_blocks():
    with dsec.Sandbox() as sb:
        done = threading.Event()
        t = threading.Thread(target=lambda: (sb.exec("sleep 30.125", timeout=2.0), done.set()))
        t.start()
        # This loop runs Python while the exec is in flight: the command shows up among the
        # sandbox init's descendants. Were the GIL held, we could not run until the call ended.
        while not find_by_marker(sb.pid, "30.125") and not done.is_set():
            pass
        assert not done.is_set(), "the exec finished before the main thread could run"
        t.join()


def test_asyncio_gather_across_sandboxes():
    async def main() -> list[bytes]:
        boxes = [dsec.Sandbox() for _ in range(3)]
        try:
            rs = await asyncio.gather(
                *(boxes[i % 3].exec_async(["echo", str(i)]) for i in range(9)),
                *(boxes[i % 3].run_python_async(f"print({i})") for i in range(3)),
            )
            return [r.stdout for r in rs]
        finally:
            for sb in boxes:
                sb.close()

    out = asyncio.run(main())
    assert out == [f"{i}\n".encode() for i in range(9)] + [f"{i}\n".encode() for i in range(3)]


def test_pool_bounds_concurrency_and_isolates_users():
    lock = threading.Lock()
    active = 0
    peak = 0
    with dsec.SandboxPool(2) as pool:

        def user(i: int) -> bytes:
            nonlocal active, peak
            with pool.sandbox() as sb:
                with lock:
                    active += 1
                    peak = max(peak, active)
                try:
                    leftover = sb.exec("ls /workspace").stdout
                    sb.write_file("mine", str(i))
                    return leftover
                finally:
                    with lock:
                        active -= 1

        with ThreadPoolExecutor(6) as ex:
            leftovers = list(ex.map(user, range(12)))
    assert peak <= 2
    assert leftovers == [b""] * 12  # nobody sees the previous user's file


def test_close_from_another_thread_kills_the_call_in_flight():
    sb = dsec.Sandbox()
    box: list[object] = []

    def run() -> None:
        try:
            box.append(sb.exec("sleep 30.25; echo done"))
        except dsec.SandboxClosedError as e:
            box.append(e)

    t = threading.Thread(target=run)
    t.start()
    while not find_by_marker(sb.pid, "30.25"):
        pass
    sb.close()
    t.join()
    assert sb.closed and len(box) == 1 and isinstance(box[0], dsec.SandboxClosedError), box


def test_forked_child_cannot_use_or_tear_down_the_parents_sandbox():
    with dsec.Sandbox() as sb:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                sb.exec("true")
            except dsec.SandboxError as e:
                code = 0 if "fork" in str(e) else 2
            else:
                code = 3
            sb.close()  # must not affect the parent's sandbox
            os.write(w, bytes([code]))
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 1) == b"\x00"
        os.close(r)
        assert sb.exec("echo alive").stdout == b"alive\n"
