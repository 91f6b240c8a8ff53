//! Handshake frames arrive from anyone who reaches the RPC port or the shm socket: the
//! target's answers and the initiator's machine must never panic on any bytes, and nothing an
//! attacker sends without the secret may open a connection that requires it.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tidewire_core::auth::{ClusterSecret, PROOF_LEN};
use tidewire_core::handshake::{
    answer_auth, answer_hello, ClientAuth, Handshake, HandshakeEvent, HelloAnswer,
};
use tidewire_core::wire::{FrameKind, Header, HEADER_LEN, MAGIC};
use tidewire_core::InstanceId;

fuzz_target!(|data: &[u8]| {
    // A header (the magic forced, so that the rest of it is what varies), a proof, a payload.
    let Some((raw, rest)) = data.split_first_chunk::<HEADER_LEN>() else { return };
    let Some((proof, payload)) = rest.split_first_chunk::<PROOF_LEN>() else { return };
    let mut raw = *raw;
    raw[..4].copy_from_slice(&MAGIC);
    let Ok(h) = Header::decode(&raw) else { return };
    let Ok(secret) = ClusterSecret::new(b"fuzz") else { return };
    // The target, with and without a secret: a proof the input carries cannot be of the
    // secret (fuzzing cannot compute one).
    for s in [Some(&secret), None] {
        if let HelloAnswer::Challenged(_, t) = answer_hello(&h, payload, InstanceId(2), s, [3; 32]) {
            let auth = Header::new(FrameKind::Auth, 0, 0, PROOF_LEN as u64);
            let (_, ok) = answer_auth(&auth, proof, &secret, &t);
            assert!(!ok, "a random proof was accepted");
        }
    }
    // The initiator, fed the bytes as the target's answer: never established without a proof.
    let auth = ClientAuth { secret, me: InstanceId(1), nonce: [4; 32] };
    let mut hs = Handshake::new(Instant::now(), Duration::from_secs(1), None, Some(auth));
    while hs.poll_transmit().is_some() {}
    hs.handle_frame(Instant::now(), &h, payload);
    assert!(!matches!(hs.poll_event(), Some(HandshakeEvent::Established(_))), "established without a proof");
});
