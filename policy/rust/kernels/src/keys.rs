//! One stored indexer key: its values (decoded from MXFP4 when packed) and its dot products with
//! the query's heads. Each routine has a portable version and, on x86-64 with AVX2 + FMA, a
//! vector one; both give the exact decoded values, and dots that differ only in summation order.

/// e2m1 code -> twice its value (sign in bit 3): 0, 0.5, 1, 1.5, 2, 3, 4, 6 become integers.
/// Code 8 (-0) decodes to +0, which is equal in every sum and product that follows.
pub const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Scale byte e (ue8m0, 2^(e - 127)) -> 2^(e - 128): the block scale times the 1/2 that
/// `E2M1_X2` doubled. Exact, subnormals included; 255 is ue8m0's NaN.
pub fn half_scales() -> [f32; 256] {
    let mut table = [0f32; 256];
    for (e, v) in table.iter_mut().enumerate() {
        let x = e as i32 - 128;
        *v = if e == 255 {
            f32::NAN
        } else if x >= -126 {
            f32::from_bits(((x + 127) as u32) << 23)
        } else {
            f32::from_bits(1u32 << (x + 149))
        };
    }
    table
}

/// Decode one MXFP4 entry (dim / 2 code bytes, low nibble = even dim, then dim / block scale
/// bytes) into `out[..dim]`.
pub fn decode_fp4(entry: &[u8], dim: usize, block: usize, scales: &[f32; 256], out: &mut [f32]) {
    let (codes, sb) = entry.split_at(dim / 2);
    for (i, o) in out[..dim].iter_mut().enumerate() {
        let byte = codes[i / 2];
        let code = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
        *o = f32::from(E2M1_X2[usize::from(code)]) * scales[usize::from(sb[i / block])];
    }
}

/// `out[h] = q[h] . key` for the heads of q [heads, dim].
pub fn dots(q: &[f32], dim: usize, key: &[f32], out: &mut [f32]) {
    for (o, qh) in out.iter_mut().zip(q.chunks_exact(dim)) {
        *o = qh.iter().zip(&key[..dim]).map(|(a, b)| a * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// Whether this CPU runs the vector routines.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `super::decode_fp4` for dim and block multiples of 32: 16 code bytes at a time, the
    /// nibbles looked up with one byte shuffle each and widened to fp32.
    ///
    /// # Safety
    /// AVX2 present; blocks = dim / block (passed: no division per entry); `entry` holds
    /// dim / 2 + blocks bytes; `out` holds dim floats.
    #[target_feature(enable = "avx2")]
    pub unsafe fn decode_fp4(
        entry: *const u8,
        dim: usize,
        block: usize,
        blocks: usize,
        scales: &[f32; 256],
        out: *mut f32,
    ) {
        let lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        let nibble = _mm_set1_epi8(0x0f);
        let per_block = block / 32; // 32-code chunks per scale (no division in the loop)
        for (blk, &sb) in std::slice::from_raw_parts(entry.add(dim / 2), blocks)
            .iter()
            .enumerate()
        {
            let scale = _mm256_set1_ps(scales[usize::from(sb)]);
            for j in blk * per_block..(blk + 1) * per_block {
                let bytes = _mm_loadu_si128(entry.add(16 * j).cast());
                let even = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, nibble));
                let odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble));
                let first = _mm_unpacklo_epi8(even, odd); // dims 32j .. 32j + 15, in order
                let second = _mm_unpackhi_epi8(even, odd); // dims 32j + 16 .. 32j + 31
                let o = out.add(32 * j);
                for (at, v) in [
                    (0, first),
                    (8, _mm_srli_si128::<8>(first)),
                    (16, second),
                    (24, _mm_srli_si128::<8>(second)),
                ] {
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                    _mm256_storeu_ps(o.add(at), _mm256_mul_ps(f, scale));
                }
            }
        }
    }

    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Dots of four heads (q [4, dim]) with two keys: `out` gets [key 0: 4 heads, key 1: 4
    /// heads]. Eight independent FMA chains; each query vector is loaded once for both keys;
    /// the eight sums are reduced together (one horizontal-add tree).
    ///
    /// # Safety
    /// AVX2 + FMA present; dim a multiple of 8; q holds 4 * dim floats, each key dim floats,
    /// out 8 floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_4x2(
        q: *const f32,
        dim: usize,
        k0: *const f32,
        k1: *const f32,
        out: *mut f32,
    ) {
        let qh = [0, 1, 2, 3].map(|i| q.add(i * dim));
        let mut acc = [_mm256_setzero_ps(); 8];
        for d in (0..dim).step_by(8) {
            let a = _mm256_loadu_ps(k0.add(d));
            let b = _mm256_loadu_ps(k1.add(d));
            for i in 0..4 {
                let qv = _mm256_loadu_ps(qh[i].add(d));
                acc[i] = _mm256_fmadd_ps(qv, a, acc[i]);
                acc[4 + i] = _mm256_fmadd_ps(qv, b, acc[4 + i]);
            }
        }
        let t0 = _mm256_hadd_ps(acc[0], acc[1]);
        let t1 = _mm256_hadd_ps(acc[2], acc[3]);
        let t2 = _mm256_hadd_ps(acc[4], acc[5]);
        let t3 = _mm256_hadd_ps(acc[6], acc[7]);
        let u0 = _mm256_hadd_ps(t0, t1); // per accumulator 0..3: [low-half sums | high-half sums]
        let u1 = _mm256_hadd_ps(t2, t3);
        let low = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let high = _mm256_permute2f128_ps::<0x31>(u0, u1);
        _mm256_storeu_ps(out, _mm256_add_ps(low, high));
    }

    /// `super::dots` for dim a multiple of 16: four heads at a time, two accumulators each, so
    /// eight independent FMA chains hide the FMA latency.
    ///
    /// # Safety
    /// AVX2 + FMA present; q holds heads * dim floats, key dim floats, out heads floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(q: *const f32, heads: usize, dim: usize, key: *const f32, out: *mut f32) {
        let mut h = 0;
        while h + 4 <= heads {
            let qh = [0, 1, 2, 3].map(|i| q.add((h + i) * dim));
            let mut acc = [_mm256_setzero_ps(); 8];
            for d in (0..dim).step_by(16) {
                let k0 = _mm256_loadu_ps(key.add(d));
                let k1 = _mm256_loadu_ps(key.add(d + 8));
                for i in 0..4 {
                    acc[2 * i] = _mm256_fmadd_ps(_mm256_loadu_ps(qh[i].add(d)), k0, acc[2 * i]);
                    acc[2 * i + 1] =
                        _mm256_fmadd_ps(_mm256_loadu_ps(qh[i].add(d + 8)), k1, acc[2 * i + 1]);
                }
            }
            for i in 0..4 {
                *out.add(h + i) = hsum(_mm256_add_ps(acc[2 * i], acc[2 * i + 1]));
            }
            h += 4;
        }
        for h in h..heads {
            let qh = q.add(h * dim);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for d in (0..dim).step_by(16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(d)), _mm256_loadu_ps(key.add(d)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qh.add(d + 8)),
                    _mm256_loadu_ps(key.add(d + 8)),
                    a1,
                );
            }
            *out.add(h) = hsum(_mm256_add_ps(a0, a1));
        }
    }
}
