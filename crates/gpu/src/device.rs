//! One GPU's primary context, retained once per process and kept, and a scope that makes it
//! current on the calling thread and restores the caller's context afterwards (a user thread
//! may be in the middle of PyTorch work on another device).

use std::ffi::c_int;
use std::sync::OnceLock;

use crate::ffi::{self, CuContext, CuDevice, Cuda};
use crate::topology::driver;
use crate::GpuError;

/// A GPU of this process.
pub struct Gpu {
    pub(crate) ordinal: u32,
    pub(crate) dev: CuDevice,
    ctx: CuContext,
    pub(crate) sm_count: u32,
    pub(crate) cc: (i32, i32),
}

// SAFETY: a CUcontext handle is an opaque token the driver accepts from any thread.
unsafe impl Send for Gpu {}
// SAFETY: as above; the struct is immutable after creation.
unsafe impl Sync for Gpu {}

/// Pops the context pushed by [`Gpu::enter`] when dropped.
pub(crate) struct Entered<'a> {
    pub(crate) cuda: &'a Cuda,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut old: CuContext = std::ptr::null_mut();
        // SAFETY: balances the push in `enter` on this thread; `old` is a local out-pointer.
        let r = unsafe { (self.cuda.ctx_pop)(&mut old) };
        if let Err(e) = self.cuda.check("cuCtxPopCurrent", r) {
            log::warn!("leaving a GPU context: {e}");
        }
    }
}

impl Gpu {
    /// The GPU with CUDA ordinal `ordinal` (primary context retained for the process).
    pub fn get(ordinal: u32) -> Result<&'static Gpu, GpuError> {
        static GPUS: OnceLock<Vec<Result<Gpu, GpuError>>> = OnceLock::new();
        let all = GPUS.get_or_init(|| {
            let Ok(cuda) = driver() else { return Vec::new() };
            let mut n: c_int = 0;
            // SAFETY: out-pointer to a local.
            if unsafe { (cuda.device_count)(&mut n) } != 0 {
                return Vec::new();
            }
            (0..n.max(0) as u32).map(|i| Self::open(cuda, i)).collect()
        });
        match all.get(ordinal as usize) {
            Some(Ok(g)) => Ok(g),
            Some(Err(e)) => Err(e.clone()),
            None => Err(match driver() {
                Err(e) => e,
                Ok(_) => GpuError::NoDevice { ordinal, count: all.len() as u32 },
            }),
        }
    }

    fn open(cuda: &Cuda, ordinal: u32) -> Result<Gpu, GpuError> {
        let mut dev = 0;
        // SAFETY: out-pointer to a local; the ordinal is below the device count.
        cuda.check("cuDeviceGet", unsafe { (cuda.device_get)(&mut dev, ordinal as c_int) })?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; never released, so the context lives as long as
        // the process.
        cuda.check("cuDevicePrimaryCtxRetain", unsafe {
            (cuda.primary_ctx_retain)(&mut ctx, dev)
        })?;
        let attr = |a| {
            let mut v = 0;
            // SAFETY: out-pointer to a local; valid device.
            (unsafe { (cuda.device_attribute)(&mut v, a, dev) } == 0).then_some(v)
        };
        Ok(Gpu {
            ordinal,
            dev,
            ctx,
            sm_count: attr(ffi::ATTR_SM_COUNT).unwrap_or(132).max(1) as u32,
            cc: (attr(ffi::ATTR_CC_MAJOR).unwrap_or(9), attr(ffi::ATTR_CC_MINOR).unwrap_or(0)),
        })
    }

    /// Free and total device memory (`cuMemGetInfo`): device-wide, so memory another
    /// process holds (or an import of ours keeps alive) shows as used.
    pub fn mem_info(&self) -> Result<(u64, u64), GpuError> {
        let entered = self.enter()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers to locals; this GPU's context is current.
        entered
            .cuda
            .check("cuMemGetInfo", unsafe { (entered.cuda.mem_get_info)(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    /// Makes this GPU's context current until the guard drops.
    pub(crate) fn enter(&self) -> Result<Entered<'static>, GpuError> {
        let cuda = driver()?;
        // SAFETY: the primary context is retained for the process; the guard pops it.
        cuda.check("cuCtxPushCurrent", unsafe { (cuda.ctx_push)(self.ctx) })?;
        Ok(Entered { cuda })
    }

    /// A GPU value with no context, for tests of teardown order that never reach the driver.
    #[cfg(test)]
    pub(crate) fn fake(ordinal: u32) -> &'static Gpu {
        Box::leak(Box::new(Gpu {
            ordinal,
            dev: ordinal as CuDevice,
            ctx: std::ptr::null_mut(),
            sm_count: 1,
            cc: (9, 0),
        }))
    }
}
