//! Register microkernels: the innermost loops, with every accumulator in a register.
//!
//! Query rows run along the vector lanes (a row tile is `NRV` vectors of rows):
//! - `qk_tile`: S^T[MR keys][row tile] = K[MR keys][d] . Q^T[d][row tile]. Q^T is packed once per
//!   query block; each K element is broadcast straight from the row-major K block, so K needs
//!   no transpose and the MR broadcasts share one base pointer at constant offsets.
//! - `pv_tile`: O[MR rows][NV vectors of dims] (+)= P[MR rows][keys] . V[keys][dims], the head
//!   dim along the lanes (V's natural layout); P is read key-major, as `qk_tile` left it.
//!
//! For a few rows (at most a vector of them, as in decode with one or a few query rows per head
//! of a GQA group) the head dim runs along the lanes instead, so no lane computes an absent row:
//! - `qk_dot_group`: the dot products of R rows with `lanes / R` keys, K read (and widened) once
//!   straight from its rows, all of them reduced by one `transpose_sum_f32s`.
//! - `pv_direct`: O[R rows][NV vectors] (+)= P . V with V read in place and widened in registers.
//! - `additive_row`: Bahdanau scores `sum_a v_a tanh(q_a + k_a)` for one row, the attention dim
//!   along the lanes like `qk_dot_group`.
//!
//! MR and NRV come from `kernels/` through the generated table; `d` and the pitches become
//! constants after inlining into a head-dim specialisation. The d loop is unrolled 4x with
//! `seq!`, as gemm's microkernels do.

use crate::simd::SimdExt;
use seq_macro::seq;

/// One rank-1 update of the S^T tile at depth `t`: NRV vectors of Q^T, one broadcast per key.
#[inline(always)]
fn qk_step<S: SimdExt, const MR: usize, const NRV: usize>(
    simd: S,
    acc: &mut [[S::f32s; NRV]; MR],
    k: &[f32],
    ld_k: usize,
    qt: &[S::f32s],
    t: usize,
) {
    let mut q = [simd.splat_f32s(0.0); NRV];
    for v in 0..NRV {
        q[v] = qt[t * NRV + v];
    }
    for m in 0..MR {
        let kb = simd.splat_f32s(k[m * ld_k + t]);
        for v in 0..NRV {
            acc[m][v] = simd.mul_add_e_f32s(kb, q[v], acc[m][v]);
        }
    }
}

/// `s[m * NRV + v]` = sum over t < d of `k[m * ld_k + t] * qt[t * NRV + v]`, for MR keys.
// `seq!` expands `t + U` to `t + 0` first: clippy calls that a no-op and its auto-fix would
// turn every unrolled step into step `t` (the property tests catch it, but keep the lint off).
#[allow(clippy::identity_op)]
#[inline(always)]
pub(crate) fn qk_tile<S: SimdExt, const MR: usize, const NRV: usize>(
    simd: S,
    d: usize,
    k: &[f32],
    ld_k: usize,
    qt: &[S::f32s],
    s: &mut [S::f32s],
) {
    let mut acc = [[simd.splat_f32s(0.0); NRV]; MR];
    let k = &k[..(MR - 1) * ld_k + d];
    let qt = &qt[..d * NRV];
    let mut t = 0;
    while t + 4 <= d {
        seq!(U in 0..4 {
            qk_step::<S, MR, NRV>(simd, &mut acc, k, ld_k, qt, t + U);
        });
        t += 4;
    }
    while t < d {
        qk_step::<S, MR, NRV>(simd, &mut acc, k, ld_k, qt, t);
        t += 1;
    }
    let s = &mut s[..MR * NRV];
    for m in 0..MR {
        for v in 0..NRV {
            s[m * NRV + v] = acc[m][v];
        }
    }
}

/// Additive (Bahdanau) scores of one query row: `s[c * rt]` = sum over the attention dim of
/// `v[a] * tanh(q[a] + k_c[a])` for keys `c < n`. `q`, `v` and each of the `n` rows of `k` are
/// `av` vectors (a constant after inlining into a specialisation), zero-padded so padding adds
/// nothing.
/// Like `qk_dot_group`, the attention dim runs along the lanes and `lanes` keys' sums are reduced by
/// one `transpose_sum_f32s`; a partial last group repeats its last key. All `lanes` tanh chains
/// of a step are independent, which hides the division in `tanh`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn additive_row<S: SimdExt>(
    simd: S,
    av: usize,
    q: &[S::f32s],
    v: &[S::f32s],
    k: &[S::f32s],
    n: usize,
    s: &mut [f32],
    rt: usize,
) {
    let lanes = S::F32_LANES;
    let (q, v, k) = (&q[..av], &v[..av], &k[..n * av]);
    let mut c0 = 0;
    while c0 < n {
        let mut rows: [&[S::f32s]; 16] = [&[]; 16];
        for (g, row) in rows[..lanes].iter_mut().enumerate() {
            let c = (c0 + g).min(n - 1);
            *row = &k[c * av..(c + 1) * av];
        }
        let mut acc = [simd.splat_f32s(0.0); 16];
        for t in 0..av {
            let (qt, vt) = (q[t], v[t]);
            for g in 0..lanes {
                let x = simd.add_f32s(qt, rows[g][t]);
                acc[g] = simd.mul_add_e_f32s(simd.tanh_f32s(x), vt, acc[g]);
            }
        }
        let mut sums = [0.0f32; 16];
        S::as_mut_simd_f32s(&mut sums[..lanes]).0[0] = simd.transpose_sum_f32s(&acc[..lanes]);
        for g in 0..lanes.min(n - c0) {
            s[(c0 + g) * rt] = sums[g];
        }
        c0 += lanes;
    }
}

/// `o[r][..NV vectors]` = `o[r] * alpha[r]` (when `rescale`) + sum over the keys c of
/// `p[c * ld_p + r] * v[c * ld_v + ..]`, for MR rows. `o`, `v` and their pitches are in vectors,
/// `p` and `ld_p` in floats; `n` keys.
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
    alpha: &[f32],
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
        let p = &p[..(n - 1) * ld_p + MR];
        let v = &v[..(n - 1) * ld_v + NV];
        for c in 0..n {
            let mut vv = [simd.splat_f32s(0.0); NV];
            for x in 0..NV {
                vv[x] = v[c * ld_v + x];
            }
            for r in 0..MR {
                let pb = simd.splat_f32s(p[c * ld_p + r]);
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

/// `o[r][x0..x0 + NV]` = `o[r][x0..] * alpha[r]` (when `rescale`) + sum over keys c < n of
/// `p[c * ld_p + r] * V_c[x0 * lanes..]` for R rows, where V row c starts at `v[v_at[c]]`; with
/// `hints`, the same segment of the row at `hints[c]` (unless null) is hinted into L2.
/// The rows are read in place and widened in registers (f16), so decode reads V once and never
/// copies it; each key's slice is taken once, at its exact width, so the loads need no checks.
/// V is read in units of [`super::lanes_unit`] (`o` accumulates `P . V / lanes_unit::<T>()`):
/// the caller multiplies the finished accumulators by it once.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(crate) fn pv_direct<S: SimdExt, T: crate::element::Element, const R: usize, const NV: usize>(
    simd: S,
    n: usize,
    p: &[f32],
    ld_p: usize,
    (v, v_at): (&[T], &[usize]),
    x0: usize,
    o: &mut [S::f32s],
    ld_o: usize,
    alpha: &[f32],
    rescale: bool,
    hints: Option<&[*const T]>,
) {
    let lanes = S::F32_LANES;
    let mut acc = [[simd.splat_f32s(0.0); NV]; R];
    for r in 0..R {
        let a = simd.splat_f32s(alpha[r]);
        for x in 0..NV {
            let cur = o[r * ld_o + x0 + x];
            acc[r][x] = if rescale { simd.mul_f32s(cur, a) } else { cur };
        }
    }
    // The segment's storage units `u0..u1` of each row (values for all but a block format,
    // whose segment starts at the block holding value `x0 * lanes`, vector `t0` of that block).
    let (u0, u1) = (x0 * lanes / T::BLOCK, ((x0 + NV) * lanes).div_ceil(T::BLOCK));
    let t0 = (x0 * lanes - u0 * T::BLOCK) / lanes;
    if n > 0 {
        let p = &p[..(n - 1) * ld_p + R];
        for c in 0..n {
            let row = &v[v_at[c] + u0..][..u1 - u0];
            if let Some(hints) = hints {
                // A hint, never dereferenced (null: nothing to hint).
                let ahead = hints[c].wrapping_add(u0).cast::<u8>();
                if !hints[c].is_null() {
                    for line in (0..core::mem::size_of_val(row)).step_by(64) {
                        simd.prefetch_l2(ahead.wrapping_add(line));
                    }
                }
            }
            let mut pb = [simd.splat_f32s(0.0); R];
            for r in 0..R {
                pb[r] = simd.splat_f32s(p[c * ld_p + r]);
            }
            let mut scale = simd.splat_f32s(0.0);
            for x in 0..NV {
                let vx = super::load_lanes_walk(simd, row, t0 + x, x == 0, &mut scale);
                for r in 0..R {
                    acc[r][x] = simd.mul_add_e_f32s(pb[r], vx, acc[r][x]);
                }
            }
        }
    }
    for r in 0..R {
        for x in 0..NV {
            o[r * ld_o + x0 + x] = acc[r][x];
        }
    }
}

/// One vector of dot products for R query rows against `lanes / R` keys: lane `g * R + r` is
/// `q_r . k_g`. `q` holds the rows' `dl` vectors each, row-major; `k[g]` is key g's row (any
/// storage, widened in registers). The head dim runs along the lanes and one
/// `transpose_sum_f32s` reduces all the dot products at once, so with few rows every lane of
/// every FMA still does useful work. K is read in units of [`super::lanes_unit`]: the caller
/// multiplies the dot products by it.
#[inline(always)]
pub(crate) fn qk_dot_group<S: SimdExt, T: crate::element::Element, const R: usize>(simd: S, dl: usize, q: &[S::f32s], k: &[&[T]; 16]) -> S::f32s {
    let lanes = S::F32_LANES;
    let group = lanes / R;
    let q = &q[..R * dl];
    let mut acc = [simd.splat_f32s(0.0); 16];
    // Each key's current q8_0 block scale (unused by the other storage types).
    let mut scale = [simd.splat_f32s(0.0); 16];
    for t in 0..dl {
        for g in 0..group {
            let kv = super::load_lanes_walk(simd, k[g], t, t == 0, &mut scale[g]);
            for r in 0..R {
                acc[g * R + r] = simd.mul_add_e_f32s(kv, q[r * dl + t], acc[g * R + r]);
            }
        }
    }
    simd.transpose_sum_f32s(&acc[..lanes])
}

/// Where the V rows of a block start, in elements: `ld` apart from `at`, or at each key's own
/// offset (the few-row decode kernel's per-chunk table, which covers paged caches).
#[derive(Clone, Copy)]
pub(crate) enum RowsAt<'t> {
    Strided { at: usize, ld: usize },
    Table(&'t [usize]),
}

impl RowsAt<'_> {
    #[inline(always)]
    pub fn at(&self, c: usize) -> usize {
        match self {
            RowsAt::Strided { at, ld } => at + c * ld,
            RowsAt::Table(t) => t[c],
        }
    }
}

/// O += P V one row at a time, skipping every key whose weight is exactly 0: the kernels' redo
/// path for a block whose output came out non-finite. A masked key has weight 0, and 0 times a
/// NaN or Inf in its V row is NaN, so the register tiles (which multiply every weight) let
/// garbage in an invisible cache slot reach rows that cannot see it. Weights `p[c * ld_p + r]`
/// for keys `c < n`, rows `r < rows`; V rows of any storage start where `v_rows` says; `o` has `ld_o` vectors per row, `dvv` of them used; `rescale` first multiplies row `r`
/// by `alpha[r]`, as the fast tiles do.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_skip_zero<S: SimdExt, T: crate::element::Element>(
    simd: S,
    n: usize,
    rows: usize,
    p: &[f32],
    ld_p: usize,
    (v, v_rows): (&[T], RowsAt<'_>),
    o: &mut [S::f32s],
    (ld_o, dvv): (usize, usize),
    alpha: &[f32],
    rescale: bool,
) {
    for r in 0..rows {
        let acc = &mut o[r * ld_o..r * ld_o + dvv];
        if rescale {
            let a = simd.splat_f32s(alpha[r]);
            acc.iter_mut().for_each(|x| *x = simd.mul_f32s(*x, a));
        }
        for c in 0..n {
            let w = p[c * ld_p + r];
            if w == 0.0 {
                continue;
            }
            let wb = simd.splat_f32s(w);
            let row = &v[v_rows.at(c)..];
            for (x, a) in acc.iter_mut().enumerate() {
                *a = simd.mul_add_e_f32s(wb, super::load_lanes(simd, row, x), *a);
            }
        }
    }
}

/// Whether every value of `acc` is finite: the test that sends a block down the
/// [`pv_skip_zero`] redo. `x - x` is 0 for a finite `x` and NaN otherwise, so one vector sum
/// answers it; read once per block, after all its keys, it costs a sliver of the P.V work.
#[inline(always)]
pub(crate) fn all_finite<S: SimdExt>(simd: S, acc: &[f32]) -> bool {
    let (head, tail) = S::as_simd_f32s(acc);
    let mut z = simd.splat_f32s(0.0);
    for &x in head {
        z = simd.add_f32s(z, simd.sub_f32s(x, x));
    }
    simd.reduce_sum_f32s(z) == 0.0 && tail.iter().all(|x| x.is_finite())
}

/// Vectors of f32 as the f32 elements they hold (for [`pv_skip_zero`], which reads rows of any
/// storage).
#[inline(always)]
pub(crate) fn as_f32s<S: SimdExt>(v: &[S::f32s]) -> &[f32] {
    pulp::bytemuck::cast_slice(v)
}

/// O += P V for a row tile: `rows` rows (those holding real rows, a multiple of MR after
/// rounding up) of weights `p` (key-major, pitch `rt`), `n` keys. Keys go in chunks of
/// [`PV_KEYS`] outermost, then the value dim in slices of NV vectors, so each slice of the
/// chunk's V rows stays in L1 while every sub-tile of MR rows uses it; a remainder narrower
/// than NV goes one vector at a time. `o` has `dvv` vectors per
/// row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_rows<S: SimdExt, const MR: usize, const NV: usize>(
    simd: S,
    n: usize,
    rows: usize,
    p: &[f32],
    rt: usize,
    v: &[S::f32s],
    ld_v: usize,
    o: &mut [S::f32s],
    dvv: usize,
    alpha: &[f32],
    rescale: bool,
) {
    // Keys in chunks of PV_KEYS: every (dims slice, sub-tile) pass re-reads the chunk's weights
    // and one line-wide slice of each of its V rows, and over a whole key block (256 keys)
    // those no longer stay in L1 between passes; at D128 (512-byte V rows) 64 keys' slices
    // already fill the 8 L1 sets they map to. Measured on Zen 3, AVX2 (`--set phases`):
    // pv_tile 0.67-0.74 of the FMA peak over whole blocks, 0.83-0.85 (D64) and 0.72 (D128)
    // in chunks of 32 keys, and the whole prefill kernel 5-11% faster. A chunk costs one more
    // load and store of the accumulators, against 32 keys of FMAs.
    let mut c0 = 0;
    while c0 < n {
        // A block of at most 2 * PV_KEYS keys goes in one pass: splitting one that short
        // measured slower (B1 H8 S64 D64: 1.5x the time), not faster.
        let kc = if n <= 2 * PV_KEYS { n } else { PV_KEYS.min(n - c0) };
        let (p, v) = (&p[c0 * rt..], &v[c0 * ld_v..]);
        // The rescale belongs to the first chunk only: later ones add to rescaled rows.
        let rescale = rescale && c0 == 0;
        let mut x = 0;
        while x < dvv {
            let wide = x + NV <= dvv;
            for sub in (0..rows).step_by(MR) {
                let (p, alpha, o) = (&p[sub..], &alpha[sub..sub + MR], &mut o[sub * dvv + x..]);
                if wide {
                    pv_tile::<S, MR, NV>(simd, kc, p, rt, &v[x..], ld_v, o, dvv, alpha, rescale);
                } else {
                    pv_tile::<S, MR, 1>(simd, kc, p, rt, &v[x..], ld_v, o, dvv, alpha, rescale);
                }
            }
            x += if wide { NV } else { 1 };
        }
        c0 += kc;
    }
}

/// Keys per pass of [`pv_rows`] (see there).
const PV_KEYS: usize = 32;
