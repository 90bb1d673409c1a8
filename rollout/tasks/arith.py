"""``arith_tool``: products of 3-4 digit numbers (optionally ``a*b+c``), computed with the python
tool (shared/RL.md §8: the tool is necessary, so using it is what the policy learns).

The model must answer with the number alone; ``verifier["answer"]`` holds it as a decimal string
and the default reward is ``exact_match``.
"""

from __future__ import annotations

import random
from typing import ClassVar

from rollout.tasks.base import GeneratedTask, Instance, user_prompt

__all__ = ["ArithTool"]


class ArithTool(GeneratedTask):
    """Options: ``min_digits`` and ``max_digits`` (3 and 4) bound the digits of ``a`` and ``b``;
    ``add`` (False) adds ``+c`` with a 2-3 digit ``c`` to every instance."""

    name: ClassVar[str] = "arith_tool"
    reward: ClassVar[str] = "exact_match"

    def __init__(self, min_digits: int = 3, max_digits: int = 4, add: bool = False) -> None:
        for option, value in (("min_digits", min_digits), ("max_digits", max_digits)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9:
                raise ValueError(f"arith_tool: {option} must be an int in [1, 9], got {value!r}")
        if min_digits > max_digits:
            raise ValueError(
                f"arith_tool: min_digits ({min_digits}) must be <= max_digits ({max_digits})"
            )
        if min_digits < 2:
            # one-digit factors give too few distinct problems to split train from test
            raise ValueError(f"arith_tool: min_digits must be >= 2, got {min_digits}")
        if not isinstance(add, bool):
            raise ValueError(f"arith_tool: add must be a bool, got {add!r}")
        self.min_digits, self.max_digits, self.add = min_digits, max_digits, add

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def sample(self, rng: random.Random, split: str) -> tuple[str, Instance]:
        a, b = self._number(rng), self._number(rng)
        expr, value = f"{a}*{b}", a * b
        if self.add:
            c = rng.randint(10, 999)
            expr, value = f"{expr}+{c}", value + c
        inst = Instance(
            id=f"{self.name}/{expr}",
            task=self.name,
            messages=user_prompt(f"Compute {expr} with python. Reply with the number only."),
            tools=["python"],
            verifier={"answer": str(value), "expression": expr},
        )
        return expr, inst
