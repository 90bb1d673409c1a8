"""Token-level KV compressor of CSA (overlapping, m=4) and HCA (m'=128) layers, and of the
lightning indexer's keys.

Letters: B batch, S tokens, N = S // m compressed entries, m ratio, c head dim, C = coff*c the
projection width (coff = 2 with overlap, else 1), d model width.

Entry i gathers the gated, per-channel softmax-weighted sum of its slots: with overlap, slots
0..m-1 are the first halves of the previous block's tokens and slots m..2m-1 the second halves of
block i's own tokens; without overlap, the m tokens of block i. Then norm -> RoPE at position m*i
-> quantisation (FP8 nope dims for the main KV; Hadamard + FP4 for indexer keys).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from policy.config import V4Config
from policy.layers import Linear, RMSNorm, f32
from policy.quant import (
    FP4_AMAX_FLOOR,
    FP8_AMAX_FLOOR,
    fake_quant_fp4,
    fake_quant_fp8,
    round_to,
)
from policy.rope import apply_rope


@functools.cache
def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [n, n] (n a power of two), fp32, on ``device``."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        return (h / n**0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard rotation of the last dim (power of two), in fp32."""
    return x.float() @ _hadamard_matrix(x.shape[-1], x.device)


def quantize_kv(kv: torch.Tensor, cfg: V4Config) -> torch.Tensor:
    """Fake-quantise kv [..., c] exactly as the cache stores it (straight-through gradient).

    fp8: nope dims FP8 e4m3 with ue8m0 scales per ``kv_quant_block``, RoPE dims BF16;
    bfloat16 / float32: every dim rounded to that dtype. numerics "official": the FP8 rule sees
    the nope dims rounded to BF16 and floors their amax at 1e-4.
    """
    if cfg.kv_dtype != "fp8":
        return round_to(kv, getattr(torch, cfg.kv_dtype))
    nope = cfg.nope_head_dim
    rope = round_to(kv[..., nope:], torch.bfloat16)
    if cfg.numerics == "official":
        x = round_to(kv[..., :nope], torch.bfloat16)
        x = fake_quant_fp8(x, cfg.kv_quant_block, amax_floor=FP8_AMAX_FLOOR)
    else:
        x = fake_quant_fp8(kv[..., :nope], cfg.kv_quant_block)
    return torch.cat((x, rope), -1)


def rotate_index(x: torch.Tensor, cfg: V4Config) -> torch.Tensor:
    """Hadamard rotation of indexer q/k: x [..., c] -> fp32 [..., c], rounded to BF16 when FP4
    follows (kv_dtype='fp8'): the official rotation returns BF16, which the FP4 rule then sees."""
    x = hadamard(x)
    return round_to(x, torch.bfloat16) if cfg.kv_dtype == "fp8" else x


def quantize_index(x: torch.Tensor, cfg: V4Config) -> torch.Tensor:
    """Indexer q/k: ``rotate_index``, then FP4 (MXFP4) fake-quantisation when kv_dtype='fp8',
    else rounding to kv_dtype. x [..., c] -> fp32 [..., c]. numerics "official": the FP4 amax
    is floored at 6 * 2^-126."""
    x = rotate_index(x, cfg)
    if cfg.kv_dtype == "fp8":
        floor = FP4_AMAX_FLOOR if cfg.numerics == "official" else 0.0
        return fake_quant_fp4(x, cfg.index_quant_block, amax_floor=floor)
    return round_to(x, getattr(torch, cfg.kv_dtype))


class Compressor(nn.Module):
    """Compress every m tokens into one c-dim entry (see module docstring)."""

    def __init__(self, cfg: V4Config, ratio: int, head_dim: int, for_indexer: bool = False):
        super().__init__()
        self.cfg, self.ratio, self.head_dim = cfg, ratio, head_dim
        self.overlap = ratio == cfg.csa_ratio
        self.for_indexer = for_indexer
        coff = 2 if self.overlap else 1
        self.wkv = Linear(cfg.hidden_size, coff * head_dim)
        self.wgate = Linear(cfg.hidden_size, coff * head_dim)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    @property
    def slots(self) -> int:
        """Slots of one entry: 2m with overlap, m without."""
        return 2 * self.ratio if self.overlap else self.ratio

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d], pos [B, S] -> kv [B, S, C], score [B, S, C] (fp32, ape[pos % m] added)."""
        xf = f32(x)
        kv = F.linear(xf, f32(self.wkv.weight))
        score = F.linear(xf, f32(self.wgate.weight)) + self.ape[pos % self.ratio]
        return kv, score

    def pool(self, kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Slot tensors [..., 2m|m, C] (prev-block slots first) -> gated entries [..., c] fp32.

        With overlap the previous-block slots take the first c channels and the current-block
        slots the last c; the softmax runs over slots, separately for each channel.
        """
        c, m = self.head_dim, self.ratio
        if self.cfg.attn_impl == "triton":
            from policy.kernels import triton_ready

            if triton_ready(kv, score):  # the fused kernel (policy.kernels.triton_compressor)
                from policy.kernels.triton_compressor import triton_pool

                return triton_pool(kv, score, m, self.overlap)
        if self.overlap:
            kv = torch.cat((kv[..., :m, :c], kv[..., m:, c:]), dim=-2)
            score = torch.cat((score[..., :m, :c], score[..., m:, c:]), dim=-2)
        return (kv * score.softmax(dim=-2)).sum(dim=-2)

    def finish(
        self, entry: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, quant: bool = True
    ) -> torch.Tensor:
        """Norm -> RoPE at ``pos`` (block's first token) -> (indexer: Hadamard) -> quantisation.

        entry [B, N, c] fp32. ``quant=False`` leaves the rounding to the cache, which applies
        the same quantisation when it stores the entry; numerics "official" quantises here all
        the same (the cache's rule has no BF16 step or amax floor, and quantising the quantised
        values again is exact).
        """
        quant = quant or self.cfg.numerics == "official"
        entry = self.norm(entry.to(self.wkv.weight.dtype))
        entry = apply_rope(entry, pos, inv_freq)
        if self.for_indexer:
            return quantize_index(entry, self.cfg) if quant else rotate_index(entry, self.cfg)
        return quantize_kv(entry, self.cfg) if quant else entry

    def block_chunk(self, b: int) -> int:
        """Blocks per chunk of the long-sequence paths: their slot tensors [B, blocks, 2m|m, C]
        and temporaries (about 8 per slot element) stay within MAX_BLOCK_ELEMS."""
        from policy.kernels import MAX_BLOCK_ELEMS

        c = self.wkv.weight.shape[0]
        return max(1, MAX_BLOCK_ELEMS // (8 * b * self.slots * c))

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Full sequence from position 0: x [B, S, d] -> entries [B, S // m, c].

        Trailing tokens that do not fill a block produce no entry. Runs ``block_chunk`` blocks
        at a time (with the previous block's tokens for the overlap), so the per-token
        projections of a long sequence never exist at once; every entry is computed the same
        way whatever the chunking.
        """
        b, s, _ = x.shape
        n = s // self.ratio
        step = self.block_chunk(b)
        parts = [self._blocks(x, i, min(n, i + step), inv_freq) for i in range(0, n, step)]
        if not parts:
            return x.new_zeros(b, 0, self.head_dim, dtype=torch.float32)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _blocks(self, x: torch.Tensor, i: int, j: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """Entries i..j-1 of a sequence from position 0: x [B, S, d] -> [B, j - i, c]."""
        b, m = x.shape[0], self.ratio
        lo = (i - 1) * m if self.overlap and i > 0 else i * m  # overlap: the previous block too
        pos = torch.arange(lo, j * m, device=x.device).expand(b, -1)
        kv, score = self.project(x[:, lo : j * m], pos)
        kvb, scb = kv.unflatten(1, (-1, m)), score.unflatten(1, (-1, m))  # [B, blocks, m, C]
        if self.overlap:
            # slots 0..m-1 <- previous block (0 / -inf for block 0); m..2m-1 <- own block
            if i == 0:
                prev_kv = F.pad(kvb[:, :-1], (0, 0, 0, 0, 1, 0))
                prev_sc = F.pad(scb[:, :-1], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            else:
                prev_kv, prev_sc, kvb, scb = kvb[:, :-1], scb[:, :-1], kvb[:, 1:], scb[:, 1:]
            kvb = torch.cat((prev_kv, kvb), dim=2)
            scb = torch.cat((prev_sc, scb), dim=2)
        entries = self.pool(kvb, scb)  # [B, j - i, c]
        epos = (torch.arange(i, j, device=x.device) * m).expand(b, -1)
        return self.finish(entries, epos, inv_freq)

    def extend(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        lengths: torch.Tensor,
        kv_state: torch.Tensor,
        sc_state: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Append lengths[b] tokens to each row's partial block; updates the states in place.

        Args:
            x: [B, S, d] right-padded new tokens; pos: [B, S] their positions (row b starts at
                pos[b, 0], which may sit anywhere inside a block).
            kv_state / sc_state: [B, 2m|m, C] fp32 (slots as in ``step``).
        Returns:
            (rows [M], indices [M], entries [M, c]) of every block completed by the append (not
            yet quantised: the cache rounds them on write), or None when none completed.
            Long appends run ``block_chunk`` blocks' worth of tokens at a time, each continuing
            from the state the previous one left.
        """
        step = self.block_chunk(x.shape[0]) * self.ratio
        outs = []
        for a in range(0, x.shape[1], step):
            ln = (lengths - a).clamp(0, step)
            sl = slice(a, a + step)
            outs.append(self._extend(x[:, sl], pos[:, sl], ln, kv_state, sc_state, inv_freq))
        outs = [o for o in outs if o is not None]
        if not outs:
            return None
        return tuple(torch.cat(t) for t in zip(*outs, strict=True)) if len(outs) > 1 else outs[0]

    def _extend(self, x, pos, lengths, kv_state, sc_state, inv_freq):
        """``extend`` of one chunk of the new tokens (same arguments and result)."""
        m = self.ratio
        off = m if self.overlap else 0
        kv, score = self.project(x, pos)  # [B, S, C]
        rows, index, blocks_kv, blocks_sc = [], [], [], []
        for r, n in enumerate(lengths.tolist()):
            if n == 0:
                continue
            p = int(pos[r, 0])
            rem = p % m
            tk = torch.cat((kv_state[r, off : off + rem], kv[r, :n]))  # from the block start
            ts = torch.cat((sc_state[r, off : off + rem], score[r, :n]))
            nb = (rem + n) // m  # blocks completed
            if nb:
                bk, bs = tk[: nb * m].unflatten(0, (nb, m)), ts[: nb * m].unflatten(0, (nb, m))
                if self.overlap:  # slots 0..m-1 <- the previous block
                    bk = torch.cat((torch.cat((kv_state[r, None, :m], bk[:-1])), bk), dim=1)
                    bs = torch.cat((torch.cat((sc_state[r, None, :m], bs[:-1])), bs), dim=1)
                    kv_state[r, :m], sc_state[r, :m] = (
                        tk[(nb - 1) * m : nb * m],
                        ts[(nb - 1) * m : nb * m],
                    )
                blocks_kv.append(bk)
                blocks_sc.append(bs)
                rows += [r] * nb
                index += range((p - rem) // m, (p - rem) // m + nb)
            tail = rem + n - nb * m
            kv_state[r, off : off + tail] = tk[nb * m :]
            sc_state[r, off : off + tail] = ts[nb * m :]
        if not rows:
            return None
        entries = self.pool(torch.cat(blocks_kv), torch.cat(blocks_sc))  # [M, c]
        idx = torch.tensor(index, device=x.device)
        entries = self.finish(entries[None], idx[None] * m, inv_freq, quant=False)[0]
        return torch.tensor(rows, device=x.device), idx, entries

    def step(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        kv_state: torch.Tensor,
        sc_state: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One decode token per row; updates the states in place.

        Args:
            x: [B, 1, d]; pos: [B] position of this token.
            kv_state / sc_state: [B, 2m|m, C] fp32.
        Returns:
            entry [B, c] (valid where emit; not yet quantised: the cache rounds it on write), or
            None when no row completed a block; emit [B] bool: rows whose block completed.
        """
        m = self.ratio
        kv, score = self.project(x, pos[:, None])  # [B, 1, C]
        rows = torch.arange(x.shape[0], device=x.device)
        slot = pos % m + (m if self.overlap else 0)
        kv_state[rows, slot] = kv[:, 0]
        sc_state[rows, slot] = score[:, 0]
        emit = (pos + 1) % m == 0
        if not bool(emit.any()):
            return None, emit
        entry = self.pool(kv_state, sc_state)[:, None]  # [B, 1, c]
        entry = self.finish(entry, (pos + 1 - m)[:, None], inv_freq, quant=False)[:, 0]
        if self.overlap:
            shift = emit[:, None, None]
            kv_state[:, :m] = torch.where(shift, kv_state[:, m:], kv_state[:, :m])
            sc_state[:, :m] = torch.where(shift, sc_state[:, m:], sc_state[:, :m])
        return entry, emit
