//! libfabric's C interface as this crate uses it: the structures of `rdma/fabric.h`,
//! `fi_domain.h`, `fi_endpoint.h`, `fi_cm.h`, `fi_rma.h` and `fi_eq.h` (ABI of libfabric 1.x,
//! API 1.9 asked for), and the library loaded once per process. The `fi_*` calls of the C
//! headers that are `static inline` go through the operation tables here. Fields no code
//! reads are kept: they give the structures libfabric's layout (hence `dead_code`).
#![allow(unsafe_code, dead_code)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub(crate) const FI_RMA: u64 = 1 << 2;
pub(crate) const FI_READ: u64 = 1 << 8;
pub(crate) const FI_WRITE: u64 = 1 << 9;
pub(crate) const FI_RECV: u64 = 1 << 10;
pub(crate) const FI_SEND: u64 = 1 << 11;
pub(crate) const FI_REMOTE_READ: u64 = 1 << 12;
pub(crate) const FI_REMOTE_WRITE: u64 = 1 << 13;
pub(crate) const FI_DELIVERY_COMPLETE: u64 = 1 << 28;
pub(crate) const FI_HMEM: u64 = 1 << 47;
pub(crate) const FI_THREAD_SAFE: c_int = 1;
pub(crate) const FI_WAIT_UNSPEC: c_int = 1;
pub(crate) const FI_HMEM_CUDA: c_int = 1;
pub(crate) const FI_EP_RDM: c_int = 3;
pub(crate) const FI_MR_LOCAL: c_int = 1 << 2;
pub(crate) const FI_MR_VIRT_ADDR: c_int = 1 << 4;
pub(crate) const FI_MR_ALLOCATED: c_int = 1 << 5;
pub(crate) const FI_MR_PROV_KEY: c_int = 1 << 6;
pub(crate) const FI_AV_TABLE: c_int = 2;
pub(crate) const FI_CQ_FORMAT_CONTEXT: c_int = 1;
pub(crate) const FI_ENABLE: c_int = 6;
pub(crate) const FI_EAGAIN: isize = 11;
pub(crate) const FI_ENODATA: c_int = 61;
pub(crate) const FI_EAVAIL: isize = 259;
/// The API version asked for: 1.9.
pub(crate) const API: u32 = (1 << 16) | 9;

#[repr(C)]
pub(crate) struct FiInfo {
    pub next: *mut FiInfo,
    pub caps: u64,
    pub mode: u64,
    pub addr_format: u32,
    pub src_addrlen: usize,
    pub dest_addrlen: usize,
    pub src_addr: *mut c_void,
    pub dest_addr: *mut c_void,
    pub handle: *mut c_void,
    pub tx_attr: *mut FiTxAttr,
    pub rx_attr: *mut c_void,
    pub ep_attr: *mut FiEpAttr,
    pub domain_attr: *mut FiDomainAttr,
    pub fabric_attr: *mut FiFabricAttr,
    pub nic: *mut c_void,
}

/// The head of `struct fi_tx_attr`.
#[repr(C)]
pub(crate) struct FiTxAttr {
    pub caps: u64,
    pub mode: u64,
    pub op_flags: u64,
}

/// The head of `struct fi_ep_attr`.
#[repr(C)]
pub(crate) struct FiEpAttr {
    pub ep_type: c_int,
}

/// The head of `struct fi_domain_attr`, up to `mr_mode`.
#[repr(C)]
pub(crate) struct FiDomainAttr {
    pub domain: *mut c_void,
    pub name: *mut c_char,
    pub threading: c_int,
    pub control_progress: c_int,
    pub data_progress: c_int,
    pub resource_mgmt: c_int,
    pub av_type: c_int,
    pub mr_mode: c_int,
}

#[repr(C)]
pub(crate) struct FiFabricAttr {
    pub fabric: *mut c_void,
    pub name: *mut c_char,
    pub prov_name: *mut c_char,
    pub prov_version: u32,
    pub api_version: u32,
}

/// `struct fi_ops`: the calls every object has.
#[repr(C)]
pub(crate) struct FiOps {
    pub size: usize,
    pub close: unsafe extern "C" fn(*mut Fid) -> c_int,
    pub bind: unsafe extern "C" fn(*mut Fid, *mut Fid, u64) -> c_int,
    pub control: unsafe extern "C" fn(*mut Fid, c_int, *mut c_void) -> c_int,
}

/// `struct fid`: the head of every object.
#[repr(C)]
pub(crate) struct Fid {
    pub fclass: usize,
    pub context: *mut c_void,
    pub ops: *const FiOps,
}

#[repr(C)]
pub(crate) struct FiOpsFabric {
    pub size: usize,
    pub domain: unsafe extern "C" fn(
        *mut FidFabric,
        *mut FiInfo,
        *mut *mut FidDomain,
        *mut c_void,
    ) -> c_int,
}

#[repr(C)]
pub(crate) struct FidFabric {
    pub fid: Fid,
    pub ops: *const FiOpsFabric,
    pub api_version: u32,
}

#[repr(C)]
pub(crate) struct FiOpsDomain {
    pub size: usize,
    pub av_open:
        unsafe extern "C" fn(*mut FidDomain, *mut FiAvAttr, *mut *mut FidAv, *mut c_void) -> c_int,
    pub cq_open:
        unsafe extern "C" fn(*mut FidDomain, *mut FiCqAttr, *mut *mut FidCq, *mut c_void) -> c_int,
    pub endpoint:
        unsafe extern "C" fn(*mut FidDomain, *mut FiInfo, *mut *mut FidEp, *mut c_void) -> c_int,
}

#[repr(C)]
pub(crate) struct FiOpsMr {
    pub size: usize,
    #[allow(clippy::type_complexity)]
    pub reg: unsafe extern "C" fn(
        *mut Fid,
        *const c_void,
        usize,
        u64,
        u64,
        u64,
        u64,
        *mut *mut FidMr,
        *mut c_void,
    ) -> c_int,
    pub regv: *const c_void,
    pub regattr: unsafe extern "C" fn(*mut Fid, *const FiMrAttr, u64, *mut *mut FidMr) -> c_int,
}

/// `struct iovec`.
#[repr(C)]
pub(crate) struct IoVec {
    pub base: *mut c_void,
    pub len: usize,
}

/// `struct fi_mr_attr` (with `iface` and the device union of API 1.9+).
#[repr(C)]
pub(crate) struct FiMrAttr {
    pub mr_iov: *const IoVec,
    pub iov_count: usize,
    pub access: u64,
    pub offset: u64,
    pub requested_key: u64,
    pub context: *mut c_void,
    pub auth_key_size: usize,
    pub auth_key: *mut u8,
    pub iface: c_int,
    pub device: u64,
}

#[repr(C)]
pub(crate) struct FidDomain {
    pub fid: Fid,
    pub ops: *const FiOpsDomain,
    pub mr: *const FiOpsMr,
}

#[repr(C)]
pub(crate) struct FidMr {
    pub fid: Fid,
    pub mem_desc: *mut c_void,
    pub key: u64,
}

#[repr(C)]
pub(crate) struct FiAvAttr {
    pub av_type: c_int,
    pub rx_ctx_bits: c_int,
    pub count: usize,
    pub ep_per_node: usize,
    pub name: *const c_char,
    pub map_addr: *mut c_void,
    pub flags: u64,
}

#[repr(C)]
pub(crate) struct FiOpsAv {
    pub size: usize,
    pub insert:
        unsafe extern "C" fn(*mut FidAv, *const c_void, usize, *mut u64, u64, *mut c_void) -> c_int,
    pub insertsvc: *const c_void,
    pub insertsym: *const c_void,
    pub remove: unsafe extern "C" fn(*mut FidAv, *mut u64, usize, u64) -> c_int,
}

#[repr(C)]
pub(crate) struct FidAv {
    pub fid: Fid,
    pub ops: *const FiOpsAv,
}

#[repr(C)]
pub(crate) struct FiCqAttr {
    pub size: usize,
    pub flags: u64,
    pub format: c_int,
    pub wait_obj: c_int,
    pub signaling_vector: c_int,
    pub wait_cond: c_int,
    pub wait_set: *mut c_void,
}

#[repr(C)]
pub(crate) struct FiCqErrEntry {
    pub op_context: *mut c_void,
    pub flags: u64,
    pub len: usize,
    pub buf: *mut c_void,
    pub data: u64,
    pub tag: u64,
    pub olen: usize,
    pub err: c_int,
    pub prov_errno: c_int,
    pub err_data: *mut c_void,
    pub err_data_size: usize,
}

#[repr(C)]
pub(crate) struct FiOpsCq {
    pub size: usize,
    pub read: unsafe extern "C" fn(*mut FidCq, *mut c_void, usize) -> isize,
    pub readfrom: unsafe extern "C" fn(*mut FidCq, *mut c_void, usize, *mut u64) -> isize,
    pub readerr: unsafe extern "C" fn(*mut FidCq, *mut FiCqErrEntry, u64) -> isize,
    pub sread: unsafe extern "C" fn(*mut FidCq, *mut c_void, usize, *const c_void, c_int) -> isize,
    pub sreadfrom: *const c_void,
    pub signal: unsafe extern "C" fn(*mut FidCq) -> c_int,
}

#[repr(C)]
pub(crate) struct FidCq {
    pub fid: Fid,
    pub ops: *const FiOpsCq,
}

#[repr(C)]
pub(crate) struct FiOpsCm {
    pub size: usize,
    pub setname: unsafe extern "C" fn(*mut Fid, *mut c_void, usize) -> c_int,
    pub getname: unsafe extern "C" fn(*mut Fid, *mut c_void, *mut usize) -> c_int,
}

/// `fi_read` and `fi_write` (the buffer is `const` for the write; the same ABI).
pub(crate) type RmaFn = unsafe extern "C" fn(
    *mut FidEp,
    *mut c_void,
    usize,
    *mut c_void,
    u64,
    u64,
    u64,
    *mut c_void,
) -> isize;

#[repr(C)]
pub(crate) struct FiOpsRma {
    pub size: usize,
    pub read: RmaFn,
    pub readv: *const c_void,
    pub readmsg: *const c_void,
    pub write: RmaFn,
}

#[repr(C)]
pub(crate) struct FidEp {
    pub fid: Fid,
    pub ops: *const c_void,
    pub cm: *const FiOpsCm,
    pub msg: *const c_void,
    pub rma: *const FiOpsRma,
}

pub(crate) type Version = unsafe extern "C" fn() -> u32;
pub(crate) type GetInfo = unsafe extern "C" fn(
    u32,
    *const c_char,
    *const c_char,
    u64,
    *const FiInfo,
    *mut *mut FiInfo,
) -> c_int;
pub(crate) type DupInfo = unsafe extern "C" fn(*const FiInfo) -> *mut FiInfo;
pub(crate) type FreeInfo = unsafe extern "C" fn(*mut FiInfo);
pub(crate) type StrError = unsafe extern "C" fn(c_int) -> *const c_char;
pub(crate) type Fabric =
    unsafe extern "C" fn(*mut FiFabricAttr, *mut *mut FidFabric, *mut c_void) -> c_int;

/// The loaded library's entry points.
pub(crate) struct Lib {
    pub api: (u32, u32),
    pub getinfo: GetInfo,
    pub dupinfo: DupInfo,
    pub freeinfo: FreeInfo,
    pub fabric: Fabric,
    pub strerror: StrError,
}

/// libfabric, loaded once for the process (kept loaded: objects made through it live on).
pub(crate) fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: loading libfabric runs its constructors, which only register providers.
        let lib = unsafe { Library::new("libfabric.so.1") }.map_err(|e| {
            format!("libfabric is not installed (libfabric.so.1: {e}); install libfabric1 to use RDMA NICs")
        })?;
        let sym = |name: &str| format!("libfabric.so.1 has no {name}");
        // SAFETY: the entry points of rdma/fabric.h, with their C signatures.
        let l = unsafe {
            let version = *lib.get::<Version>(b"fi_version\0").map_err(|_| sym("fi_version"))?;
            let v = version();
            Lib {
                api: (v >> 16, v & 0xffff),
                getinfo: *lib.get::<GetInfo>(b"fi_getinfo\0").map_err(|_| sym("fi_getinfo"))?,
                dupinfo: *lib.get::<DupInfo>(b"fi_dupinfo\0").map_err(|_| sym("fi_dupinfo"))?,
                freeinfo: *lib.get::<FreeInfo>(b"fi_freeinfo\0").map_err(|_| sym("fi_freeinfo"))?,
                fabric: *lib.get::<Fabric>(b"fi_fabric\0").map_err(|_| sym("fi_fabric"))?,
                strerror: *lib
                    .get::<StrError>(b"fi_strerror\0")
                    .map_err(|_| sym("fi_strerror"))?,
            }
        };
        if l.api < (1, 9) {
            return Err(format!("libfabric {}.{} is older than 1.9", l.api.0, l.api.1));
        }
        // The entry points above stay valid for the process.
        std::mem::forget(lib);
        Ok(l)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// RDM + RMA hints (caps, endpoint type, the memory-registration modes we handle, thread-safe
/// calls), with `provider` as the provider's name and `domain` as the domain's (a NIC) when
/// given, and GPU memory (`FI_HMEM`) asked for when `hmem`. Freed by the caller with
/// `freeinfo`.
pub(crate) fn hints(
    l: &Lib,
    provider: Option<&str>,
    domain: Option<&str>,
    hmem: bool,
) -> Result<*mut FiInfo, String> {
    // SAFETY: fi_dupinfo(NULL) allocates a zeroed fi_info with its attribute structures.
    let h = unsafe { (l.dupinfo)(std::ptr::null()) };
    if h.is_null() {
        return Err("fi_allocinfo failed".into());
    }
    let dup = |what: &str, text: &str| {
        std::ffi::CString::new(text)
            .map_err(|_| format!("a {what} name with a NUL: {text:?}"))
            // SAFETY: strdup of a NUL-terminated string; fi_freeinfo frees it.
            .map(|c| unsafe { libc::strdup(c.as_ptr()) })
    };
    // SAFETY: `h` and its attributes were allocated by libfabric above and are ours until
    // fi_freeinfo, which frees `prov_name` and the domain's `name` too (hence strdup).
    unsafe {
        (*h).caps = FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
        if hmem {
            (*h).caps |= FI_HMEM;
        }
        if !(*h).ep_attr.is_null() {
            (*(*h).ep_attr).ep_type = FI_EP_RDM;
        }
        // A write completes when the data is in the target's memory (not when it left):
        // what comes after it (a notification) may rely on it.
        if !(*h).tx_attr.is_null() {
            (*(*h).tx_attr).op_flags = FI_DELIVERY_COMPLETE;
        }
        if !(*h).domain_attr.is_null() {
            let d = &mut *(*h).domain_attr;
            d.mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
            // Submitting threads post operations while the completion thread polls.
            d.threading = FI_THREAD_SAFE;
            if let Some(name) = domain {
                d.name = dup("domain", name)?;
            }
        }
        if let (Some(p), false) = (provider, (*h).fabric_attr.is_null()) {
            (*(*h).fabric_attr).prov_name = dup("provider", p)?;
        }
    }
    Ok(h)
}

/// libfabric's text for an error code (positive or negative).
pub(crate) fn strerror(l: &Lib, code: isize) -> String {
    let code = code.unsigned_abs().min(i32::MAX as usize) as c_int;
    // SAFETY: fi_strerror returns a static string for any code.
    let p = unsafe { (l.strerror)(code) };
    if p.is_null() {
        return format!("error {code}");
    }
    // SAFETY: a NUL-terminated static string.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
