//! Who may touch this engine's memory: the cluster secret every connection must prove (RPC
//! port, tcp lanes, the revocation channel, the shm socket), the uid check of the shm socket,
//! and the count of what was refused.

use std::sync::atomic::{AtomicU64, Ordering};

use tidewire_core::auth::{ClusterSecret, Nonce};
use tidewire_core::handshake::{answer_auth, answer_hello, HelloAnswer};
use tidewire_core::wire::Header;
use tidewire_core::InstanceId;

/// The target side's policy and counters, shared by every entry point of one engine.
#[derive(Debug)]
pub(crate) struct Guard {
    pub(crate) secret: Option<ClusterSecret>,
    pub(crate) me: InstanceId,
    /// Processes of other uids may use the shm socket.
    pub(crate) any_uid: bool,
    /// How long a connection may take to complete its handshake (the engine's deadline).
    pub(crate) handshake: std::time::Duration,
    refused: AtomicU64,
}

/// What the target does after a frame of the handshake.
pub(crate) enum Step {
    /// Send this; the connection is open (serve it).
    Open(Vec<u8>),
    /// Send this; the initiator's proof comes next.
    Wait(Vec<u8>, tidewire_core::auth::Transcript),
    /// Send this, then close (refused: counted and logged).
    Refuse(Vec<u8>),
}

impl Guard {
    pub(crate) fn new(
        secret: Option<ClusterSecret>,
        me: InstanceId,
        any_uid: bool,
        handshake: std::time::Duration,
    ) -> Self {
        Self { secret, me, any_uid, handshake, refused: AtomicU64::new(0) }
    }

    /// Connections refused so far (no secret, another secret, another uid).
    pub(crate) fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Counts and logs one refusal at `entry` (which endpoint) of `peer`.
    pub(crate) fn refuse(&self, entry: &str, peer: &str, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        log::warn!("{entry}: refused a connection from {peer}: {why}");
    }

    /// The answer to a `Hello` (payload whole) at `entry` from `peer`.
    pub(crate) fn hello(&self, entry: &str, peer: &str, h: &Header, payload: &[u8]) -> Step {
        let nonce: Nonce = rand::random();
        match answer_hello(h, payload, self.me, self.secret.as_ref(), nonce) {
            HelloAnswer::Open(a) => Step::Open(a),
            HelloAnswer::Challenged(a, t) => Step::Wait(a, t),
            HelloAnswer::Refused(a) => {
                self.refuse(
                    entry,
                    peer,
                    "it offered no proof of the cluster secret this engine requires",
                );
                Step::Refuse(a)
            }
            HelloAnswer::Unasked(a) => {
                // Open from our side: the initiator will refuse us, and says why.
                log::warn!(
                    "{entry}: {peer} offered a cluster secret and this engine has none \
                     (set TIDEWIRE_CLUSTER_SECRET alike on every engine)"
                );
                Step::Open(a)
            }
        }
    }

    /// The answer to the initiator's `Auth` for handshake `t`.
    pub(crate) fn auth(
        &self,
        entry: &str,
        peer: &str,
        h: &Header,
        payload: &[u8],
        t: &tidewire_core::auth::Transcript,
    ) -> Step {
        let Some(secret) = &self.secret else {
            self.refuse(entry, peer, "a proof without a challenge");
            return Step::Refuse(Vec::new());
        };
        let (a, ok) = answer_auth(h, payload, secret, t);
        if ok {
            Step::Open(a)
        } else {
            self.refuse(entry, peer, "its proof is not of this engine's cluster secret");
            Step::Refuse(a)
        }
    }
}
