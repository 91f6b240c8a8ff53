//! The control messages of the shm socket: fixed 9-byte requests and answers, the answer
//! carrying a file descriptor (SCM_RIGHTS, the transport's business) when it grants one.
//!
//! ```text
//! request  [what u8][region id u64 LE]   what: 0 data memfd, 1 revocation page, 2 VMM fd,
//!                                        3 liveness page (region id ignored)
//! answer   [status u8][length u64 LE]    status 0: granted, length is the region's;
//!                                        any other: refused, length is meaningless
//! ```
//! Decoding is total: a request of an unknown kind is an error, every answer decodes.

use crate::{CoreError, RegionId};

/// Bytes of every request and answer.
pub const SHM_MESSAGE_LEN: usize = 9;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ShmFetch {
    /// The memfd of a shared host region.
    Data = 0,
    /// The revocation page of exported device memory.
    Control = 1,
    /// The POSIX file descriptor of an exported VMM allocation.
    VmmFd = 2,
    /// The target engine's liveness page (a robust mutex word its process holds); the
    /// region id is not read.
    Alive = 3,
}

impl ShmFetch {
    /// The kind with wire value `v`, if this build knows it.
    pub fn from_u8(v: u8) -> Option<Self> {
        [Self::Data, Self::Control, Self::VmmFd, Self::Alive].into_iter().find(|k| *k as u8 == v)
    }
}

/// An initiator's request for a descriptor of one of the target's regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShmRequest {
    pub what: ShmFetch,
    pub region: RegionId,
}

impl ShmRequest {
    pub fn encode(&self) -> [u8; SHM_MESSAGE_LEN] {
        let mut b = [0u8; SHM_MESSAGE_LEN];
        b[0] = self.what as u8;
        b[1..].copy_from_slice(&self.region.0.to_le_bytes());
        b
    }

    /// Decodes a request from untrusted bytes; an unknown kind is [`CoreError::ShmKind`].
    pub fn decode(b: &[u8; SHM_MESSAGE_LEN]) -> Result<Self, CoreError> {
        let (kind, id) = split(b);
        let region = RegionId(id);
        let what = ShmFetch::from_u8(kind).ok_or(CoreError::ShmKind { kind, region })?;
        Ok(Self { what, region })
    }
}

/// The target's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShmAnswer {
    /// A descriptor comes with this message; `len` is the length the target states for it
    /// (data bytes for `Data`, the allocation size for `VmmFd`, 0 for `Control` and `Alive`).
    Granted { len: u64 },
    /// Unknown or unregistered region, not shareable, or a kind the target does not serve.
    Refused,
}

impl ShmAnswer {
    /// `Refused` is sent as status 1 and length 0.
    pub fn encode(&self) -> [u8; SHM_MESSAGE_LEN] {
        let mut b = [0u8; SHM_MESSAGE_LEN];
        match self {
            Self::Granted { len } => b[1..].copy_from_slice(&len.to_le_bytes()),
            Self::Refused => b[0] = 1,
        }
        b
    }

    /// Decodes an answer from untrusted bytes: status 0 grants, anything else refuses.
    pub fn decode(b: &[u8; SHM_MESSAGE_LEN]) -> Self {
        match split(b) {
            (0, len) => Self::Granted { len },
            _ => Self::Refused,
        }
    }
}

/// The first byte and the little-endian word after it.
fn split(b: &[u8; SHM_MESSAGE_LEN]) -> (u8, u64) {
    let [first, word @ ..] = *b;
    (first, u64::from_le_bytes(word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip_and_keep_the_layout() {
        let r = ShmRequest { what: ShmFetch::VmmFd, region: RegionId(0x0102_0304_0506_0708) };
        assert_eq!(r.encode(), [2, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(ShmRequest::decode(&r.encode()), Ok(r));
        for what in [ShmFetch::Data, ShmFetch::Control, ShmFetch::VmmFd, ShmFetch::Alive] {
            let r = ShmRequest { what, region: RegionId(u64::MAX) };
            assert_eq!(ShmRequest::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn an_unknown_kind_is_an_error_naming_it() {
        let mut b = ShmRequest { what: ShmFetch::Data, region: RegionId(9) }.encode();
        b[0] = 4;
        assert_eq!(
            ShmRequest::decode(&b),
            Err(CoreError::ShmKind { kind: 4, region: RegionId(9) })
        );
    }

    #[test]
    fn answers_round_trip_and_any_nonzero_status_refuses() {
        let a = ShmAnswer::Granted { len: 1 << 40 };
        assert_eq!(a.encode()[0], 0);
        assert_eq!(ShmAnswer::decode(&a.encode()), a);
        assert_eq!(ShmAnswer::decode(&ShmAnswer::Refused.encode()), ShmAnswer::Refused);
        // What earlier builds sent for a refusal.
        assert_eq!(ShmAnswer::decode(&[1u8; 9]), ShmAnswer::Refused);
        assert_eq!(ShmAnswer::decode(&[255, 0, 0, 0, 0, 0, 0, 0, 0]), ShmAnswer::Refused);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(b in any::<[u8; SHM_MESSAGE_LEN]>()) {
            match ShmRequest::decode(&b) {
                Ok(r) => prop_assert_eq!(r.encode(), b),
                Err(e) => prop_assert!(b[0] > 3, "{}", e),
            }
            let a = ShmAnswer::decode(&b);
            prop_assert_eq!(ShmAnswer::decode(&a.encode()), a);
            if b[0] == 0 {
                prop_assert_eq!(a.encode(), b);
            }
        }
    }
}
