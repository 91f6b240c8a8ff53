//! Who and where this process is: host id (same kernel and network namespace) and host name.

use tidewire_core::HostId;

/// The host id: the kernel's boot id plus the network namespace. Two processes with the same
/// id can share memfds and reach each other's abstract Unix sockets.
pub(crate) fn host_id() -> HostId {
    // Containers that share a kernel but not their GPUs' reach, and tests that put two
    // processes of one machine on "different hosts", name the host themselves.
    if let Ok(id) = std::env::var("TIDEWIRE_HOST_ID") {
        if !id.is_empty() {
            return HostId(id);
        }
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into());
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-netns".into());
    HostId(format!("{boot}/{netns}"))
}

/// This host's name.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
