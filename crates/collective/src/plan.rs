//! The algorithms' schedules as plain functions: which block a rank sends and receives at each
//! step, and how a buffer splits into blocks. No I/O: tested here by running the schedules on
//! simulated ranks.

use std::ops::Range;

/// Splits `count` elements into `n` blocks (the first `count % n` one element longer), as byte
/// ranges of elements of `esize` bytes.
pub fn blocks(count: usize, n: usize, esize: usize) -> Vec<Range<usize>> {
    let (base, extra) = (count / n, count % n);
    let mut at = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = at * esize..(at + len) * esize;
            at += len;
            r
        })
        .collect()
}

/// The rank after `rank` on the ring of `n`, and the one before.
pub fn ring_neighbours(rank: usize, n: usize) -> (usize, usize) {
    ((rank + 1) % n, (rank + n - 1) % n)
}

/// Ring reduce-scatter, step `s` of `n - 1`: the block `rank` sends to the next rank and the
/// block it receives from the previous one (and reduces into its own copy). After the last
/// step, `rank` holds block `rank` reduced over every rank.
pub fn reduce_scatter_step(rank: usize, n: usize, s: usize) -> (usize, usize) {
    ((rank + 2 * n - s - 1) % n, (rank + 2 * n - s - 2) % n)
}

/// Ring all-gather, step `s` of `n - 1`, starting from every rank holding block `rank`: the
/// block sent to the next rank and the one received from the previous.
pub fn all_gather_step(rank: usize, n: usize, s: usize) -> (usize, usize) {
    ((rank + n - s) % n, (rank + 2 * n - s - 1) % n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs ring reduce-scatter then all-gather on `n` simulated ranks holding `vals[r]`
    /// (one u64 per block, summed); returns every rank's final blocks.
    fn simulate(vals: &[Vec<u64>]) -> Vec<Vec<u64>> {
        let n = vals.len();
        let mut state = vals.to_vec();
        for s in 0..n - 1 {
            let sent: Vec<(usize, u64)> = (0..n)
                .map(|r| {
                    let (b, _) = reduce_scatter_step(r, n, s);
                    (b, state[r][b])
                })
                .collect();
            for (r, blocks) in state.iter_mut().enumerate() {
                let (_, prev) = ring_neighbours(r, n);
                let (b, got) = sent[prev];
                assert_eq!(
                    b,
                    reduce_scatter_step(r, n, s).1,
                    "rank {r} step {s} receives what was sent"
                );
                blocks[b] += got;
            }
        }
        for s in 0..n - 1 {
            let sent: Vec<(usize, u64)> = (0..n)
                .map(|r| {
                    let (b, _) = all_gather_step(r, n, s);
                    (b, state[r][b])
                })
                .collect();
            for (r, blocks) in state.iter_mut().enumerate() {
                let (_, prev) = ring_neighbours(r, n);
                let (b, got) = sent[prev];
                assert_eq!(b, all_gather_step(r, n, s).1);
                blocks[b] = got;
            }
        }
        state
    }

    proptest! {
        #[test]
        fn ring_reduce_scatter_then_gather_is_an_all_reduce(
            n in 2usize..9,
            seed in any::<u64>(),
        ) {
            let vals: Vec<Vec<u64>> = (0..n)
                .map(|r| (0..n).map(|b| seed.wrapping_mul(31).wrapping_add((r * 131 + b * 7) as u64) % 1000).collect())
                .collect();
            let want: Vec<u64> = (0..n).map(|b| vals.iter().map(|v| v[b]).sum()).collect();
            for got in simulate(&vals) {
                prop_assert_eq!(&got, &want);
            }
        }

        #[test]
        fn blocks_cover_the_buffer_in_order(count in 0usize..1000, n in 1usize..17, esize in 1usize..9) {
            let b = blocks(count, n, esize);
            prop_assert_eq!(b.len(), n);
            prop_assert_eq!(b[0].start, 0);
            prop_assert_eq!(b[n - 1].end, count * esize);
            for w in b.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
                prop_assert!(w[0].len() >= w[1].len());
            }
        }
    }
}
