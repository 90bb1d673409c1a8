"""Numerics of the official inference (``V4Config.numerics``), each rule against a restatement
written here from the rule's words, plus the cached-path equivalence in official mode.

Restatements: the FP8 / FP4 value is the nearest grid value (ties to the even code) picked from
the list of all e4m3 / e2m1 values, the scale exponent is found by doubling, sums run in float64
and every BF16 rounding point is written out. Bitwise wherever the fp32 arithmetic of the rule
is exact; the attention core (fp32 exp) is compared with a tolerance well below its BF16 effect.

Equivalence criteria as in test_kv_cache / test_continuation: per layer (same layer input on
both paths), >= 99% of outputs within 1e-4; whole model, logits within 1e-5 (bf16 model: every
rounding point lands on BF16 values, so no fp32-reordering flip was seen; the fp32 model's flips
make whole-model comparisons of quantised paths unstable, as there). Official mode runs on both
attention layouts: the block-sparse one (the default: the cached-path tests above run on it)
against the dense one as in test_blocksparse (1e-5 per layer, fp32).

The Hadamard rotation of indexer queries and keys returns BF16 before FP4 (every mode).
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import policy.kernels
from policy.attention import Attention
from policy.compressor import hadamard, quantize_index, quantize_kv
from policy.config import V4Config
from policy.engine import Engine, SamplingParams
from policy.kv_cache import LayerCache
from policy.kv_layout import KVLayout
from policy.losses import forward_logprobs, make_batch
from policy.model import V4Model
from policy.quant import (
    FP8_DTYPE,
    act_quant_linear,
    bf16_attention,
    bf16_index_scores,
    bf16_index_weights,
    bf16_unit_rms,
    dequantize_fp4,
    fake_quant_act,
    quantize_fp4,
)
from tests.policy.test_kv_cache import _attn_layer, _layer_decode

BF16 = torch.bfloat16


# ------------------------------------------------------------------ restatements of the rules
def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to BF16, as float64."""
    return x.to(torch.float32).to(BF16).double()


def _grid_fp8() -> torch.Tensor:
    b = torch.arange(128, dtype=torch.uint8)  # non-negative codes; 0x7F is NaN
    return b[:127].view(FP8_DTYPE).double()


GRID_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _nearest_even(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """|y| (float64, <= grid max) -> nearest grid value, ties to the even code (index)."""
    d = (grid[None, :] - y.abs().reshape(-1, 1)).abs()
    best = d.min(dim=1, keepdim=True).values
    code = torch.arange(len(grid))
    tied = d == best
    pick = torch.where(tied.sum(1) > 1, (tied & (code % 2 == 0)).int().argmax(1), d.argmin(1))
    return grid[pick].reshape(y.shape) * torch.sign(y)


def _block_rule(x: torch.Tensor, block: int, qmax: float, grid, floor: float) -> torch.Tensor:
    """Quantise-dequantise float64 x [..., K] per ``block`` of the last dim: scale 2^e with e
    the smallest integer where max(amax, floor) <= qmax * 2^e (e >= -127)."""
    xb = x.reshape(-1, block)
    amax = xb.abs().amax(-1).clamp(min=floor)
    e = torch.full_like(amax, -127.0)
    while bool((amax > qmax * 2.0**e).any()):  # one doubling at a time
        e = torch.where(amax > qmax * 2.0**e, e + 1, e)
    sc = (2.0**e)[:, None]
    return (_nearest_even((xb / sc).clamp(-qmax, qmax), grid) * sc).reshape(x.shape)


FLOOR_FP8 = float(torch.tensor(1e-4, dtype=torch.float32))  # the fp32 constant 1e-4
FLOOR_FP4 = 6 * 2.0**-126


def _act_rule(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """BF16 first, FP8 per 128 along K (last block may be shorter), amax floor 1e-4."""
    k = x.shape[-1]
    parts = [
        _block_rule(_bf16(x[..., a : a + block]), min(block, k - a), 448.0, _grid_fp8(), FLOOR_FP8)
        for a in range(0, k, block)
    ]
    return torch.cat(parts, dim=-1)


def _adversarial(k: int) -> torch.Tensor:
    """Rows of K values: zeros, values below the floors, denormals, 448 and 6 times powers of
    two and their fp32 neighbours, midpoints between e4m3 values, random BF16 values."""
    f32 = torch.float32
    rows = [torch.zeros(k), torch.full((k,), 3e-5), torch.full((k,), 1e-40)]
    rows.append(torch.linspace(-1e-4, 1e-4, k))
    for v in (448.0, 6.0):
        for p in (-130, -126, -20, -1, 0, 3):
            base = torch.tensor(v * 2.0**p, dtype=f32)
            up = torch.nextafter(base, torch.tensor(math.inf))
            down = torch.nextafter(base, torch.tensor(0.0))
            row = torch.randn(k) * float(base) / 4
            row[:3] = torch.stack((base, up, down))
            rows.append(row)
    mids = (_grid_fp8()[1:] + _grid_fp8()[:-1]) / 2  # ties of e4m3 at scale 1 (amax 448)
    row = mids[torch.randint(0, len(mids), (k,))].float()
    row[0] = 448.0
    rows.append(row)
    rows.append(torch.randn(k).to(BF16).float())
    rows.append(torch.randn(k) * 10.0 ** torch.randint(-8, 4, (k,)))
    return torch.stack(rows)


# ------------------------------------------------------------------ the rules, bitwise
@pytest.mark.parametrize("k", [128, 256, 96, 200])
def test_activation_rule(k):
    torch.manual_seed(k)
    x = torch.cat((_adversarial(k), torch.randn(20, k)))
    assert torch.equal(fake_quant_act(x).double(), _act_rule(x))
    xb = x.to(BF16)  # BF16 activations (a bf16 model) take the same rule
    assert torch.equal(fake_quant_act(xb).double(), _act_rule(xb.float()))


def test_activation_floor_and_bf16_step_matter():
    x = torch.full((1, 128), 3e-5)  # below the floor: scale 2^-22, 3e-5 / 2^-22 = 125.8 -> 128
    assert float(fake_quant_act(x)[0, 0]) == 128 * 2.0**-22
    # fp32 values that BF16 moves to another FP8 value
    torch.manual_seed(0)
    y = torch.randn(64, 128)
    from policy.quant import fake_quant_fp8

    assert not torch.equal(fake_quant_act(y), fake_quant_fp8(y, 128))


def test_act_quant_linear_accumulates_per_k_block():
    """Exact data (integer weights, activations on a coarse grid): the result is the float64
    sum of the rule's quantised activations times the weights, bitwise; and in general it is the
    in-order sum of fp32 per-block products of the rule's activations."""
    torch.manual_seed(1)
    x = torch.randint(-15, 16, (6, 200)).float() * 2.0 ** torch.randint(-6, 3, (6, 1))
    w = torch.randint(-4, 5, (24, 200)).float()
    want = (_act_rule(x) @ w.double().T).float()
    assert torch.equal(act_quant_linear(x, w), want)
    x, w = torch.randn(5, 3, 300), torch.randn(40, 300)
    q = _act_rule(x).float()
    want = sum(q[..., a : a + 128] @ w[:, a : a + 128].T for a in range(0, 300, 128))
    assert torch.equal(act_quant_linear(x, w), want)
    got = act_quant_linear(x.to(BF16), w.to(BF16))
    assert got.dtype == BF16
    assert torch.equal(got, act_quant_linear(x.to(BF16).float(), w.to(BF16).float()).to(BF16))


@pytest.mark.parametrize("kv_dtype", ["fp8"])
def test_kv_and_index_rules_official(kv_dtype):
    cfg = V4Config.from_preset("tiny", kv_dtype=kv_dtype, numerics="official")
    torch.manual_seed(2)
    kv = torch.cat((_adversarial(128), torch.randn(8, 128)))
    got = quantize_kv(kv, cfg).double()
    nope = _block_rule(_bf16(kv[:, :64]), 64, 448.0, _grid_fp8(), FLOOR_FP8)
    assert torch.equal(got, torch.cat((nope, _bf16(kv[:, 64:])), -1))
    want = _block_rule(_bf16(hadamard(kv)), 32, 6.0, GRID_FP4, FLOOR_FP4)  # fp32 rotation
    assert torch.equal(quantize_index(kv, cfg).double(), want)
    # the KV cache keeps the official values: quantising them again is exact
    lay = KVLayout.from_config(cfg)
    assert torch.equal(lay.unpack_main(lay.pack_main(quantize_kv(kv, cfg))), quantize_kv(kv, cfg))
    qi = quantize_index(kv, cfg)
    assert torch.equal(lay.unpack_index(lay.pack_index(qi)), qi)


def test_fp4_floor_rule():
    x = torch.cat((_adversarial(64), torch.randn(4, 64)))
    packed, scale = quantize_fp4(x, 32, amax_floor=FLOOR_FP4)
    want = _block_rule(x.double(), 32, 6.0, GRID_FP4, FLOOR_FP4)
    assert torch.equal(dequantize_fp4(packed, scale, 32).double(), want)
    packed, scale = quantize_fp4(x, 32)  # no floor: smaller scales for the tiniest blocks
    assert not torch.equal(dequantize_fp4(packed, scale, 32).double(), want)


def test_bf16_unit_rms_rule():
    torch.manual_seed(3)
    x = torch.cat((torch.randn(300, 128), torch.randn(20, 128) * 1e-3, torch.randn(20, 128) * 50))
    xb = _bf16(x)
    ms = _bf16(_bf16(xb * xb).mean(-1, keepdim=True))
    want = _bf16(xb * _bf16(1 / torch.sqrt(_bf16(ms + 1e-6))))
    assert torch.equal(bf16_unit_rms(x, 1e-6).double(), want)
    assert torch.equal(bf16_unit_rms(x.to(BF16), 1e-6).double(), want)
    g = x[:4].clone().requires_grad_()  # straight-through: the fp32 formula's gradient
    bf16_unit_rms(g, 1e-6).sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()


def test_bf16_index_scores_rule():
    torch.manual_seed(4)
    b, s, h, n, c = 2, 5, 4, 7, 128
    q = quantize_index(torch.randn(b, s, h, c), V4Config.from_preset("tiny"))
    k = quantize_index(torch.randn(b, n, c), V4Config.from_preset("tiny"))
    scale = c**-0.5 * h**-0.5
    wx = torch.randn(b, s, h)
    w = bf16_index_weights(wx, scale)
    assert w.dtype == BF16
    assert torch.equal(w.double(), _bf16(_bf16(wx) * float(torch.tensor(scale))))
    logits = _bf16(torch.einsum("bshc,bnc->bshn", _bf16(q), _bf16(k))).relu()
    want = _bf16((_bf16(logits * w.double()[..., None])).sum(2))
    got = bf16_index_scores(q, w, k)
    assert got.dtype == BF16 and torch.equal(got.double(), want)


def test_bf16_attention_rule():
    """q·K and P·V with BF16 operands, fp32 softmax; vs a float64 restatement with the same
    roundings (tolerance: fp32 exp noise) and far from it without the P rounding."""
    torch.manual_seed(5)
    b, s, h, n, c = 2, 6, 4, 20, 128
    q, kv = torch.randn(b, s, h, c), torch.randn(b, n, c)
    allowed = torch.rand(b, s, n) < 0.7
    allowed[..., 0] = True
    sink, scale = torch.randn(h), c**-0.5

    def restated(round_p: bool):
        lg = torch.einsum("bshc,bnc->bshn", _bf16(q), _bf16(kv)) * scale
        lg = lg.masked_fill(~allowed[:, :, None], -math.inf)
        mx = torch.maximum(lg.amax(-1), sink.double())
        p = torch.exp(lg - mx[..., None])
        den = p.sum(-1) + torch.exp(sink.double() - mx)
        pv = _bf16(p) if round_p else p
        return torch.einsum("bshn,bnc->bshc", pv, _bf16(kv)) / den[..., None]

    got = bf16_attention(q, kv, allowed, sink, scale).double()
    err = (got - restated(True)).abs().max()
    assert err < 1e-6, float(err)
    assert (got - restated(False)).abs().max() > 20 * err


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"numerics": "offical"}, "numerics must be one of .*'offical'"),
        ({"numerics": "official", "attn_impl": "triton"}, "attn_impl='triton'"),
    ],
)
def test_config_errors_name_the_bad_value(kw, match):
    with pytest.raises(ValueError, match=match):
        V4Config.from_preset("tiny", **kw)


# ------------------------------------------------------------------ cached paths, official mode
def _official_layer(kind: str, dtype: str) -> Attention:
    """A tiny-preset attention layer of ``kind`` in official numerics, FP8 cache, initialised
    as test_kv_cache._attn_layer (non-trivial norms, sink and ape)."""
    cfg = V4Config.from_preset("tiny", numerics="official")
    layer_id = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == kind)
    torch.manual_seed(0)
    attn = Attention(cfg, layer_id)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(("ape", "attn_sink")):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return attn.to(getattr(torch, dtype))


@pytest.mark.parametrize(
    "kind,dtype",  # bf16: CSA here, every kind in the whole-model test below
    [("swa", "float32"), ("csa", "float32"), ("hca", "float32"), ("csa", "bfloat16")],
)
def test_official_layer_prefill_decode_matches_full(kind, dtype):
    attn = _official_layer(kind, dtype)
    x = torch.randn(3, 26, 64, generator=torch.Generator().manual_seed(7)).to(attn.wkv.weight)
    with torch.no_grad():
        full = attn(x, torch.arange(26).expand(3, 26))
    got = _layer_decode(attn, x, [3, 11, 17])
    close = ((got.float() - full.float()).abs() <= 1e-4).float().mean()
    assert close >= 0.99, float(close)


@pytest.mark.parametrize("attn_path", ["blocksparse", "dense"])
@torch.no_grad()
def test_official_bf16_model_prefill_extend_decode_match_full(attn_path):
    torch.manual_seed(8)
    cfg = V4Config.from_preset("tiny", numerics="official", dtype="bfloat16", attn_path=attn_path)
    model = V4Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    full = model(ids)
    cache = model.new_cache(2, 16)
    got = [model.prefill(ids[:, :9], torch.tensor([9, 6]), cache)]
    want = [full[torch.arange(2), torch.tensor([8, 5])]]
    ext = model.extend(torch.stack((ids[0, 9:14], ids[1, 6:11])), torch.tensor([2, 5]), cache, True)
    got += [ext[0, :2], ext[1]]
    want += [full[0, 9:11], full[1, 6:11]]
    for _ in range(5):  # positions 11..15: the HCA block of 16 completes
        p = cache.pos.clone()
        got.append(model.decode(ids[torch.arange(2), p], cache))
        want.append(full[torch.arange(2), p])
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ block-sparse vs dense layout
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_official_blocksparse_layer_equals_dense(kind, monkeypatch):
    """The block-sparse layout (the default) against the dense one, official numerics, same
    fp32 layer and input, query chunks of one window block (S = 33 crosses the window and block
    boundaries): outputs, input and weight gradients within 1e-5. Both apply the same roundings
    to the same keys; only the fp32 summation order differs (measured: outputs <= 2.4e-7 apart,
    bitwise in one chunk; gradients <= 1.1e-6), while a rounding done differently moves an
    output by a BF16 step of p or an FP8 step at wo_b's input (~1e-3)."""
    attn = _official_layer(kind, "float32")
    dense = copy.deepcopy(attn)
    dense.cfg = attn.cfg.replace(attn_path="dense")
    monkeypatch.setattr(policy.kernels, "MAX_BLOCK_ELEMS", 1)
    g = torch.Generator().manual_seed(11)
    x, weight = torch.randn(2, 33, 64, generator=g), torch.randn(2, 33, 64, generator=g)
    pos = torch.arange(33).expand(2, 33)
    got = []
    for layer in (attn, dense):
        xi = x.clone().requires_grad_()
        out = layer(xi, pos)
        (out * weight).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        got.append((out.detach(), xi.grad, grads))
    (out, gx, grads), (want, wgx, wgrads) = got
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, wgx, atol=1e-5, rtol=0)
    assert grads.keys() == wgrads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, wgrads[name], atol=1e-5, rtol=0, msg=name)


@torch.no_grad()
def test_official_blocksparse_model_equals_dense():
    """Whole bf16 model, full forward: the block-sparse and the dense layout give the same
    logits (the whole-model criterion above, 1e-5; measured bitwise, also in fp32)."""
    torch.manual_seed(8)
    cfg = V4Config.from_preset("tiny", numerics="official", dtype="bfloat16")
    sparse = V4Model(cfg).eval()
    dense = V4Model(cfg.replace(attn_path="dense")).eval()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 41))
    torch.testing.assert_close(sparse(ids), dense(ids), atol=1e-5, rtol=0)


def test_official_training_step_has_gradients():
    """Training runs the official rounding with straight-through gradients."""
    torch.manual_seed(10)
    model = V4Model(V4Config.from_preset("tiny", numerics="official"))
    model.loss(torch.randint(0, 512, (1, 12)), mtp_weight=0.3).backward()
    for name in (
        "layers.0.attn.wq_a.weight",
        "layers.0.attn.wo_b.weight",
        "layers.1.ffn.shared_experts.w2.weight",
        "mtp.0.e_proj.weight",
    ):
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# ------------------------------------------------------------------ rollout vs learner
@torch.no_grad()
def test_learner_scores_rollouts_with_the_rollout_numerics():
    """Tokens sampled by the engine (cached prefill + decode) in official numerics, scored by
    the learner's full forward (losses.forward_logprobs) of a model with the same config: the
    gap is float noise (a reordering flip of a quantised value moves a few tokens: median),
    far below the gap to a learner in reference numerics (the mode reaches the learner)."""
    torch.manual_seed(9)
    cfg = V4Config.from_preset("tiny", numerics="official")
    model = V4Model(cfg).eval()
    model.head.weight.mul_(20)
    prompts = [[1, 2, 3], [5] * 9]
    gens = Engine(model, max_batch=2, max_context=32).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    )
    samples = [
        SimpleNamespace(
            prompt_ids=p,
            response_ids=g.token_ids,
            loss_mask=[1] * len(g.token_ids),
            logprobs=g.logprobs,
        )
        for p, g in zip(prompts, gens, strict=True)
    ]
    batch = make_batch(samples)
    on = batch.loss_mask.bool()
    ref = V4Model(cfg.replace(numerics="reference")).eval()
    ref.load_state_dict(model.state_dict())
    gaps = {}
    for name, learner in (("official", model), ("reference", ref)):
        lp, _ = forward_logprobs(learner, batch, entropy=False)
        gaps[name] = (lp - batch.old_logprobs)[on].abs().median()
    assert gaps["official"] < 1e-5, gaps
    assert gaps["reference"] > 100 * gaps["official"], gaps


# ------------------------------------------------------------------ the Hadamard fix
def _fp4_rule(x: torch.Tensor) -> torch.Tensor:
    """The indexer rule on a rotation x (fp32): round to BF16, then MXFP4 (block 32)."""
    packed, scale = quantize_fp4(x.to(BF16).float(), 32)
    return dequantize_fp4(packed, scale, 32)


@torch.no_grad()
def test_indexer_fp4_keys_and_queries_quantise_the_bf16_rotation():
    """Prefill then decode with an FP8 cache stores FP4 indexer keys equal to the rule applied to
    the fp32 rotation that the same layer (same weights, same path) stores in a float32 cache."""
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(3))
    keys = {}
    for kv_dtype in ("fp8", "float32"):
        attn = _attn_layer("csa", kv_dtype)
        cache = LayerCache(attn.cfg, attn.layer_id, 2, 64, "cpu")
        lens = torch.tensor([5, 12])
        attn(x[:, :12], torch.arange(12).expand(2, 12), cache, lens)  # prefill
        for p in range(5, 20):  # decode row 0 from 5, row 1 from 12 (clamped, ignored later)
            pos = torch.tensor([p, max(p, 12)])
            attn(x[torch.arange(2), pos][:, None], pos[:, None], cache)
        keys[kv_dtype] = cache.index.read(5).clone()  # 5 complete blocks of 4 in both rows
    rot32 = keys["float32"]
    assert torch.equal(keys["fp8"], _fp4_rule(rot32))
    # the rule is not the FP4 of the fp32 rotation (what the keys were before the fix)
    packed, scale = quantize_fp4(rot32, 32)
    assert not torch.equal(keys["fp8"], dequantize_fp4(packed, scale, 32))

    qs = {}
    for kv_dtype in ("fp8", "float32"):
        attn = _attn_layer("csa", kv_dtype)
        pos = torch.arange(20).expand(2, 20)
        qr = attn.q_norm(attn.wq_a(x))
        qs[kv_dtype] = attn.indexer.queries(qr, x, pos, attn.inv_freq)[0]
    assert torch.equal(qs["fp8"], _fp4_rule(qs["float32"]))


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_unquantised_index_formats_keep_their_rounding(kv_dtype):
    """kv_dtype float32 / bfloat16 (no FP4): the rotation is rounded to kv_dtype only."""
    cfg = V4Config.from_preset("tiny", kv_dtype=kv_dtype)
    x = torch.randn(5, 128)
    assert torch.equal(quantize_index(x, cfg), hadamard(x).to(getattr(torch, kv_dtype)).float())
