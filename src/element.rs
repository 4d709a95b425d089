//! Storage element types.
//!
//! Tensors are stored as `f32`, `half::f16` or `half::bf16`; K and V may also be `i8`
//! (symmetric int8, dequantized by the call's [`crate::KvScales`]). Every kernel computes and
//! accumulates in `f32`.
//! The trait is sealed: each storage type needs matching kernels and reference conversions,
//! so callers cannot add one the kernels do not know.

/// The storage types a tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    /// Symmetric int8 codes, K and V only: the value is `factor * code`, the factor from the
    /// call's [`crate::KvScales`] (1 without them).
    I8 = 3,
}

impl DType {
    /// Whether a tensor of this type holds quantized codes rather than values (K and V only).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::I8)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i8 {}
}

/// A floating-point storage element (`f32`, `f16`, `bf16`): what Q, outputs and partial
/// results are stored as. K and V may also be quantized codes (any [`Element`]).
pub trait FloatElement: Element {}
impl FloatElement for f32 {}
impl FloatElement for half::f16 {}
impl FloatElement for half::bf16 {}

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
    /// The slice itself when the storage type is `i8` (widened in registers by a sign-extend
    /// and an exact integer conversion).
    #[inline(always)]
    fn as_i8_slice(_: &[Self]) -> Option<&[i8]> {
        None
    }
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

impl Element for i8 {
    const DTYPE: DType = DType::I8;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Exact: every int8 is an f32.
        self as f32
    }
    /// Round to nearest even and saturate to `-128..=127` (NaN to 0), as a quantizer that has
    /// already divided by its scale would.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x.round_ties_even().clamp(-128.0, 127.0) as i8
    }
    #[inline(always)]
    fn as_f32_slice(_: &[i8]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f16_slice(_: &[i8]) -> Option<&[half::f16]> {
        None
    }
    #[inline(always)]
    fn as_bf16_slice(_: &[i8]) -> Option<&[half::bf16]> {
        None
    }
    #[inline(always)]
    fn as_i8_slice(s: &[i8]) -> Option<&[i8]> {
        Some(s)
    }
}
