//! Storage element types.
//!
//! Tensors are stored as `f32`, `half::f16` or `half::bf16`; K and V may also be `i8`
//! (symmetric int8) or 8-bit floats ([`F8E4M3`], [`F8E5M2`]), dequantized by the call's
//! [`crate::KvScales`]. Every kernel computes and accumulates in `f32`.
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
    /// OCP fp8 E4M3 (`torch.float8_e4m3fn`), K and V only: value = `factor * decode(code)`.
    F8E4M3 = 4,
    /// OCP fp8 E5M2 (`torch.float8_e5m2`), K and V only: value = `factor * decode(code)`.
    F8E5M2 = 5,
    /// ggml's `q8_0` blocks ([`BlockQ8_0`]), K and V only: value `i` of a row is
    /// `factor * f32(block.d) * block.qs[i % 32]` of the row's block `i / 32`.
    Q8_0 = 6,
}

impl DType {
    /// Whether a tensor of this type holds quantized codes rather than values (K and V only).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i8 {}
    impl Sealed for super::F8E4M3 {}
    impl Sealed for super::F8E5M2 {}
    impl Sealed for super::BlockQ8_0 {}
    pub trait SealedPair {}
    impl<T: super::Element> SealedPair for (T, T) {}
    impl SealedPair for (super::BlockQ8_0, half::f16) {}
    impl SealedPair for (half::f16, super::BlockQ8_0) {}
}

/// The storage types of a K/V cache, `(K, V)`: `(T, T)` for every [`Element`], and the mixed
/// pairs listed in [`MIXED_KV_PAIRS`] (engines often quantize K and V differently: llama.cpp's
/// `-ctk q8_0 -ctv f16`, or the reverse). Each pair is a full set of compiled kernels, so the
/// trait is sealed and the list is short: a new pair is one line here and one in `dtypes`.
pub trait KvPair: sealed::SealedPair + Copy + Send + Sync + 'static {
    type K: Element;
    type V: Element;
    /// The storage type whose kernel family (tiles, specialised head dims) plans the pair: the
    /// shared type, or f32's (the generic family) for a mixed pair.
    const FAMILY: DType;
}

impl<T: Element> KvPair for (T, T) {
    type K = T;
    type V = T;
    const FAMILY: DType = T::DTYPE;
}

impl KvPair for (BlockQ8_0, half::f16) {
    type K = BlockQ8_0;
    type V = half::f16;
    const FAMILY: DType = DType::F32;
}

impl KvPair for (half::f16, BlockQ8_0) {
    type K = half::f16;
    type V = BlockQ8_0;
    const FAMILY: DType = DType::F32;
}

/// The `(K, V)` storage pairs of different types that every entry accepts (Rust, C ABI, paged
/// or not): the [`KvPair`] impls besides `(T, T)`. Any other pair does not compile in Rust and
/// is refused with `SIMD_ATTN_ERR_UNSUPPORTED_DTYPES` by the C ABI.
pub const MIXED_KV_PAIRS: &[(DType, DType)] = &[(DType::Q8_0, DType::F16), (DType::F16, DType::Q8_0)];

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
    /// The slice itself when the storage type is fp8 E4M3 (widened in registers through f16).
    #[inline(always)]
    fn as_e4m3_slice(_: &[Self]) -> Option<&[F8E4M3]> {
        None
    }
    /// The slice itself when the storage type is fp8 E5M2 (the top byte of an f16).
    #[inline(always)]
    fn as_e5m2_slice(_: &[Self]) -> Option<&[F8E5M2]> {
        None
    }
    /// Values per storage unit: 1, or a block format's block length ([`BlockQ8_0`]: 32). A row
    /// of `d` values (a multiple of it) is `d / BLOCK` units; strides count units.
    const BLOCK: usize = 1;
    /// The slice itself when the storage type is ggml `q8_0` blocks.
    #[inline(always)]
    fn as_q8_0_slice(_: &[Self]) -> Option<&[BlockQ8_0]> {
        None
    }
    /// Value `i` of the row that starts at `row[0]`, exactly: the one scalar read of K and V
    /// that block formats answer too (`to_f32` of one unit is one value only when `BLOCK` is 1).
    #[inline(always)]
    fn value(row: &[Self], i: usize) -> f32 {
        row[i].to_f32()
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

/// An OCP 8-bit float, E4M3 "fn" flavour (`torch.float8_e4m3fn`, the fp8 of vLLM's and
/// SGLang's `fp8` / `fp8_e4m3` KV caches): sign, 4 exponent bits (bias 7), 3 mantissa bits.
/// Finite everywhere except the two NaN codes `0x7f` and `0xff`; no infinities; largest value
/// 448, smallest subnormal 2^-9. Decoding is exact in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct F8E4M3(pub u8);

/// An OCP 8-bit float, E5M2 (`torch.float8_e5m2`): sign, 5 exponent bits (bias 15), 2 mantissa
/// bits: exactly the top byte of an IEEE f16, infinities (`0x7c`, `0xfc`) and NaNs (exponent
/// 31, mantissa not 0) included; largest finite value 57344, smallest subnormal 2^-16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct F8E5M2(pub u8);

impl F8E4M3 {
    /// The largest finite value, 448 (code `0x7e`).
    pub const MAX: f32 = 448.0;

    /// The f16 whose value is this code's value times 2^-8: the sign moves to bit 15 and the
    /// 7 exponent-and-mantissa bits to bits 13..7. With f16's exponent bias 8 above E4M3's,
    /// normal and subnormal codes land exactly (`0x7f` lands on a finite value; see `to_f32`).
    /// The SIMD loads do the same with a sign-extend, a shift and a mask.
    #[inline(always)]
    pub const fn f16_bits_scaled(self) -> u16 {
        (((self.0 as i8 as i16) << 7) as u16) & 0xBFFF
    }

    /// Exact decoding: NaN for `0x7f` / `0xff`.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        if self.0 & 0x7f == 0x7f {
            return f32::NAN;
        }
        half::f16::from_bits(self.f16_bits_scaled()).to_f32() * 256.0
    }

    /// Round to nearest even; finite values beyond +-448 saturate to +-448 (as vLLM's
    /// quantizers clamp before converting); NaN and +-inf (the format has no infinity) give NaN.
    pub fn from_f32(x: f32) -> Self {
        if !x.is_finite() {
            return F8E4M3(0x7f);
        }
        F8E4M3(round_to_code(x, 0x7e, |c| F8E4M3(c).to_f32()))
    }
}

impl F8E5M2 {
    /// The largest finite value, 57344 (code `0x7b`).
    pub const MAX: f32 = 57344.0;

    /// Exact decoding: the code is the top byte of an f16.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        half::f16::from_bits((self.0 as u16) << 8).to_f32()
    }

    /// Round to nearest even; finite values beyond +-57344 saturate to +-57344; +-inf stays
    /// +-inf, NaN gives NaN (`0x7f`).
    pub fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            return F8E5M2(0x7f);
        }
        if x.is_infinite() {
            return F8E5M2(if x > 0.0 { 0x7c } else { 0xfc });
        }
        F8E5M2(round_to_code(x, 0x7b, |c| F8E5M2(c).to_f32()))
    }
}

/// The code nearest to finite `x` among sign-magnitude codes whose non-negative half
/// `0..=max_code` decodes to increasing values (`value`); ties go to the even code (even
/// mantissa), beyond the largest value to the largest.
fn round_to_code(x: f32, max_code: u8, value: impl Fn(u8) -> f32) -> u8 {
    let (sign, a) = (if x.is_sign_negative() { 0x80 } else { 0 }, x.abs());
    // The largest code whose value is <= a (values increase with the code).
    let (mut lo, mut hi) = (0u8, max_code);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if value(mid) <= a {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let c = if lo == max_code {
        lo
    } else {
        let (below, above) = (a - value(lo), value(lo + 1) - a);
        if below < above || (below == above && lo % 2 == 0) { lo } else { lo + 1 }
    };
    sign | c
}

macro_rules! fp8_element {
    ($t:ident, $dtype:ident, $slice:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $t::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                $t::from_f32(x)
            }
            #[inline(always)]
            fn as_f32_slice(_: &[$t]) -> Option<&[f32]> {
                None
            }
            #[inline(always)]
            fn as_f16_slice(_: &[$t]) -> Option<&[half::f16]> {
                None
            }
            #[inline(always)]
            fn as_bf16_slice(_: &[$t]) -> Option<&[half::bf16]> {
                None
            }
            #[inline(always)]
            fn $slice(s: &[$t]) -> Option<&[$t]> {
                Some(s)
            }
        }
    };
}
fp8_element!(F8E4M3, F8E4M3, as_e4m3_slice);
fp8_element!(F8E5M2, F8E5M2, as_e5m2_slice);

/// One block of ggml's `q8_0` format (`block_q8_0`, 34 bytes): an f16 scale `d`, then 32 int8
/// codes. Value `i` of the block is `f32(d) * qs[i]`, exact in f32 (11 by 8 significant bits).
/// A row of `D` values (`D` a multiple of 32) is `D / 32` consecutive blocks, so a ggml K or V
/// tensor is read in place; strides count blocks (ggml's byte strides `nb` divided by 34).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: half::f16,
    pub qs: [i8; 32],
}

const _: () = assert!(size_of::<BlockQ8_0>() == 34 && align_of::<BlockQ8_0>() == 2);

impl BlockQ8_0 {
    /// Values per block.
    pub const LEN: usize = 32;

    /// The block ggml's reference quantizer (`quantize_row_q8_0_ref`) makes of 32 values:
    /// `d = amax / 127` rounded to f16, codes `round(x / d)` (halves away from zero, as C's
    /// `roundf`), all zero when `amax` is 0.
    pub fn quantize(x: &[f32; 32]) -> Self {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        BlockQ8_0 { d: half::f16::from_f32(d), qs }
    }

    /// Value `i` (`i < 32`), exactly.
    #[inline(always)]
    pub fn value(&self, i: usize) -> f32 {
        self.d.to_f32() * self.qs[i] as f32
    }
}

impl Element for BlockQ8_0 {
    const DTYPE: DType = DType::Q8_0;
    const BLOCK: usize = BlockQ8_0::LEN;
    /// A block holds 32 values, not one: every reader of K and V goes through
    /// [`Element::value`] or the block-aware loads, so this is never called on a row; it
    /// answers the block's first value.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.value(0)
    }
    /// The block of 32 copies of `x`.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        BlockQ8_0::quantize(&[x; 32])
    }
    #[inline(always)]
    fn as_f32_slice(_: &[BlockQ8_0]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f16_slice(_: &[BlockQ8_0]) -> Option<&[half::f16]> {
        None
    }
    #[inline(always)]
    fn as_bf16_slice(_: &[BlockQ8_0]) -> Option<&[half::bf16]> {
        None
    }
    #[inline(always)]
    fn as_q8_0_slice(s: &[BlockQ8_0]) -> Option<&[BlockQ8_0]> {
        Some(s)
    }
    #[inline(always)]
    fn value(row: &[BlockQ8_0], i: usize) -> f32 {
        row[i / BlockQ8_0::LEN].value(i % BlockQ8_0::LEN)
    }
}
