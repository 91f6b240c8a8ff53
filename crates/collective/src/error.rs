//! The communicator's errors: what failed (the operation), which rank and why, in fields.

use std::time::Duration;

/// A collective or point-to-point operation that did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The group's timeout passed while the operation waited for `ranks` (none: a receive from
    /// any rank, which blames no rank).
    #[error("{op}: timed out after {after:?} waiting for {}", ranks_text(.ranks))]
    Timeout { op: String, ranks: Vec<usize>, after: Duration },
    /// A rank of the group died (its process exited) or its memory became unreachable.
    #[error("{op}: rank {rank} failed: {reason}")]
    RankFailed { op: String, rank: usize, reason: String },
    /// An earlier operation failed: the group cannot be used any more (destroy it and form a
    /// new one). `ranks`: the ones that failure named (none: it blamed no rank).
    #[error("{op}: the group is unusable after an earlier failure ({first})")]
    Poisoned { op: String, first: String, ranks: Vec<usize> },
    /// The group's membership changed again while `op` waited for the ranks of an earlier
    /// view: no rank is to blame; the next call uses the new view.
    #[error("{op}: the group's membership changed meanwhile (now epoch {epoch})")]
    ViewChanged { op: String, epoch: u64 },
    /// The caller used the API wrongly.
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// The engine refused something (opening or mapping a peer).
    #[error("{context}: {source}")]
    Engine { context: String, source: tidewire::Error },
}

impl Error {
    pub(crate) fn invalid(reason: String) -> Self {
        Self::InvalidArgument { reason }
    }

    /// The ranks the failure is about (`get_failed_ranks_hint`).
    pub fn ranks(&self) -> Vec<usize> {
        match self {
            Self::Timeout { ranks, .. } | Self::Poisoned { ranks, .. } => ranks.clone(),
            Self::RankFailed { rank, .. } => vec![*rank],
            _ => Vec::new(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<tidewire::PeersError> for Error {
    fn from(e: tidewire::PeersError) -> Self {
        Error::Engine { context: e.context, source: e.source }
    }
}

/// "rank 2", "ranks 1, 3".
fn ranks_text(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
    match list.len() {
        // A receive from any rank blames none of them.
        0 => "any rank".to_string(),
        1 => format!("rank {}", list[0]),
        _ => format!("ranks {}", list.join(", ")),
    }
}

impl Error {
    /// The variant's name (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "Timeout",
            Self::RankFailed { .. } => "RankFailed",
            Self::Poisoned { .. } => "Poisoned",
            Self::ViewChanged { .. } => "ViewChanged",
            Self::InvalidArgument { .. } => "InvalidArgument",
            Self::Engine { .. } => "Engine",
        }
    }
}

/// Counts a collective call in the process's metrics (when they are recorded): `op` with
/// `algorithm`, `bytes` of this rank's input, and its failure by kind. An empty `algorithm`
/// is a later step of a call already counted: only its failure counts.
pub fn record<T>(op: &str, algorithm: &str, bytes: u64, outcome: &Result<T>) {
    let Some(m) = tidewire::metrics::get() else { return };
    if let Err(e) = outcome {
        m.coll_failures
            .get_or_create(&[("op", op.to_string()), ("kind", e.kind().to_string())])
            .inc();
    }
    if algorithm.is_empty() {
        return;
    }
    m.coll_calls
        .get_or_create(&[("op", op.to_string()), ("algorithm", algorithm.to_string())])
        .inc();
    m.coll_bytes.get_or_create(&[("op", op.to_string())]).inc_by(bytes);
}
