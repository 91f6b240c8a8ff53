//! A kernel source compiled once per process (NVRTC) and loaded once per GPU, and launches of
//! its kernels: what the EP and collective kernels share.

use std::ffi::{c_void, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::copy::{compile, load_functions, Func};
use crate::device::Gpu;
use crate::ffi::CuStream;
use crate::topology::driver;
use crate::GpuError;

/// A source's kernels loaded on a GPU (by ordinal).
type PerGpu = (u32, Arc<Loaded>);

/// A kernel source and what it was compiled and loaded into so far.
pub(crate) struct Source {
    pub(crate) text: &'static str,
    /// The program's name (in NVRTC's messages) and what launches call it.
    pub(crate) name: &'static CStr,
    pub(crate) kernels: &'static [&'static CStr],
    /// How a failed launch names the call (`cuLaunchKernel(tw_ep)`).
    pub(crate) call: &'static str,
    pub(crate) ptx: OnceLock<Result<CString, GpuError>>,
    pub(crate) loaded: OnceLock<Mutex<Vec<PerGpu>>>,
}

impl Source {
    pub(crate) const fn new(
        text: &'static str,
        name: &'static CStr,
        kernels: &'static [&'static CStr],
        call: &'static str,
    ) -> Self {
        Self { text, name, kernels, call, ptx: OnceLock::new(), loaded: OnceLock::new() }
    }

    /// Compiles (once per process) and loads (once per GPU) the source's kernels on `gpu`.
    pub(crate) fn load(&'static self, gpu: &'static Gpu) -> Result<Arc<Loaded>, GpuError> {
        let loaded = self.loaded.get_or_init(Default::default);
        let mut all = loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, k)) = all.iter().find(|(o, _)| *o == gpu.ordinal) {
            return Ok(k.clone());
        }
        let ptx = self
            .ptx
            .get_or_init(|| compile(self.text, self.name, gpu.cc))
            .as_ref()
            .map_err(Clone::clone)?;
        let funcs = load_functions(gpu, ptx, self.kernels)?;
        let k = Arc::new(Loaded { gpu, call: self.call, funcs });
        all.push((gpu.ordinal, k.clone()));
        Ok(k)
    }
}

/// A source's kernels, loaded on one GPU.
pub(crate) struct Loaded {
    pub(crate) gpu: &'static Gpu,
    call: &'static str,
    funcs: Vec<Func>,
}

impl Loaded {
    /// Launches kernel `which` with `grid` blocks of `block` threads on `stream` (nothing for
    /// an empty grid).
    ///
    /// # Safety
    /// `params` are pointers to the kernel's parameters, in order and of their types.
    pub(crate) unsafe fn launch(
        &self,
        which: usize,
        grid: u32,
        block: u32,
        stream: u64,
        params: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        if grid == 0 {
            return Ok(());
        }
        let cuda = driver()?;
        let _ctx = self.gpu.enter()?;
        let f = self.funcs.get(which).ok_or(GpuError::Internal("no such kernel"))?;
        // SAFETY: the caller vouches for the parameters.
        cuda.check(self.call, unsafe {
            (cuda.launch)(
                f.0,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                stream as CuStream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

/// A kernel parameter as the pointer `cuLaunchKernel` takes.
pub(crate) fn param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// Reads a kernel source the way the compiler lays it out, for tests that tie the Rust
/// mirrors of argument structs and constants to the `.cu` files.
#[cfg(test)]
pub(crate) mod layout {
    /// (name, offset, size) of each named field of a Rust struct, to compare with [`fields`].
    macro_rules! rust_fields {
        ($t:ty: $($f:ident),*) => {
            vec![$((stringify!($f).to_string(), std::mem::offset_of!($t, $f),
                $crate::kernels::layout::size_of_field(|a: &$t| &a.$f))),*]
        };
    }
    pub(crate) use rust_fields;

    /// The size of the field a projection returns.
    pub(crate) fn size_of_field<T, F>(_: impl Fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    /// The value of `#define NAME <integer>[ull]` in `src`.
    pub(crate) fn define(src: &str, name: &str) -> u64 {
        let line = src
            .lines()
            .find_map(|l| l.trim().strip_prefix("#define ")?.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no #define {name}"));
        line.trim()
            .trim_end_matches("ull")
            .parse()
            .unwrap_or_else(|_| panic!("#define {name} {line}"))
    }

    /// Each field of `struct NAME { ... };` in `src`: (name, offset, size), laid out by C's
    /// rules (every field aligned to its own size; arrays sized by integers or `#define`s).
    pub(crate) fn fields(src: &str, name: &str) -> Vec<(String, usize, usize)> {
        let start =
            src.find(&format!("struct {name} {{")).unwrap_or_else(|| panic!("no struct {name}"));
        let body = &src[start..];
        let body = &body[body.find('{').unwrap_or(0) + 1..body.find("};").unwrap_or(body.len())];
        let mut out = Vec::new();
        let mut at = 0usize;
        for decl in
            body.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<String>().split(';')
        {
            let decl = decl.trim();
            if decl.is_empty() {
                continue;
            }
            const TYPES: [(&str, usize); 7] = [
                ("unsigned long long ", 8),
                ("long long ", 8),
                ("u64 ", 8),
                ("double ", 8),
                ("unsigned ", 4),
                ("int ", 4),
                ("float ", 4),
            ];
            let (size, names) = TYPES
                .iter()
                .find_map(|(t, size)| Some((*size, decl.strip_prefix(t)?)))
                .unwrap_or_else(|| panic!("a field of {name} of unknown type: {decl}"));
            for field in names.split(',').map(str::trim) {
                let (field, count) = match field.split_once('[') {
                    Some((f, n)) => {
                        let n = n.trim_end_matches(']');
                        (f, n.parse().unwrap_or_else(|_| define(src, n) as usize))
                    }
                    None => (field, 1),
                };
                at = at.next_multiple_of(size);
                out.push((field.to_string(), at, size * count));
                at += size * count;
            }
        }
        out
    }
}
