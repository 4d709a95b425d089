//! Probes into the SIMD layer and the pool for the crate's own tests (`tests/simd_ops.rs`,
//! `tests/pool.rs`). Not part of the API: hidden, and free to change.
//!
//! They live here, not in `#[cfg(test)]` modules, so the test suite reaches them from
//! integration tests and the library is compiled once: a unit-test harness compiles the whole
//! crate, every kernel included, a second time (about 4 of CI's minutes on 2 cores, per target).

use crate::isa::Isa;
use crate::simd::{run_avx2, run_avx512, run_neon, run_scalar, SimdExt, WithSimdExt};
use half::f16;

/// Runs `op` on `isa`'s SIMD layer; `None` where this machine lacks it (and for the portable
/// kernel, which has no SIMD layer).
fn on<Op: WithSimdExt>(isa: Isa, op: Op) -> Option<Op::Output> {
    match isa {
        Isa::Portable => None,
        Isa::Scalar => run_scalar(op),
        Isa::Avx2 => run_avx2(op),
        Isa::Avx512 | Isa::Avx512Bf16 => run_avx512(op),
        Isa::Neon => run_neon(op),
    }
}

/// f32 lanes per vector of `isa`'s SIMD layer.
pub fn lanes(isa: Isa) -> Option<usize> {
    struct Lanes;
    impl WithSimdExt for Lanes {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, _: S) -> usize {
            S::F32_LANES
        }
    }
    on(isa, Lanes)
}

/// `xs[i] = exp(xs[i])` with the kernels' vector `exp` (partial last vector included).
pub fn exp(isa: Isa, xs: &mut [f32]) -> Option<()> {
    struct Exp<'a>(&'a mut [f32]);
    impl WithSimdExt for Exp<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) {
            let (head, tail) = S::as_mut_simd_f32s(self.0);
            for x in head {
                *x = simd.exp_f32s(*x);
            }
            let t = simd.exp_f32s(simd.partial_load_f32s(tail));
            simd.partial_store_f32s(tail, t);
        }
    }
    on(isa, Exp(xs))
}

/// `xs[i] = tanh(xs[i])` with the additive score's vector `tanh`.
pub fn tanh(isa: Isa, xs: &mut [f32]) -> Option<()> {
    struct Tanh<'a>(&'a mut [f32]);
    impl WithSimdExt for Tanh<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) {
            let (head, tail) = S::as_mut_simd_f32s(self.0);
            for x in head {
                *x = simd.tanh_f32s(*x);
            }
            let t = simd.tanh_f32s(simd.partial_load_f32s(tail));
            simd.partial_store_f32s(tail, t);
        }
    }
    on(isa, Tanh(xs))
}

/// `transpose_sum_f32s` of the `lanes` vectors in `vals` (`lanes * lanes` values, vector by
/// vector): lane `i` of the result should be the sum of vector `i`.
pub fn transpose_sum(isa: Isa, vals: &[f32]) -> Option<Vec<f32>> {
    struct TransposeSum<'a>(&'a [f32]);
    impl WithSimdExt for TransposeSum<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) -> Vec<f32> {
            let lanes = S::F32_LANES;
            let acc = S::as_simd_f32s(&self.0[..lanes * lanes]).0;
            let mut out = vec![0.0; lanes];
            S::as_mut_simd_f32s(&mut out).0[0] = simd.transpose_sum_f32s(acc);
            out
        }
    }
    on(isa, TransposeSum(vals))
}

/// `src` (whole vectors' worth) widened by `load_f16s` one vector at a time, and by
/// `load_f16s_pair` two vectors at a time (a trailing single vector is left 0 there).
pub fn widen_f16(isa: Isa, src: &[f16]) -> Option<(Vec<f32>, Vec<f32>)> {
    on(isa, Widen(src))
}

/// [`widen_f16`] for bf16: `load_bf16s` and `load_bf16s_pair`.
pub fn widen_bf16(isa: Isa, src: &[half::bf16]) -> Option<(Vec<f32>, Vec<f32>)> {
    on(isa, Widen(src))
}

/// [`widen_f16`] for int8: `load_i8s` and `load_i8s_pair`.
pub fn widen_i8(isa: Isa, src: &[i8]) -> Option<(Vec<f32>, Vec<f32>)> {
    on(isa, Widen(src))
}

/// [`widen_f16`] for fp8 E4M3: `load_e4m3s` and `load_e4m3s_pair`.
pub fn widen_e4m3(isa: Isa, src: &[crate::F8E4M3]) -> Option<(Vec<f32>, Vec<f32>)> {
    on(isa, Widen(src))
}

/// [`widen_f16`] for fp8 E5M2: `load_e5m2s` and `load_e5m2s_pair`.
pub fn widen_e5m2(isa: Isa, src: &[crate::F8E5M2]) -> Option<(Vec<f32>, Vec<f32>)> {
    on(isa, Widen(src))
}

/// Every value of a row of q8_0 blocks as the ISA's `load_q8_0s` gives it, a vector at a time
/// (through the kernels' `load_lanes`, as they read K and V in place).
pub fn widen_q8_0(isa: Isa, src: &[crate::BlockQ8_0]) -> Option<Vec<f32>> {
    struct Blocks<'a>(&'a [crate::BlockQ8_0]);
    impl WithSimdExt for Blocks<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) -> Vec<f32> {
            let mut out = vec![0.0f32; self.0.len() * crate::BlockQ8_0::LEN];
            for (t, dst) in S::as_mut_simd_f32s(&mut out).0.iter_mut().enumerate() {
                *dst = crate::kernel::load_lanes(simd, self.0, t);
            }
            out
        }
    }
    on(isa, Blocks(src))
}

struct Widen<'a, T>(&'a [T]);
impl<T: crate::simd::Widen> WithSimdExt for Widen<'_, T> {
    type Output = (Vec<f32>, Vec<f32>);
    #[inline(always)]
    fn with_simd<S: SimdExt>(self, simd: S) -> Self::Output {
        let lanes = S::F32_LANES;
        let (mut one, mut pair) = (vec![0.0f32; self.0.len()], vec![0.0f32; self.0.len()]);
        for (src, dst) in self.0.chunks_exact(lanes).zip(one.chunks_exact_mut(lanes)) {
            S::as_mut_simd_f32s(dst).0[0] = T::load(simd, src);
        }
        for (src, dst) in self.0.chunks_exact(2 * lanes).zip(pair.chunks_exact_mut(2 * lanes)) {
            let (a, b) = T::load_pair(simd, src);
            let (lo, hi) = dst.split_at_mut(lanes);
            (S::as_mut_simd_f32s(lo).0[0], S::as_mut_simd_f32s(hi).0[0]) = (a, b);
        }
        (one, pair)
    }
}

/// `prefetch_l2` on each address (which it must never dereference).
pub fn prefetch(isa: Isa, addrs: &[*const u8]) -> Option<()> {
    struct Prefetch<'a>(&'a [*const u8]);
    impl WithSimdExt for Prefetch<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) {
            for &p in self.0 {
                simd.prefetch_l2(p);
            }
        }
    }
    on(isa, Prefetch(addrs))
}

/// A phase of the SIMD prefill kernel, timed on its own by the bench's `--set phases`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `qk_tile` over one key block: S^T = K Q^T for one row tile.
    QkTile,
    /// `online_softmax` over that score tile (max, exp, sum, the rescale factors).
    OnlineSoftmax,
    /// `pv_rows`: O += P V for the row tile over the key block.
    PvTile,
}

/// Runs `phase` of `isa`'s f32 flash kernel at `head_dim` (a specialised head dim of the f32
/// family) `reps` times over one row tile and one key block of the kernel's own tile sizes,
/// on data that stays in L1/L2 as the kernel's does. Returns the (row, key) pairs one rep
/// covers and the seconds all reps took; `None` where the machine lacks `isa` or `head_dim`
/// has no f32 specialisation on it.
pub fn flash_phase(isa: Isa, phase: Phase, head_dim: usize, reps: usize) -> Option<(usize, f64)> {
    use crate::element::DType;
    use crate::kernel::flash::online_softmax;
    use crate::kernel::microkernel::{pv_rows, qk_tile};
    use std::hint::black_box;

    struct PhaseRun<const D: usize, const MR: usize, const NRV: usize> {
        phase: Phase,
        bc: usize,
        reps: usize,
    }
    impl<const D: usize, const MR: usize, const NRV: usize> WithSimdExt for PhaseRun<D, MR, NRV> {
        type Output = (usize, f64);
        #[inline(always)]
        fn with_simd<S: SimdExt>(self, simd: S) -> (usize, f64) {
            let (lanes, bc) = (S::F32_LANES, self.bc);
            let (rt, dvv) = (NRV * lanes, D / lanes);
            // Values in [-1, 1): no denormals, no overflow however many reps accumulate.
            let fill = |n: usize, seed: u32| -> Vec<f32> {
                (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 9) as f32 / (1u32 << 22) as f32 - 1.0).collect()
            };
            let (qt, k, v) = (fill(D * rt, 1), fill(bc * D, 2), fill(bc * D, 3));
            let mut s = fill(bc * rt, 4);
            let mut acc = vec![0.0f32; rt * D];
            let (mut max, mut sum, mut alpha) = (vec![f32::NEG_INFINITY; rt], vec![0.0f32; rt], vec![1.0f32; rt]);
            // The softmax's steady state: after its first call the maxima are set and the tile
            // holds weights in (0, 1], so later calls rescale nothing, as inside a long row.
            online_softmax::<S, NRV>(simd, &mut s, &mut max, &mut sum, &mut alpha);
            let start = std::time::Instant::now();
            for _ in 0..self.reps {
                match self.phase {
                    Phase::QkTile => {
                        let qt = S::as_simd_f32s(&qt).0;
                        let sv = S::as_mut_simd_f32s(&mut s).0;
                        for g in 0..bc / MR {
                            qk_tile::<S, MR, NRV>(simd, D, &k[g * MR * D..], D, qt, &mut sv[g * MR * NRV..]);
                        }
                    }
                    Phase::OnlineSoftmax => {
                        black_box(online_softmax::<S, NRV>(simd, &mut s, &mut max, &mut sum, &mut alpha));
                    }
                    Phase::PvTile => {
                        let accv = S::as_mut_simd_f32s(&mut acc).0;
                        pv_rows::<S, MR, NRV>(simd, bc, rt, &s, rt, S::as_simd_f32s(&v).0, dvv, accv, dvv, &alpha, false);
                    }
                }
                black_box((&mut s, &mut acc));
            }
            (rt * bc, start.elapsed().as_secs_f64())
        }
    }

    let family = crate::plan::Family::find(isa, DType::F32)?;
    let bc = family.tiles(head_dim, head_dim).bc;
    macro_rules! arms {
        ($([$isa:ident, $dt:ident, $mr:literal, $nrv:literal, [$($hd:literal),*], [$($ad:literal),*]])*) => {
            $(
                if isa == Isa::$isa && DType::$dt == DType::F32 {
                    $(
                        if head_dim == $hd {
                            return on(isa, PhaseRun::<$hd, $mr, $nrv> { phase, bc, reps });
                        }
                    )*
                    return None;
                }
            )*
        };
    }
    crate::plan::for_each_simd_family!(arms);
    None
}

/// The crate's thread pool: runs `f(0)` on the caller and the other shares on helpers (see
/// `pool::run`); `Err(())` when the helpers are busy with another call.
#[cfg(feature = "rayon")]
#[allow(clippy::result_unit_err)]
pub fn pool_run<R>(threads: usize, f: &(dyn Fn(usize) -> R + Sync)) -> Result<R, ()> {
    crate::pool::run(threads, f)
}
