//! Storage element types.
//!
//! Tensors are stored as `f32`, `half::f16` or `half::bf16`; every kernel computes and
//! accumulates in `f32`.
//! The trait is sealed: each storage type needs matching kernels and reference conversions,
//! so callers cannot add one the kernels do not know.

/// The storage types a tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage element: converted to `f32` on load and rounded once on store.
pub trait Element: sealed::Sealed + Copy + Default + Send + Sync + core::fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Round to nearest even, as IEEE conversion does.
    fn from_f32(x: f32) -> Self;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// The slice itself when the storage type is already `f32`, so kernels can read it in
    /// place instead of converting a copy.
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]>;
    /// The slice itself when the storage type is `f16`, so kernels can convert it in registers.
    fn as_f16_slice(s: &[Self]) -> Option<&[half::f16]>;
    /// The slice itself when the storage type is `bf16` (widened in registers by a shift).
    fn as_bf16_slice(s: &[Self]) -> Option<&[half::bf16]>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32_slice(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn as_f16_slice(_: &[f32]) -> Option<&[half::f16]> {
        None
    }
    #[inline(always)]
    fn as_bf16_slice(_: &[f32]) -> Option<&[half::bf16]> {
        None
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[inline(always)]
    fn as_f32_slice(_: &[half::f16]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f16_slice(s: &[half::f16]) -> Option<&[half::f16]> {
        Some(s)
    }
    #[inline(always)]
    fn as_bf16_slice(_: &[half::f16]) -> Option<&[half::bf16]> {
        None
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Exact: a bf16 is the top half of an f32's bits.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        // Round to nearest even; NaN stays NaN (half's conversion does both).
        half::bf16::from_f32(x)
    }
    #[inline(always)]
    fn as_f32_slice(_: &[half::bf16]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f16_slice(_: &[half::bf16]) -> Option<&[half::f16]> {
        None
    }
    #[inline(always)]
    fn as_bf16_slice(s: &[half::bf16]) -> Option<&[half::bf16]> {
        Some(s)
    }
}
