//! Cluster allocation without refcounts on the hot path.
//!
//! New clusters come from the end of the file, or from clusters freed earlier in this
//! session. A freed cluster is *pending* until the metadata that unlinked it is durable
//! and its contents have been hole-punched durably (see `Image::flush`); only then is
//! it *ready* to be handed out again, so a torn write can never expose old data through
//! another link.

use crate::format::addr::HostOffset;

/// The allocator's state. All offsets are cluster-aligned host offsets.
///
/// ```
/// use qcowx_core::engine::alloc::Allocator;
/// use qcowx_core::format::addr::HostOffset;
///
/// let mut a = Allocator::new(65536, 100_000); // a file of 100,000 bytes
/// assert_eq!(a.cluster(), HostOffset::new(131072)); // the next whole cluster
/// assert_eq!(a.contiguous(2), HostOffset::new(196608));
/// assert_eq!(a.end(), 327680);
///
/// // A freed cluster waits for its punch before it is handed out again.
/// a.free(HostOffset::new(131072));
/// assert_eq!(a.pending_len(), 1);
/// assert_eq!(a.cluster(), HostOffset::new(327680));
/// let punched = a.take_pending();
/// a.make_ready(punched);
/// a.hold_ready(true); // a gc is counting: ready clusters stay put
/// assert_eq!(a.unused().collect::<Vec<_>>(), [131072]);
/// assert_eq!(a.cluster(), HostOffset::new(393216));
/// a.hold_ready(false);
/// assert_eq!(a.cluster(), HostOffset::new(131072));
///
/// a.reset(65536); // the file was cut back
/// assert_eq!(a.end(), 65536);
/// ```
#[derive(Debug)]
pub struct Allocator {
    cluster_size: u64,
    end: u64,
    pending: Vec<u64>,
    ready: Vec<u64>,
    /// While set, ready clusters are not handed out (a gc is counting references and
    /// must not see a free cluster become linked behind its back).
    hold_ready: bool,
}

impl Allocator {
    /// An allocator that hands out clusters from `file_len` (rounded up) onwards.
    pub fn new(cluster_size: u64, file_len: u64) -> Allocator {
        Allocator {
            cluster_size,
            end: file_len.next_multiple_of(cluster_size),
            pending: Vec::new(),
            ready: Vec::new(),
            hold_ready: false,
        }
    }

    /// One cluster: a ready freed one, or a new one at the end.
    pub fn cluster(&mut self) -> HostOffset {
        if !self.hold_ready {
            if let Some(c) = self.ready.pop() {
                return HostOffset::new(c);
            }
        }
        self.contiguous(1)
    }

    /// `n` contiguous new clusters at the end of the file.
    pub fn contiguous(&mut self, n: u64) -> HostOffset {
        let at = self.end;
        self.end += n * self.cluster_size;
        HostOffset::new(at)
    }

    /// The first offset past every cluster allocated so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Resets the end (after the file was truncated or compacted).
    pub fn reset(&mut self, end: u64) {
        self.end = end.next_multiple_of(self.cluster_size);
        self.pending.clear();
        self.ready.clear();
    }

    /// Records a cluster that nothing links to any more (once the unlink is durable).
    pub fn free(&mut self, offset: HostOffset) {
        self.pending.push(offset.get());
    }

    /// Takes the pending clusters, sorted, for punching.
    pub fn take_pending(&mut self) -> Vec<u64> {
        let mut p = std::mem::take(&mut self.pending);
        p.sort_unstable();
        p
    }

    /// Makes punched clusters available.
    pub fn make_ready(&mut self, clusters: Vec<u64>) {
        self.ready.extend(clusters);
    }

    /// Stops (`true`) or resumes (`false`) handing out ready clusters: while held,
    /// every new cluster comes from the end of the file.
    pub fn hold_ready(&mut self, hold: bool) {
        self.hold_ready = hold;
    }

    /// Clusters freed but not yet handed out again (pending or ready).
    pub fn unused(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.iter().chain(&self.ready).copied()
    }

    /// Number of clusters waiting to be punched.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// Groups sorted cluster offsets into `(start, len)` runs.
///
/// ```
/// use qcowx_core::engine::alloc::runs;
///
/// assert_eq!(runs(&[0, 512, 1024, 4096], 512), [(0, 1536), (4096, 512)]);
/// ```
pub fn runs(sorted: &[u64], cluster_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in sorted {
        match out.last_mut() {
            Some((s, l)) if *s + *l == c => *l += cluster_size,
            _ => out.push((c, cluster_size)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_then_ready() {
        let mut a = Allocator::new(512, 1000);
        assert_eq!(a.cluster().get(), 1024);
        assert_eq!(a.contiguous(2).get(), 1536);
        a.free(HostOffset::new(512));
        assert_eq!(a.cluster().get(), 2560, "pending clusters are not reused");
        let p = a.take_pending();
        a.make_ready(p);
        assert_eq!(a.cluster().get(), 512);
        assert_eq!(runs(&[0, 512, 2048], 512), vec![(0, 1024), (2048, 512)]);
    }

    #[test]
    fn held_ready_clusters_stay_unused() {
        let mut a = Allocator::new(512, 1024);
        a.free(HostOffset::new(512));
        let p = a.take_pending();
        a.make_ready(p);
        a.hold_ready(true);
        assert_eq!(
            a.cluster().get(),
            1024,
            "a held ready cluster is not handed out"
        );
        assert_eq!(a.unused().collect::<Vec<_>>(), vec![512]);
        a.hold_ready(false);
        assert_eq!(a.cluster().get(), 512);
    }
}
