//! A vectorised `tanh` for the additive score, from the crate's `exp`:
//! `tanh(x) = 1 - 2 / (e^(2x) + 1)` on `x` clamped to `[-9, 9]` (beyond that `tanh` rounds to
//! `±1` in f32). It never overflows and maps `±inf` to `±1`.
//!
//! Its error is absolute, not relative (the subtraction cancels near 0): at most 2.4e-7 over
//! the whole line (`tests` below sweeps it against f64 on every ISA). The additive score
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{run_scalar, runners, SimdExt, WithSimdExt};

    struct MaxError;
    impl WithSimdExt for MaxError {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) -> f64 {
            let lanes = S::F32_LANES;
            let mut worst = 0.0f64;
            let mut xs = vec![0.0f32; lanes];
            // Dense near 0 (where the cancellation is), then the whole range out to saturation.
            let grid = (-200_000..=200_000)
                .map(|k| k as f32 * 1e-5)
                .chain((-120_000..=120_000).map(|k| k as f32 * 1e-4))
                .chain([f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, f32::MIN_POSITIVE, -0.0]);
            let grid: Vec<f32> = grid.collect();
            for chunk in grid.chunks(lanes) {
                xs[..chunk.len()].copy_from_slice(chunk);
                let y = tanh_f32s(simd, S::as_simd_f32s(&xs).0[0]);
                let mut ys = vec![0.0f32; lanes];
                S::as_mut_simd_f32s(&mut ys).0[0] = y;
                for (&x, &y) in chunk.iter().zip(&ys) {
                    worst = worst.max((y as f64 - (x as f64).tanh()).abs());
                }
            }
            worst
        }
    }

    #[test]
    fn tanh_stays_within_its_stated_absolute_error_on_every_isa() {
        for (name, run) in runners::<MaxError>() {
            if let Some(worst) = run(MaxError) {
                assert!(worst <= TANH_MAX_ABS_ERROR, "{name}: max |tanh error| {worst:e}");
            }
        }
        assert!(run_scalar(MaxError).is_some());
    }
}
