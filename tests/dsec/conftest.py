"""Fixtures for the sandbox tests. Helpers live in sandbox_helpers.py; this directory is put on
sys.path so test modules can `from sandbox_helpers import ...` under pytest's importlib mode."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sandbox_helpers import new_sandbox

import dsec


@pytest.fixture(autouse=True)
def no_spares_across_tests() -> Iterator[None]:
    """Each test starts and ends without warm spares, so what it counts (cgroups, processes)
    is its own; a test that counts mid-way stops the spares its sandboxes started."""
    dsec.stop_spares()
    yield
    dsec.stop_spares()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[dsec.Sandbox]:
    """One sandbox shared by a module's tests that do not depend on its state."""
    with new_sandbox() as sb:
        yield sb


@pytest.fixture
def fresh_sandbox() -> Iterator[dsec.Sandbox]:
    with new_sandbox() as sb:
        yield sb


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., dsec.Sandbox]]:
    """Factory for sandboxes with custom limits; all are closed at the end of the test."""
    made: list[dsec.Sandbox] = []

    def make(**overrides: Any) -> dsec.Sandbox:
        sb = new_sandbox(**overrides)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()
