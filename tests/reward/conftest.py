"""Fixtures for the reward tests. Helpers live in episodes.py; this directory is put on sys.path
so test modules can `from episodes import ...` under pytest's importlib mode."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import dsec


@pytest.fixture
def sandbox() -> Iterator[dsec.Sandbox]:
    with dsec.Sandbox(timeout=20.0, memory_bytes=256 << 20, max_pids=64) as sb:
        yield sb
