//! Paged layouts (a KV cache): `layers` page arrays of the same shape, each `pages` pages of
//! `page_size` bytes from its base address. Both sides register one; pages then move by index
//! arrays, and consecutive page pairs coalesce into one range, so a caller never builds one
//! descriptor (or one Python object) per page.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// A registered layout, as published in the segment descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutDescriptor {
    /// The name both sides use for it (e.g. "kv").
    pub name: String,
    pub page_size: u64,
    /// Pages per layer.
    pub pages: u64,
    /// The base address of each layer's page array.
    pub layers: Vec<u64>,
}

impl LayoutDescriptor {
    /// Bytes of one layer's page array.
    pub fn layer_len(&self) -> Option<u64> {
        self.pages.checked_mul(self.page_size)
    }

    /// Checks the shape: a name, pages, a page size, layers, and no layer wrapping the
    /// address space.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |reason: String| Err(CoreError::Layout { name: self.name.clone(), reason });
        if self.name.is_empty() {
            return bad("empty name".into());
        }
        if self.page_size == 0 || self.pages == 0 || self.layers.is_empty() {
            return bad(format!(
                "{} layers of {} pages of {} bytes: none may be zero",
                self.layers.len(),
                self.pages,
                self.page_size
            ));
        }
        let Some(len) = self.layer_len() else {
            return bad(format!("{} pages of {} bytes overflow", self.pages, self.page_size));
        };
        if let Some(base) = self.layers.iter().find(|b| b.checked_add(len).is_none()) {
            return bad(format!("the layer at {base:#x} (+{len}) wraps the address space"));
        }
        Ok(())
    }
}

/// Consecutive page pairs: `count` pages from `local` and from `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub local: u64,
    pub remote: u64,
    pub count: u64,
}

/// Coalesces page pairs `(local[i], remote[i])` (arrays of the same length, checked by
/// `for_each_range`) into runs where both sides advance by one, handing each to `f` (no
/// allocation: the hot path of page transfers). Returns the largest local and remote index seen, so the caller can check them without a
/// second pass.
#[inline]
pub fn for_each_run(local: &[u64], remote: &[u64], mut f: impl FnMut(PageRun)) -> (u64, u64) {
    let mut pairs = local.iter().copied().zip(remote.iter().copied());
    let Some((l0, r0)) = pairs.next() else { return (0, 0) };
    let mut run = PageRun { local: l0, remote: r0, count: 1 };
    let (mut max_l, mut max_r) = (l0, r0);
    for (l, r) in pairs {
        max_l = max_l.max(l);
        max_r = max_r.max(r);
        // Wrapping: an index that would wrap is out of range and refused by the caller.
        if run.local.wrapping_add(run.count) == l && run.remote.wrapping_add(run.count) == r {
            run.count += 1;
        } else {
            f(run);
            run = PageRun { local: l, remote: r, count: 1 };
        }
    }
    f(run);
    (max_l, max_r)
}

/// The ranges that move `local_pages[i]` of `local` to or from `remote_pages[i]` of `remote`,
/// handed to `f` as `(layer, local address, remote address, length)`, layer by layer,
/// consecutive pages coalesced (no allocation; one pass over the indices per layer). The
/// indices are checked in the same pass: on `Err`, what was handed over must be discarded (its
/// addresses are meaningless).
pub fn for_each_range(
    local: &LayoutDescriptor,
    remote: &LayoutDescriptor,
    local_pages: &[u64],
    remote_pages: &[u64],
    mut f: impl FnMut(usize, u64, u64, u64),
) -> Result<(), CoreError> {
    check_shapes(local, remote, local_pages, remote_pages)?;
    let size = local.page_size;
    for (layer, (&lb, &rb)) in local.layers.iter().zip(&remote.layers).enumerate() {
        // Wrapping arithmetic: an index past the layout makes a meaningless address, which
        // the check below refuses before anyone uses it.
        let (max_l, max_r) = for_each_run(local_pages, remote_pages, |r| {
            let (l, rr) = (r.local.wrapping_mul(size), r.remote.wrapping_mul(size));
            f(layer, lb.wrapping_add(l), rb.wrapping_add(rr), r.count.wrapping_mul(size))
        });
        if !local_pages.is_empty() && (max_l >= local.pages || max_r >= remote.pages) {
            return check_pages(local, remote, local_pages, remote_pages);
        }
    }
    Ok(())
}

/// What a pass over a page transfer's index arrays finds: the same for every layer, since the
/// layers share the arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageShape {
    /// Coalesced runs per layer (the requests each layer stands for).
    pub runs: usize,
    /// The first run (where each layer's first request starts), inside both layouts.
    pub first: PageRun,
    /// The pairs that continue the previous one on both sides (ascending): where runs of
    /// more than one page are. Empty when nothing coalesces.
    pub joins: Vec<usize>,
    /// Pages in the local and the remote layout: every index must be below.
    pub limits: (u64, u64),
}

/// Checks a page transfer's shape (arrays that pair up, layouts of one shape, the first run
/// inside both layouts) and finds its runs, in one branch-free pass that stores nothing
/// unless pages coalesce: what a transport needs to write its descriptors straight from the
/// indices with a [`PageCursor`], which checks the other indices window by window. `None`
/// for empty arrays.
pub fn page_shape(
    local: &LayoutDescriptor,
    remote: &LayoutDescriptor,
    local_pages: &[u64],
    remote_pages: &[u64],
) -> Result<Option<PageShape>, CoreError> {
    check_shapes(local, remote, local_pages, remote_pages)?;
    let n = local_pages.len();
    if n == 0 {
        return Ok(None);
    }
    let (l0, l1, r0, r1) =
        (&local_pages[..n - 1], &local_pages[1..], &remote_pages[..n - 1], &remote_pages[1..]);
    // Pair `j + 1` continues pair `j` when both sides advance by exactly one.
    let continues = |j: usize| {
        (l1[j].wrapping_sub(l0[j]).wrapping_sub(1) | r1[j].wrapping_sub(r0[j]).wrapping_sub(1)) == 0
    };
    let joined: usize = (0..n - 1).map(|j| usize::from(continues(j))).sum();
    let joins: Vec<usize> = if joined == 0 {
        Vec::new()
    } else {
        (0..n - 1).filter(|&j| continues(j)).map(|j| j + 1).collect()
    };
    let count = 1 + joins.iter().zip(1..).take_while(|&(&j, k)| j == k).count() as u64;
    let first = PageRun { local: local_pages[0], remote: remote_pages[0], count };
    let limits = (local.pages, remote.pages);
    check_run(first, 0, limits)?;
    Ok(Some(PageShape { runs: n - joined, first, joins, limits }))
}

/// The run that starts at pair `index` lies inside both layouts (`limits` pages each).
fn check_run(run: PageRun, index: usize, limits: (u64, u64)) -> Result<(), CoreError> {
    for (side, start, limit) in [("local", run.local, limits.0), ("remote", run.remote, limits.1)] {
        if start >= limit || limit - start < run.count {
            let page = if start >= limit { start } else { limit };
            return Err(CoreError::Pages {
                reason: format!(
                    "{side} page {page} (index {}) is outside its layout, which has {limit} pages",
                    index + (page - start) as usize
                ),
            });
        }
    }
    Ok(())
}

/// A stretch of a page transfer, as [`PageCursor::window`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Pairs that each are a run of one page: `local[i]` with `remote[i]`.
    Singles { local: &'a [u64], remote: &'a [u64] },
    /// A run of more than one page.
    Run(PageRun),
}

/// Walks a page transfer's runs window by window (one layer; a new cursor for the next), with
/// the joins [`page_shape`] found: stretches without coalescing come out as slices, so a
/// transport maps them to descriptors in a tight loop. Every window's indices are checked
/// against the layouts before it is handed over.
#[derive(Debug, Clone)]
pub struct PageCursor<'a> {
    local: &'a [u64],
    remote: &'a [u64],
    joins: &'a [usize],
    limits: (u64, u64),
    /// The next pair (a run starts there) and the next join at or after it.
    at: usize,
    next_join: usize,
}

impl<'a> PageCursor<'a> {
    /// A cursor at the first pair of `shape`'s arrays.
    pub fn new(local: &'a [u64], remote: &'a [u64], shape: &'a PageShape) -> Self {
        let joins = &shape.joins;
        Self { local, remote, joins, limits: shape.limits, at: 0, next_join: 0 }
    }

    /// True once every pair was handed over.
    pub fn done(&self) -> bool {
        self.at >= self.local.len().min(self.remote.len())
    }

    /// Hands over the runs that start in the next `pairs` pairs (at least one; a run is never
    /// split, so the window may end past them), as stretches of single pairs and multi-page
    /// runs, in order; returns how many runs it handed over. An index outside its layout is
    /// an `Err` (naming it): discard what this window handed over.
    pub fn window(
        &mut self,
        pairs: usize,
        mut f: impl FnMut(Piece<'a>),
    ) -> Result<usize, CoreError> {
        let n = self.local.len().min(self.remote.len());
        let end = n.min(self.at.saturating_add(pairs.max(1)));
        let mut runs = 0;
        while self.at < end {
            // The pair before the next join starts a multi-page run; all before it are singles.
            let join = self.joins.get(self.next_join).copied().unwrap_or(usize::MAX);
            let stop = end.min(join - 1);
            if self.at < stop {
                let (l, r) = (&self.local[self.at..stop], &self.remote[self.at..stop]);
                self.check_singles(l, r)?;
                f(Piece::Singles { local: l, remote: r });
                runs += stop - self.at;
                self.at = stop;
            }
            if self.at < end && self.at + 1 == join {
                let mut count = 1u64;
                while self.joins.get(self.next_join) == Some(&(self.at + count as usize)) {
                    count += 1;
                    self.next_join += 1;
                }
                let run =
                    PageRun { local: self.local[self.at], remote: self.remote[self.at], count };
                check_run(run, self.at, self.limits)?;
                f(Piece::Run(run));
                runs += 1;
                self.at += count as usize;
            }
        }
        Ok(runs)
    }

    /// Every index of a stretch of singles starting at `self.at` lies inside its layout (a
    /// branch-free pass; the culprit is searched for only on failure).
    fn check_singles(&self, local: &[u64], remote: &[u64]) -> Result<(), CoreError> {
        let (ll, rl) = self.limits;
        let outside =
            local.iter().zip(remote).fold(false, |bad, (&l, &r)| bad | (l >= ll) | (r >= rl));
        if !outside {
            return Ok(());
        }
        let k = local.iter().zip(remote).position(|(&l, &r)| l >= ll || r >= rl).unwrap_or(0);
        let run = PageRun { local: local[k], remote: remote[k], count: 1 };
        check_run(run, self.at + k, self.limits)
    }
}

/// The page arrays pair up and the two layouts have the same shape.
fn check_shapes(
    local: &LayoutDescriptor,
    remote: &LayoutDescriptor,
    local_pages: &[u64],
    remote_pages: &[u64],
) -> Result<(), CoreError> {
    let bad = |reason: String| Err(CoreError::Pages { reason });
    if local_pages.len() != remote_pages.len() {
        return bad(format!(
            "{} local pages against {} remote pages",
            local_pages.len(),
            remote_pages.len()
        ));
    }
    if local.page_size != remote.page_size || local.layers.len() != remote.layers.len() {
        return bad(format!(
            "layout {:?} ({} layers of {}-byte pages) does not match {:?} ({} layers of {}-byte pages)",
            local.name,
            local.layers.len(),
            local.page_size,
            remote.name,
            remote.layers.len(),
            remote.page_size
        ));
    }
    Ok(())
}

/// Checks that the page arrays pair up, every index lies inside its layout, and the two
/// layouts have the same shape (the slow path of [`for_each_range`]: it names the culprit).
fn check_pages(
    local: &LayoutDescriptor,
    remote: &LayoutDescriptor,
    local_pages: &[u64],
    remote_pages: &[u64],
) -> Result<(), CoreError> {
    let bad = |reason: String| Err(CoreError::Pages { reason });
    check_shapes(local, remote, local_pages, remote_pages)?;
    for (pages, layout) in [(local_pages, local), (remote_pages, remote)] {
        // One branch-free pass; the slow search for the culprit only on failure.
        let max = pages.iter().copied().max().unwrap_or(0);
        if !pages.is_empty() && max >= layout.pages {
            let i = pages.iter().position(|&p| p >= layout.pages).unwrap_or(0);
            return bad(format!(
                "page {} (index {i}) is outside layout {:?}, which has {} pages",
                pages[i], layout.name, layout.pages
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn coalesce(local: &[u64], remote: &[u64]) -> Vec<PageRun> {
        let mut runs = Vec::new();
        for_each_run(local, remote, |run| runs.push(run));
        runs
    }

    fn page_ranges(
        local: &LayoutDescriptor,
        remote: &LayoutDescriptor,
        local_pages: &[u64],
        remote_pages: &[u64],
    ) -> Result<Vec<(u64, u64, u64)>, CoreError> {
        let mut out = Vec::new();
        for_each_range(local, remote, local_pages, remote_pages, |_, l, r, n| out.push((l, r, n)))?;
        Ok(out)
    }

    fn layout(name: &str, layers: &[u64], pages: u64, page_size: u64) -> LayoutDescriptor {
        LayoutDescriptor { name: name.into(), page_size, pages, layers: layers.to_vec() }
    }

    #[test]
    fn consecutive_pairs_coalesce_and_others_do_not() {
        let runs = coalesce(&[4, 5, 6, 9, 1, 2], &[10, 11, 12, 13, 3, 5]);
        assert_eq!(
            runs,
            vec![
                PageRun { local: 4, remote: 10, count: 3 },
                PageRun { local: 9, remote: 13, count: 1 },
                PageRun { local: 1, remote: 3, count: 1 },
                PageRun { local: 2, remote: 5, count: 1 },
            ]
        );
        assert!(coalesce(&[], &[]).is_empty());
    }

    #[test]
    fn ranges_cover_every_layer_and_indices_are_checked() {
        let a = layout("kv", &[0x10000, 0x80000], 16, 256);
        let b = layout("kv", &[0x200000, 0x300000], 8, 256);
        let r = page_ranges(&a, &b, &[0, 1, 7], &[3, 4, 0]).unwrap();
        assert_eq!(
            r,
            vec![
                (0x10000, 0x200000 + 3 * 256, 512),
                (0x10000 + 7 * 256, 0x200000, 256),
                (0x80000, 0x300000 + 3 * 256, 512),
                (0x80000 + 7 * 256, 0x300000, 256),
            ]
        );
        let out = page_ranges(&a, &b, &[0], &[8]).unwrap_err().to_string();
        assert!(out.contains("page 8 (index 0)"), "{out}");
        assert!(page_ranges(&a, &b, &[0, 1], &[0]).is_err());
        let other = layout("kv", &[0], 8, 512);
        assert!(page_ranges(&a, &other, &[0], &[0]).is_err());
    }

    #[test]
    fn the_shape_counts_runs_once_for_every_layer() {
        let a = layout("kv", &[0x10000, 0x80000], 16, 256);
        let b = layout("kv", &[0x200000, 0x300000], 8, 256);
        let shape = page_shape(&a, &b, &[0, 1, 7], &[3, 4, 0]).unwrap().unwrap();
        assert_eq!(shape.runs, 2);
        assert_eq!(shape.first, PageRun { local: 0, remote: 3, count: 2 });
        assert_eq!(page_shape(&a, &b, &[], &[]).unwrap(), None);
        let out = page_shape(&a, &b, &[0], &[8]).unwrap_err().to_string();
        assert!(out.contains("remote page 8 (index 0)"), "{out}");
        assert!(page_shape(&a, &b, &[0, 1], &[0]).is_err());
        // Past the first run, the cursor finds bad indices window by window.
        let (l, r) = ([0, 1, 5, 6, 7, 3], [0, 1, 2, 3, 8, 4]);
        let shape = page_shape(&a, &b, &l, &r).unwrap().unwrap();
        let mut cursor = PageCursor::new(&l, &r, &shape);
        assert_eq!(cursor.window(1, |_| ()).unwrap(), 1, "the run of pairs 0 and 1");
        let out = cursor.window(8, |_| ()).unwrap_err().to_string();
        assert!(out.contains("remote page 8 (index 4)"), "{out}");
        let shape = page_shape(&a, &b, &[3, 15, 2], &[0, 7, 3]).unwrap().unwrap();
        let mut cursor = PageCursor::new(&[3, 15, 2], &[0, 7, 3], &shape);
        assert!(cursor.window(8, |_| ()).is_ok());
        let shape = page_shape(&a, &b, &[1, 2], &[6, 7]).unwrap().unwrap();
        assert_eq!(shape.first.count, 2);
        let shape = page_shape(&a, &b, &[3, 4, 5], &[6, 7, 8]).unwrap_err().to_string();
        assert!(shape.contains("remote page 8 (index 2)"), "{shape}");
    }

    #[test]
    fn malformed_layouts_are_refused() {
        assert!(layout("kv", &[0], 4, 4096).validate().is_ok());
        assert!(layout("", &[0], 4, 4096).validate().is_err());
        assert!(layout("kv", &[], 4, 4096).validate().is_err());
        assert!(layout("kv", &[0], 0, 4096).validate().is_err());
        assert!(layout("kv", &[0], u64::MAX, 4096).validate().is_err());
        assert!(layout("kv", &[u64::MAX - 100], 1, 4096).validate().is_err());
    }

    proptest! {
        /// Windows of any size, one after the other, give exactly the runs of one pass, and
        /// the shape counts them; an index outside its layout (8 pages) is found on the way.
        #[test]
        fn windows_give_the_runs_of_one_pass(
            pairs in prop::collection::vec((0u64..9, 0u64..9), 1..100),
            max in 1usize..7,
        ) {
            let (l, r): (Vec<u64>, Vec<u64>) = pairs.iter().copied().unzip();
            let outside = pairs.iter().any(|&(l, r)| l >= 8 || r >= 8);
            let kv = layout("kv", &[0], 8, 1);
            let shape = match page_shape(&kv, &kv, &l, &r) {
                Ok(shape) => shape.unwrap(),
                Err(_) => {
                    prop_assert!(outside);
                    return Ok(());
                }
            };
            let want = coalesce(&l, &r);
            prop_assert_eq!(shape.runs, want.len());
            prop_assert_eq!(shape.first, want[0]);
            let mut cursor = PageCursor::new(&l, &r, &shape);
            let mut windowed = Vec::new();
            while !cursor.done() {
                let before = windowed.len();
                let handed = cursor.window(max, |piece| match piece {
                    Piece::Singles { local, remote } => windowed.extend(
                        local.iter().zip(remote).map(|(&l, &r)| PageRun { local: l, remote: r, count: 1 }),
                    ),
                    Piece::Run(run) => windowed.push(run),
                });
                let Ok(runs) = handed else {
                    prop_assert!(outside);
                    return Ok(());
                };
                prop_assert_eq!(runs, windowed.len() - before);
                prop_assert!(runs > 0, "a window makes progress");
                prop_assert!(runs <= max, "a window hands over at most one run per pair");
            }
            prop_assert!(!outside, "every index outside its layout is found");
            prop_assert_eq!(windowed, want);
        }
    }

    proptest! {
        /// Expanding the coalesced runs gives back exactly the page pairs, in order.
        #[test]
        fn coalescing_loses_and_invents_nothing(pairs in prop::collection::vec((0u64..64, 0u64..64), 0..200)) {
            let (l, r): (Vec<u64>, Vec<u64>) = pairs.iter().copied().unzip();
            let back: Vec<(u64, u64)> = coalesce(&l, &r)
                .iter()
                .flat_map(|run| (0..run.count).map(move |k| (run.local + k, run.remote + k)))
                .collect();
            prop_assert_eq!(back, pairs);
        }
    }
}
