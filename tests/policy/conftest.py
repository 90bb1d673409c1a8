"""Fixtures shared by the policy tests."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from policy import V4Config, V4Model


@functools.cache
def _meta_model(preset: str) -> V4Model:
    with torch.device("meta"):
        return V4Model(V4Config.from_preset(preset))


@pytest.fixture
def meta_model() -> Callable[[str], V4Model]:
    """``meta_model(preset)``: the V4Model of a preset on the meta device, built once per test
    session (building ``pro``'s modules takes about 17 s). Read it only."""
    return _meta_model
