//! The cluster secret: proof, at every handshake, that both ends know it.
//!
//! A connection is opened with a challenge–response in both directions: the initiator sends a
//! fresh nonce `nc`, the target answers with its own nonce `ns` and a MAC over both instance
//! ids and both nonces, the initiator checks it and answers with its own MAC over the same
//! values. Each side's MAC covers a nonce it did not choose, so a recorded handshake cannot be
//! replayed to either side; both instance ids are bound in, so a proof made for one pair of
//! engines is worth nothing to another. The MAC is HMAC-SHA-256 (the RustCrypto `hmac` and
//! `sha2` crates) keyed by SHA-256 of the configured secret; proofs are compared in constant
//! time. Nothing here does I/O or draws random numbers: the caller brings the nonces.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{CoreError, InstanceId};

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof.
pub const PROOF_LEN: usize = 32;

/// A handshake nonce (fresh random bytes from the side that sends it).
pub type Nonce = [u8; NONCE_LEN];
/// A MAC proving knowledge of the secret for one handshake.
pub type Proof = [u8; PROOF_LEN];

/// Which end of a handshake a proof comes from (the two proofs of one handshake differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Target,
}

/// The values one handshake binds its proofs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    pub initiator: InstanceId,
    pub target: InstanceId,
    pub initiator_nonce: Nonce,
    pub target_nonce: Nonce,
}

/// A cluster secret, as a MAC key. Its `Debug` shows the fingerprint, never the key.
#[derive(Clone)]
pub struct ClusterSecret {
    key: [u8; 32],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({})", self.fingerprint())
    }
}

type HmacSha256 = Hmac<Sha256>;

impl ClusterSecret {
    /// The secret made of `bytes` (any length, surrounding whitespace ignored, so that a file
    /// ending in a newline means what it says); refuses an empty one.
    pub fn new(bytes: &[u8]) -> Result<Self, CoreError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.is_empty() {
            return Err(CoreError::Config { reason: "the cluster secret is empty".into() });
        }
        let key: [u8; 32] = Sha256::digest(trimmed).into();
        Ok(Self { key })
    }

    /// A short public name of the secret (8 hex digits of a hash of the key), for operators to
    /// compare engines' configurations; it reveals nothing usable about the secret.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tidewire cluster secret fingerprint");
        h.update(self.key);
        h.finalize()[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, role: Role, t: &Transcript) -> HmacSha256 {
        // HMAC pads a key shorter than the hash's block with zeros: the 32-byte key padded to
        // the 64-byte block is the same key, given in the one form that cannot be refused.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.key);
        let mut m = <HmacSha256 as KeyInit>::new(&block.into());
        m.update(b"tidewire handshake v1");
        m.update(&[match role {
            Role::Initiator => 1,
            Role::Target => 2,
        }]);
        m.update(&t.initiator.0.to_le_bytes());
        m.update(&t.target.0.to_le_bytes());
        m.update(&t.initiator_nonce);
        m.update(&t.target_nonce);
        m
    }

    /// The proof `role` sends for handshake `t`.
    pub fn prove(&self, role: Role, t: &Transcript) -> Proof {
        self.mac(role, t).finalize().into_bytes().into()
    }

    /// Whether `proof` is `role`'s for handshake `t` (compared in constant time).
    pub fn verify(&self, role: Role, t: &Transcript, proof: &[u8]) -> bool {
        self.mac(role, t).verify_slice(proof).is_ok()
    }

    fn message_mac(&self, domain: &[u8], bytes: &[u8]) -> HmacSha256 {
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.key);
        let mut m = <HmacSha256 as KeyInit>::new(&block.into());
        m.update(b"tidewire message v1");
        m.update(&(domain.len() as u64).to_le_bytes());
        m.update(domain);
        m.update(bytes);
        m
    }

    /// A tag proving that `bytes` come from a holder of the secret, for messages that need no
    /// handshake (datagrams); `domain` names their kind, so a tag for one kind is worth nothing
    /// for another. HMAC-SHA-256 cut to [`TAG_LEN`] bytes.
    pub fn tag(&self, domain: &[u8], bytes: &[u8]) -> [u8; TAG_LEN] {
        let full: [u8; 32] = self.message_mac(domain, bytes).finalize().into_bytes().into();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    /// Whether `tag` is [`ClusterSecret::tag`]'s for `domain` and `bytes` (constant time).
    pub fn verify_tag(&self, domain: &[u8], bytes: &[u8], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN && self.message_mac(domain, bytes).verify_truncated_left(tag).is_ok()
    }
}

/// Bytes of a message tag.
pub const TAG_LEN: usize = 16;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(nc: u8, ns: u8) -> Transcript {
        Transcript {
            initiator: InstanceId(1),
            target: InstanceId(2),
            initiator_nonce: [nc; NONCE_LEN],
            target_nonce: [ns; NONCE_LEN],
        }
    }

    #[test]
    fn proofs_verify_only_for_their_secret_role_and_transcript() {
        let s = ClusterSecret::new(b"alpha\n").unwrap();
        let same = ClusterSecret::new(b"  alpha").unwrap();
        let other = ClusterSecret::new(b"beta").unwrap();
        let p = s.prove(Role::Initiator, &t(1, 2));
        assert!(same.verify(Role::Initiator, &t(1, 2), &p), "whitespace around it is ignored");
        assert!(!other.verify(Role::Initiator, &t(1, 2), &p), "another secret");
        assert!(!s.verify(Role::Target, &t(1, 2), &p), "the other role's proof");
        assert!(!s.verify(Role::Initiator, &t(1, 3), &p), "another target nonce (a replay)");
        assert!(!s.verify(Role::Initiator, &t(9, 2), &p), "another initiator nonce");
        let mut swapped = t(1, 2);
        std::mem::swap(&mut swapped.initiator, &mut swapped.target);
        assert!(!s.verify(Role::Initiator, &swapped, &p), "instance ids are bound in");
        assert!(!s.verify(Role::Initiator, &t(1, 2), &p[..31]), "a short proof");
        assert_eq!(s.fingerprint(), same.fingerprint());
        assert_ne!(s.fingerprint(), other.fingerprint());
        assert!(!format!("{s:?}").contains("alpha"));
        let tag = s.tag(b"datagram", b"hello");
        assert!(same.verify_tag(b"datagram", b"hello", &tag));
        assert!(!other.verify_tag(b"datagram", b"hello", &tag), "another secret");
        assert!(!s.verify_tag(b"handshake", b"hello", &tag), "another domain");
        assert!(!s.verify_tag(b"datagram", b"hellp", &tag), "other bytes");
        assert!(!s.verify_tag(b"datagram", b"hello", &tag[..15]), "a short tag");
        assert!(ClusterSecret::new(b" \n").is_err());
    }

    #[test]
    fn the_key_padded_to_the_block_is_the_same_hmac_key() {
        let s = ClusterSecret::new(b"alpha").unwrap();
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&s.key).unwrap();
        m.update(b"tidewire handshake v1");
        m.update(&[1]);
        let tr = t(1, 2);
        m.update(&tr.initiator.0.to_le_bytes());
        m.update(&tr.target.0.to_le_bytes());
        m.update(&tr.initiator_nonce);
        m.update(&tr.target_nonce);
        let want: Proof = m.finalize().into_bytes().into();
        assert_eq!(s.prove(Role::Initiator, &tr), want);
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2() {
        // The MAC primitive itself, against the RFC's test vector (key "Jefe").
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let out: [u8; 32] = m.finalize().into_bytes().into();
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
