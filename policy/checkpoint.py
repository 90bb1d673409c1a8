"""Checkpoints: the official DeepSeek-V4 safetensors layout (V4_SPEC.md §9) and our own format.

Official layout (``load_official`` / ``save_official``):

- keys without a ``model.`` prefix (one is stripped if present), equal to ``V4Model`` names;
- FP8 e4m3 ``.weight`` plus ``.scale`` (ue8m0, one per 128×128 tile, [⌈out/128⌉, ⌈in/128⌉]) for
  the attention projections (``wq_a``, ``wq_b``, ``wkv``, ``wo_a``, ``wo_b``), the indexer's
  ``wq_b``, the shared expert and MTP's ``e_proj`` / ``h_proj``; the name ``weight_scale_inv``
  is accepted for ``scale``;
- routed experts ``ffn.experts.{e}.w{1,2,3}.weight`` as I8 [out, in/2] (two e2m1 codes per byte,
  low nibble = even input column) plus ``.scale`` ue8m0 [out, in/32];
- F32: ``ape``, ``attn_sink``, every ``hc_*``, ``gate.bias``; integer ``tid2eid`` (I64);
- BF16: everything else (embed, head, norms, router weight, compressor and indexer projections).

Quantised tensors are dequantised to the model's parameter dtype when loaded. Loading streams
one tensor at a time from memory-mapped shards, so peak memory is the model plus one tensor.

Own format (``save`` / ``load``): one safetensors file with the state dict as is and the config
as JSON in the metadata, so ``load(path)`` rebuilds the model alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from policy.quant import (
    FP8_DTYPE,
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    quantize_fp4_weight,
    quantize_fp8_weight,
)

INDEX_FILE = "model.safetensors.index.json"
FORMAT_TAG = "dsec-rl/v4"

_FP8_WEIGHT = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123]"
    r"|e_proj|h_proj)\.weight$"
)
_FP4_WEIGHT = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")
_MTP_DUPLICATE = re.compile(r"^mtp\.\d+\..*(emb|head\.weight$)")

# safetensors dtype strings -> torch dtypes (those the official checkpoint uses, and a few more)
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model (every offending key is named)."""


def official_format(key: str, *, fp8: bool = True, fp4_experts: bool = True) -> str:
    """On-disk format of a model key in the official layout: "fp8", "fp4", "f32", "int", "bf16".

    ``fp8`` / ``fp4_experts`` False store those weights as BF16 instead.
    """
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "tid2eid":
        return "int"
    if leaf in ("ape", "attn_sink") or leaf.startswith("hc_") or key.endswith("gate.bias"):
        return "f32"
    if _FP4_WEIGHT.search(key):
        return "fp4" if fp4_experts else "bf16"
    if _FP8_WEIGHT.search(key):
        return "fp8" if fp8 else "bf16"
    return "bf16"


def official_tensor_specs(
    state: Mapping[str, torch.Tensor], *, fp8: bool = True, fp4_experts: bool = True
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """On-disk (dtype, shape) of every tensor ``save_official`` writes for ``state``.

    Works on meta tensors (only shapes are read), e.g. to compare a Flash/Pro model built on the
    meta device against the published key list.
    """
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, t in state.items():
        shape = tuple(t.shape)
        fmt = official_format(key, fp8=fp8, fp4_experts=fp4_experts)
        stem = key[: -len("weight")]
        if fmt == "fp8":
            out[key] = (FP8_DTYPE, shape)
            out[stem + "scale"] = (torch.float8_e8m0fnu, (-(-shape[0] // 128), -(-shape[1] // 128)))
        elif fmt == "fp4":
            out[key] = (torch.int8, (shape[0], shape[1] // 2))
            out[stem + "scale"] = (torch.float8_e8m0fnu, (shape[0], shape[1] // 32))
        else:
            dtype = {"f32": torch.float32, "int": torch.int64, "bf16": torch.bfloat16}[fmt]
            out[key] = (dtype, shape)
    return out


def _official_tensors(
    key: str, t: torch.Tensor, *, fp8: bool, fp4_experts: bool
) -> dict[str, torch.Tensor]:
    """One model tensor -> the tensor(s) stored for it in the official layout."""
    t = t.detach()
    fmt = official_format(key, fp8=fp8, fp4_experts=fp4_experts)
    stem = key[: -len("weight")]
    if fmt == "fp8":
        w, s = quantize_fp8_weight(t)
        return {key: w, stem + "scale": s}
    if fmt == "fp4":
        w, s = quantize_fp4_weight(t)
        return {key: w, stem + "scale": s}
    dtype = {"f32": torch.float32, "int": torch.int64, "bf16": torch.bfloat16}[fmt]
    return {key: t.to(dtype).contiguous()}


@torch.no_grad()
def round_to_official(model: torch.nn.Module, *, fp8: bool = True, fp4_experts: bool = True):
    """Round every parameter in place through its official storage format (quantise then
    dequantise; BF16 for the BF16 keys), so that ``save_official`` + ``load_official`` give back
    exactly the same weights. Returns the model."""
    for key, t in model.state_dict(keep_vars=True).items():
        fmt = official_format(key, fp8=fp8, fp4_experts=fp4_experts)
        if fmt == "fp8":
            t.copy_(dequantize_fp8_weight(*quantize_fp8_weight(t), t.dtype))
        elif fmt == "fp4":
            t.copy_(dequantize_fp4_weight(*quantize_fp4_weight(t), t.dtype))
        elif fmt == "bf16" and t.is_floating_point():
            t.copy_(t.to(torch.bfloat16))
    return model


def save_official(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    fp8: bool = True,
    fp4_experts: bool = True,
    shard_bytes: int = 4 << 30,
    progress: bool = False,
) -> list[Path]:
    """Write ``model`` in the official layout: shards ``model-0000i-of-0000N.safetensors``, an
    ``model.safetensors.index.json`` weight map and (when the model has a V4Config ``cfg``) a
    ``config.json``. A weight and its scale always share a shard. Returns the shard paths.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in tqdm(list(state), desc="quantise", disable=not progress):
        group = _official_tensors(key, state[key], fp8=fp8, fp4_experts=fp4_experts)
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += nbytes
    n = len(shards)
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        paths.append(out / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    cfg = getattr(model, "cfg", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))
    return paths


# ------------------------------------------------------------------------------- loading


class _Source:
    """Tensors by key from a dict, one safetensors file or a directory of shards.

    ``meta(key)`` reads only headers; ``get(key)`` materialises one tensor.
    """

    def __init__(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]):
        self._dict: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Any] = {}
        self.key_file: dict[str, str] = {}
        if isinstance(path_or_state_dict, Mapping):
            self._dict = path_or_state_dict
            for k, v in path_or_state_dict.items():
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"state dict value for {k!r} is {type(v).__name__}")
            return
        if not isinstance(path_or_state_dict, str | os.PathLike):
            raise ValueError(
                "expected a checkpoint directory, a .safetensors file or a state dict, got "
                f"{type(path_or_state_dict).__name__}"
            )
        path = Path(path_or_state_dict)
        if path.is_dir():
            files = sorted(path.glob("model*.safetensors"))
            index = path / INDEX_FILE
            if index.exists():
                wm = json.loads(index.read_text()).get("weight_map", {})
                files = sorted({path / f for f in wm.values()})
                missing = [str(f.name) for f in files if not f.exists()]
                if missing:
                    raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
            if not files:
                raise FileNotFoundError(f"no model*.safetensors files in {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"checkpoint path {path} does not exist")
        for f in files:
            h = safe_open(str(f), framework="pt")
            self._files[str(f)] = h
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self.key_file[k] = str(f)

    def keys(self) -> list[str]:
        return list(self._dict) if self._dict is not None else list(self.key_file)

    def by_file(self) -> Iterator[tuple[str, list[str]]]:
        """Keys grouped shard by shard (one group for a dict)."""
        if self._dict is not None:
            yield "<state dict>", list(self._dict)
            return
        for f, h in self._files.items():
            yield f, list(h.keys())

    def meta(self, key: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
        if self._dict is not None:
            t = self._dict[key]
            return t.dtype, tuple(t.shape)
        sl = self._files[self.key_file[key]].get_slice(key)
        return _ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape())

    def get(self, key: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[key]
        return self._files[self.key_file[key]].get_tensor(key)


@dataclass
class LoadReport:
    """What ``load_official`` did: loaded keys, and the keys it could not match."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"
    skipped: list[str] = field(default_factory=list)  # MTP duplicates of embed/head (convert.py)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def message(self) -> str:
        parts = []
        for name, items in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            ("with mismatched shapes or formats", self.mismatched),
        ):
            if items:
                shown = "\n    ".join(items[:50])
                more = f"\n    ... and {len(items) - 50} more" if len(items) > 50 else ""
                parts.append(f"  {len(items)} key(s) {name}:\n    {shown}{more}")
        return "checkpoint does not match the model:\n" + "\n".join(parts)


@dataclass
class _Plan:
    key: str  # model key
    src: str  # checkpoint key of the data
    scale: str | None  # checkpoint key of its scale
    kind: str  # "fp8" | "fp4" | "copy"


def _strip(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def _plan(
    src: _Source, targets: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, _Plan]:
    """Match checkpoint keys to model keys from headers only; fill ``report``'s lists."""
    raw = src.keys()
    names: dict[str, str] = {}  # normalised name -> checkpoint key
    for k in raw:
        n = _strip(k)
        if n.endswith(".weight_scale_inv"):
            n = n[: -len("weight_scale_inv")] + "scale"
        if n in names:
            raise CheckpointMismatchError(f"checkpoint key {n!r} appears twice ({k!r})")
        names[n] = k
    plans: dict[str, _Plan] = {}
    used: set[str] = set()
    for n, k in names.items():
        if n.endswith(".scale") and n[: -len("scale")] + "weight" in names:
            continue  # consumed with its weight
        if n not in targets:
            if _MTP_DUPLICATE.match(n):
                report.skipped.append(n)
            else:
                report.unexpected.append(n)
            continue
        dtype, shape = src.meta(k)
        want = tuple(targets[n].shape)
        scale_name = n[: -len("weight")] + "scale" if n.endswith(".weight") else None
        scale_key = names.get(scale_name) if scale_name else None
        if scale_key is not None:
            used.add(scale_name)
            _, sshape = src.meta(scale_key)
            if dtype == FP8_DTYPE:
                kind, got = "fp8", shape
                swant = (-(-shape[0] // 128), -(-shape[1] // 128)) if len(shape) == 2 else None
            elif dtype in (torch.int8, torch.uint8) or dtype is None:
                kind, got = "fp4", (*shape[:-1], shape[-1] * 2)
                swant = (shape[0], got[-1] // 32) if len(shape) == 2 else None
            else:
                report.mismatched.append(f"{n}: has a scale but dtype {dtype} is not FP8 or I8")
                continue
            if tuple(sshape) != swant:
                report.mismatched.append(
                    f"{n}: {kind} scale {scale_name} has shape {list(sshape)}, "
                    f"expected {list(swant) if swant else '2-D'}"
                )
                continue
        else:
            kind, got = "copy", shape
            if dtype == FP8_DTYPE or (
                dtype in (torch.int8, torch.uint8) and targets[n].is_floating_point()
            ):
                report.mismatched.append(f"{n}: quantised ({dtype}) but no {scale_name} found")
                continue
        if tuple(got) != want:
            report.mismatched.append(f"{n}: checkpoint {list(got)} vs model {list(want)}")
            continue
        plans[n] = _Plan(n, k, scale_key, kind)
    for n in names:
        if n.endswith(".scale") and n not in used and n[: -len("scale")] + "weight" not in names:
            report.unexpected.append(n)
    report.missing = sorted(
        set(targets) - set(plans) - {m.split(":")[0] for m in report.mismatched}
    )
    return plans


@torch.no_grad()
def load_official(
    model: torch.nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    progress: bool = True,
) -> LoadReport:
    """Load official DeepSeek-V4 weights into ``model`` (parameters and persistent buffers).

    Args:
        model: a V4Model (or any module whose state-dict keys are the official names), with
            materialised (non-meta) tensors.
        path_or_state_dict: a directory of ``model*.safetensors`` shards (with or without
            ``model.safetensors.index.json``), one ``.safetensors`` file, or a dict of tensors.
        strict: raise ``CheckpointMismatchError`` naming every missing, unexpected and
            mismatched key before anything is written; False loads what matches and returns
            the report.
        progress: show a tqdm bar over the tensors.
    Returns:
        LoadReport with the loaded keys and the ones that did not match.
    """
    targets = model.state_dict(keep_vars=True)
    meta = [k for k, t in targets.items() if t.is_meta]
    if meta:
        raise ValueError(
            f"model has {len(meta)} tensors on the meta device (e.g. {meta[0]!r}); "
            "materialise it first (module.to_empty(device=...))"
        )
    src = _Source(path_or_state_dict)
    report = LoadReport()
    plans = _plan(src, targets, report)
    if strict and not report.ok:
        raise CheckpointMismatchError(report.message())
    by_src = {p.src: p for p in plans.values()}
    bar = tqdm(total=len(plans), desc="load", unit="tensor", disable=not progress)
    for _, keys in src.by_file():
        for k in keys:
            p = by_src.get(k)
            if p is None:
                continue
            dst = targets[p.key]
            t = src.get(k)
            if p.kind == "fp8":
                t = dequantize_fp8_weight(t, src.get(p.scale), dst.dtype)
            elif p.kind == "fp4":
                t = dequantize_fp4_weight(t, src.get(p.scale), dst.dtype)
            dst.copy_(t.to(dst.dtype))
            report.loaded.append(p.key)
            bar.update(1)
    bar.close()
    return report


# ------------------------------------------------------------------------------- own format


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s state dict (dtypes as they are) and config to one safetensors file."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        raise ValueError(f"model {type(model).__name__} has no dataclass config in .cfg")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(_config_dict(cfg))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def read_config(path: str | os.PathLike):
    """The V4Config stored in a checkpoint written by ``save``."""
    from policy.config import V4Config

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise ValueError(f"{path} is not a checkpoint written by policy.checkpoint.save")
    return V4Config(**json.loads(meta["config"]))


def load(model_or_config: Any, path: str | os.PathLike | None = None):
    """Load a checkpoint written by ``save``.

    ``load(path)`` builds a V4Model from the stored config; ``load(config, path)`` builds one
    from ``config``; ``load(model, path)`` fills an existing model. Keys and shapes must match
    exactly (``CheckpointMismatchError`` names the offenders). Returns the model.
    """
    from policy.config import V4Config
    from policy.model import V4Model

    if path is None:
        if not isinstance(model_or_config, str | os.PathLike):
            raise ValueError("load(path) or load(model_or_config, path)")
        path, model_or_config = model_or_config, None
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if model_or_config is None:
        model = V4Model(read_config(path))
    elif isinstance(model_or_config, V4Config):
        model = V4Model(model_or_config)
    elif isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        raise ValueError(
            f"expected a V4Model, a V4Config or None, got {type(model_or_config).__name__}"
        )
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    targets = model.state_dict()
    report = LoadReport(
        missing=sorted(set(targets) - set(state)),
        unexpected=sorted(set(state) - set(targets)),
        mismatched=[
            f"{k}: checkpoint {list(state[k].shape)} vs model {list(targets[k].shape)}"
            for k in sorted(set(state) & set(targets))
            if state[k].shape != targets[k].shape
        ],
    )
    if not report.ok:
        raise CheckpointMismatchError(report.message())
    model.load_state_dict(state, strict=True)
    return model
