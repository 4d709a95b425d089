//! The ISA layer: the operations pulp lacks (exp), and running an op on a chosen ISA.
//!
//! Kernels are written once against pulp's `Simd` plus [`SimdExt`]; `run_on` monomorphises
//! them for AVX-512 (`V4`), AVX2+FMA (`V3`), NEON or the portable scalar `Simd`, inside a
//! function compiled with that ISA's target features.

pub(crate) mod exp;

use crate::isa::Isa;
use pulp::{Simd, WithSimd};

/// What the kernels need beyond pulp's `Simd`. Implemented for every token the crate
/// dispatches to; the default bodies are written in pulp operations, so every ISA shares them.
pub(crate) trait SimdExt: Simd {
    /// `e^x` per lane: max relative error below 2e-7 on the softmax's input range (x <= 0),
    /// exactly 0 below the underflow threshold and for -inf.
    #[inline(always)]
    fn exp_f32s(self, x: Self::f32s) -> Self::f32s {
        exp::exp_f32s(self, x)
    }
}

impl SimdExt for pulp::Scalar {}
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl SimdExt for pulp::x86::V3 {}
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl SimdExt for pulp::x86::V4 {}
#[cfg(target_arch = "aarch64")]
impl SimdExt for pulp::aarch64::NeonFcma {}

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

/// Runs `op` with AVX2+FMA, if the CPU has them.
#[inline]
pub(crate) fn run_avx2<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return Some(Simd::vectorize(v3, Vectorize { simd: v3, op }));
    }
    let _ = op;
    None
}

/// Runs `op` with AVX-512 (F/BW/CD/DQ/VL), if the CPU has it.
#[inline]
pub(crate) fn run_avx512<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
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
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        Isa::Avx2 => pulp::x86::V3::try_new().is_some(),
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        Isa::Avx512 => pulp::x86::V4::try_new().is_some(),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => pulp::aarch64::NeonFcma::try_new().is_some(),
        _ => false,
    }
}
