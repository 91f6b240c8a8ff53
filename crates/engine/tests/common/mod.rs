//! Helpers shared by the engine's integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use rand::{Rng, SeedableRng};
use tidewire::{Engine, EngineConfig, HostBuffer};

/// A peer-to-peer engine on loopback with an OS-chosen port.
pub fn engine() -> Engine {
    Engine::new(config()).expect("engine starts")
}

pub fn config() -> EngineConfig {
    EngineConfig {
        port: Some(0),
        ..EngineConfig::default()
    }
}

/// `len` random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A registered buffer filled with `fill`.
pub fn registered(engine: &Engine, len: usize, fill: &[u8]) -> HostBuffer {
    let mut b = HostBuffer::new(len).unwrap();
    b.fill_from(fill);
    // SAFETY: the buffer lives until the test ends; engines are shut down (or the region
    // unregistered) before it drops, as every test keeps engines declared after buffers.
    unsafe { engine.register(b.addr(), len as u64, "cpu").unwrap() };
    b
}

/// Reads `len` bytes of raw memory at `addr` (a region the test owns).
pub fn peek(addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: tests only peek at buffers they allocated and that are alive.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), len) };
    out
}

/// Writes `data` at `addr` (a region the test owns).
pub fn poke(addr: u64, data: &[u8]) {
    // SAFETY: as for `peek`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}
