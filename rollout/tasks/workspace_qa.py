"""``workspace_qa``: a question whose facts are spread over files in ``/workspace``.

Each person has a file ``/workspace/people/<name>.txt`` saying where they live, and
``/workspace/ages.txt`` lists everyone's age. The question names a city; answering needs the
person file that mentions the city and then the age list, so the sandbox state matters across
turns. ``verifier["answer"]`` is the age (a decimal string); the default reward is
``exact_match``.
"""

from __future__ import annotations

import hashlib
import random
from typing import ClassVar

from rollout.tasks.base import GeneratedTask, Instance, user_prompt

__all__ = ["WorkspaceQA"]

NAMES = (
    "alice", "bruno", "chen", "dana", "emil", "fatima", "goran", "hana", "ivan", "jonas",
    "kira", "luis", "mei", "nora", "omar", "pia", "quinn", "rosa", "sven", "tara",
)  # fmt: skip
CITIES = (
    "Oslo", "Lima", "Kyoto", "Accra", "Quito", "Riga", "Perth", "Tunis", "Porto", "Dhaka",
    "Hanoi", "Cusco", "Turku", "Bern", "Split", "Malmo", "Cork", "Graz", "Nice", "Fez",
)  # fmt: skip


class WorkspaceQA(GeneratedTask):
    """Options: ``people`` (3): how many person files the workspace holds (2..10)."""

    name: ClassVar[str] = "workspace_qa"
    reward: ClassVar[str] = "exact_match"

    def __init__(self, people: int = 3) -> None:
        if isinstance(people, bool) or not isinstance(people, int) or not 2 <= people <= 10:
            raise ValueError(f"workspace_qa: people must be an int in [2, 10], got {people!r}")
        self.people = people

    def sample(self, rng: random.Random, split: str) -> tuple[str, Instance]:
        names = sorted(rng.sample(NAMES, self.people))
        cities = rng.sample(CITIES, self.people)
        ages = rng.sample(range(18, 90), self.people)
        asked = rng.randrange(self.people)
        files = {
            f"people/{n}.txt": f"{n.title()} lives in {c}.\n"
            for n, c in zip(names, cities, strict=True)
        }
        files["ages.txt"] = "".join(f"{n.title()}: {a}\n" for n, a in zip(names, ages, strict=True))
        key = (
            ",".join(f"{n}-{c}-{a}" for n, c, a in zip(names, cities, ages, strict=True))
            + f"?{asked}"
        )
        prompt = (
            f"Files in /workspace say who lives where and how old they are. "
            f"How old is the person who lives in {cities[asked]}? Reply with the number only."
        )
        inst = Instance(
            id=f"{self.name}/{hashlib.sha256(key.encode()).hexdigest()[:12]}",
            task=self.name,
            messages=user_prompt(prompt),
            tools=["bash", "read_file"],
            verifier={"answer": str(ages[asked]), "city": cities[asked], "name": names[asked]},
            files=files,
        )
        return key, inst
