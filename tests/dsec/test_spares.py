"""Warm spares: `Sandbox()` takes a pre-started sandbox of the same limit set and a replacement
starts in the background, automatically after a set's first use or explicitly with
`dsec.keep_spares`; dead spares are replaced; nothing leaks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sandbox_helpers import LIMITS, gone_or_zombie, sandbox_cgroups, wait_for

import dsec
from dsec import spares


def ready_spares() -> list[dsec.Sandbox]:
    pool = spares._pools.get(spares._key(LIMITS))
    return list(pool.ready) if pool else []


def test_sandbox_takes_a_spare_and_a_replacement_starts():
    before = sandbox_cgroups()
    dsec.keep_spares(1, **LIMITS)
    try:
        wait_for(lambda: dsec.spare_stats(**LIMITS)["ready"] == 1, "a spare")
        spare_pid = ready_spares()[0].pid
        a = dsec.Sandbox(**LIMITS)
        assert a.pid == spare_pid and isinstance(a, dsec.Sandbox)
        assert dsec.spare_stats(**LIMITS)["taken"] == 1
        wait_for(lambda: dsec.spare_stats(**LIMITS)["ready"] == 1, "the replacement")
        b = dsec.Sandbox(**LIMITS)
        with a, b:
            assert a.pid != b.pid
            a.write_file("mine", b"a")
            assert b.exec("ls /workspace").stdout == b""
            assert a.exec("cat mine").stdout == b"a"
        # Other limits (or a subclass, or a snapshot) never take these spares.
        with dsec.Sandbox(**{**LIMITS, "max_pids": 33}) as c:
            assert c.limits["max_pids"] == 33
        assert dsec.spare_stats(**LIMITS)["taken"] == 2
    finally:
        dsec.stop_spares()
    assert dsec.spare_stats(**LIMITS)["ready"] == 0
    wait_for(lambda: sandbox_cgroups() == before, "every spare closed")


def test_a_spare_that_died_is_replaced_silently():
    dsec.keep_spares(1, **LIMITS)
    try:
        wait_for(lambda: dsec.spare_stats(**LIMITS)["ready"] == 1, "a spare")
        dead = ready_spares()[0]
        os.kill(dead.pid, signal.SIGKILL)
        wait_for(lambda: gone_or_zombie([dead.pid]), "the spare's init gone")
        with dsec.Sandbox(**LIMITS) as sb:
            assert sb.pid != dead.pid
            assert sb.exec("echo ok").stdout == b"ok\n"
        stats = dsec.spare_stats(**LIMITS)
        assert stats["failures"] == 1 and stats["taken"] == 0, stats
        assert dead.closed
    finally:
        dsec.stop_spares()
    assert not Path(f"/proc/{dead.pid}").exists() or gone_or_zombie([dead.pid])


def test_spares_are_automatic_after_a_limit_sets_first_use():
    before = sandbox_cgroups()
    try:
        with dsec.Sandbox(**LIMITS) as first:
            assert dsec.spare_stats(**LIMITS)["taken"] == 0
            wait_for(lambda: dsec.spare_stats(**LIMITS)["ready"] == 1, "the automatic spare")
            spare_pid = ready_spares()[0].pid
            assert spare_pid != first.pid
        with dsec.Sandbox(**LIMITS) as second:
            assert second.pid == spare_pid
            assert second.exec("echo ok").stdout == b"ok\n"
        wait_for(lambda: dsec.spare_stats(**LIMITS)["ready"] == 1, "its replacement")
        with dsec.Sandbox(spare=False, **LIMITS) as third:
            assert third.pid != ready_spares()[0].pid
        assert dsec.spare_stats(**LIMITS)["taken"] == 1
    finally:
        dsec.stop_spares()
    wait_for(lambda: sandbox_cgroups() == before, "the automatic spares closed")


def test_automatic_spares_keep_the_most_recent_limit_sets_only():
    before = sandbox_cgroups()
    sets = [{**LIMITS, "max_pids": 40 + i} for i in range(spares.AUTO_SETS + 1)]
    try:
        pids = []
        for limits in sets:
            dsec.Sandbox(**limits).close()
            wait_for(lambda: dsec.spare_stats(**limits)["ready"] == 1, "a spare")  # noqa: B023
            pids.append(spares._pools[spares._key(limits)].ready[0].pid)
        assert dsec.spare_stats(**sets[0])["ready"] == 0  # the oldest set's spare was closed
        assert gone_or_zombie(pids[:1]) and not any(gone_or_zombie([p]) for p in pids[1:])
        assert all(dsec.spare_stats(**limits)["ready"] == 1 for limits in sets[1:])
        dsec.auto_spares(0)  # closes them and keeps none
        dsec.Sandbox(**LIMITS).close()
        assert all(dsec.spare_stats(**limits)["ready"] == 0 for limits in [*sets, LIMITS])
        wait_for(lambda: sandbox_cgroups() == before, "every automatic spare closed")
    finally:
        dsec.auto_spares(1)
        dsec.stop_spares()


def test_spares_bad_input():
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(dsec.PolicyError, match="count must be"):
            dsec.keep_spares(bad, **LIMITS)
    with pytest.raises(dsec.PolicyError, match="memory_bytes"):
        dsec.keep_spares(1, memory_bytes=1)
    with pytest.raises(dsec.PolicyError, match="snapshot"):
        dsec.keep_spares(1, snapshot=None)
    assert dsec.spare_stats(memory_bytes=1)["ready"] == 0
    with pytest.raises(dsec.PolicyError, match="count must be"):
        dsec.auto_spares(-1)
    with pytest.raises(dsec.PolicyError, match="memory_bytes"):
        dsec.Sandbox(memory_bytes=1)
    assert dsec.spare_stats(memory_bytes=1)["ready"] == 0  # a failed creation keeps no spares
    with pytest.raises(dsec.PolicyError, match="spare must be True or False, got 'no'"):
        dsec.Sandbox(spare="no", **LIMITS)


def test_bad_dsec_auto_spares_is_named(monkeypatch):
    monkeypatch.setenv("DSEC_AUTO_SPARES", "many")
    monkeypatch.setattr(spares, "_auto", None)
    with pytest.raises(dsec.PolicyError, match=r"DSEC_AUTO_SPARES must be an int.*'many'"):
        dsec.Sandbox(**LIMITS).close()
    monkeypatch.setenv("DSEC_AUTO_SPARES", "0")
    monkeypatch.setattr(spares, "_auto", None)
    dsec.Sandbox(**LIMITS).close()
    assert dsec.spare_stats(**LIMITS)["starting"] + dsec.spare_stats(**LIMITS)["ready"] == 0
