"""The V4 KV cache: per layer a sliding-window ring, compressed entries (CSA / HCA), indexer keys
(CSA) and the compressor tail state, in the per-entry byte layout of V4_SPEC.md §8.

Letters: B batch rows, W window, n entries, c head dim, E bytes per entry.

Entry formats (kv_dtype="fp8"), one uint8 row of E bytes per entry:
- main KV (window and compressed): [nope FP8 e4m3 | RoPE dims BF16 | one ue8m0 scale per
  ``kv_quant_block`` nope dims | pad], E = 584 at official dims (448 + 128 + 7 + 1);
- indexer key: [MXFP4 packed, two per byte | one ue8m0 scale per 32 dims], 68 B at c = 128.
With kv_dtype "bfloat16" / "float32" an entry is c values of that dtype (no quantisation).
The compressor tail state stays fp32, as in the reference.

Decode mirror (``mirror=True``, the default): every quantised store also keeps an fp32 copy of
its dequantised entries, updated only for the entries written (each write dequantises just the
rows it packed), so a decode step reads the cache without unpacking it in full. The packed bytes
stay the cache's source of truth and its only accounted memory (``nbytes``): the mirror is
scratch working memory, like activations, and holds exactly ``decode(data)`` at all times
(dequantisation is elementwise, so decoding one row alone gives the same values). ``mirror=False``
reads by unpacking the stored bytes on every read, in c/4x less memory than the mirror. With
``attn_impl="cpu"`` the indexer keys keep no mirror: that decode scores their stored bytes.
"""

from __future__ import annotations

import torch

from policy.config import V4Config
from policy.kv_layout import KVLayout


class EntryStore:
    """Entries [B, n, c] in a cache format of ``KVLayout``; reads return fp32 [..., c].

    kind "main" (window / compressed KV) or "index" (indexer keys). Quantised formats are uint8
    rows [B, n, E] packed by ``KVLayout``; unquantised ones are [B, n, c] in kv_dtype.
    """

    def __init__(self, layout: KVLayout, kind: str, batch: int, n: int, device, mirror=True):
        self.layout, self.kind = layout, kind
        quantised = (
            layout.kv_dtype == "fp8"
            if kind == "main"
            else layout.index_dtype
            in (
                "fp4",
                "fp8",
            )
        )
        self.quantised = quantised
        if quantised:
            e = layout.main_entry_bytes if kind == "main" else layout.index_entry_bytes
            self.data = torch.zeros(batch, n, e, dtype=torch.uint8, device=device)
        else:
            dim = layout.head_dim if kind == "main" else layout.index_dims
            dtype = layout.kv_dtype if kind == "main" else layout.index_dtype
            self.data = torch.zeros(batch, n, dim, dtype=getattr(torch, dtype), device=device)
        # fp32 [B, n, c] copy of decode(data) (see module doc), or None
        self.mirror = self.decode(self.data) if quantised and mirror else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., c] -> stored rows [..., E] (or [..., c] in a plain dtype)."""
        if not self.quantised:
            return x.to(self.data.dtype)
        pack = self.layout.pack_main if self.kind == "main" else self.layout.pack_index
        return pack(x.float())

    def decode(self, row: torch.Tensor) -> torch.Tensor:
        """Stored rows [..., E] -> fp32 [..., c]."""
        if not self.quantised:
            return row.float()
        unpack = self.layout.unpack_main if self.kind == "main" else self.layout.unpack_index
        return unpack(row)

    def write(self, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """data[rows[i], slots[i]] = encode(x[i]). rows, slots [M] int, x [M, c]."""
        if rows.numel():
            if self.mirror is not None and self.kind == "main":  # values from the same rounding
                enc, values = self.layout.pack_main_values(x.float())
            else:
                enc = self.encode(x)
                values = None if self.mirror is None else self.decode(enc)
            self.data[rows, slots] = enc
            if self.mirror is not None:
                self.mirror[rows, slots] = values

    def read(self, n: int) -> torch.Tensor:
        """The first n entries of every row, fp32 [B, n, c] (with the mirror: a view of it,
        valid until the next write)."""
        if self.mirror is not None:
            return self.mirror[:, :n]
        return self.decode(self.data[:, :n])

    def stored(self, n: int) -> tuple[torch.Tensor, int | None]:
        """The first n entries of every row as kernels read them: (the stored MXFP4 rows
        [B, n, E] uint8, the scale block) for FP4 indexer keys, else (fp32 [B, n, c], None)."""
        if self.kind == "index" and self.layout.index_dtype == "fp4":
            return self.data[:, :n], self.layout.index_block
        return self.read(n), None

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Entries idx [B, K] (>= 0) of each row, fp32 [B, K, c]."""
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        if self.mirror is not None:
            return self.mirror[rows, idx]
        return self.decode(self.data[rows, idx])

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` [B'] (in that order)."""
        self.data = self.data[rows]
        if self.mirror is not None:
            self.mirror = self.mirror[rows]


class LayerCache:
    """State of one attention layer for B rows and up to ``capacity`` tokens."""

    def __init__(
        self, cfg: V4Config, layer_id: int, batch: int, capacity: int, device, mirror=True
    ):
        lay = KVLayout.from_config(cfg)
        kind = cfg.layer_kind(layer_id)
        c = cfg.head_dim
        self.window = EntryStore(lay, "main", batch, cfg.sliding_window, device, mirror)
        self.comp = self.index = None
        self.states: list[torch.Tensor] = []
        if kind != "swa":
            m = cfg.compress_ratios[layer_id]
            n = capacity // m
            self.comp = EntryStore(lay, "main", batch, n, device, mirror)
            slots, width = (2 * m, 2 * c) if kind == "csa" else (m, c)
            self.kv_state = torch.zeros(batch, slots, width, device=device)
            self.sc_state = torch.full((batch, slots, width), float("-inf"), device=device)
            self.states += [self.kv_state, self.sc_state]
            if kind == "csa":
                ic = cfg.index_head_dim
                # attn_impl "cpu" scores the stored keys in place: no fp32 copy to keep
                index_mirror = mirror and cfg.attn_impl != "cpu"
                self.index = EntryStore(lay, "index", batch, n, device, index_mirror)
                self.ikv_state = torch.zeros(batch, slots, 2 * ic, device=device)
                self.isc_state = torch.full((batch, slots, 2 * ic), float("-inf"), device=device)
                self.states += [self.ikv_state, self.isc_state]

    def tensors(self) -> list[torch.Tensor]:
        stores = [s for s in (self.window, self.comp, self.index) if s is not None]
        return [s.data for s in stores] + self.states

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` [B'] (in that order)."""
        for store in (self.window, self.comp, self.index):
            if store is not None:
                store.keep_rows(rows)
        names = [n for n in ("kv_state", "sc_state", "ikv_state", "isc_state") if hasattr(self, n)]
        for n in names:
            setattr(self, n, getattr(self, n)[rows])
        self.states = [getattr(self, n) for n in names]


class KVCache:
    """Cache of every attention layer of a model (main blocks; MTP is not cached).

    ``pos [B]`` is the number of tokens each row holds (its next position). ``mirror``: keep the
    decode mirror of the quantised stores (module doc; not part of ``nbytes``).
    """

    def __init__(self, cfg: V4Config, batch: int, capacity: int, device="cpu", mirror: bool = True):
        if capacity <= 0 or batch <= 0:
            raise ValueError(f"batch and capacity must be > 0, got {batch}, {capacity}")
        self.cfg, self.batch, self.capacity = cfg, batch, capacity
        self.layers = [
            LayerCache(cfg, i, batch, capacity, device, mirror)
            for i in range(cfg.num_hidden_layers)
        ]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep batch rows ``rows`` [B'] (in that order)."""
        rows = rows.to(self.pos.device)
        for layer in self.layers:
            layer.keep_rows(rows)
        self.pos = self.pos[rows]
        self.batch = len(rows)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (entries, scales, tail states)."""
        return sum(t.numel() * t.element_size() for la in self.layers for t in la.tensors())

    def entry_nbytes(self) -> int:
        """Bytes of the window rings, compressed entries and indexer keys (no tail states)."""
        stores = [s for la in self.layers for s in (la.window, la.comp, la.index) if s is not None]
        return sum(s.data.numel() * s.data.element_size() for s in stores)


# ---------------------------------------------------------------------- row operations
def _store_pairs(dst: LayerCache, src: LayerCache):
    """(dst store, src store) pairs of two layer caches (window, compressed, indexer)."""
    for name in ("window", "comp", "index"):
        a, b = getattr(dst, name), getattr(src, name)
        if a is not None:
            yield a, b


def _state_names(layer: LayerCache) -> list[str]:
    return [n for n in ("kv_state", "sc_state", "ikv_state", "isc_state") if hasattr(layer, n)]


def copy_row(dst: KVCache, dst_row: int, src: KVCache, src_row: int) -> None:
    """Copy one sequence's whole state (entries, decode mirror, tail states, position) from row
    ``src_row`` of ``src`` into row ``dst_row`` of ``dst``. Only the compressed entries the row
    holds are copied, so the caches may have different capacities as long as ``dst`` can hold
    the sequence."""
    pos = int(src.pos[src_row])
    if pos > dst.capacity:
        raise ValueError(
            f"a sequence of {pos} tokens does not fit a cache of capacity {dst.capacity}"
        )
    for i, (ld, ls) in enumerate(zip(dst.layers, src.layers, strict=True)):
        held = pos // max(1, dst.cfg.compress_ratios[i])  # compressed entries the row holds
        for a, b in _store_pairs(ld, ls):
            n = a.data.shape[1] if a is ld.window else held
            a.data[dst_row, :n] = b.data[src_row, :n]
            if a.mirror is not None:
                if b.mirror is not None:
                    a.mirror[dst_row, :n] = b.mirror[src_row, :n]
                else:
                    a.mirror[dst_row, :n] = a.decode(b.data[src_row, :n])
        for name in _state_names(ld):
            getattr(ld, name)[dst_row] = getattr(ls, name)[src_row]
    dst.pos[dst_row] = pos


def clone_row(src: KVCache, row: int, capacity: int, mirror: bool = True) -> KVCache:
    """A new one-row cache of ``capacity`` tokens holding row ``row`` of ``src``."""
    out = KVCache(src.cfg, 1, capacity, src.pos.device, mirror)
    copy_row(out, 0, src, row)
    return out


def view_rows(cache: KVCache, n: int) -> KVCache:
    """The first ``n`` rows of ``cache`` as a cache sharing its storage (writes go through)."""
    out = KVCache.__new__(KVCache)
    out.cfg, out.batch, out.capacity = cache.cfg, n, cache.capacity
    out.pos = cache.pos[:n]
    out.layers = []
    for la in cache.layers:
        lv = LayerCache.__new__(LayerCache)
        for name in ("window", "comp", "index"):
            store = getattr(la, name)
            if store is not None:
                sv = EntryStore.__new__(EntryStore)
                sv.layout, sv.kind, sv.quantised = store.layout, store.kind, store.quantised
                sv.data = store.data[:n]
                sv.mirror = None if store.mirror is None else store.mirror[:n]
                store = sv
            setattr(lv, name, store)
        names = _state_names(la)
        for name in names:
            setattr(lv, name, getattr(la, name)[:n])
        lv.states = [getattr(lv, name) for name in names]
        out.layers.append(lv)
    return out


def tail_state(cache: KVCache, row: int) -> dict:
    """What a rollback to the row's current position needs besides the append-only compressed
    entries (which later appends never rewrite below that position): a copy of the window ring
    and of the compressor tail states."""
    out = {"pos": int(cache.pos[row]), "layers": []}
    for la in cache.layers:
        w = la.window
        state = {
            "data": w.data[row].clone(),
            "mirror": None if w.mirror is None else w.mirror[row].clone(),
        }
        state.update({n: getattr(la, n)[row].clone() for n in _state_names(la)})
        out["layers"].append(state)
    return out


def restore_tail(cache: KVCache, row: int, tail: dict) -> None:
    """Roll row ``row`` back to the position ``tail`` was taken at (see ``tail_state``)."""
    for la, state in zip(cache.layers, tail["layers"], strict=True):
        la.window.data[row] = state["data"]
        if la.window.mirror is not None:
            la.window.mirror[row] = state["mirror"]
        for n in _state_names(la):
            getattr(la, n)[row] = state[n]
    cache.pos[row] = tail["pos"]
