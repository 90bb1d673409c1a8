"""The DeepSeek-V4 policy in PyTorch: config, model, FP8 KV cache, checkpoints, chat, engine.

Public names are resolved lazily so that ``import policy`` stays cheap and a user of one part
(say the chat encoder) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "V4Config": "policy.config",
    "V4Model": "policy.model",
    "load_official": "policy.checkpoint",
    "save": "policy.checkpoint",
    "load": "policy.checkpoint",
    "kv_cache_bytes_per_token": "policy.kv_layout",
    "SamplingParams": "policy.engine",
    "Engine": "policy.engine",
    "Generation": "policy.engine",
    "AsyncEngine": "policy.engine",
    "Session": "policy.engine",
    "SessionError": "policy.engine",
    "PolicyLossConfig": "policy.losses",
    "policy_loss": "policy.losses",
    "sft_loss": "policy.losses",
    "aggregate": "policy.losses",
    "kl_estimate": "policy.losses",
    "token_logprobs": "policy.losses",
    "token_entropy": "policy.losses",
    "forward_logprobs": "policy.losses",
    "Batch": "policy.losses",
    "make_batch": "policy.losses",
    "make_micro_batches": "policy.losses",
    "split_by_token_budget": "policy.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
