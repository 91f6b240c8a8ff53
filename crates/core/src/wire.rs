//! The RPC/data wire protocol: fixed 32-byte frame headers, optionally followed by a payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic  "TWW1"
//!      4     1  kind   (FrameKind)
//!      5     1  status (Status; 0 in requests)
//!      6     2  flags  (must be 0)
//!      8     8  tag    (chosen by the requester, echoed in the response)
//!     16     8  addr   (remote address for Write / Read, echoed in responses)
//!     24     8  len    (payload length, or the requested length for Read)
//! ```
//! All integers are little-endian. Each kind has a payload limit; a header announcing more is
//! rejected before a single payload byte is read, and the connection is dropped.

use crate::CoreError;

pub const MAGIC: [u8; 4] = *b"TWW1";
pub const HEADER_LEN: usize = 32;
/// Largest data payload in one Write or ReadData frame. Larger requests are split.
pub const MAX_DATA_FRAME: u64 = 16 << 20;
/// Largest control payload (descriptors).
pub const MAX_CONTROL_FRAME: u64 = crate::descriptor::MAX_DESCRIPTOR_BYTES as u64;
/// Largest notification payload.
pub const MAX_NOTIFY_FRAME: u64 = 1 << 20;
/// Size of an instance id on the wire.
pub const INSTANCE_LEN: u64 = 16;
/// Payload of a `Hello` with a cluster secret: expected instance, own instance, nonce.
pub const HELLO_AUTH_PAYLOAD: u64 = 2 * INSTANCE_LEN + crate::auth::NONCE_LEN as u64;
/// Payload of a `HelloAck` answering one: instance, nonce, proof.
pub const HELLO_ACK_AUTH_PAYLOAD: u64 =
    INSTANCE_LEN + (crate::auth::NONCE_LEN + crate::auth::PROOF_LEN) as u64;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Opens a connection; payload: the instance id the initiator expects (0: any), then,
    /// when it has a cluster secret, its own instance id and a nonce (`handshake.rs`).
    Hello = 1,
    /// Payload: the target's instance id, then, answering a hello with a nonce, its own nonce
    /// and its proof of the cluster secret. Status AccessDenied: refused.
    HelloAck = 2,
    GetDescriptor = 3,
    /// Payload: the descriptor JSON.
    Descriptor = 4,
    /// Payload: `len` bytes to store at `addr`.
    Write = 5,
    WriteAck = 6,
    /// Asks for `len` bytes at `addr`.
    Read = 7,
    /// Payload: the bytes read (none when status is not Ok).
    ReadData = 8,
    /// Payload: length-prefixed strings (sender segment, notification name, message).
    Notify = 9,
    NotifyAck = 10,
    Probe = 11,
    ProbeAck = 12,
    /// Marks an in-flight GPU copy into region `addr` (a region id) of the target, unless the
    /// region was unregistered: the revocation channel of peers that share no host (mnnvl).
    /// The target's `unregister` waits for the matching `Leave`, or for the connection to close.
    Enter = 13,
    /// Status Ok: marked; AccessDenied: unknown or unregistered.
    EnterAck = 14,
    /// Clears one `Enter` of region `addr`.
    Leave = 15,
    LeaveAck = 16,
    /// The initiator's proof of the cluster secret (payload), after the target's.
    Auth = 17,
    /// Status Ok: the connection is open; AccessDenied: the proof was wrong (then closed).
    AuthAck = 18,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameKind::*;
        [Hello, HelloAck, GetDescriptor, Descriptor, Write, WriteAck, Read, ReadData, Notify]
            .into_iter()
            .chain([NotifyAck, Probe, ProbeAck, Enter, EnterAck, Leave, LeaveAck, Auth, AuthAck])
            .find(|k| *k as u8 == v)
    }

    /// The largest payload a frame of this kind may carry (0: none).
    pub fn payload_limit(self) -> u64 {
        match self {
            Self::Hello => HELLO_AUTH_PAYLOAD,
            Self::HelloAck => HELLO_ACK_AUTH_PAYLOAD,
            Self::Auth => crate::auth::PROOF_LEN as u64,
            Self::AuthAck => 0,
            Self::Descriptor => MAX_CONTROL_FRAME,
            Self::Write | Self::ReadData => MAX_DATA_FRAME,
            Self::Notify => MAX_NOTIFY_FRAME,
            Self::GetDescriptor | Self::WriteAck | Self::Read => 0,
            Self::NotifyAck | Self::Probe | Self::ProbeAck => 0,
            Self::Enter | Self::EnterAck | Self::Leave | Self::LeaveAck => 0,
        }
    }

    /// True when the `len` field counts payload bytes that follow the header.
    pub fn len_is_payload(self) -> bool {
        !matches!(self, Self::Read | Self::WriteAck)
    }
}

/// Result code carried in responses. Mapped to errors in exactly one place on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The range is not inside a registered region of the target (or was unregistered).
    AccessDenied = 1,
    /// The target is shutting down.
    ShuttingDown = 2,
    /// The request was malformed.
    BadRequest = 3,
    /// The target failed internally.
    Internal = 4,
}

impl Status {
    fn from_u8(v: u8) -> Option<Self> {
        [Self::Ok, Self::AccessDenied, Self::ShuttingDown, Self::BadRequest, Self::Internal]
            .into_iter()
            .find(|s| *s as u8 == v)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub status: Status,
    pub tag: u64,
    pub addr: u64,
    pub len: u64,
}

impl Header {
    pub fn new(kind: FrameKind, tag: u64, addr: u64, len: u64) -> Self {
        Self { kind, status: Status::Ok, tag, addr, len }
    }

    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Bytes of payload that follow this header.
    pub fn payload_len(&self) -> u64 {
        if self.kind.len_is_payload() {
            self.len
        } else {
            0
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.status as u8;
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and validates a header from untrusted bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, CoreError> {
        if b[0..4] != MAGIC {
            return Err(CoreError::Frame { reason: "bad magic" });
        }
        let kind = FrameKind::from_u8(b[4]).ok_or(CoreError::Frame { reason: "unknown kind" })?;
        let status = Status::from_u8(b[5]).ok_or(CoreError::Frame { reason: "unknown status" })?;
        if b[6] != 0 || b[7] != 0 {
            return Err(CoreError::Frame { reason: "reserved flags set" });
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let h = Self { kind, status, tag: word(8), addr: word(16), len: word(24) };
        let limit = kind.payload_limit();
        if h.payload_len() > limit {
            return Err(CoreError::Oversized { kind: b[4], len: h.payload_len(), limit });
        }
        let hello_len = match kind {
            FrameKind::Hello => Some([INSTANCE_LEN, HELLO_AUTH_PAYLOAD]),
            // A refusal may carry no payload.
            FrameKind::HelloAck if status != Status::Ok => Some([0, INSTANCE_LEN]),
            FrameKind::HelloAck => Some([INSTANCE_LEN, HELLO_ACK_AUTH_PAYLOAD]),
            _ => None,
        };
        if hello_len.is_some_and(|ok| !ok.contains(&h.len)) {
            return Err(CoreError::Frame {
                reason: "a hello or its answer of a length no version sends",
            });
        }
        if kind == FrameKind::Auth && h.len != crate::auth::PROOF_LEN as u64 {
            return Err(CoreError::Frame { reason: "an auth frame must carry one proof" });
        }
        if matches!(kind, FrameKind::Write | FrameKind::Read) && h.addr.checked_add(h.len).is_none()
        {
            return Err(CoreError::Frame { reason: "address range wraps" });
        }
        Ok(h)
    }
}

/// Encodes strings as `u32 length + bytes` each.
pub fn encode_strings(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Decodes exactly `N` length-prefixed UTF-8 strings from untrusted bytes.
pub fn decode_strings<const N: usize>(mut b: &[u8]) -> Result<[String; N], CoreError> {
    let bad = |reason: &str| CoreError::Payload { what: "strings", reason: reason.to_string() };
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for slot in out.iter_mut() {
        let (len_bytes, rest) =
            b.split_first_chunk::<4>().ok_or_else(|| bad("truncated length"))?;
        let len = u32::from_le_bytes(*len_bytes) as usize;
        if rest.len() < len {
            return Err(bad("truncated string"));
        }
        let (s, rest) = rest.split_at(len);
        *slot = std::str::from_utf8(s).map_err(|_| bad("not UTF-8"))?.to_string();
        b = rest;
    }
    if !b.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn headers_round_trip() {
        let h = Header::new(FrameKind::Write, 7, 0x1000, 4096);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let h = Header::new(FrameKind::Read, 1, 0x1000, 1 << 40).with_status(Status::AccessDenied);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn rejects_oversized_and_malformed() {
        let h = Header::new(FrameKind::Write, 1, 0, MAX_DATA_FRAME + 1);
        assert!(matches!(Header::decode(&h.encode()), Err(CoreError::Oversized { .. })));
        let h = Header::new(FrameKind::Probe, 1, 0, 5);
        assert!(matches!(Header::decode(&h.encode()), Err(CoreError::Oversized { .. })));
        let mut b = Header::new(FrameKind::Probe, 1, 0, 0).encode();
        b[0] = b'X';
        assert!(Header::decode(&b).is_err());
        let mut b = Header::new(FrameKind::Probe, 1, 0, 0).encode();
        b[4] = 200;
        assert!(Header::decode(&b).is_err());
        let h = Header::new(FrameKind::Write, 1, u64::MAX - 2, 16);
        assert!(Header::decode(&h.encode()).is_err());
    }

    #[test]
    fn strings_round_trip() {
        let b = encode_strings(&["a", "", "héllo"]);
        assert_eq!(decode_strings::<3>(&b), Ok(["a".into(), String::new(), "héllo".into()]));
        assert!(decode_strings::<2>(&b).is_err());
        assert!(decode_strings::<3>(&b[..b.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = [0u8; HEADER_LEN];
            let n = bytes.len().min(HEADER_LEN);
            b[..n].copy_from_slice(&bytes[..n]);
            let _ = Header::decode(&b);
            b[..4].copy_from_slice(&MAGIC);
            let _ = Header::decode(&b);
            let _ = decode_strings::<3>(&bytes);
            let _ = crate::descriptor::SegmentDescriptor::from_json(&bytes);
        }
    }
}
