"""The reward registry, and what `import reward` may pull in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from episodes import answer, episode

import reward
from reward import get_reward, list_rewards, make_reward, register_reward
from reward.registry import _REGISTRY
from rollout.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_builtins_are_registered() -> None:
    assert {"exact_match", "format", "sandbox_tests"} <= set(list_rewards())
    assert get_reward("sandbox_tests").needs_sandbox
    assert not get_reward("exact_match").needs_sandbox


def test_unknown_reward_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"unknown reward 'exactmatch'; known rewards: .*exact_match"
    ):
        get_reward("exactmatch")


def test_register_function_decorator_and_lazy(clean_registry) -> None:
    [inst] = get_task("arith_tool").instances("test", 1, seed=0)
    t = episode(inst, [answer("hello world")])

    @register_reward("length")
    def length(trajectory, verifier, sandbox=None):
        return len(trajectory.messages[-1]["content"])

    assert get_reward("length")(t, {}) == 11.0
    register_reward("lazy_exact", "reward.functions:exact_match")
    assert get_reward("lazy_exact")(t, {"answer": "hello world"}) == 1.0
    assert make_reward({"length": 0.5, "lazy_exact": 2.0})(t, {"answer": "x"}) == (
        5.5,
        {"length": 11.0, "lazy_exact": 0.0},
    )

    with pytest.raises(ValueError, match="'length' is already registered"):
        register_reward("length", length)
    register_reward("broken", "reward.functions:no_such_function")
    with pytest.raises(
        ValueError, match=r"reward 'broken': cannot load 'reward\.functions:no_such_function'"
    ):
        get_reward("broken")
    with pytest.raises(ValueError, match="'module:attr'"):
        register_reward("bad_ref", "reward.functions.exact_match")
    register_reward("not_a_number", lambda t, v, s=None: "1")
    with pytest.raises(ValueError, match="reward 'not_a_number' returned '1', not a number"):
        get_reward("not_a_number")(t, {})


def test_import_reward_pulls_in_neither_ray_nor_torch() -> None:
    code = (
        "import sys, reward\n"
        "reward.load_run, reward.summarize, reward.get_reward('exact_match')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert reward.__all__
