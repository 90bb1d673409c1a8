//! CPU kernels of the V4 policy, loaded by `policy.kernels.cpu_indexer` through ctypes (a plain C
//! ABI: no Python in here).
//!
//! `v4_indexer_topk`: the lightning indexer of a CSA layer fused with its causal top-k, reading
//! the indexer keys as the cache stores them (MXFP4: dim / 2 code bytes, then one ue8m0 scale
//! byte per block) or as fp32 vectors. For every query row r with `nvis[r]` visible entries:
//!
//! ```text
//! score_i = sum_h w[r, h] * relu(q[r, h] . key_i),   i < nvis[r]
//! ```
//!
//! and the k best entries in the order of `policy.indexer.topk_indices` (`topk.rs`), -1 past the
//! visible ones. Only one decoded key exists at a time: a decode step reads the stored bytes once
//! and materialises nothing of size N (unless the caller asks for the scores, for tests).

mod keys;
mod topk;

pub use keys::{decode_fp4, dots, half_scales, E2M1_X2};
pub use topk::{key_index, order_key, Best};

/// The arguments of `v4_indexer_topk` (`policy.kernels.cpu_indexer.Args` is the same layout).
#[repr(C)]
pub struct IndexerArgs {
    /// [rows, heads, dim] fp32, contiguous.
    pub q: *const f32,
    /// [rows, heads] fp32, contiguous.
    pub w: *const f32,
    /// Entry 0 of batch row 0 of the keys.
    pub keys: *const u8,
    /// Bytes from one batch row of keys to the next.
    pub batch_stride: i64,
    /// Bytes from one entry to the next.
    pub entry_stride: i64,
    /// [rows] entries visible to each query row (clamped to 0 ..= n).
    pub nvis: *const i64,
    /// [rows, k] chosen indices, -1 = none.
    pub out: *mut i64,
    /// [rows, n] scores of the visible entries, or null; the rest is left as the caller set it.
    pub scores: *mut f32,
    /// Query rows (batch * queries per batch row).
    pub rows: i64,
    /// Query rows per batch row: row r reads the keys of batch row r / per_batch.
    pub per_batch: i64,
    pub heads: i64,
    pub dim: i64,
    /// Entries held per batch row.
    pub n: i64,
    /// Slots per query row.
    pub k: i64,
    /// MXFP4 scale block of packed keys, 0 = fp32 keys.
    pub block: i64,
}

/// Fill `out` (and `scores`) from the arguments. Returns 0, or 1 for arguments that do not
/// describe a valid call (negative sizes, a block that does not divide dim, null pointers).
///
/// # Safety
/// Every pointer must address the memory its field describes.
#[no_mangle]
pub unsafe extern "C" fn v4_indexer_topk(args: *const IndexerArgs) -> i32 {
    match args.as_ref() {
        Some(a) if valid(a) => {
            run(a);
            0
        }
        _ => 1,
    }
}

fn valid(a: &IndexerArgs) -> bool {
    let sizes = [a.rows, a.heads, a.dim, a.n, a.k, a.block];
    sizes.iter().all(|&v| v >= 0)
        && a.per_batch > 0
        && a.dim % 2 == 0
        && (a.block == 0 || (a.dim % a.block == 0 && a.block % 2 == 0))
        && a.n < i64::from(u32::MAX)
        && (a.rows == 0 || !(a.q.is_null() || a.w.is_null() || a.nvis.is_null() || a.out.is_null()))
        && (a.rows == 0 || a.n == 0 || !a.keys.is_null())
}

unsafe fn run(a: &IndexerArgs) {
    let (heads, dim, n, k) = (a.heads as usize, a.dim as usize, a.n as usize, a.k as usize);
    let block = a.block as usize;
    let packed = dim.checked_div(block).map(|s| dim / 2 + s); // bytes of a packed entry
    let kernels = Kernels::new(dim, block);
    let mut decoded = vec![0f32; 2 * dim]; // two keys
    let mut dot = vec![0f32; 2 * heads];
    let mut best = Best::new(k);
    for r in 0..a.rows as usize {
        let q = std::slice::from_raw_parts(a.q.add(r * heads * dim), heads * dim);
        let w = std::slice::from_raw_parts(a.w.add(r * heads), heads);
        let base = a
            .keys
            .offset((r as i64 / a.per_batch * a.batch_stride) as isize);
        let visible = (*a.nvis.add(r)).clamp(0, n as i64) as usize;
        best.clear();
        let key = |i: usize, buf: &mut [f32]| {
            let entry = base.offset((i as i64 * a.entry_stride) as isize);
            match packed {
                None => std::slice::from_raw_parts(entry.cast::<f32>(), dim),
                Some(len) => {
                    kernels.decode(std::slice::from_raw_parts(entry, len), buf);
                    std::slice::from_raw_parts(buf.as_ptr(), dim)
                }
            }
        };
        let mut score = |i: usize, dot: &[f32]| {
            let mut score = 0f32; // sum_h w[h] * relu(dot[h]), heads in order; NaN stays NaN
            for (wh, &d) in w.iter().zip(dot) {
                score += wh * if d < 0.0 { 0.0 } else { d };
            }
            if !a.scores.is_null() {
                *a.scores.add(r * n + i) = score;
            }
            best.push(order_key(score, i as u32));
        };
        for i in (0..visible - visible % 2).step_by(2) {
            let (d0, d1) = decoded.split_at_mut(dim);
            kernels.dots2(q, key(i, d0), key(i + 1, d1), &mut dot);
            score(i, &dot[..heads]);
            score(i + 1, &dot[heads..]);
        }
        if visible % 2 == 1 {
            let k0 = key(visible - 1, &mut decoded[..dim]);
            kernels.dots(q, k0, &mut dot[..heads]);
            score(visible - 1, &dot[..heads]);
        }
        let out = std::slice::from_raw_parts_mut(a.out.add(r * k), k);
        for (j, o) in out.iter_mut().enumerate() {
            *o = best
                .keys()
                .get(j)
                .map_or(-1, |&key| i64::from(key_index(key)));
        }
    }
}

/// The decode and dot routines this CPU and these widths can use.
struct Kernels {
    dim: usize,
    block: usize,
    blocks: usize,
    scales: [f32; 256],
    vector_dots: bool,
    vector_decode: bool,
}

impl Kernels {
    fn new(dim: usize, block: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let vector = keys::avx2::available() && dim.is_multiple_of(16);
        #[cfg(not(target_arch = "x86_64"))]
        let vector = false;
        let vector_decode = vector && dim.is_multiple_of(32) && block.is_multiple_of(32);
        let scales = half_scales();
        Kernels {
            dim,
            block,
            blocks: dim.checked_div(block).unwrap_or(0),
            scales,
            vector_dots: vector,
            vector_decode,
        }
    }

    fn decode(&self, entry: &[u8], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.vector_decode {
            // SAFETY: AVX2 checked in `new`; entry and out have the lengths for dim and block.
            unsafe {
                keys::avx2::decode_fp4(
                    entry.as_ptr(),
                    self.dim,
                    self.block,
                    self.blocks,
                    &self.scales,
                    out.as_mut_ptr(),
                )
            };
            return;
        }
        decode_fp4(entry, self.dim, self.block, &self.scales, out);
    }

    /// `dots` of two keys: out [key 0: heads, key 1: heads].
    fn dots2(&self, q: &[f32], k0: &[f32], k1: &[f32], out: &mut [f32]) {
        let (heads, dim) = (out.len() / 2, self.dim);
        let mut h = 0;
        #[cfg(target_arch = "x86_64")]
        if self.vector_dots {
            let mut four = [0f32; 8];
            while h + 4 <= heads {
                // SAFETY: AVX2 + FMA checked in `new`; heads h .. h + 4 of q, dim-float keys.
                unsafe {
                    let qh = q.as_ptr().add(h * dim);
                    keys::avx2::dots_4x2(qh, dim, k0.as_ptr(), k1.as_ptr(), four.as_mut_ptr())
                };
                out[h..h + 4].copy_from_slice(&four[..4]);
                out[heads + h..heads + h + 4].copy_from_slice(&four[4..]);
                h += 4;
            }
        }
        if h < heads {
            let (o0, o1) = out.split_at_mut(heads);
            self.dots(&q[h * dim..], k0, &mut o0[h..]);
            self.dots(&q[h * dim..], k1, &mut o1[h..]);
        }
    }

    fn dots(&self, q: &[f32], key: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.vector_dots {
            // SAFETY: AVX2 + FMA checked in `new`; q holds out.len() heads of dim floats.
            unsafe {
                keys::avx2::dots(
                    q.as_ptr(),
                    out.len(),
                    self.dim,
                    key.as_ptr(),
                    out.as_mut_ptr(),
                )
            };
            return;
        }
        dots(q, self.dim, key, out);
    }
}

#[cfg(test)]
mod tests;
