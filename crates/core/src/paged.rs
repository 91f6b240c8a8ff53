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

/// What one pass over a page transfer's index arrays finds: the same for every layer, since
/// the layers share the arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageShape {
    /// Coalesced runs per layer (the requests each layer stands for).
    pub runs: usize,
    /// The first run (where each layer's first request starts).
    pub first: PageRun,
}

/// Checks a page transfer (arrays that pair up, layouts of one shape, every index inside its
/// layout) and counts its runs, in one pass that stores nothing: what a transport needs to
/// write its descriptors straight from the indices. `None` for empty arrays.
pub fn page_shape(
    local: &LayoutDescriptor,
    remote: &LayoutDescriptor,
    local_pages: &[u64],
    remote_pages: &[u64],
) -> Result<Option<PageShape>, CoreError> {
    check_shapes(local, remote, local_pages, remote_pages)?;
    let mut runs = 0usize;
    let mut first = None;
    let (max_l, max_r) = for_each_run(local_pages, remote_pages, |run| {
        runs += 1;
        first.get_or_insert(run);
    });
    if !local_pages.is_empty() && (max_l >= local.pages || max_r >= remote.pages) {
        check_pages(local, remote, local_pages, remote_pages)?;
    }
    Ok(first.map(|first| PageShape { runs, first }))
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
        assert!(out.contains("page 8 (index 0)"), "{out}");
        assert!(page_shape(&a, &b, &[0, 1], &[0]).is_err());
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
