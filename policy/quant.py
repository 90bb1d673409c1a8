"""FP8 (e4m3) and FP4 (e2m1) block quantisation with power-of-two (ue8m0) scales.

Formats (V4_SPEC.md §3, §8, §9.1):

- FP8 e4m3fn values (max 448) with one ue8m0 scale per ``block`` elements along the last dim:
  the KV cache (block 64), activations (block 128) and weights (128×128 tiles).
- FP4 e2m1 values (max 6), two per byte (low nibble = even element), with one ue8m0 scale per 32
  elements: indexer keys/queries and routed-expert weights (MXFP4).
- ue8m0 (``torch.float8_e8m0fnu``): one byte ``b``, value 2^(b − 127); byte 255 is NaN.

Scale rule: ``scale = 2^ceil(log2(amax / qmax))`` per block (qmax 448 or 6), the smallest power of
two with ``amax / scale <= qmax``, computed exactly (no float log rounding) and clamped to the
e8m0 range [2^-127, 2^127]. An all-zero block gets the smallest scale 2^-127 and quantises to
zeros. The official kernels floor amax at 1e-4 (FP8) and 6 · 2^-126 (FP4); ``amax_floor`` applies
that (``numerics="official"``); without it, blocks whose amax is below the floor keep their
precision instead of flushing towards zero.

Official inference numerics (the last section, ``V4Config.numerics == "official"``): the FP8
activation rule at the input of the GEMMs whose weight is FP8 / FP4 in the official checkpoint,
with fp32 accumulation per 128-wide K block; BF16 rounding before every quantiser; index scores
in BF16; attention q·K and P·V with BF16 operands; the per-head query RMS norm in BF16.

Special values:

- ``±inf`` does not take part in the block's amax and saturates to ``±qmax · scale``; finite
  values beyond ``qmax · scale`` cannot occur by construction, and with an explicit ``scale``
  they saturate too (values are clamped before every cast, so results do not depend on the
  device's cast behaviour).
- ``NaN``: FP8 keeps NaN per element (e4m3fn has a NaN) and the block's other values are
  quantised as if it were absent. FP4 has no NaN code, so a block holding a NaN gets the e8m0 NaN
  scale (byte 255, the OCP MX convention) and its whole block dequantises to NaN.

On CPU, fp8 tensors support casts, views and copies but no arithmetic, and
``torch.float4_e2m1fn_x2`` supports no casts at all (PLATFORM.md §3): every computation here runs
in fp32 and FP4 data is kept as uint8 nibbles decoded through a 16-entry table.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float8_e8m0fnu
WEIGHT_BLOCK = 128
FP4_BLOCK = 32
ACT_BLOCK = 128  # official FP8 activation blocks along K
FP8_AMAX_FLOOR = 1e-4  # official floor of the FP8 amax (an fp32 constant)
FP4_AMAX_FLOOR = 6.0 * 2.0**-126  # official floor of the FP4 amax: scale >= 2^-126

E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
E8M0_NAN_BYTE = 255

# e2m1 code -> value (V4_SPEC.md §9.1): bits 0-2 magnitude, bit 3 sign.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = tuple(_E2M1_MAGNITUDES) + tuple(-v for v in _E2M1_MAGNITUDES)
# Midpoints between consecutive magnitudes; a tie rounds to the even code (round half to even).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# --------------------------------------------------------------------------------------------
# ue8m0 scales
# --------------------------------------------------------------------------------------------


def e8m0_from_exponent(exp: torch.Tensor) -> torch.Tensor:
    """Integer exponents e (any int dtype, clamped to [-127, 127]) -> e8m0 tensor 2^e."""
    byte = (exp.to(torch.int32).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + 127).to(torch.uint8)
    return byte.view(SCALE_DTYPE)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode scales to fp32 exactly: byte b -> 2^(b − 127), byte 255 -> NaN.

    Accepts ``float8_e8m0fnu`` or ``uint8`` tensors (the raw bytes); any other floating tensor is
    taken to hold the scale values already and is returned as fp32.
    """
    if scale.dtype == SCALE_DTYPE:
        byte = scale.view(torch.uint8)
    elif scale.dtype == torch.uint8:
        byte = scale
    elif scale.is_floating_point():
        return scale.to(torch.float32)
    else:
        raise ValueError(f"scale dtype {scale.dtype} is not float8_e8m0fnu, uint8 or a float")
    return _e8m0_table(byte.device)[byte.long()]


def _e8m0_bits(b: torch.Tensor) -> torch.Tensor:
    """Bytes b (int32) -> fp32 2^(b − 127), built as bit patterns (no libm involved)."""
    bits = b << 23  # exponent field b, zero mantissa
    bits = torch.where(b == 0, torch.full_like(bits, 1 << 22), bits)  # 2^-127 is subnormal
    bits = torch.where(b == E8M0_NAN_BYTE, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


@functools.cache
def _normal_fp32(v: float) -> bool:
    """v is a normal fp32 number (exactly representable, >= 2^-126)."""
    return v >= 2.0**-126 and struct.unpack("<f", struct.pack("<f", v))[0] == v


_E8M0_TABLES: dict[torch.device, torch.Tensor] = {}


def _e8m0_table(device: torch.device) -> torch.Tensor:
    """The 256 e8m0 values as fp32 [256] on ``device`` (one lookup decodes any scale tensor)."""
    table = _E8M0_TABLES.get(device)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = _e8m0_bits(torch.arange(256, dtype=torch.int32, device=device))
        _E8M0_TABLES[device] = table
    return table


def _exp2_exact(exp: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e (clamped to [-127, 127]), exactly."""
    return _e8m0_table(exp.device)[(exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + 127).long()]


def _block_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest integer e with amax <= qmax · 2^e, clamped to the e8m0 range. amax >= 0, finite.

    Returns int32 exponents; amax == 0 gives the minimum exponent.

    fp32 amax with a tiny bound qmax · 2^-127 that is a normal fp32 (qmax 448 and 6): exactly from
    the binary exponents, a = m · 2^k and qmax = mq · 2^kq with m, mq in [0.5, 1) give
    e = k − kq + (m > mq). Otherwise (any other dtype or qmax) via float64 log2 with fix-ups.
    """
    mq, kq = math.frexp(qmax)
    tiny = qmax * 2.0**E8M0_MIN_EXP
    if amax.dtype == torch.float32 and _normal_fp32(tiny):
        m, k = torch.frexp(amax.clamp(min=tiny))
        return (k - kq + (m > mq)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).to(torch.int32)
    a = amax.to(torch.float64)
    a = torch.clamp(a, min=tiny)
    e = torch.ceil(torch.log2(a / qmax))
    # log2 may be off by one ulp near powers of two: fix up against exact float64 products.
    e = torch.where(a > qmax * torch.exp2(e), e + 1, e)
    e = torch.where(a <= qmax * torch.exp2(e - 1), e - 1, e)
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).to(torch.int32)


def _finite_amax(xb: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Max |x| over ``dims`` ignoring NaN and ±inf (0 for a block with no finite value)."""
    return xb.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=dims)


def _floored_amax(xb: torch.Tensor, floor: float) -> torch.Tensor:
    """Finite amax over the last dim of blocks xb [..., n, block], at least ``floor`` (fp32)."""
    amax = _finite_amax(xb, (-1,))
    return amax.clamp(min=floor) if floor else amax


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (FP8_DTYPE, SCALE_DTYPE):
        raise ValueError(f"{name} must be a float32/bfloat16/float16 tensor, got {x.dtype}")


def _check_block(x: torch.Tensor, block: int, name: str = "x") -> None:
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.shape[-1] % block != 0:
        raise ValueError(f"last dim of {name} ({x.shape[-1]}) is not divisible by block={block}")


def _check_scale_shape(q_shape: torch.Size, d: int, scale: torch.Tensor, block: int) -> None:
    want = (*q_shape[:-1], d // block)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match {want} (block={block})")


# --------------------------------------------------------------------------------------------
# FP8 e4m3, blocks along the last dim
# --------------------------------------------------------------------------------------------


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scale -> e4m3fn, saturating at ±448 (NaN kept)."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8(
    x: torch.Tensor, block: int, *, scale: torch.Tensor | None = None, amax_floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise to FP8 e4m3 with one power-of-two scale per ``block`` elements of the last dim.

    Args:
        x: float tensor [..., D], D divisible by ``block``.
        block: elements per scale (64 for the KV cache, 128 for activations).
        scale: optional fixed scales [..., D // block] (e8m0 or float powers of two); values that
            do not fit saturate to ±448 · scale. Default: the dynamic rule of the module doc.
        amax_floor: the dynamic rule takes max(amax, amax_floor) (fp32); 0 = none,
            ``FP8_AMAX_FLOOR`` = the official kernels' 1e-4.

    Returns:
        q: float8_e4m3fn [..., D]; scale: float8_e8m0fnu [..., D // block], x ≈ q · scale.
    """
    _check_float(x, "x")
    _check_block(x, block)
    d = x.shape[-1]
    xb = x.to(torch.float32).reshape(*x.shape[:-1], d // block, block)
    if scale is None:
        exp = _block_exponent(_floored_amax(xb, amax_floor), FP8_MAX)
        scale = e8m0_from_exponent(exp)
        inv = _exp2_exact(-exp)
    else:
        _check_scale_shape(x.shape, d, scale, block)
        inv = 1.0 / e8m0_to_float(scale)
        scale = scale if scale.dtype == SCALE_DTYPE else _float_to_e8m0(scale)
    q = _to_fp8(xb * inv.unsqueeze(-1)).reshape(x.shape)
    return q, scale


def _float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Positive power-of-two float scales -> e8m0 (raises if a value is not a power of two)."""
    s32 = s.to(torch.float32)
    mant, exp = torch.frexp(s32)
    if not bool(((mant == 0.5) | torch.isnan(s32)).all()):
        raise ValueError("explicit scales must be positive powers of two (ue8m0)")
    byte = torch.where(torch.isnan(s32), E8M0_NAN_BYTE, (exp - 1).clamp(-127, 127) + 127)
    return byte.to(torch.uint8).view(SCALE_DTYPE)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """FP8 [..., D] with scales [..., D // block] -> ``dtype`` [..., D] (computed in fp32)."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be float8_e4m3fn, got {q.dtype}")
    _check_block(q, block, "q")
    d = q.shape[-1]
    _check_scale_shape(q.shape, d, scale, block)
    qb = q.to(torch.float32).reshape(*q.shape[:-1], d // block, block)
    return (qb * e8m0_to_float(scale).unsqueeze(-1)).reshape(q.shape).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``fq`` (the quantised values); backward passes the gradient to x as is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        return fq

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quant_fp8(x: torch.Tensor, block: int, *, amax_floor: float = 0.0) -> torch.Tensor:
    """dequantize_fp8(quantize_fp8(x)) in x's dtype [..., D]; straight-through gradient."""
    with torch.no_grad():
        q, s = quantize_fp8(x.detach(), block, amax_floor=amax_floor)
        fq = dequantize_fp8(q, s, block, x.dtype)
    return _StraightThrough.apply(x, fq) if x.requires_grad else fq


# --------------------------------------------------------------------------------------------
# FP4 e2m1 (MXFP4), packed two per byte
# --------------------------------------------------------------------------------------------


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scale -> e2m1 codes (uint8 0..15), saturating at ±6.

    Round to nearest, ties to the even code. NaN gives code 0 (the caller marks its block).
    The magnitude code is the number of midpoints below |y|; on small tensors (decode) counted by
    one ``bucketize`` over boundaries where a midpoint whose tie goes up is replaced by the fp32
    just below it.
    """
    a = y.abs().nan_to_num(nan=0.0)  # inf stays inf and lands on the top code
    if a.numel() <= BUCKETIZE_MAX_NUMEL:
        mag = torch.bucketize(a, _e2m1_bounds(y.device)).to(torch.uint8)
    else:  # the same count, one comparison per midpoint (faster on large tensors)
        mag = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
        for i, m in enumerate(_E2M1_MIDPOINTS):
            # midpoint i lies between codes i and i+1: the tie goes up only when i+1 is even.
            up = (a >= m) if i % 2 == 1 else (a > m)
            mag += up.to(torch.uint8)
    sign = (torch.signbit(y) & ~torch.isnan(y)).to(torch.uint8) << 3
    return mag | sign


BUCKETIZE_MAX_NUMEL = 4096
_E2M1_BOUNDS: dict[torch.device, torch.Tensor] = {}


def _e2m1_bounds(device: torch.device) -> torch.Tensor:
    """fp32 [7]: code i+1 starts above bound i. Midpoint i lies between codes i and i+1; the tie
    goes up only when i+1 is even (odd i), so there the bound is the fp32 just below it."""
    bounds = _E2M1_BOUNDS.get(device)
    if bounds is None:
        with torch.inference_mode(False), torch.no_grad():
            mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32)
            below = torch.nextafter(mids, torch.zeros_like(mids))
            odd = torch.arange(len(_E2M1_MIDPOINTS)) % 2 == 1
            bounds = torch.where(odd, below, mids).to(device)
        _E2M1_BOUNDS[device] = bounds
    return bounds


_E2M1_LUT: dict[torch.device, torch.Tensor] = {}


def _e2m1_lut(device: torch.device) -> torch.Tensor:
    """fp32 [16]: the value of each e2m1 code (built once per device)."""
    lut = _E2M1_LUT.get(device)
    if lut is None:
        with torch.inference_mode(False), torch.no_grad():
            lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
        _E2M1_LUT[device] = lut
    return lut


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [..., D] (D even) -> packed uint8 [..., D // 2], low nibble = even."""
    if codes.shape[-1] % 2 != 0:
        raise ValueError(f"last dim ({codes.shape[-1]}) must be even to pack FP4 pairs")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 (or int8) [..., D // 2] -> e2m1 codes uint8 [..., D]."""
    if packed.dtype not in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        raise ValueError(f"packed FP4 must be uint8, int8 or float4_e2m1fn_x2, got {packed.dtype}")
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def quantize_fp4(
    x: torch.Tensor, block: int = FP4_BLOCK, *, amax_floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise to FP4 e2m1 with one power-of-two scale per ``block`` elements of the last dim.

    Args:
        x: float tensor [..., D], D divisible by ``block`` (and even).
        block: elements per scale (32 for MXFP4).
        amax_floor: the scale rule takes max(amax, amax_floor); 0 = none, ``FP4_AMAX_FLOOR`` =
            the official kernels' 6 · 2^-126.

    Returns:
        packed: uint8 [..., D // 2] (element 2k in the low nibble of byte k, 2k+1 in the high);
        scale: float8_e8m0fnu [..., D // block] (NaN for a block that holds a NaN).
    """
    _check_float(x, "x")
    _check_block(x, block)
    if block % 2 != 0:
        raise ValueError(f"FP4 block must be even to pack pairs, got block={block}")
    d = x.shape[-1]
    xb = x.to(torch.float32).reshape(*x.shape[:-1], d // block, block)
    exp = _block_exponent(_floored_amax(xb, amax_floor), FP4_MAX)
    scale = e8m0_from_exponent(exp)
    has_nan = torch.isnan(xb).any(dim=-1)
    if bool(has_nan.any()):
        byte = torch.where(has_nan, E8M0_NAN_BYTE, scale.view(torch.uint8).to(torch.int32))
        scale = byte.to(torch.uint8).view(SCALE_DTYPE)
    codes = _e2m1_codes(xb * _exp2_exact(-exp).unsqueeze(-1)).reshape(x.shape)
    return pack_fp4(codes), scale


def dequantize_fp4(
    packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK, dtype=torch.float32
) -> torch.Tensor:
    """Packed FP4 uint8/int8 [..., D // 2] with scales [..., D // block] -> ``dtype`` [..., D]."""
    codes = unpack_fp4(packed)
    _check_block(codes, block, "unpacked FP4")
    d = codes.shape[-1]
    _check_scale_shape(codes.shape, d, scale, block)
    vals = _e2m1_lut(codes.device)[codes.long()]
    vb = vals.reshape(*codes.shape[:-1], d // block, block) * e8m0_to_float(scale).unsqueeze(-1)
    return vb.reshape(codes.shape).to(dtype)


def fake_quant_fp4(
    x: torch.Tensor, block: int = FP4_BLOCK, *, amax_floor: float = 0.0
) -> torch.Tensor:
    """dequantize_fp4(quantize_fp4(x)) in x's dtype [..., D], bit for bit; straight-through
    gradient.

    Small tensors (the indexer's queries at every decode step) skip the codes: each value is
    rounded to its e2m1 magnitude (``_e2m1_codes``'s midpoint count, one ``bucketize``) with
    x's sign, times the block scale, and a block holding a NaN is all NaN (its scale is
    ue8m0's NaN). Dividing by the power-of-two scale rounds exactly as multiplying by its
    reciprocal does. About half the tensor ops of the round trip, which large tensors keep
    (there its byte-sized passes are cheaper than the direct path's gathers).
    """
    with torch.no_grad():
        xd = x.detach()
        if xd.numel() > BUCKETIZE_MAX_NUMEL:
            p, s = quantize_fp4(xd, block, amax_floor=amax_floor)
            fq = dequantize_fp4(p, s, block, x.dtype)
        else:
            fq = _fp4_round_small(xd, block, amax_floor).to(x.dtype)
    return _StraightThrough.apply(x, fq) if x.requires_grad else fq


def _fp4_round_small(x: torch.Tensor, block: int, amax_floor: float) -> torch.Tensor:
    """The direct path of ``fake_quant_fp4`` -> fp32 [..., D]."""
    _check_float(x, "x")
    _check_block(x, block)
    d = x.shape[-1]
    xb = x.to(torch.float32).reshape(*x.shape[:-1], d // block, block)
    scale = _exp2_exact(_block_exponent(_floored_amax(xb, amax_floor), FP4_MAX)).unsqueeze(-1)
    y = xb / scale
    mag = torch.bucketize(y.abs().nan_to_num(nan=0.0), _e2m1_bounds(y.device))
    scale = torch.where(xb.isnan().any(dim=-1, keepdim=True), float("nan"), scale)
    return (torch.copysign(_e2m1_lut(y.device)[mag], y) * scale).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Weights in the official checkpoint formats (V4_SPEC.md §9.1)
# --------------------------------------------------------------------------------------------


def _check_matrix(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [out, in] matrix, got shape {tuple(w.shape)}")


def quantize_fp8_weight(
    w: torch.Tensor, block: int = WEIGHT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight with one ue8m0 scale per ``block``×``block`` tile (edge tiles may be partial).

    Args:
        w: float [out, in].
    Returns:
        w_fp8: float8_e4m3fn [out, in]; scale: float8_e8m0fnu [ceil(out/block), ceil(in/block)].
    """
    _check_float(w, "w")
    _check_matrix(w, "w")
    out_f, in_f = w.shape
    po, pi = math.ceil(out_f / block), math.ceil(in_f / block)
    wp = torch.zeros(po * block, pi * block, dtype=torch.float32, device=w.device)
    wp[:out_f, :in_f] = w.to(torch.float32)
    tiles = wp.reshape(po, block, pi, block)
    exp = _block_exponent(_finite_amax(tiles, (1, 3)), FP8_MAX)
    inv = _exp2_exact(-exp)[:, None, :, None]
    q = _to_fp8(tiles * inv).reshape(po * block, pi * block)[:out_f, :in_f].contiguous()
    return q, e8m0_from_exponent(exp)


def dequantize_fp8_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: int = WEIGHT_BLOCK,
) -> torch.Tensor:
    """FP8 [out, in] with tile scales [ceil(out/block), ceil(in/block)] -> ``dtype`` [out, in]."""
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {w.dtype}")
    _check_matrix(w, "w")
    out_f, in_f = w.shape
    want = (math.ceil(out_f / block), math.ceil(in_f / block))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"FP8 weight scale shape {tuple(scale.shape)} does not match {want} for weight "
            f"{tuple(w.shape)} with {block}x{block} blocks"
        )
    s = e8m0_to_float(scale)
    s = s.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (w.to(torch.float32) * s).to(dtype)


def quantize_fp4_weight(
    w: torch.Tensor, block: int = FP4_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weight as stored in the official checkpoint.

    Args:
        w: float [out, in], in divisible by ``block``.
    Returns:
        packed: int8 [out, in/2] (two e2m1 codes per byte, low nibble = even column);
        scale: float8_e8m0fnu [out, in/block].
    """
    _check_matrix(w, "w")
    packed, scale = quantize_fp4(w, block)
    return packed.view(torch.int8), scale


def dequantize_fp4_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: int = FP4_BLOCK,
) -> torch.Tensor:
    """Packed FP4 int8/uint8 [out, in/2] with scales [out, in/block] -> ``dtype`` [out, in]."""
    _check_matrix(w, "w")
    return dequantize_fp4(w, scale, block, dtype)


def fp4_to_fp8_weight(
    w: torch.Tensor, scale: torch.Tensor, block: int = WEIGHT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Re-express an MXFP4 weight as an FP8 weight with ``block``×``block`` tile scales.

    The FP4-QAT forward path (V4_SPEC.md §12.1): e2m1 values carry at most two significant bits,
    so each tile is exact in e4m3 while the 1×32 scales inside it span a small enough range
    (about 2^14 with e4m3 subnormals); ``lossless`` says whether that held for this weight.

    Args:
        w: packed FP4 int8/uint8 [out, in/2]; scale: e8m0 [out, in/32].
    Returns:
        (w_fp8 [out, in], scale e8m0 [⌈out/block⌉, ⌈in/block⌉], lossless).
    """
    exact = dequantize_fp4_weight(w, scale, torch.float32)
    q, s = quantize_fp8_weight(exact, block)
    lossless = bool(torch.equal(dequantize_fp8_weight(q, s, torch.float32, block), exact))
    return q, s, lossless


# --------------------------------------------------------------------------------------------
# Official inference numerics (V4Config.numerics == "official")
# --------------------------------------------------------------------------------------------


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round x to ``dtype`` and back (straight-through gradient)."""
    if dtype == x.dtype or (dtype == torch.float32 and x.dtype == torch.float64):
        return x
    return x + (x.detach().to(dtype).to(x.dtype) - x.detach())


def fake_quant_act(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """The official FP8 activation rule: x [..., K] -> BF16 -> FP8 e4m3 with one ue8m0 scale per
    ``block`` elements along K, amax floored at 1e-4 -> dequantised, in x's dtype (exact: e4m3
    times a power of two fits BF16), straight-through gradient. When ``block`` does not divide K
    the last block is the K % block remaining elements (zero padding does not move an amax)."""
    k = x.shape[-1]
    pad = -k % block
    xb = round_to(x, torch.bfloat16)
    if pad:
        xb = torch.nn.functional.pad(xb, (0, pad))
    return fake_quant_fp8(xb, block, amax_floor=FP8_AMAX_FLOOR)[..., :k]


def act_quant_linear(x: torch.Tensor, weight: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T with the official FP8 GEMM numerics -> [..., N] in x's dtype.

    The input goes through ``fake_quant_act``; the product accumulates in fp32 one ``block``-wide
    slice of K at a time, the slices' partial sums added in order (the kernel's scales are powers
    of two, so applying them before or after a slice's sum is the same).
    """
    xq = fake_quant_act(x, block).float()
    w = weight.float()
    y = torch.nn.functional.linear(xq[..., :block], w[:, :block])
    for a in range(block, x.shape[-1], block):
        y = y + torch.nn.functional.linear(xq[..., a : a + block], w[:, a : a + block])
    return y.to(x.dtype)


def bf16_unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head query RMS norm in BF16 arithmetic: with xb = BF16(x), each step rounded to BF16,
    xb * rsqrt(mean(xb^2) + eps), the mean accumulated in fp32 (explicitly: torch's own BF16
    reductions round differently from one tensor shape to another). x [..., c] -> x's dtype;
    the gradient is that of the fp32 formula (straight-through)."""
    bf16 = torch.bfloat16
    xb = x.detach().to(bf16).float()
    sq = (xb * xb).to(bf16).float()
    ms = sq.mean(-1, keepdim=True).to(bf16).float()
    r = torch.rsqrt((ms + eps).to(bf16).float()).to(bf16).float()
    y = (xb * r).to(bf16).to(x.dtype)
    if not x.requires_grad:
        return y
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ref + (y - ref).detach()


def bf16_index_weights(wx: torch.Tensor, scale: float) -> torch.Tensor:
    """Indexer head weights: BF16(BF16(weights_proj(x)) [..., h] times fp32 ``scale``) -> BF16."""
    bf16 = torch.bfloat16
    return (wx.detach().to(bf16).float() * torch.tensor(scale, dtype=torch.float32)).to(bf16)


def bf16_index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Official index scores, q [B, S, h, c], w [B, S, h], k [B, N, c] -> [B, S, N] BF16:
    q·k with BF16 operands (fp32 accumulation, rounded to BF16), ReLU, times BF16 w (products
    rounded to BF16), summed over heads in fp32 and rounded to BF16 once. The fp32 accumulation
    is explicit (torch's BF16 matmul and sum round differently from one shape to another).
    No gradient."""
    s, h = q.shape[1:3]
    bf16 = torch.bfloat16
    with torch.no_grad():
        qb = q.to(bf16).float().flatten(1, 2)
        kb = k.to(bf16).float().transpose(1, 2)
        logits = torch.matmul(qb, kb).to(bf16).float().relu_().unflatten(1, (s, h))
        prod = (logits * w.to(bf16).float().unsqueeze(-1)).to(bf16).float()  # [B, S, h, N]
        return prod.sum(dim=2).to(bf16)


def bf16_attention(
    q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Shared-KV attention with a sink (``policy.kernels.sparse_attention``'s shapes and rule)
    in the official numerics: logits = (BF16 q · BF16 k) accumulated in fp32, times ``scale``;
    p = exp(logits - max) in fp32, which also gives the denominator (+ exp(sink - max));
    o = (BF16 p · BF16 v) accumulated in fp32, / denominator, in q's dtype. BF16 roundings have a
    straight-through gradient. The max is the row's global one (the kernel's running max over key
    blocks rescales the same values)."""
    from policy.kernels import sparse_attention

    return sparse_attention(q, kv, allowed, sink, scale, bf16=True)
