"""Cached continuation (``V4Model.extend``): appending tokens to a cached sequence computes only
those tokens and equals the full forward of the whole sequence.

Tolerances as in test_kv_cache: float32 cache, whole model, logits within 1e-5 (float
reordering only); quantised caches are compared per layer with the same layer input (>= 99% of
outputs within 1e-4: a rounding-boundary flip may move one element by one FP8/BF16 step)."""

import itertools

import pytest
import torch

from policy.config import V4Config
from policy.kv_cache import LayerCache
from policy.model import V4Model
from tests.policy.test_kv_cache import _attn_layer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = V4Model(V4Config.from_preset("tiny", kv_dtype="float32")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("ape", "attn_sink")):
                p.normal_(0, 1.0)
    return m


def _chunked_logits(model, ids, cuts):
    """Logits [S, V] of ids [S] computed as a prefill up to cuts[0], then extends between cuts."""
    cache = model.new_cache(1, len(ids))
    bounds = [0, *cuts, len(ids)]
    out = []
    for a, b in itertools.pairwise(bounds):
        if b > a:
            out.append(
                model.extend(ids[None, a:b], torch.tensor([b - a]), cache, all_logits=True)[0]
            )
    assert int(cache.pos[0]) == len(ids)
    return torch.cat(out)


def test_append_at_every_offset_equals_full_forward(model):
    """Tiny preset: window 8, CSA m=4, HCA m'=16. Appends start at every offset 1..39 (every
    position inside a CSA and an HCA block, across several window wraps), with lengths 1..9."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (48,))
    with torch.no_grad():
        full = model(ids[None])[0]
    for start in range(1, 40):
        k = 1 + start % 9
        got = _chunked_logits(model, ids, [start, start + k])
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0, msg=f"append at {start}+{k}")


def test_many_small_appends_equal_full_forward(model):
    torch.manual_seed(2)
    ids = torch.randint(0, model.cfg.vocab_size, (70,))
    with torch.no_grad():
        full = model(ids[None])[0]
    cuts = [3, 4, 9, 15, 16, 17, 31, 33, 47, 48, 50, 64, 69]
    torch.testing.assert_close(_chunked_logits(model, ids, cuts), full, atol=1e-5, rtol=0)


def test_batched_append_with_padding_and_different_positions(model):
    torch.manual_seed(3)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,)) for n in (37, 22, 50)]
    first = [13, 5, 31]
    cache = model.new_cache(3, 64)
    ids = torch.zeros(3, max(first), dtype=torch.long)
    for r, (s, f) in enumerate(zip(seqs, first, strict=True)):
        ids[r, :f] = s[:f]
    model.prefill(ids, torch.tensor(first), cache)
    rest = [len(s) - f for s, f in zip(seqs, first, strict=True)]
    ids = torch.zeros(3, max(rest), dtype=torch.long)
    for r, (s, f) in enumerate(zip(seqs, first, strict=True)):
        ids[r, : len(s) - f] = s[f:]
    got = model.extend(ids, torch.tensor(rest), cache, all_logits=True)
    for r, s in enumerate(seqs):
        with torch.no_grad():
            full = model(s[None])[0, first[r] :]
        torch.testing.assert_close(got[r, : rest[r]], full, atol=1e-5, rtol=0)
    assert cache.pos.tolist() == [len(s) for s in seqs]


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8"])
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_layer_append_matches_full_quantised(kind, kv_dtype):
    attn = _attn_layer(kind, kv_dtype)
    torch.manual_seed(4)
    x = torch.randn(2, 45, attn.cfg.hidden_size)
    with torch.no_grad():
        full = attn(x, torch.arange(45).expand(2, 45))
        cache = LayerCache(attn.cfg, attn.layer_id, 2, 64, "cpu")
        outs, p = [], 0
        for k in (7, 1, 9, 3, 16, 9):
            pos = (p + torch.arange(k)).expand(2, k)
            outs.append(attn(x[:, p : p + k], pos, cache, torch.tensor([k, k])))
            p += k
        got = torch.cat(outs, dim=1)
    close = ((got - full).abs() <= 1e-4).float().mean()
    assert close >= 0.99, float(close)


def test_extend_rejects_overflow(model):
    cache = model.new_cache(1, 8)
    model.extend(torch.zeros(1, 6, dtype=torch.long), torch.tensor([6]), cache)
    with pytest.raises(ValueError, match="capacity 8"):
        model.extend(torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), cache)
