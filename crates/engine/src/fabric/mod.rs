//! libfabric, loaded at run time (as the CUDA driver is): which providers this host offers for
//! one-sided RMA between processes, and which one the fabric transport would use, with the
//! reason. The build needs nothing of libfabric; a host without it (or without a usable
//! provider) says why, and transfers across hosts stay on tidewire's own tcp transport.
//!
//! Choice: `TIDEWIRE_FABRIC_PROVIDER` (or libfabric's own `FI_PROVIDER`, its first name) asks
//! for a provider by name; otherwise `efa`, then `verbs`, else none: libfabric's `tcp` and
//! `shm` are offered only when asked for (tidewire's own transports serve those paths).
//!
//! The C interface is in `sys.rs`; [`rma`] opens endpoints and moves bytes with one-sided
//! RMA (the fabric transport's machinery, tested over the `tcp` provider on loopback).

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

pub mod rma;
mod sys;
pub(crate) mod topo;

/// A provider (and domain: a NIC, or a host's loopback) libfabric offers for RDM endpoints
/// with RMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The provider's name (`efa`, `verbs;ofi_rxm`, `tcp;ofi_rxm`, `shm`, ...).
    pub name: String,
    /// The domain: the NIC or interface it runs on.
    pub domain: String,
    /// The fabric (network) it belongs to.
    pub fabric: String,
    /// The provider's version, major and minor.
    pub version: (u32, u32),
}

impl Provider {
    /// The core provider (the first of a layered name: `verbs` of `verbs;ofi_rxm`).
    pub fn core(&self) -> &str {
        self.name.split(';').next().unwrap_or(&self.name)
    }
}

/// What this host's libfabric offers.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The library's API version, or why it could not be used.
    pub library: Result<(u32, u32), String>,
    /// Every (provider, domain) offering RDM endpoints with RMA.
    pub providers: Vec<Provider>,
    /// The provider the fabric transport would use, or why none.
    pub chosen: Result<String, String>,
}

/// The providers wanted by the environment: `TIDEWIRE_FABRIC_PROVIDER`, else the first name of
/// `FI_PROVIDER` (which may list several, or exclusions with `^`).
pub fn wanted_from_env() -> Option<String> {
    wanted(&|k: &str| std::env::var(k).ok())
}

/// As [`wanted_from_env`], read through `lookup`.
pub(crate) fn wanted(lookup: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let pick = |v: String| {
        v.split(',').map(str::trim).find(|s| !s.is_empty() && !s.starts_with('^')).map(String::from)
    };
    lookup("TIDEWIRE_FABRIC_PROVIDER")
        .and_then(pick)
        .or_else(|| lookup("FI_PROVIDER").and_then(pick))
}

/// Which core provider to use among `offered` (core names): the one `wanted` names, else
/// `efa`, then `verbs`; an error says why none.
pub fn choose(offered: &[&str], wanted: Option<&str>) -> Result<String, String> {
    let list = |o: &[&str]| {
        let mut v: Vec<&str> = o.to_vec();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    if let Some(w) = wanted {
        let core = w.split(';').next().unwrap_or(w);
        return if offered.contains(&core) {
            Ok(core.to_string())
        } else {
            Err(format!(
                "provider {w:?} was asked for; this host's libfabric offers {}",
                list(offered)
            ))
        };
    }
    for p in ["efa", "verbs"] {
        if offered.contains(&p) {
            return Ok(p.to_string());
        }
    }
    Err(format!(
        "no RDMA provider (efa, verbs) here, offered: {}; tidewire's own tcp carries transfers \
         across hosts (TIDEWIRE_FABRIC_PROVIDER names one to use anyway)",
        list(offered)
    ))
}

/// Probes once per process.
pub fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        let (library, providers) = match ffi::providers() {
            Ok((version, providers)) => (Ok(version), providers),
            Err(why) => (Err(why), Vec::new()),
        };
        let chosen = match &library {
            Err(why) => Err(why.clone()),
            Ok(_) => {
                let cores: Vec<&str> = providers.iter().map(Provider::core).collect();
                choose(&cores, wanted_from_env().as_deref())
            }
        };
        Probe { library, providers, chosen }
    })
}

#[allow(unsafe_code)]
mod ffi {
    use super::*;

    pub(super) fn text(p: *const c_char) -> String {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: a non-null string of a structure libfabric returned, NUL-terminated, alive
        // until the structure is freed (after this copy).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// The library's API version and every provider offering RDM endpoints with RMA.
    pub(super) fn providers() -> Result<((u32, u32), Vec<Provider>), String> {
        let l = sys::lib()?;
        let hints = sys::hints(l, None, None, false)?;
        // SAFETY: `hints` is ours (freed here); fi_getinfo returns a list we free after
        // copying what we read out of it.
        let found = unsafe {
            let mut info: *mut sys::FiInfo = std::ptr::null_mut();
            let rc = (l.getinfo)(sys::API, std::ptr::null(), std::ptr::null(), 0, hints, &mut info);
            (l.freeinfo)(hints);
            if rc != 0 {
                // -FI_ENODATA: no provider matches: an empty list, not an error.
                if rc != -sys::FI_ENODATA {
                    return Err(format!("fi_getinfo failed ({rc})"));
                }
                info = std::ptr::null_mut();
            }
            let mut out = Vec::new();
            let mut at = info;
            while !at.is_null() {
                let i = &*at;
                let (name, fabric, version) = if i.fabric_attr.is_null() {
                    (String::new(), String::new(), 0)
                } else {
                    let f = &*i.fabric_attr;
                    (text(f.prov_name), text(f.name), f.prov_version)
                };
                let domain = if i.domain_attr.is_null() {
                    String::new()
                } else {
                    text((*i.domain_attr).name)
                };
                let p =
                    Provider { name, domain, fabric, version: (version >> 16, version & 0xffff) };
                if !out.contains(&p) {
                    out.push(p);
                }
                at = i.next;
            }
            if !info.is_null() {
                (l.freeinfo)(info);
            }
            out
        };
        Ok((l.api, found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_follows_the_request_then_efa_then_verbs() {
        assert_eq!(choose(&["tcp", "verbs", "efa"], None), Ok("efa".into()));
        assert_eq!(choose(&["tcp", "verbs", "shm"], None), Ok("verbs".into()));
        let none = choose(&["tcp", "shm", "tcp"], None);
        assert!(matches!(&none, Err(why) if why.contains("offered: shm, tcp")), "{none:?}");
        assert_eq!(choose(&["tcp", "verbs"], Some("tcp")), Ok("tcp".into()));
        assert_eq!(choose(&["tcp", "verbs"], Some("verbs;ofi_rxm")), Ok("verbs".into()));
        let missing = choose(&["tcp"], Some("efa"));
        assert!(
            matches!(&missing, Err(why) if why.contains("\"efa\"") && why.contains("offers tcp"))
        );
        assert!(choose(&[], None).is_err_and(|w| w.contains("offered: none")));
    }

    /// Whether a test may pass without libfabric (scripts/test.sh installs it and says it
    /// must be there: `TIDEWIRE_REQUIRE_LIBFABRIC=1`).
    pub(crate) fn libfabric_optional() -> bool {
        std::env::var("TIDEWIRE_REQUIRE_LIBFABRIC").map_or(true, |v| v != "1")
    }

    #[test]
    fn the_probe_names_providers_or_says_why_not() {
        let p = probe();
        match &p.library {
            Ok(_) => {
                // Debian's libfabric1 (what scripts/test.sh installs) has the tcp provider.
                assert!(p.providers.iter().any(|x| x.core() == "tcp"), "{:?}", p.providers);
                assert!(p.providers.iter().all(|x| !x.name.is_empty()));
                let rdma = p.providers.iter().any(|x| matches!(x.core(), "efa" | "verbs"));
                if !rdma && wanted_from_env().is_none() {
                    // Without an RDMA NIC nothing is chosen, and the reason says so.
                    let why = p.chosen.as_ref().err().map(String::as_str).unwrap_or("chosen");
                    assert!(why.contains("no RDMA provider (efa, verbs) here"), "{why}");
                }
            }
            Err(why) => {
                assert!(libfabric_optional(), "TIDEWIRE_REQUIRE_LIBFABRIC=1 but: {why}");
                assert!(why.contains("libfabric") && p.chosen.is_err(), "{why}");
            }
        }
    }
}
