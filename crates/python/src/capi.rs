//! C-ABI allocation entry points, for PyTorch's `CUDAPluggableAllocator`
//! (`torch.cuda.memory.CUDAPluggableAllocator(path, "tidewire_alloc", "tidewire_free")`):
//! a `torch.cuda.MemPool` over them puts tensors (a KV cache) in tidewire's transferable
//! allocation, which every NVLink transport the topology proves can reach.
//!
//! The signatures are the ones PyTorch calls through `dlsym`:
//! `void* alloc(ssize_t size, int device, cudaStream_t stream)` and
//! `void free(void* ptr, ssize_t size, int device, cudaStream_t stream)`. Allocation is
//! synchronous, so the stream is not needed. A failure returns null (PyTorch then raises its
//! out-of-memory error, which cannot carry our reason), so the reason is written to stderr and
//! kept for [`last_failure`]; nothing unwinds across the C boundary.

use std::ffi::{c_int, c_void};
use std::panic::catch_unwind;
use std::sync::Mutex;

use tidewire_gpu::alloc;

static LAST_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// The reason of the most recent failed `tidewire_alloc` / `tidewire_free`, if any.
pub(crate) fn last_failure() -> Option<String> {
    LAST_FAILURE.lock().ok()?.clone()
}

fn failed(why: String) {
    eprintln!("tidewire: {why}");
    if let Ok(mut last) = LAST_FAILURE.lock() {
        *last = Some(why);
    }
}

/// Allocates `size` bytes on CUDA device `device` with the best reach the topology proves
/// (VMM exportable as FABRIC, else as a POSIX file descriptor, else `cuMemAlloc`).
// SAFETY: `no_mangle` exports this symbol under its own name; no other item in the process
// defines `tidewire_alloc`.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn tidewire_alloc(size: isize, device: c_int, _stream: *mut c_void) -> *mut c_void {
    let made = catch_unwind(|| {
        let len = u64::try_from(size).map_err(|_| format!("negative size {size}"))?;
        let dev = u32::try_from(device).map_err(|_| format!("negative device {device}"))?;
        alloc::alloc_device(len, dev, None).map_err(|e| format!("cuda:{device}: {e}"))
    });
    let why = match made {
        Ok(Ok(a)) => return a.ptr as *mut c_void,
        Ok(Err(why)) => why,
        Err(_) => "panicked".to_string(),
    };
    failed(format!("tidewire_alloc({size} bytes, cuda:{device}) failed: {why}"));
    std::ptr::null_mut()
}

/// Frees memory returned by [`tidewire_alloc`]; a pointer tidewire did not allocate is
/// reported and left alone.
// SAFETY: as for `tidewire_alloc`, the exported name is unique in the process.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn tidewire_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    _stream: *mut c_void,
) {
    let freed = catch_unwind(|| alloc::free(ptr as u64));
    let why = match freed {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "panicked".to_string(),
    };
    failed(format!("tidewire_free({ptr:?}, {size} bytes, cuda:{device}) failed: {why}"));
}
