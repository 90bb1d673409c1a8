"""Import ``dsec`` from its built copy when a source copy without the compiled module shadows it.

``ray job submit --working-dir .`` runs the job (and its actors) in an unpacked copy of the
working directory, first on ``sys.path``. Ray leaves out what ``.gitignore`` ignores, so that
copy's ``dsec/`` lacks the compiled ``dsec._native`` and would shadow the installed, built
package (``import dsec`` then fails). :func:`use_built_dsec` looks for the first ``dsec``
package on ``sys.path`` that has its compiled module and imports that one as ``dsec``; the
rest of the job (``rollout``, ``policy``, ``reward``) still comes from the submitted copy.
It is a no-op when the first ``dsec`` found is complete (every run outside a job copy).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["use_built_dsec"]


def _has_native(package_dir: Path) -> bool:
    return any(
        (package_dir / f"_native{suffix}").is_file()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def use_built_dsec() -> None:
    """Make ``import dsec`` find a built package (see the module doc). Call before any import
    of ``dsec``; raises ImportError naming the shadowing copy when no built package exists."""
    if "dsec" in sys.modules:
        return
    spec = importlib.util.find_spec("dsec")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed at all: the import itself will say so
    first = Path(next(iter(spec.submodule_search_locations))).resolve()
    if _has_native(first):
        return
    for entry in sys.path:
        candidate = (Path(entry or ".") / "dsec").resolve()
        if candidate != first and (candidate / "__init__.py").is_file() and _has_native(candidate):
            built = importlib.util.spec_from_file_location(
                "dsec", candidate / "__init__.py", submodule_search_locations=[str(candidate)]
            )
            assert built is not None and built.loader is not None
            module = importlib.util.module_from_spec(built)
            sys.modules["dsec"] = module
            try:
                built.loader.exec_module(module)
            except BaseException:
                del sys.modules["dsec"]
                raise
            return
    raise ImportError(
        f"the dsec package at {first} has no compiled dsec._native and no built dsec package "
        "is on sys.path: install the project (pip install . or maturin develop) where the "
        "job runs"
    )
