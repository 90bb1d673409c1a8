use super::*;

/// A deterministic byte stream (xorshift), so the tests need no crate.
fn bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[test]
fn half_scales_are_exact_powers_of_two() {
    let t = half_scales();
    assert_eq!(t[128], 1.0);
    assert_eq!(t[127], 0.5);
    assert_eq!(t[254], 2f32.powi(126));
    assert_eq!(t[0], 2f32.powi(-64) * 2f32.powi(-64)); // 2^-128, a subnormal
    assert_eq!(t[1] * 2f32.powi(127), 1.0);
    assert!(t[255].is_nan());
}

#[test]
fn fp4_decode_gives_the_e2m1_values() {
    // codes 0..15 in dims 0..15 (two per byte), scale byte 127 (x1) for the first 32 dims.
    let mut entry: Vec<u8> = (0..8u8).map(|b| (2 * b) | ((2 * b + 1) << 4)).collect();
    entry.extend([0u8; 8]);
    entry.push(127);
    let mut out = [0f32; 32];
    decode_fp4(&entry, 32, 32, &half_scales(), &mut out);
    let want = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    assert_eq!(&out[..16], &want);
    assert!(out[16..].iter().all(|&v| v == 0.0));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vector_decode_and_dots_equal_the_portable_ones() {
    if !keys::avx2::available() {
        return;
    }
    let scales = half_scales();
    for (dim, block) in [(32, 32), (128, 32), (128, 64), (256, 128)] {
        let mut entry = bytes(dim / 2 + dim / block, dim as u64 * 31 + block as u64);
        for s in &mut entry[dim / 2..] {
            *s = 100 + *s % 50; // keep the products finite
        }
        let (mut a, mut b) = (vec![0f32; dim], vec![0f32; dim]);
        decode_fp4(&entry, dim, block, &scales, &mut a);
        unsafe {
            keys::avx2::decode_fp4(
                entry.as_ptr(),
                dim,
                block,
                dim / block,
                &scales,
                b.as_mut_ptr(),
            )
        };
        assert_eq!(a, b, "dim {dim} block {block}");
        for heads in [1, 3, 4, 7] {
            let q: Vec<f32> = bytes(heads * dim, 7)
                .iter()
                .map(|&v| f32::from(v) - 128.0)
                .collect();
            let (mut x, mut y) = (vec![0f32; heads], vec![0f32; heads]);
            dots(&q, dim, &a, &mut x);
            unsafe { keys::avx2::dots(q.as_ptr(), heads, dim, a.as_ptr(), y.as_mut_ptr()) };
            for (u, v) in x.iter().zip(&y) {
                assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "{u} vs {v}");
            }
        }
    }
}

#[test]
fn order_keys_follow_the_stable_descending_sort() {
    assert!(order_key(1.0, 5) > order_key(0.5, 0));
    assert!(order_key(0.0, 2) > order_key(-0.0, 3)); // equal scores: the lower index first
    assert_eq!(order_key(-0.0, 3), order_key(0.0, 3));
    assert!(order_key(-1.0, 0) < order_key(-0.5, 9));
    assert!(order_key(f32::NEG_INFINITY, 0) < order_key(f32::MIN, 9));
    assert_eq!(key_index(order_key(-3.5, 77)), 77);
}

#[test]
fn best_keeps_the_k_largest_in_order() {
    let scores = [3.0, 1.0, 3.0, 7.0, 0.0, -2.0, 7.0, 3.0];
    let mut best = Best::new(4);
    for (i, &s) in scores.iter().enumerate() {
        best.push(order_key(s, i as u32));
    }
    let idx: Vec<u32> = best.keys().iter().map(|&k| key_index(k)).collect();
    assert_eq!(idx, [3, 6, 0, 2]);
    let mut none = Best::new(0);
    none.push(order_key(1.0, 0));
    assert!(none.keys().is_empty());
}

#[test]
fn a_call_scores_and_chooses_with_minus_one_past_the_visible() {
    // one query row, 2 heads, dim 32 fp32 keys: key i = i * e_0, so head 0 scores i, head 1 -i.
    let (n, dim) = (6usize, 32usize);
    let mut keys = vec![0f32; n * dim];
    for i in 0..n {
        keys[i * dim] = i as f32;
    }
    let mut q = vec![0f32; 2 * dim];
    q[0] = 1.0;
    q[dim] = -1.0;
    let w = [1.0f32, 10.0];
    let nvis = [4i64];
    let mut out = [0i64; 5];
    let mut scores = [f32::NEG_INFINITY; 6];
    let args = IndexerArgs {
        q: q.as_ptr(),
        w: w.as_ptr(),
        keys: keys.as_ptr().cast(),
        batch_stride: 0,
        entry_stride: (dim * 4) as i64,
        nvis: nvis.as_ptr(),
        out: out.as_mut_ptr(),
        scores: scores.as_mut_ptr(),
        rows: 1,
        per_batch: 1,
        heads: 2,
        dim: dim as i64,
        n: n as i64,
        k: 5,
        block: 0,
    };
    assert_eq!(unsafe { v4_indexer_topk(&args) }, 0);
    assert_eq!(out, [3, 2, 1, 0, -1]);
    assert_eq!(
        scores,
        [0.0, 1.0, 2.0, 3.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
    );
    let bad = IndexerArgs { block: 3, ..args };
    assert_eq!(unsafe { v4_indexer_topk(&bad) }, 1);
    assert_eq!(unsafe { v4_indexer_topk(std::ptr::null()) }, 1);
}
