//! A vectorised `tanh` for the additive score, from the crate's `exp`:
//! `tanh(x) = 1 - 2 / (e^(2x) + 1)` on `x` clamped to `[-9, 9]` (beyond that `tanh` rounds to
//! `±1` in f32). It never overflows and maps `±inf` to `±1`.
//!
//! Its error is absolute, not relative (the subtraction cancels near 0): at most 2.4e-7 over
//! the whole line (`tests/simd_ops.rs` sweeps it against f64 on every ISA). The additive score
//! `sum_a v_a tanh(..)` therefore carries at most `2.4e-7 * sum_a |v_a|` from it, on the order of
//! f32 rounding of the sum itself.

use pulp::Simd;

/// Where `tanh` is `±1` to f32 precision.
const CLAMP: f32 = 9.0;

/// The measured bound on `|tanh_f32s(x) - tanh(x)|`.
pub const TANH_MAX_ABS_ERROR: f64 = 2.4e-7;

#[inline(always)]
pub(crate) fn tanh_f32s<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let xc = simd.min_f32s(simd.max_f32s(x, simd.splat_f32s(-CLAMP)), simd.splat_f32s(CLAMP));
    let e = super::exp::exp_f32s(simd, simd.add_f32s(xc, xc));
    let one = simd.splat_f32s(1.0);
    simd.sub_f32s(one, simd.div_f32s(simd.splat_f32s(2.0), simd.add_f32s(e, one)))
}
