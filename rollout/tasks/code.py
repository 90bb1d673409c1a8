"""``code_tests``: write one small function into ``/workspace/solution.py``.

Each instance is a family and a parameter (e.g. ``scale`` with ``K = 7``: "``scale(x)`` returns
``x*7``"). ``verifier["tests"]`` holds hidden unit tests (Python source with the expected values
computed here from a reference implementation); the ``sandbox_tests`` reward runs them in the
episode's sandbox after the episode, so they see the workspace the model left behind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rollout.tasks.base import GeneratedTask, Instance, user_prompt

__all__ = ["SOLUTION_PATH", "CodeTests"]

SOLUTION_PATH = "/workspace/solution.py"


@dataclass(frozen=True)
class _Family:
    function: str
    signature: str
    spec: Callable[[Any], str]  # parameter -> what the function must return
    param: Callable[[random.Random], Any]
    reference: Callable[[Any], Callable[..., Any]]  # parameter -> implementation
    cases: tuple[tuple[Any, ...], ...]  # argument tuples of the hidden tests


def _clamp_param(rng: random.Random) -> tuple[int, int]:
    return rng.randint(-50, 0), rng.randint(1, 50)


_WORDS = ("banana", "", "abracadabra", "mississippi", "zzz", "hello world")
_LISTS = ([], [1], [1, 2, 3], [5, 4, 3, 2, 1, 0], list(range(12)))

_FAMILIES: dict[str, _Family] = {
    f.function: f
    for f in (
        _Family(
            "scale",
            "scale(x)",
            lambda k: f"x*{k}",
            lambda r: r.randint(2, 99),
            lambda k: lambda x: x * k,
            ((0,), (1,), (-3,), (12,), (250,)),
        ),
        _Family(
            "count",
            "count(s)",
            lambda c: f"the number of {c!r} in s",
            lambda r: r.choice("abcdefghijklmnopqrstuvwxyz"),
            lambda c: lambda s: s.count(c),
            (*((w,) for w in _WORDS), ("abcdefghijklmnopqrstuvwxyz" * 2,)),
        ),
        _Family(
            "clamp",
            "clamp(x)",
            lambda p: f"x limited to [{p[0]}, {p[1]}]",
            _clamp_param,
            lambda p: lambda x: min(max(x, p[0]), p[1]),
            ((-100,), (-1,), (0,), (1,), (100,), (25,), (-25,)),
        ),
        _Family(
            "rep",
            "rep(s)",
            lambda k: f"s repeated {k} times",
            lambda r: r.randint(2, 9),
            lambda k: lambda s: s * k,
            (("",), ("a",), ("xy",)),
        ),
        _Family(
            "tail",
            "tail(xs)",
            lambda k: f"a list of the last {k} items of xs",
            lambda r: r.randint(1, 9),
            lambda k: lambda items: list(items[-k:]) if items else [],
            tuple((lst,) for lst in _LISTS),
        ),
        _Family(
            "div",
            "div(n)",
            lambda k: f"True if n is divisible by {k}, else False",
            lambda r: r.randint(2, 50),
            lambda k: lambda n: n % k == 0,
            ((0,), (1,), (7,), (36,), (100,), (221,), (2450,)),
        ),
        _Family(
            "shift",
            "shift(xs)",
            lambda k: f"a list of each item of xs plus {k}",
            lambda r: r.randint(1, 99),
            lambda k: lambda items: [x + k for x in items],
            tuple((lst,) for lst in _LISTS),
        ),
    )
}


def hidden_tests(function: str, cases: list[tuple[tuple[Any, ...], Any]]) -> str:
    """Python source that imports ``function`` from the solution file and checks each case."""
    return (
        "import sys\n"
        "sys.path.insert(0, '/workspace')\n"
        f"from solution import {function}\n"
        f"for args, want in {cases!r}:\n"
        f"    got = {function}(*args)\n"
        f"    assert got == want, f'{function}{{args!r}} returned {{got!r}}, expected {{want!r}}'\n"
    )


class CodeTests(GeneratedTask):
    """Options: ``families`` (all by default): which function families to draw from."""

    name: ClassVar[str] = "code_tests"
    reward: ClassVar[str] = "sandbox_tests"

    def __init__(self, families: list[str] | None = None) -> None:
        chosen = list(_FAMILIES) if families is None else families
        if isinstance(chosen, str) or not isinstance(chosen, list) or not chosen:
            raise ValueError(f"code_tests: families must be a non-empty list, got {families!r}")
        unknown = [f for f in chosen if f not in _FAMILIES]
        if unknown:
            raise ValueError(
                f"code_tests: unknown families {unknown}; known: {', '.join(_FAMILIES)}"
            )
        self.families = chosen

    def sample(self, rng: random.Random, split: str) -> tuple[str, Instance]:
        family = _FAMILIES[rng.choice(self.families)]
        param = family.param(rng)
        impl = family.reference(param)
        cases = [(args, impl(*args)) for args in family.cases]
        key = f"{family.function}:{param!r}"
        prompt = (
            f"Write {SOLUTION_PATH} defining {family.signature} that returns {family.spec(param)}."
        )
        inst = Instance(
            id=f"{self.name}/{key}",
            task=self.name,
            messages=user_prompt(prompt),
            tools=["write_file", "python"],
            verifier={
                "tests": hidden_tests(family.function, cases),
                "function": family.function,
                "path": SOLUTION_PATH,
            },
        )
        return key, inst
