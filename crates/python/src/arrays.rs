//! Arrays from Python without one Python object per element: lists of ints, anything with
//! `__array_interface__` (numpy), or a DLPack tensor on the CPU (`__dlpack__`, e.g. torch),
//! read in place. Memory objects for registration are described the same way.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyInt, PyList, PyTuple};

use crate::errors::invalid;

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;
const DL_CUDA_HOST: i32 = 3;
const DL_CUDA_MANAGED: i32 = 13;

#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut u8,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// What a DLPack tensor exposes, read from its capsule.
struct DlInfo {
    addr: u64,
    device_type: i32,
    device_id: i32,
    /// Element count.
    elements: u64,
    /// Bytes per element.
    itemsize: u64,
    /// Integer (signed or unsigned) elements.
    integer: bool,
    contiguous: bool,
    ndim: i32,
}

fn dlpack_info<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(DlInfo, Bound<'py, PyAny>)> {
    let capsule = obj.call_method0("__dlpack__")?;
    let cap = capsule
        .downcast::<PyCapsule>()
        .map_err(|_| PyTypeError::new_err("__dlpack__ did not return a capsule"))?;
    let name_ok = cap.name()?.is_some_and(|n| n.to_bytes() == b"dltensor");
    if !name_ok {
        return Err(PyTypeError::new_err("expected an unconsumed \"dltensor\" DLPack capsule"));
    }
    let ptr = cap.pointer() as *const DlTensor;
    if ptr.is_null() {
        return Err(PyTypeError::new_err("empty DLPack capsule"));
    }
    // SAFETY: a "dltensor" capsule points at a DLManagedTensor whose first member is a
    // DLTensor; it stays valid while the capsule (kept by the caller) is alive.
    let t = unsafe { &*ptr };
    if t.ndim < 0 || t.ndim > 32 {
        return Err(PyTypeError::new_err("DLPack tensor with an impossible rank"));
    }
    let ndim = t.ndim as usize;
    // SAFETY: `shape` (and `strides` when non-null) hold `ndim` entries per the DLPack ABI.
    let shape: &[i64] =
        if ndim == 0 { &[] } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) } };
    let strides: Option<&[i64]> = (!t.strides.is_null() && ndim > 0)
        .then(|| unsafe { std::slice::from_raw_parts(t.strides, ndim) });
    let mut expect = 1i64;
    let mut contiguous = true;
    for d in (0..ndim).rev() {
        if let Some(s) = strides {
            if shape[d] > 1 && s[d] != expect {
                contiguous = false;
            }
        }
        expect = expect.saturating_mul(shape[d].max(1));
    }
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| u64::try_from(d).ok().and_then(|d| acc.checked_mul(d)));
    let elements =
        elements.ok_or_else(|| PyTypeError::new_err("DLPack tensor with a bad shape"))?;
    let info = DlInfo {
        addr: t.data as u64 + t.byte_offset,
        device_type: t.device.device_type,
        device_id: t.device.device_id,
        elements,
        itemsize: u64::from(t.dtype.bits) * u64::from(t.dtype.lanes.max(1)) / 8,
        integer: t.dtype.code <= 1,
        contiguous,
        ndim: t.ndim,
    };
    Ok((info, capsule))
}

/// `(data pointer, read-only, shape, item size, C-contiguous, typestr)` of an
/// `__array_interface__` / `__cuda_array_interface__` dict.
struct InterfaceInfo {
    addr: u64,
    readonly: bool,
    elements: u64,
    itemsize: u64,
    contiguous: bool,
    typestr: String,
    ndim: usize,
}

fn interface_info(dict: &Bound<'_, PyAny>) -> PyResult<InterfaceInfo> {
    let dict = dict
        .downcast::<PyDict>()
        .map_err(|_| PyTypeError::new_err("array interface is not a dict"))?;
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        dict.get_item(k)?
            .ok_or_else(|| PyTypeError::new_err(format!("array interface lacks {k:?}")))
    };
    let (addr, readonly): (u64, bool) = get("data")?.extract()?;
    let shape: Vec<u64> = get("shape")?.extract()?;
    let typestr: String = get("typestr")?.extract()?;
    let itemsize: u64 = typestr
        .get(2..)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| PyTypeError::new_err(format!("unsupported typestr {typestr:?}")))?;
    let elements = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid("array too large".into()))?;
    let contiguous = match dict.get_item("strides")? {
        None => true,
        Some(s) if s.is_none() => true,
        Some(s) => {
            let strides: Vec<u64> = s.extract()?;
            let mut expect = itemsize;
            let mut ok = true;
            for d in (0..shape.len()).rev() {
                if shape[d] > 1 && strides.get(d) != Some(&expect) {
                    ok = false;
                }
                expect = expect.saturating_mul(shape[d].max(1));
            }
            ok
        }
    };
    Ok(InterfaceInfo { addr, readonly, elements, itemsize, contiguous, typestr, ndim: shape.len() })
}

/// A sequence of u64 read from Python: owned (list/tuple), borrowed in place (array
/// interface, DLPack) while the GIL is held, or one scalar for every index.
pub(crate) enum U64Array<'py> {
    Owned(Vec<u64>),
    Borrowed { addr: u64, len: usize, _keep: Bound<'py, PyAny> },
    Scalar(u64),
}

impl U64Array<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Owned(v) => v.len(),
            Self::Borrowed { len, .. } => *len,
            Self::Scalar(_) => 1,
        }
    }

    pub(crate) fn is_scalar(&self) -> bool {
        matches!(self, Self::Scalar(_))
    }

    /// Every value, copied out (a scalar is one value).
    pub(crate) fn to_vec(&self) -> PyResult<Vec<u64>> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    pub(crate) fn get(&self, i: usize) -> PyResult<u64> {
        match self {
            Self::Owned(v) => {
                v.get(i).copied().ok_or_else(|| invalid(format!("index {i} out of range")))
            }
            Self::Scalar(x) => Ok(*x),
            Self::Borrowed { addr, len, .. } => {
                if i >= *len {
                    return Err(invalid(format!("index {i} out of range")));
                }
                // SAFETY: the kept object exposes `len` contiguous 8-byte integers at `addr`
                // (checked at extraction) and stays alive as long as `self`.
                Ok(unsafe { std::ptr::read_unaligned((*addr as *const u64).add(i)) })
            }
        }
    }
}

impl<'py> FromPyObject<'py> for U64Array<'py> {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        if ob.is_instance_of::<PyInt>() {
            return Ok(Self::Scalar(ob.extract()?));
        }
        if ob.is_instance_of::<PyList>() || ob.is_instance_of::<PyTuple>() {
            return Ok(Self::Owned(ob.extract()?));
        }
        if let Ok(iface) = ob.getattr("__array_interface__") {
            let i = interface_info(&iface)?;
            let int64 = i.itemsize == 8 && (i.typestr.ends_with("u8") || i.typestr.ends_with("i8"));
            let native = !i.typestr.starts_with('>');
            if !int64 || !native || !i.contiguous || i.ndim != 1 {
                return Err(invalid(format!(
                    "descriptor arrays must be contiguous 1-D 64-bit integers (got typestr {:?}, {} dims)",
                    i.typestr, i.ndim
                )));
            }
            return Ok(Self::Borrowed {
                addr: i.addr,
                len: i.elements as usize,
                _keep: ob.clone(),
            });
        }
        if ob.hasattr("__dlpack__")? {
            let (i, capsule) = dlpack_info(ob)?;
            if i.device_type != DL_CPU
                || i.itemsize != 8
                || !i.integer
                || !i.contiguous
                || i.ndim != 1
            {
                return Err(invalid(
                    "descriptor tensors must be contiguous 1-D 64-bit integers on the CPU".into(),
                ));
            }
            return Ok(Self::Borrowed { addr: i.addr, len: i.elements as usize, _keep: capsule });
        }
        Err(PyTypeError::new_err(format!(
            "expected an int, a list of ints, a numpy array or a DLPack tensor, not {}",
            ob.get_type().name()?
        )))
    }
}

/// Memory described by a Python object, for registration.
pub(crate) struct MemoryObject {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    /// The object says it is CUDA memory (device or managed), on this device if known.
    pub(crate) cuda: Option<Option<i32>>,
    pub(crate) owner: Py<PyAny>,
}

impl<'py> FromPyObject<'py> for MemoryObject {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let (addr, len, cuda) = if let Ok(iface) = ob.getattr("__cuda_array_interface__") {
            let i = interface_info(&iface)?;
            if !i.contiguous {
                return Err(invalid("only contiguous arrays can be registered".into()));
            }
            (i.addr, i.elements * i.itemsize, Some(None))
        } else if let Ok(iface) = ob.getattr("__array_interface__") {
            let i = interface_info(&iface)?;
            if i.readonly {
                return Err(invalid(
                    "read-only arrays cannot be registered: peers may write into them".into(),
                ));
            }
            if !i.contiguous {
                return Err(invalid("only contiguous arrays can be registered".into()));
            }
            (i.addr, i.elements * i.itemsize, None)
        } else if ob.hasattr("__dlpack__")? {
            let (i, _capsule) = dlpack_info(ob)?;
            let cuda = match i.device_type {
                DL_CPU | DL_CUDA_HOST => None,
                DL_CUDA | DL_CUDA_MANAGED => Some(Some(i.device_id)),
                other => {
                    return Err(invalid(format!("DLPack device type {other} is not supported")))
                }
            };
            if !i.contiguous {
                return Err(invalid("only contiguous tensors can be registered".into()));
            }
            (i.addr, i.elements * i.itemsize, cuda)
        } else {
            return Err(PyTypeError::new_err(format!(
                "expected a numpy array, a CUDA array or a DLPack tensor, not {}",
                ob.get_type().name()?
            )));
        };
        if len == 0 {
            return Err(invalid("cannot register an empty array".into()));
        }
        Ok(Self { addr, len, cuda, owner: ob.clone().unbind() })
    }
}
