//! The ISA layer: the operations pulp lacks (exp), and running an op on a chosen ISA.
//!
//! Kernels are written once against pulp's `Simd` plus [`SimdExt`]; `run_on` monomorphises
//! them for AVX-512 (`V4`), AVX2+FMA (`V3`), NEON or the portable scalar `Simd`, inside a
//! function compiled with that ISA's target features.

pub(crate) mod exp;
pub(crate) mod tanh;

use crate::isa::Isa;
use half::f16;
use pulp::{Simd, WithSimd};

/// What the kernels need beyond pulp's `Simd`. Implemented for every token the crate
/// dispatches to; the default bodies are written in pulp operations (or lane by lane), so every
/// ISA has them, and x86 overrides the f16 conversion with the hardware instruction.
pub(crate) trait SimdExt: Simd {
    /// `e^x` per lane: max relative error below 2e-7 on the softmax's input range (x <= 0),
    /// exactly 0 below the underflow threshold and for -inf.
    #[inline(always)]
    fn exp_f32s(self, x: Self::f32s) -> Self::f32s {
        exp::exp_f32s(self, x)
    }

    /// `tanh(x)` per lane, absolute error below [`tanh::TANH_MAX_ABS_ERROR`].
    #[inline(always)]
    fn tanh_f32s(self, x: Self::f32s) -> Self::f32s {
        tanh::tanh_f32s(self, x)
    }

    /// The first `F32_LANES` values of `src` (which holds at least that many), widened to f32.
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        let mut buf = [0.0f32; 16];
        let lanes = Self::F32_LANES;
        for (d, s) in buf[..lanes].iter_mut().zip(&src[..lanes]) {
            *d = s.to_f32();
        }
        Self::as_simd_f32s(&buf[..lanes]).0[0]
    }

    /// Lane `i` of the result is the sum of the lanes of `acc[i]` (`acc` holds `F32_LANES`
    /// vectors): the horizontal sums of a whole register tile of dot products at once, which
    /// costs a few shuffles per sum instead of a full reduction each.
    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        let mut buf = [0.0f32; 16];
        let lanes = Self::F32_LANES;
        for (d, &a) in buf[..lanes].iter_mut().zip(&acc[..lanes]) {
            *d = self.reduce_sum_f32s(a);
        }
        Self::as_simd_f32s(&buf[..lanes]).0[0]
    }

    /// Hints that the cache line holding `p` will be read soon (into L2): decode streams K and V
    /// from memory, and the hardware prefetcher stops at every 4 KiB page. Never dereferences
    /// `p`, so any address is allowed; a no-op where the ISA layer has no hint.
    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        let _ = p;
    }
}

impl SimdExt for pulp::Scalar {}
#[cfg(target_arch = "aarch64")]
impl SimdExt for pulp::aarch64::NeonFcma {}

#[cfg(target_arch = "x86_64")]
impl SimdExt for pulp::x86::V4 {
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        use core::arch::x86_64::{__m256i, _mm256_loadu_si256};
        let src = &src[..16];
        // SAFETY: `src` holds 16 f16 = 32 bytes; AVX is enabled in every V4 context.
        let bits = unsafe { _mm256_loadu_si256(src.as_ptr().cast::<__m256i>()) };
        pulp::cast(self.avx512f._mm512_cvtph_ps(bits))
    }

    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        use core::arch::x86_64::*;
        let acc = &acc[..16];
        // Loops, not closures: a closure is a function of its own, compiled without the target
        // features, and the intrinsics in it would not inline.
        // SAFETY (every block below): AVX-512F is enabled in every V4 context; the intrinsics
        // only shuffle and add registers.
        // 16 -> 8: 256-bit halves; pair k holds sums of acc 2k (128-bit lanes 0, 1) and 2k+1.
        let mut p = [unsafe { _mm512_setzero_ps() }; 8];
        for k in 0..8 {
            let (x, y): (__m512, __m512) = (pulp::cast(acc[2 * k]), pulp::cast(acc[2 * k + 1]));
            p[k] = unsafe { _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y)) };
        }
        // 8 -> 4: 128-bit lane i of q[m] holds the 4 partial sums of acc 4m + i.
        let mut q = [p[0]; 4];
        for m in 0..4 {
            let (x, y) = (p[2 * m], p[2 * m + 1]);
            q[m] = unsafe { _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y)) };
        }
        // 4 -> 2 -> 1 inside 128-bit lanes: position 4i + j ends up with the sum of acc 4j + i.
        let mut r = [q[0]; 2];
        for m in 0..2 {
            let (x, y) = (q[2 * m], q[2 * m + 1]);
            r[m] = unsafe { _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y)) };
        }
        unsafe {
            let t = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(r[0], r[1]), _mm512_shuffle_ps::<0xDD>(r[0], r[1]));
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            pulp::cast(_mm512_permutexvar_ps(idx, t))
        }
    }

    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch never faults or reads architecturally, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
impl SimdExt for pulp::x86::V3 {
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_loadu_si128};
        let src = &src[..8];
        // SAFETY: `src` holds 8 f16 = 16 bytes. The crate hands a V3 token to kernels only
        // inside `run_avx2`, which runs them under `V3F16C` (F16C present and enabled), so the
        // conversion inlines to one `vcvtph2ps`.
        unsafe { pulp::cast(_mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast::<__m128i>()))) }
    }

    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        use core::arch::x86_64::*;
        let acc = &acc[..8];
        // Loops, not closures (see V4).
        // SAFETY (every block below): AVX2 is enabled in every V3 context; the intrinsics only
        // shuffle and add registers.
        // 8 -> 4: 128-bit lane i of p[k] holds the 4 partial sums of acc 2k + i.
        let mut p = [unsafe { _mm256_setzero_ps() }; 4];
        for k in 0..4 {
            let (x, y): (__m256, __m256) = (pulp::cast(acc[2 * k]), pulp::cast(acc[2 * k + 1]));
            p[k] = unsafe { _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y)) };
        }
        // 4 -> 2 -> 1 inside 128-bit lanes: position 4i + j ends up with the sum of acc 2j + i.
        let mut r = [p[0]; 2];
        for m in 0..2 {
            let (x, y) = (p[2 * m], p[2 * m + 1]);
            r[m] = unsafe { _mm256_add_ps(_mm256_shuffle_ps::<0x44>(x, y), _mm256_shuffle_ps::<0xEE>(x, y)) };
        }
        unsafe {
            let t = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(r[0], r[1]), _mm256_shuffle_ps::<0xDD>(r[0], r[1]));
            let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            pulp::cast(_mm256_permutevar8x32_ps(t, idx))
        }
    }

    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch never faults or reads architecturally, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
pulp::simd_type! {
    /// pulp's `V3` (AVX2 + FMA) plus F16C, which `V3` does not enable: without it the f16
    /// conversion compiles to an out-of-line call, about 5x slower.
    pub struct V3F16C {
        pub sse: "sse",
        pub sse2: "sse2",
        pub fxsr: "fxsr",
        pub sse3: "sse3",
        pub ssse3: "ssse3",
        pub sse4_1: "sse4.1",
        pub sse4_2: "sse4.2",
        pub popcnt: "popcnt",
        pub avx: "avx",
        pub avx2: "avx2",
        pub bmi1: "bmi1",
        pub bmi2: "bmi2",
        pub fma: "fma",
        pub lzcnt: "lzcnt",
        pub f16c: "f16c",
    }
}

/// Runs an op with a V3 token inside `V3F16C::vectorize` (so F16C is enabled too).
#[cfg(target_arch = "x86_64")]
struct UnderF16C<Op> {
    v3: pulp::x86::V3,
    op: Op,
}

#[cfg(target_arch = "x86_64")]
impl<Op: WithSimdExt> pulp::NullaryFnOnce for UnderF16C<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn call(self) -> Op::Output {
        self.op.with_simd(self.v3)
    }
}

/// An op the ISA layer can run: like pulp's `WithSimd`, but bound on [`SimdExt`].
pub(crate) trait WithSimdExt {
    type Output;
    fn with_simd<S: SimdExt>(self, simd: S) -> Self::Output;
}

/// Runs `op` on the portable scalar `Simd` (available everywhere).
#[inline]
pub(crate) fn run_scalar<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    Some(op.with_simd(pulp::Scalar::new()))
}

/// Runs `op` with AVX2+FMA (and F16C, which every AVX2 CPU has and the f16 kernels need), if
/// the CPU has them.
#[inline]
pub(crate) fn run_avx2<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(tok), Some(v3)) = (V3F16C::try_new(), pulp::x86::V3::try_new()) {
        return Some(tok.vectorize(UnderF16C { v3, op }));
    }
    let _ = op;
    None
}

/// Runs `op` with AVX-512 (F/BW/CD/DQ/VL), if the CPU has it.
#[inline]
pub(crate) fn run_avx512<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "x86_64")]
    if let Some(v4) = pulp::x86::V4::try_new() {
        return Some(Simd::vectorize(v4, Vectorize { simd: v4, op }));
    }
    let _ = op;
    None
}

/// Runs `op` with NEON, on aarch64.
#[inline]
pub(crate) fn run_neon<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "aarch64")]
    if let Some(n) = pulp::aarch64::NeonFcma::try_new() {
        return Some(Simd::vectorize(n, Vectorize { simd: n, op }));
    }
    let _ = op;
    None
}

/// Carries the concrete token into `vectorize`, which enables its target features around the
/// (fully inlined) op.
struct Vectorize<S, Op> {
    simd: S,
    op: Op,
}
impl<S: SimdExt, Op: WithSimdExt> WithSimd for Vectorize<S, Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn with_simd<S2: Simd>(self, _: S2) -> Self::Output {
        self.op.with_simd(self.simd)
    }
}

/// Whether this CPU and build can run `isa`.
pub(crate) fn supported(isa: Isa) -> bool {
    match isa {
        Isa::Portable | Isa::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => pulp::x86::V3::try_new().is_some() && V3F16C::try_new().is_some(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => pulp::x86::V4::try_new().is_some(),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => pulp::aarch64::NeonFcma::try_new().is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `transpose_sum_f32s` on `lanes` vectors whose lanes are distinct, and returns the
    /// sums with the lane count.
    struct TransposeSum;
    impl WithSimdExt for TransposeSum {
        type Output = (Vec<f32>, Vec<f32>);
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) -> Self::Output {
            let lanes = S::F32_LANES;
            let vals: Vec<f32> = (0..lanes * lanes).map(|i| (i * i % 97) as f32 + 0.25 * i as f32).collect();
            let acc = S::as_simd_f32s(&vals).0;
            let got = simd.transpose_sum_f32s(acc);
            let mut out = vec![0.0; lanes];
            S::as_mut_simd_f32s(&mut out).0[0] = got;
            let want = vals.chunks(lanes).map(|c| c.iter().sum()).collect();
            (out, want)
        }
    }

    #[test]
    fn transpose_sum_puts_each_vectors_sum_in_its_lane_on_every_isa() {
        for run in [run_scalar::<TransposeSum>, run_avx2, run_avx512, run_neon] {
            if let Some((got, want)) = run(TransposeSum) {
                assert_eq!(got, want);
            }
        }
    }
}
