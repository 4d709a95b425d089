//! A vectorised `exp` from pulp operations only (pulp has none, and no float-to-int
//! conversion): round-to-nearest by the 1.5 * 2^23 trick, Cody-Waite reduction by ln 2 in two
//! parts, a degree-6 polynomial for `e^r` on |r| <= ln2 / 2 (Horner), and `2^n` added
//! directly to the exponent bits.
//!
//! Max relative error ~7.5e-8 on [-87.3, 88.3] (with fused multiply-adds) (tested against f64 on every ISA in
//! `tests/simd_ops.rs`, through `selftest::exp`); inputs below the underflow threshold, -inf included,
//! give exactly 0 so masked keys weigh nothing.

use pulp::Simd;

/// Below this `e^x` is subnormal in f32: flushed to exactly 0.
pub const UNDERFLOW: f32 = -87.336_54;
const OVERFLOW: f32 = 88.3; // keeps round(x * log2 e) <= 127
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23

#[inline(always)]
pub(crate) fn exp_f32s<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let underflow = simd.less_than_f32s(x, simd.splat_f32s(UNDERFLOW));
    let xc = simd.min_f32s(simd.max_f32s(x, simd.splat_f32s(UNDERFLOW)), simd.splat_f32s(OVERFLOW));
    // t = x * log2(e) + 1.5 * 2^23: the low mantissa bits of t hold round(x * log2(e)).
    let t = simd.mul_add_e_f32s(xc, simd.splat_f32s(LOG2E), simd.splat_f32s(ROUND));
    let n = simd.sub_f32s(t, simd.splat_f32s(ROUND));
    let r = simd.mul_add_e_f32s(n, simd.splat_f32s(-LN2_HI), xc);
    let r = simd.mul_add_e_f32s(n, simd.splat_f32s(-LN2_LO), r);
    // e^r = 1 + r (1 + r P(r)), P of degree 4, all Horner: six FMAs. Coefficients fitted for
    // minimal relative error on |r| <= ln2 / 2 (3.1e-9 in exact arithmetic, 7.5e-8 in f32;
    // Cephes' 1 + r + r^2 P5(r) costs seven FMA-unit operations for 8.3e-8). In a prefill
    // kernel the FMA units are the bottleneck, and the softmax's exp shares them with Q.K^T
    // and P.V: every operation here is one less FMA for those.
    let mut p = simd.splat_f32s(1.381_446_7e-3);
    p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(8.368_781e-3));
    p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(4.166_839_3e-2));
    p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(1.666_652e-1));
    p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(4.999_999_4e-1));
    p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(1.0));
    let er = simd.mul_add_e_f32s(p, r, simd.splat_f32s(1.0));
    // times 2^n by adding n to the exponent field (an integer add, off the FMA units): shifting
    // t's bits left by 23 leaves n (two's complement) there. The result stays normal: on the
    // clamped range n is in [-126, 127], and n = -126 only with r >= 0, so e^r >= 1.
    let bits = simd.transmute_u32s_f32s(t);
    let shifted = simd.wrapping_dyn_shl_u32s(bits, simd.splat_u32s(23));
    let y = simd.transmute_f32s_u32s(simd.add_u32s(simd.transmute_u32s_f32s(er), shifted));
    simd.select_f32s(underflow, simd.splat_f32s(0.0), y)
}
