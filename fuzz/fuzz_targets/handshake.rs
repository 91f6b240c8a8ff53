//! Handshake frames arrive from anyone who reaches the RPC port or the shm socket: the
//! target's answers and the initiator's machine must never panic on any bytes, and nothing an
//! attacker sends without the secret may open a connection that requires it.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tidewire_core::auth::ClusterSecret;
use tidewire_core::handshake::{answer_auth, answer_hello, ClientAuth, Handshake, HelloAnswer};
use tidewire_core::wire::{FrameKind, Header, HEADER_LEN};
use tidewire_core::InstanceId;

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.first_chunk::<HEADER_LEN>() else { return };
    let Ok(h) = Header::decode(raw) else { return };
    let payload = &data[HEADER_LEN..];
    let secret = ClusterSecret::new(b"fuzz").ok();
    let Some(secret) = secret else { return };
    // The target, with and without a secret.
    for s in [Some(&secret), None] {
        if let HelloAnswer::Challenged(_, t) = answer_hello(&h, payload, InstanceId(2), s, [3; 32]) {
            // Whatever proof follows, it cannot be right without the secret... unless the
            // input carries a proof made with it, which fuzzing cannot compute.
            let (_, ok) = answer_auth(&Header::new(FrameKind::Auth, 0, 0, 32), payload, &secret, &t);
            assert!(!ok || payload.len() == 32);
        }
    }
    // The initiator, fed the bytes as the target's answer.
    let auth = ClientAuth { secret, me: InstanceId(1), nonce: [4; 32] };
    let mut hs = Handshake::new(Instant::now(), Duration::from_secs(1), None, Some(auth));
    while hs.poll_transmit().is_some() {}
    hs.handle_frame(Instant::now(), &h, payload);
    let _ = hs.poll_event();
});
