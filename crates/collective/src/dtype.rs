//! Element types and reductions over byte buffers (tensors as their bytes, native endian).
//!
//! Every rank reduces in the same order, so floating-point results are identical everywhere.
//! Half-precision types are reduced through `f32`, rounded after every step. Booleans reduce
//! as logic: SUM and MAX are OR, PRODUCT and MIN are AND (what NCCL users of PyTorch get).

use crate::error::{Error, Result};

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
    F16,
    BF16,
    F32,
    F64,
}

/// Reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Avg,
    Product,
    Min,
    Max,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 | Self::Bool => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::I64 | Self::F64 => 8,
        }
    }

    /// Parses the names the Python layer passes (torch's, without the prefix).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "int8" => Self::I8,
            "int16" => Self::I16,
            "int32" => Self::I32,
            "int64" => Self::I64,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            "float16" => Self::F16,
            "bfloat16" => Self::BF16,
            "float32" => Self::F32,
            "float64" => Self::F64,
            other => return Err(Error::invalid(format!("unsupported element type {other}"))),
        })
    }
}

impl ReduceOp {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sum" => Self::Sum,
            "avg" => Self::Avg,
            "product" => Self::Product,
            "min" => Self::Min,
            "max" => Self::Max,
            other => return Err(Error::invalid(format!("unsupported reduction {other}"))),
        })
    }

    /// Refuses the combinations that have no meaning (AVG of booleans).
    pub fn check(self, dtype: DType) -> Result<()> {
        if self == Self::Avg && dtype == DType::Bool {
            return Err(Error::invalid("AVG of bool tensors has no meaning".into()));
        }
        Ok(())
    }
}

/// Applies `f` to every element pair of `acc` and `src` (elements of `N` bytes).
#[inline]
fn zip_elems<const N: usize>(acc: &mut [u8], src: &[u8], f: impl Fn([u8; N], [u8; N]) -> [u8; N]) {
    for (a, s) in acc.chunks_exact_mut(N).zip(src.chunks_exact(N)) {
        let (mut x, mut y) = ([0u8; N], [0u8; N]);
        x.copy_from_slice(a);
        y.copy_from_slice(s);
        a.copy_from_slice(&f(x, y));
    }
}

macro_rules! int_reduce {
    ($t:ty, $acc:expr, $src:expr, $op:expr) => {{
        let f: fn($t, $t) -> $t = match $op {
            ReduceOp::Sum | ReduceOp::Avg => <$t>::wrapping_add,
            ReduceOp::Product => <$t>::wrapping_mul,
            ReduceOp::Min => std::cmp::min,
            ReduceOp::Max => std::cmp::max,
        };
        zip_elems::<{ std::mem::size_of::<$t>() }>($acc, $src, |a, b| {
            f(<$t>::from_ne_bytes(a), <$t>::from_ne_bytes(b)).to_ne_bytes()
        })
    }};
}

macro_rules! float_reduce {
    ($t:ty, $acc:expr, $src:expr, $op:expr) => {{
        let f: fn($t, $t) -> $t = match $op {
            ReduceOp::Sum | ReduceOp::Avg => |a, b| a + b,
            ReduceOp::Product => |a, b| a * b,
            ReduceOp::Min => |a: $t, b: $t| if b < a || b.is_nan() { b } else { a },
            ReduceOp::Max => |a: $t, b: $t| if b > a || b.is_nan() { b } else { a },
        };
        zip_elems::<{ std::mem::size_of::<$t>() }>($acc, $src, |a, b| {
            f(<$t>::from_ne_bytes(a), <$t>::from_ne_bytes(b)).to_ne_bytes()
        })
    }};
}

macro_rules! half_reduce {
    ($t:ty, $acc:expr, $src:expr, $op:expr) => {{
        let f: fn(f32, f32) -> f32 = match $op {
            ReduceOp::Sum | ReduceOp::Avg => |a, b| a + b,
            ReduceOp::Product => |a, b| a * b,
            ReduceOp::Min => |a: f32, b: f32| if b < a || b.is_nan() { b } else { a },
            ReduceOp::Max => |a: f32, b: f32| if b > a || b.is_nan() { b } else { a },
        };
        zip_elems::<2>($acc, $src, |a, b| {
            let (a, b) = (<$t>::from_ne_bytes(a).to_f32(), <$t>::from_ne_bytes(b).to_f32());
            <$t>::from_f32(f(a, b)).to_ne_bytes()
        })
    }};
}

/// `acc[i] = acc[i] op src[i]` over aligned typed slices (the compiler vectorizes these).
fn typed<T: bytemuck::Pod>(acc: &mut [u8], src: &[u8], f: impl Fn(T, T) -> T) -> bool {
    match (bytemuck::try_cast_slice_mut::<u8, T>(acc), bytemuck::try_cast_slice::<u8, T>(src)) {
        (Ok(a), Ok(s)) => {
            for (x, &y) in a.iter_mut().zip(s) {
                *x = f(*x, y);
            }
            true
        }
        _ => false,
    }
}

/// The common sums of aligned buffers, typed; false when the bytes need the general path.
fn fast_sum(acc: &mut [u8], src: &[u8], dtype: DType) -> bool {
    match dtype {
        DType::F32 => typed::<f32>(acc, src, |a, b| a + b),
        DType::F64 => typed::<f64>(acc, src, |a, b| a + b),
        DType::I32 => typed::<i32>(acc, src, i32::wrapping_add),
        DType::I64 => typed::<i64>(acc, src, i64::wrapping_add),
        _ => false,
    }
}

/// `acc[i] = acc[i] op src[i]` for every element (`acc` and `src` of equal length, a multiple
/// of the element size; AVG sums, [`finish_avg`] divides).
pub fn reduce_into(acc: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    if matches!(op, ReduceOp::Sum | ReduceOp::Avg) && fast_sum(acc, src, dtype) {
        return;
    }
    match dtype {
        DType::I8 => int_reduce!(i8, acc, src, op),
        DType::I16 => int_reduce!(i16, acc, src, op),
        DType::I32 => int_reduce!(i32, acc, src, op),
        DType::I64 => int_reduce!(i64, acc, src, op),
        DType::U8 => int_reduce!(u8, acc, src, op),
        DType::Bool => {
            let or = matches!(op, ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Max);
            for (a, s) in acc.iter_mut().zip(src) {
                *a = u8::from(if or { *a != 0 || *s != 0 } else { *a != 0 && *s != 0 });
            }
        }
        DType::F16 => half_reduce!(half::f16, acc, src, op),
        DType::BF16 => half_reduce!(half::bf16, acc, src, op),
        DType::F32 => float_reduce!(f32, acc, src, op),
        DType::F64 => float_reduce!(f64, acc, src, op),
    }
}

/// Divides a sum of `n` contributions by `n` (AVG; integers truncate toward zero).
pub fn finish_avg(acc: &mut [u8], dtype: DType, n: usize) {
    macro_rules! div {
        ($t:ty, $conv:expr, $back:expr) => {
            for a in acc.chunks_exact_mut(std::mem::size_of::<$t>()) {
                let mut x = [0u8; std::mem::size_of::<$t>()];
                x.copy_from_slice(a);
                let v: $t = $back($conv(<$t>::from_ne_bytes(x)) / (n as f64));
                a.copy_from_slice(&v.to_ne_bytes());
            }
        };
    }
    macro_rules! idiv {
        // Divides in `$w` (wide enough for `n`, however many ranks), truncating toward zero.
        ($t:ty, $w:ty) => {
            for a in acc.chunks_exact_mut(std::mem::size_of::<$t>()) {
                let mut x = [0u8; std::mem::size_of::<$t>()];
                x.copy_from_slice(a);
                let v = (<$w>::from(<$t>::from_ne_bytes(x)) / n as $w) as $t;
                a.copy_from_slice(&v.to_ne_bytes());
            }
        };
    }
    match dtype {
        DType::I8 => idiv!(i8, i64),
        DType::I16 => idiv!(i16, i64),
        DType::I32 => idiv!(i32, i64),
        DType::I64 => idiv!(i64, i128),
        DType::U8 => idiv!(u8, u64),
        DType::Bool => {}
        DType::F16 => {
            div!(half::f16, |v: half::f16| f64::from(v.to_f32()), |v: f64| half::f16::from_f64(v))
        }
        DType::BF16 => {
            div!(half::bf16, |v: half::bf16| f64::from(v.to_f32()), |v: f64| half::bf16::from_f64(
                v
            ))
        }
        DType::F32 => div!(f32, f64::from, |v: f64| v as f32),
        DType::F64 => div!(f64, |v: f64| v, |v: f64| v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }

    #[test]
    fn every_type_and_op_reduces_elementwise() {
        let mut a = bytes(&[1i32, -5, 7], i32::to_ne_bytes);
        reduce_into(&mut a, &bytes(&[2i32, 3, -9], i32::to_ne_bytes), DType::I32, ReduceOp::Sum);
        assert_eq!(a, bytes(&[3i32, -2, -2], i32::to_ne_bytes));
        let mut a = bytes(&[1.5f32, -5.0], f32::to_ne_bytes);
        reduce_into(&mut a, &bytes(&[2.0f32, 3.0], f32::to_ne_bytes), DType::F32, ReduceOp::Max);
        assert_eq!(a, bytes(&[2.0f32, 3.0], f32::to_ne_bytes));
        let mut a = vec![1u8, 0, 1, 0];
        reduce_into(&mut a, &[1, 1, 0, 0], DType::Bool, ReduceOp::Product);
        assert_eq!(a, vec![1, 0, 0, 0]);
        let mut a = vec![1u8, 0, 1, 0];
        reduce_into(&mut a, &[1, 1, 0, 0], DType::Bool, ReduceOp::Sum);
        assert_eq!(a, vec![1, 1, 1, 0]);
        let h = |v: &[f32]| bytes(v, |x| half::bf16::from_f32(x).to_ne_bytes());
        let mut a = h(&[1.0, 2.0]);
        reduce_into(&mut a, &h(&[3.0, 0.5]), DType::BF16, ReduceOp::Product);
        assert_eq!(a, h(&[3.0, 1.0]));
        let mut a = bytes(&[7i64, -7], i64::to_ne_bytes);
        finish_avg(&mut a, DType::I64, 2);
        assert_eq!(a, bytes(&[3i64, -3], i64::to_ne_bytes), "integer AVG truncates toward zero");
        let mut a = bytes(&[7.0f64, -1.0], f64::to_ne_bytes);
        finish_avg(&mut a, DType::F64, 2);
        assert_eq!(a, bytes(&[3.5f64, -0.5], f64::to_ne_bytes));
        assert!(ReduceOp::Avg.check(DType::Bool).is_err());
        let mut a = bytes(&[100i8, -100], i8::to_ne_bytes);
        finish_avg(&mut a, DType::I8, 300);
        assert_eq!(a, bytes(&[0i8, 0], i8::to_ne_bytes), "AVG over more ranks than i8 counts");
        let mut a = vec![200u8];
        finish_avg(&mut a, DType::U8, 256);
        assert_eq!(a, vec![0u8], "AVG over 256 ranks of u8 divides, never by zero");
        let mut a = bytes(&[i8::MAX], i8::to_ne_bytes);
        reduce_into(&mut a, &bytes(&[1i8], i8::to_ne_bytes), DType::I8, ReduceOp::Sum);
        assert_eq!(a, bytes(&[i8::MIN], i8::to_ne_bytes), "integers wrap, as in torch");
    }
}
