//! The top-k choice of `policy.indexer.topk_indices`: a stable descending order, so a higher
//! score comes first and equal scores (-0.0 equal to 0.0) go to the lower index.
//!
//! Every (score, index) becomes one distinct u64 whose order is exactly "chosen first": the
//! score's order-preserving unsigned image in the high 32 bits, u32::MAX - index in the low ones.

/// The u64 key of `score` at entry `index`.
pub fn order_key(score: f32, index: u32) -> u64 {
    let bits = (score + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
    let ordered = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(ordered) << 32) | u64::from(u32::MAX - index)
}

/// The entry index a key was made for.
pub fn key_index(key: u64) -> u32 {
    u32::MAX - key as u32
}

/// The best `k` keys seen so far, largest first. An insertion costs O(k), and only keys above
/// the current k-th are inserted: on a long row of scores in no particular order that happens
/// about k ln(N / k) times.
pub struct Best {
    keys: Vec<u64>,
    k: usize,
}

impl Best {
    pub fn new(k: usize) -> Self {
        Best {
            keys: Vec::with_capacity(k + 1),
            k,
        }
    }

    pub fn clear(&mut self) {
        self.keys.clear();
    }

    pub fn push(&mut self, key: u64) {
        if self.keys.len() == self.k {
            match self.keys.last() {
                Some(&last) if key > last => {
                    self.keys.pop();
                }
                _ => return,
            }
        }
        let at = self.keys.partition_point(|&x| x > key);
        self.keys.insert(at, key);
    }

    /// The chosen keys, largest first.
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }
}
