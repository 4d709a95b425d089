//! Register microkernels: the innermost loops, with every accumulator in a register.
//!
//! `qk_tile`: S[MR][NRV vectors of keys] = Q[MR][d] . Kpanel[d][keys], keys along the lanes
//! (the K tile is packed so), one broadcast query element per row and step.
//! `pv_tile`: O[MR][NV vectors of dims] (+)= P[MR][keys] . V[keys][dims], the head dim along
//! the lanes (V's natural layout), one broadcast probability per row and key.
//!
//! MR, NRV and NV are const generics from `kernels/` through the generated table; `d` and the
//! key count become constants after inlining into a head-dim specialisation, so the loops have
//! fixed trip counts. The d loop is unrolled 4x with `seq!`, as gemm's microkernels do.

use crate::simd::SimdExt;
use seq_macro::seq;

/// `s[r * ld_s + v * lanes ..]` = sum over t < d of `q[r * ld_q + t] * panel[t * nrv * lanes + ..]`.
#[inline(always)]
pub(crate) fn qk_tile<S: SimdExt, const MR: usize, const NRV: usize>(
    simd: S,
    d: usize,
    q: &[f32],
    ld_q: usize,
    panel: &[S::f32s],
    s: &mut [S::f32s],
    ld_s: usize,
) {
    let mut acc = [[simd.splat_f32s(0.0); NRV]; MR];
    let q = &q[..(MR - 1) * ld_q + d];
    let panel = &panel[..d * NRV];
    let mut t = 0;
    while t + 4 <= d {
        seq!(U in 0..4 {
            qk_step::<S, MR, NRV>(simd, &mut acc, q, ld_q, panel, t + U);
        });
        t += 4;
    }
    while t < d {
        qk_step::<S, MR, NRV>(simd, &mut acc, q, ld_q, panel, t);
        t += 1;
    }
    for r in 0..MR {
        for v in 0..NRV {
            s[r * ld_s + v] = acc[r][v];
        }
    }
}

/// One rank-1 update of the Q.K^T tile: NRV key vectors at depth `t`, one broadcast per row.
#[inline(always)]
fn qk_step<S: SimdExt, const MR: usize, const NRV: usize>(
    simd: S,
    acc: &mut [[S::f32s; NRV]; MR],
    q: &[f32],
    ld_q: usize,
    panel: &[S::f32s],
    t: usize,
) {
    let mut k = [simd.splat_f32s(0.0); NRV];
    for v in 0..NRV {
        k[v] = panel[t * NRV + v];
    }
    for r in 0..MR {
        let qb = simd.splat_f32s(q[r * ld_q + t]);
        for v in 0..NRV {
            acc[r][v] = simd.mul_add_e_f32s(qb, k[v], acc[r][v]);
        }
    }
}

/// `o[r][..NV vectors]` = `o[r] * alpha[r]` + sum over c < n of `p[r * ld_p + c] * v[c * ld_v + ..]`.
/// `o` and `v` are in vectors; `ld_o`, `ld_v` count vectors, `ld_p` counts floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_tile<S: SimdExt, const MR: usize, const NV: usize>(
    simd: S,
    n: usize,
    p: &[f32],
    ld_p: usize,
    v: &[S::f32s],
    ld_v: usize,
    o: &mut [S::f32s],
    ld_o: usize,
    alpha: &[f32; MR],
    rescale: bool,
) {
    let mut acc = [[simd.splat_f32s(0.0); NV]; MR];
    for r in 0..MR {
        let a = simd.splat_f32s(alpha[r]);
        for x in 0..NV {
            let cur = o[r * ld_o + x];
            acc[r][x] = if rescale { simd.mul_f32s(cur, a) } else { cur };
        }
    }
    if n > 0 {
        let p = &p[..(MR - 1) * ld_p + n];
        let v = &v[..(n - 1) * ld_v + NV];
        for c in 0..n {
            let mut vv = [simd.splat_f32s(0.0); NV];
            for x in 0..NV {
                vv[x] = v[c * ld_v + x];
            }
            for r in 0..MR {
                let pb = simd.splat_f32s(p[r * ld_p + c]);
                for x in 0..NV {
                    acc[r][x] = simd.mul_add_e_f32s(pb, vv[x], acc[r][x]);
                }
            }
        }
    }
    for r in 0..MR {
        for x in 0..NV {
            o[r * ld_o + x] = acc[r][x];
        }
    }
}
