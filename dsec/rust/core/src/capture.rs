//! Bounded head+tail capture of a stream: the first half of the budget and the last half are
//! kept, everything in between is counted and dropped.

/// Head+tail capture buffer with a byte budget.
pub struct Capture {
    cap: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
    tail_pos: usize,
    total: u64,
}

impl Capture {
    /// A capture that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Capture {
            cap,
            head: Vec::new(),
            tail: Vec::new(),
            tail_pos: 0,
            total: 0,
        }
    }

    fn head_cap(&self) -> usize {
        self.cap - self.cap / 2
    }

    fn tail_cap(&self) -> usize {
        self.cap / 2
    }

    /// Feeds bytes read from the stream.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.head_cap().saturating_sub(self.head.len());
        let n = room.min(data.len());
        self.head.extend_from_slice(&data[..n]);
        data = &data[n..];
        let tc = self.tail_cap();
        if data.is_empty() || tc == 0 {
            return;
        }
        if data.len() >= tc {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - tc..]);
            self.tail_pos = 0;
            return;
        }
        for &b in data {
            if self.tail.len() < tc {
                self.tail.push(b);
            } else {
                self.tail[self.tail_pos] = b;
                self.tail_pos = (self.tail_pos + 1) % tc;
            }
        }
    }

    /// Total bytes seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.cap as u64
    }

    /// The kept bytes: head then tail, in stream order.
    pub fn into_bytes(self) -> Vec<u8> {
        let full = self.tail.len() == self.tail_cap();
        let mut out = self.head;
        if full && self.tail_pos > 0 {
            out.extend_from_slice(&self.tail[self.tail_pos..]);
            out.extend_from_slice(&self.tail[..self.tail_pos]);
        } else {
            out.extend_from_slice(&self.tail);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Capture;

    fn feed(cap: usize, data: &[u8], chunk: usize) -> (Vec<u8>, bool, u64) {
        let mut c = Capture::new(cap);
        for part in data.chunks(chunk.max(1)) {
            c.push(part);
        }
        let (t, n) = (c.truncated(), c.total());
        (c.into_bytes(), t, n)
    }

    #[test]
    fn small_output_is_kept_whole() {
        assert_eq!(feed(10, b"hello", 2), (b"hello".to_vec(), false, 5));
        assert_eq!(
            feed(10, b"0123456789", 3),
            (b"0123456789".to_vec(), false, 10)
        );
    }

    #[test]
    fn large_output_keeps_head_and_tail() {
        let data: Vec<u8> = (0..100u8).collect();
        for chunk in [1, 3, 7, 100] {
            let (out, trunc, total) = feed(10, &data, chunk);
            assert!(trunc);
            assert_eq!(total, 100);
            assert_eq!(
                out,
                vec![0, 1, 2, 3, 4, 95, 96, 97, 98, 99],
                "chunk {chunk}"
            );
        }
    }
}
