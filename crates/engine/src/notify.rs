//! Notifications: small messages attached to a batch, delivered to the peer's queue only after
//! the batch's data is visible there.

use std::collections::VecDeque;

use parking_lot::Mutex;

/// A notification received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's segment name.
    pub from: String,
    pub name: String,
    pub message: String,
}

/// Received notifications, oldest first. Bounded: the oldest are dropped past the limit.
#[derive(Default)]
pub(crate) struct NotifyQueue {
    items: Mutex<VecDeque<Notification>>,
}

const MAX_QUEUED: usize = 1 << 16;

impl NotifyQueue {
    pub(crate) fn push(&self, n: Notification) {
        let mut q = self.items.lock();
        if q.len() >= MAX_QUEUED {
            log::warn!("notification queue full ({MAX_QUEUED}); dropping the oldest");
            q.pop_front();
        }
        q.push_back(n);
    }

    pub(crate) fn take(&self) -> Vec<Notification> {
        self.items.lock().drain(..).collect()
    }
}
