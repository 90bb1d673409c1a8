"""Ray for the rollout tests: one local instance for the whole test session (shared/PLATFORM.md
§5: ``ray.init(num_cpus=2, include_dashboard=False)`` once, then about 1 ms per call)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, shut down at the end of the session, pass or fail."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
