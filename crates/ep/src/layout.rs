//! Where things live in an EP buffer (plain arithmetic, the same on every rank).
//!
//! A buffer is two halves of equal size, whatever the call's shape (calls alternate between
//! them, so a fast rank's next call never overwrites what a slow rank still reads); each half
//! starts with a header at offsets no call shape changes (so that calls of different shapes on
//! one buffer find their signals and counters where the previous ones left them):
//! - dispatch signals: one u64 per (local expert, source rank): `seq << 32 | tokens`;
//! - combine signals: one u64 per global expert: `seq << 32`;
//! - this rank's own dispatch counters: one u32 per global expert (pieces of rows sent so far
//!   in the call; the piece that completes an expert publishes its signal and resets it);
//!
//! then the call's data:
//! - dispatch rows: `max_tokens` rows of `hidden` bf16 (or e4m3 and their scales) per source
//!   rank, row `t` holding the source's token `t`: a token crosses to a rank once, however many
//!   of that rank's experts it selects;
//! - dispatch sources: per (local expert, source rank), the source tokens that select the
//!   expert, in token order (i32): the receiver finds each expert's rows through them;
//! - combine rows: one bf16 row per (global expert, token of this rank).

use crate::error::{Error, Result};

/// Ranks the kernels support.
pub const MAX_RANKS: usize = tidewire_gpu::ep::MAX_RANKS;
/// Tokens per rank the kernels support.
pub const MAX_TOKENS: usize = 1024;
/// Experts per token the kernels support.
pub const MAX_TOPK: usize = 16;
/// Experts the kernels support.
pub const MAX_EXPERTS: usize = 1024;
/// Bytes of a half's header: the dispatch signals, combine signals and counters, each sized
/// for [`MAX_EXPERTS`].
const HEADER: u64 = (MAX_EXPERTS as u64) * (8 + 8 + 4);

/// The shape of a dispatch/combine and the offsets it implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub max_tokens: usize,
    pub hidden: usize,
    pub ranks: usize,
    pub experts: usize,
    pub local_experts: usize,
    pub off_dsig: u64,
    pub off_ddata: u64,
    pub off_dsrc: u64,
    pub off_csig: u64,
    pub off_cdata: u64,
    pub off_fin: u64,
    /// Bytes of one half.
    pub half: u64,
}

fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Layout {
    /// The layout for `max_tokens` tokens per rank of `hidden` bf16 channels, `ranks` ranks and
    /// `experts` experts; refuses shapes the kernels cannot run.
    pub fn new(max_tokens: usize, hidden: usize, ranks: usize, experts: usize) -> Result<Self> {
        let bad = |why: String| Err(Error::Shape(why));
        if ranks == 0 || ranks > MAX_RANKS {
            return bad(format!("{ranks} ranks (1 to {MAX_RANKS})"));
        }
        if max_tokens == 0 || max_tokens > MAX_TOKENS {
            return bad(format!("{max_tokens} tokens per rank (1 to {MAX_TOKENS})"));
        }
        if hidden == 0 || !hidden.is_multiple_of(128) {
            return bad(format!("hidden {hidden} (a positive multiple of 128)"));
        }
        if experts == 0 || !experts.is_multiple_of(ranks) || experts > MAX_EXPERTS {
            return bad(format!(
                "{experts} experts over {ranks} ranks (a positive multiple, at most {MAX_EXPERTS})"
            ));
        }
        let local_experts = experts / ranks;
        let (t, h, r, e, el) =
            (max_tokens as u64, hidden as u64, ranks as u64, experts as u64, local_experts as u64);
        let row = 2 * h;
        let off_dsig = 0;
        let off_csig = off_dsig + MAX_EXPERTS as u64 * 8;
        let off_fin = off_csig + MAX_EXPERTS as u64 * 8;
        let off_ddata = align(HEADER, 256);
        let off_dsrc = align(off_ddata + r * t * row, 256);
        let off_cdata = align(off_dsrc + el * r * t * 4, 256);
        let half = align(off_cdata + e * t * row, 4096);
        Ok(Self {
            max_tokens,
            hidden,
            ranks,
            experts,
            local_experts,
            off_dsig,
            off_ddata,
            off_dsrc,
            off_csig,
            off_cdata,
            off_fin,
            half,
        })
    }

    /// Bytes of the whole buffer (both halves).
    pub fn bytes(&self) -> u64 {
        2 * self.half
    }
}

/// `Buffer.get_ep_buffer_size_hint(T, H, R, E)`: the bytes a buffer needs for that shape.
pub fn size_hint(max_tokens: usize, hidden: usize, ranks: usize, experts: usize) -> Result<u64> {
    Ok(Layout::new(max_tokens, hidden, ranks, experts)?.bytes())
}

/// A `layout_range` entry: where source `s`'s rows start in a local expert's block, and how many.
pub fn pack_range(begin: u32, count: u32) -> i64 {
    (i64::from(begin) << 32) | i64::from(count)
}

/// The inverse of [`pack_range`].
pub fn unpack_range(v: i64) -> (u32, u32) {
    ((v >> 32) as u32, (v & 0xffff_ffff) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sglang_shapes_fit_and_bad_shapes_are_refused() {
        // T = 128, H = 7168, E = 288 over 8 ranks: ≈ 2 × 0.54 GB (the combine rows, one per
        // (expert, token), are most of it; dispatch rows are one per (source, token)).
        let l = Layout::new(128, 7168, 8, 288).unwrap();
        assert_eq!(l.local_experts, 36);
        assert!(l.bytes() > 1_000_000_000 && l.bytes() < 1_100_000_000, "{}", l.bytes());
        assert!(Layout::new(128, 7000, 8, 288).is_err(), "hidden not a multiple of 128");
        assert!(Layout::new(128, 7168, 8, 100).is_err(), "experts not a multiple of ranks");
        assert!(Layout::new(2048, 7168, 8, 288).is_err(), "too many tokens");
        assert!(Layout::new(128, 7168, 65, 650).is_err(), "too many ranks");
        assert_eq!(unpack_range(pack_range(3 * 128, 17)), (384, 17));
    }

    proptest! {
        /// The areas never overlap and every one starts aligned for its accesses.
        #[test]
        fn areas_are_disjoint_and_aligned(t in 1usize..1025, h in 1usize..64, r in 1usize..65, per in 1usize..9) {
            let l = Layout::new(t, h * 128, r, r * per).unwrap();
            let (tt, row, rr, e, el) = (t as u64, (h * 256) as u64, r as u64, (r * per) as u64, per as u64);
            let areas = [
                (l.off_dsig, el * rr * 8),
                (l.off_csig, e * 8),
                (l.off_fin, e * 4),
                (l.off_ddata, rr * tt * row),
                (l.off_dsrc, el * rr * tt * 4),
                (l.off_cdata, e * tt * row),
            ];
            for w in areas.windows(2) {
                prop_assert!(w[0].0 + w[0].1 <= w[1].0);
            }
            for (off, _) in areas {
                prop_assert_eq!(off % 256, 0);
            }
            // The header does not move with the shape.
            let other = Layout::new(1, 128, r, r * per).unwrap();
            prop_assert_eq!((l.off_dsig, l.off_csig, l.off_fin), (other.off_dsig, other.off_csig, other.off_fin));
            prop_assert!(areas[5].0 + areas[5].1 <= l.half);
        }
    }
}
