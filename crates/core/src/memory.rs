//! Where memory lives, and what a caller's location hint claims about it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The kind of a registered region, as classified from the pointer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MemoryKind {
    /// Ordinary process memory (heap, stack, anonymous or file mappings).
    HostPageable,
    /// Host memory page-locked with the CUDA driver.
    HostPinned,
    /// Host memory the engine allocated as shareable (a memfd), reachable by same-host peers.
    HostShared,
    /// Device memory from `cudaMalloc` / `cuMemAlloc`.
    Device,
    /// Device memory from the CUDA virtual memory API (`cuMemCreate` + `cuMemMap`).
    DeviceVmm,
    /// CUDA managed (unified) memory.
    Managed,
}

impl MemoryKind {
    /// True for memory the CPU owns (a location hint of `cpu` fits it).
    pub fn is_host(self) -> bool {
        matches!(self, Self::HostPageable | Self::HostPinned | Self::HostShared)
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HostPageable => "host pageable",
            Self::HostPinned => "host pinned",
            Self::HostShared => "host shared (memfd)",
            Self::Device => "device (cudaMalloc)",
            Self::DeviceVmm => "device (VMM)",
            Self::Managed => "managed",
        })
    }
}

/// What the pointer classification found: the kind and, for device memory, the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub kind: MemoryKind,
    /// CUDA device ordinal for device and VMM memory; `None` for host memory.
    pub device: Option<u32>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.device {
            Some(d) => write!(f, "{} on cuda:{d}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// A caller's claim about where memory lives (Mooncake's `location` string).
/// It is a hint: the pointer's own classification wins, and a contradiction is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocationHint {
    /// `*` or empty: no claim.
    Any,
    /// `cpu` or `cpu:N` (a NUMA node, recorded but not checked).
    Cpu,
    /// `cuda:N`.
    Cuda(u32),
}

impl LocationHint {
    /// Parses `*`, ``, `cpu`, `cpu:N`, `cuda`, `cuda:N` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        let t = text.trim().to_ascii_lowercase();
        let bad = || CoreError::LocationHint { hint: text.to_string() };
        if t.is_empty() || t == "*" {
            return Ok(Self::Any);
        }
        let (head, tail) = match t.split_once(':') {
            Some((h, n)) => (h, Some(n)),
            None => (t.as_str(), None),
        };
        let number = |n: Option<&str>| -> Result<Option<u32>, CoreError> {
            n.map(|s| s.parse::<u32>().map_err(|_| bad())).transpose()
        };
        match head {
            "cpu" => number(tail).map(|_| Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(number(tail)?.unwrap_or(0))),
            _ => Err(bad()),
        }
    }

    /// Checks the hint against the classified location. Returns the contradiction, if any,
    /// as a sentence naming both.
    pub fn contradiction(self, found: Location) -> Option<String> {
        match self {
            Self::Any => None,
            Self::Cpu if found.kind.is_host() || found.kind == MemoryKind::Managed => None,
            Self::Cpu => Some(format!("hint \"cpu\" but the pointer is {found}")),
            Self::Cuda(_) if found.kind.is_host() => Some(format!(
                "hint \"{self}\" but the pointer is {found}; register it as \"cpu\" or \"*\""
            )),
            Self::Cuda(want) => match found.device {
                Some(dev) if dev != want => {
                    Some(format!("hint \"{self}\" but the pointer is {found}"))
                }
                _ => None,
            },
        }
    }
}

impl fmt::Display for LocationHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(d) => write!(f, "cuda:{d}"),
        }
    }
}

/// True when `[addr, addr+len)` is non-empty and lies inside `[start, start+size)`. Branch-free
/// (no short-circuit), so a scan over many requests compiles to straight-line compares:
/// `0 < len <= size` and `addr - start <= size - len`, unsigned (an `addr` below `start` wraps
/// to a huge offset).
#[inline(always)]
pub fn range_within(addr: u64, len: u64, start: u64, size: u64) -> bool {
    (len.wrapping_sub(1) < size) & (addr.wrapping_sub(start) <= size.wrapping_sub(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Location = Location { kind: MemoryKind::HostPageable, device: None };
    const DEV1: Location = Location { kind: MemoryKind::Device, device: Some(1) };

    #[test]
    fn hints_parse() {
        assert_eq!(LocationHint::parse("*"), Ok(LocationHint::Any));
        assert_eq!(LocationHint::parse(""), Ok(LocationHint::Any));
        assert_eq!(LocationHint::parse("cpu:0"), Ok(LocationHint::Cpu));
        assert_eq!(LocationHint::parse("CUDA:3"), Ok(LocationHint::Cuda(3)));
        assert!(LocationHint::parse("cuda:x").is_err());
        assert!(LocationHint::parse("tpu:0").is_err());
    }

    #[test]
    fn contradictions_name_both() {
        assert_eq!(LocationHint::Any.contradiction(DEV1), None);
        assert_eq!(LocationHint::Cpu.contradiction(HOST), None);
        assert_eq!(LocationHint::Cuda(1).contradiction(DEV1), None);
        let msg = LocationHint::Cuda(0).contradiction(HOST).unwrap_or_default();
        assert!(msg.contains("cuda:0") && msg.contains("host pageable"), "{msg}");
        let msg = LocationHint::Cuda(0).contradiction(DEV1).unwrap_or_default();
        assert!(msg.contains("cuda:0") && msg.contains("cuda:1"), "{msg}");
        assert!(LocationHint::Cpu.contradiction(DEV1).is_some());
    }

    proptest::proptest! {
        #[test]
        fn range_within_agrees_with_the_obvious_definition(
            addr in proptest::prop_oneof![0u64..64, proptest::num::u64::ANY],
            len in proptest::prop_oneof![0u64..64, proptest::num::u64::ANY],
            start in proptest::prop_oneof![0u64..64, proptest::num::u64::ANY],
            size in proptest::prop_oneof![0u64..64, proptest::num::u64::ANY],
        ) {
            let obvious = len > 0
                && addr >= start
                && addr.checked_add(len).is_some_and(|end| {
                    start.checked_add(size).is_some_and(|limit| end <= limit)
                });
            // Regions never wrap the address space; only those are asked about.
            if start.checked_add(size).is_some() {
                proptest::prop_assert_eq!(range_within(addr, len, start, size), obvious);
            }
        }
    }
}
