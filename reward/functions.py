"""The built-in reward functions (registered in ``reward.registry`` under the names below).

- ``exact_match``: the final answer equals ``verifier["answer"]``. The final answer is the
  content of the last assistant message, stripped; a last assistant message that calls tools
  gives no answer (0). Numbers (an ``answer`` that is an int, a float or a numeric string, or
  ``verifier["match"] == "number"``) compare by value: the content must be one number, with
  optional thousands commas and a trailing period (``"1,234."`` equals ``1234``), within
  ``verifier["tolerance"]`` (default 0). Text compares with case and runs of whitespace
  ignored. ``answer`` may be a list of accepted answers.
- ``sandbox_tests``: ``verifier["tests"]`` (Python source) runs in the episode's live sandbox,
  which holds the workspace the model left; 1 if it exits 0 within ``verifier["timeout"]``
  (default 10 s) and printed a fresh random marker appended after the tests (so solution code
  that exits early with status 0 does not pass), else 0. Bytecode caches in the workspace are
  ignored (a fresh ``sys.pycache_prefix``), so a rewritten file is always the one tested. An
  episode that ended with ``sandbox_error`` scores 0 without touching the sandbox.
- ``format``: 1 if the episode finished with ``stop`` and its last assistant message parsed
  with no DSML errors (its ``errors`` list, as ``policy.chat.parse_assistant`` reports it, is
  empty), else 0. A separate component so that format and correctness are logged apart.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

__all__ = ["exact_match", "final_answer", "final_message", "format_reward", "sandbox_tests"]

DEFAULT_TESTS_TIMEOUT = 10.0
_NUMBER_RE = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")


def final_message(trajectory: Any) -> Mapping[str, Any] | None:
    """The last assistant message of a trajectory, or None."""
    for msg in reversed(trajectory.messages):
        if msg.get("role") == "assistant":
            return msg
    return None


def final_answer(trajectory: Any) -> str | None:
    """The stripped content of the last assistant message; None if there is none or it calls
    tools (the episode ended before the model answered)."""
    msg = final_message(trajectory)
    if msg is None or msg.get("tool_calls"):
        return None
    content = msg.get("content")
    return content.strip() if isinstance(content, str) else None


def _number(text: str) -> Fraction | None:
    text = text.strip().removesuffix(".")
    if not _NUMBER_RE.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def _is_numeric(answer: Any) -> bool:
    if isinstance(answer, bool):
        return False
    return isinstance(answer, (int, float)) or (
        isinstance(answer, str) and _number(answer) is not None
    )


def _matches(got: str, want: Any, mode: str, tolerance: Fraction) -> bool:
    if mode == "number":
        a, b = _number(got), _number(str(want))
        if b is None:
            raise ValueError(f"verifier answer {want!r} is not a number")
        return a is not None and abs(a - b) <= tolerance
    return " ".join(got.split()).casefold() == " ".join(str(want).split()).casefold()


def exact_match(trajectory: Any, verifier: Mapping[str, Any], sandbox: Any = None) -> float:
    if "answer" not in verifier:
        raise ValueError(
            f"exact_match needs verifier['answer'] (instance {trajectory.instance_id!r})"
        )
    answers = verifier["answer"]
    answers = answers if isinstance(answers, list) else [answers]
    got = final_answer(trajectory)
    if got is None:
        return 0.0
    tolerance = Fraction(str(verifier.get("tolerance", 0)))
    for want in answers:
        mode = verifier.get("match") or ("number" if _is_numeric(want) else "text")
        if mode not in ("number", "text"):
            raise ValueError(f"verifier['match'] must be 'number' or 'text', got {mode!r}")
        if _matches(got, want, mode, tolerance):
            return 1.0
    return 0.0


def sandbox_tests(trajectory: Any, verifier: Mapping[str, Any], sandbox: Any = None) -> float:
    tests = verifier.get("tests")
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError(
            f"sandbox_tests needs verifier['tests'] as Python source "
            f"(instance {trajectory.instance_id!r})"
        )
    if sandbox is None:
        raise ValueError("sandbox_tests needs the episode's live sandbox; got None")
    if trajectory.finish_reason == "sandbox_error":
        return 0.0
    timeout = float(verifier.get("timeout", DEFAULT_TESTS_TIMEOUT))
    token = secrets.token_hex(16)
    marker = f"tests-passed-{token}"
    # A fresh bytecode cache directory: stale or planted __pycache__ files in the workspace
    # (same size and mtime second as a rewritten source) are never used.
    prelude = f"import sys\nsys.pycache_prefix = '/tmp/reward-pycache-{token}'\n"
    result = sandbox.run_python(f"{prelude}{tests}\nprint({marker!r})\n", timeout=timeout)
    passed = (
        result.exit_code == 0
        and not result.timed_out
        and marker in bytes(result.stdout).decode("utf-8", errors="replace").splitlines()
    )
    return 1.0 if passed else 0.0


def format_reward(trajectory: Any, verifier: Mapping[str, Any], sandbox: Any = None) -> float:
    msg = final_message(trajectory)
    if msg is None or trajectory.finish_reason != "stop":
        return 0.0
    return 0.0 if msg.get("errors") else 1.0
