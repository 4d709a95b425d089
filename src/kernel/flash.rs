//! The SIMD flash kernel: one generic body for every ISA, specialised at compile time per head
//! dim (`D`, 0 = the generic path with the head dim known only at run time) and per register
//! tile (`MR` rows x `NRV` vectors of keys) from `kernels/`.
//!
//! Per query block (`br` rows of one batch entry and query head) and key block (`bc` keys):
//! pack K^T into panels of `NRV * lanes` keys and V into padded rows (both converted to f32),
//! then per register tile of `MR` rows: `qk_tile` over the panels, the optional score terms and
//! the boundary masks, the online softmax in vectors (row max, `exp`, row sum), and `pv_tile`,
//! which folds the rescale of the accumulator (only when a row's max grew) into its load.

use super::microkernel::{pv_tile, qk_tile};
use super::softmax::RowState;
use super::terms::{any_terms, mask_outside, score_terms};
use crate::element::Element;
use crate::plan::Tiles;
use crate::problem::Problem;
use crate::simd::SimdExt;

#[inline(always)]
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Buffers of one worker, sized for one call's tiles, head dims and ISA width.
pub(crate) struct Scratch {
    q: Vec<f32>,
    panels: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    /// Output rows of the current block (pitch `dv_pad`), normalised when a block returns.
    pub acc: Vec<f32>,
    pub lse: Vec<f32>,
    rows: Vec<RowState>,
    intervals: Vec<(usize, usize)>,
    pub dv_pad: usize,
}

impl Scratch {
    pub fn new(tiles: &Tiles, lanes: usize, head_dim: usize, v_head_dim: usize) -> Self {
        let br = round_up(tiles.br, tiles.mr);
        let bc = round_up(tiles.bc, tiles.nr);
        let dv_pad = round_up(v_head_dim, lanes);
        Self {
            q: vec![0.0; br * head_dim],
            panels: vec![0.0; bc * head_dim],
            v: vec![0.0; bc * dv_pad],
            s: vec![0.0; tiles.mr * bc],
            acc: vec![0.0; br * dv_pad],
            lse: vec![0.0; br],
            rows: vec![RowState::start(f32::NEG_INFINITY); br],
            intervals: vec![(0, 0); br],
            dv_pad,
        }
    }
}

/// Computes rows `[i0, i1)` of batch `b`, query head `h` into `sc.acc` / `sc.lse`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_block<S: SimdExt, TQ: Element, TKV: Element, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TQ, TKV>,
    tiles: &Tiles,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    sc: &mut Scratch,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let dv = p.shape.v_head_dim;
    let lanes = S::F32_LANES;
    let nr = NRV * lanes;
    let bc = round_up(tiles.bc, nr);
    let dv_pad = sc.dv_pad;
    let dvv = dv_pad / lanes;
    let rows = i1 - i0;
    let rows_pad = round_up(rows, MR);
    let hk = p.kv_head(h);
    let kv_len = p.kv_len(b);
    let keys = p.masker.block(kv_len, i0, i1);
    let terms = any_terms(p);

    // Q rows, pre-scaled so the scores come out as scale * q.k; padding rows are zero.
    for r in 0..rows_pad {
        let dst = &mut sc.q[r * d..(r + 1) * d];
        if r < rows {
            let o = p.q.strides.offset(b, h, i0 + r);
            for (x, y) in dst.iter_mut().zip(&p.q.data[o..o + d]) {
                *x = y.to_f32() * p.scale;
            }
            sc.rows[r] = RowState::start(p.sink(h));
            sc.intervals[r] = p.masker.interval(kv_len, i0 + r);
        } else {
            dst.fill(0.0);
            sc.rows[r] = RowState::start(f32::NEG_INFINITY);
            sc.intervals[r] = (0, 0);
        }
    }
    sc.acc[..rows_pad * dv_pad].fill(0.0);

    let mut j0 = keys.union.0;
    while j0 < keys.union.1 {
        let n = bc.min(keys.union.1 - j0);
        let n_pad = round_up(n, nr);
        pack_k(p, b, hk, j0, n, n_pad, d, nr, &mut sc.panels);
        pack_v(p, b, hk, j0, n, dv, dv_pad, &mut sc.v);
        let all_visible = keys.all_visible(j0, j0 + n);
        let panels = S::as_simd_f32s(&sc.panels[..n_pad * d]).0;
        let vrows = S::as_simd_f32s(&sc.v[..n * dv_pad]).0;

        for rt in (0..rows_pad).step_by(MR) {
            // S = Q K^T for MR rows over the key block, one panel at a time.
            {
                let s = S::as_mut_simd_f32s(&mut sc.s[..MR * bc]).0;
                let q = &sc.q[rt * d..(rt + MR) * d];
                for pi in 0..n_pad / nr {
                    qk_tile::<S, MR, NRV>(simd, d, q, d, &panels[pi * d * NRV..(pi + 1) * d * NRV], &mut s[pi * NRV..], bc / lanes);
                }
            }
            // Score terms, masks and the online softmax, row by row.
            let mut alpha = [1.0f32; MR];
            let mut rescale = false;
            for r in 0..MR {
                let row = &mut sc.s[r * bc..r * bc + n_pad];
                if rt + r >= rows {
                    row.fill(0.0); // padding rows: weight nothing
                    continue;
                }
                if terms {
                    score_terms(p, b, h, i0 + rt + r, j0, &mut row[..n]);
                }
                if !all_visible {
                    mask_outside(&mut row[..n], j0, sc.intervals[rt + r]);
                }
                row[n..].fill(f32::NEG_INFINITY);
                let st = &mut sc.rows[rt + r];
                let new_max = st.max.max(row_max(simd, row));
                // Nothing visible yet: exp(-inf - 0) keeps every weight 0.
                let shift = if new_max == f32::NEG_INFINITY { 0.0 } else { new_max };
                let sum = exp_sum(simd, row, shift);
                if new_max > st.max {
                    let a = (st.max - new_max).exp();
                    alpha[r] = a;
                    rescale = true;
                    st.sum *= a;
                    st.max = new_max;
                }
                st.sum += sum;
            }
            // O += P V, in chunks of NRV vectors of the value dim, then single vectors.
            let acc = S::as_mut_simd_f32s(&mut sc.acc[rt * dv_pad..(rt + MR) * dv_pad]).0;
            let mut x = 0;
            while x + NRV <= dvv {
                pv_tile::<S, MR, NRV>(simd, n, &sc.s, bc, &vrows[x..], dvv, &mut acc[x..], dvv, &alpha, rescale);
                x += NRV;
            }
            while x < dvv {
                pv_tile::<S, MR, 1>(simd, n, &sc.s, bc, &vrows[x..], dvv, &mut acc[x..], dvv, &alpha, rescale);
                x += 1;
            }
        }
        j0 += n;
    }

    for r in 0..rows {
        let (inv, lse) = sc.rows[r].finish();
        sc.acc[r * dv_pad..r * dv_pad + dv].iter_mut().for_each(|a| *a *= inv);
        sc.lse[r] = lse;
    }
}

/// K^T in panels of `nr` keys: `panels[(pi * d + t) * nr + c]` = key `j0 + pi * nr + c`,
/// element `t`; keys past `n` are zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_k<TQ, TKV: Element>(p: &Problem<'_, TQ, TKV>, b: usize, hk: usize, j0: usize, n: usize, n_pad: usize, d: usize, nr: usize, panels: &mut [f32]) {
    for c in 0..n_pad {
        let (pi, lane) = (c / nr, c % nr);
        let panel = &mut panels[pi * d * nr..(pi + 1) * d * nr];
        if c < n {
            let o = p.k.strides.offset(b, hk, j0 + c);
            for (t, x) in p.k.data[o..o + d].iter().enumerate() {
                panel[t * nr + lane] = x.to_f32();
            }
        } else {
            for t in 0..d {
                panel[t * nr + lane] = 0.0;
            }
        }
    }
}

/// V rows of the key block, converted, each padded with zeros to `dv_pad`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_v<TQ, TKV: Element>(p: &Problem<'_, TQ, TKV>, b: usize, hk: usize, j0: usize, n: usize, dv: usize, dv_pad: usize, v: &mut [f32]) {
    for c in 0..n {
        let o = p.v.strides.offset(b, hk, j0 + c);
        let dst = &mut v[c * dv_pad..(c + 1) * dv_pad];
        for (x, y) in dst.iter_mut().zip(&p.v.data[o..o + dv]) {
            *x = y.to_f32();
        }
        dst[dv..].fill(0.0);
    }
}

#[inline(always)]
fn row_max<S: SimdExt>(simd: S, row: &[f32]) -> f32 {
    let mut m = simd.splat_f32s(f32::NEG_INFINITY);
    for &x in S::as_simd_f32s(row).0 {
        m = simd.max_f32s(m, x);
    }
    simd.reduce_max_f32s(m)
}

/// `row[c] = exp(row[c] - shift)` in place; returns the sum.
#[inline(always)]
fn exp_sum<S: SimdExt>(simd: S, row: &mut [f32], shift: f32) -> f32 {
    let sh = simd.splat_f32s(shift);
    let mut sum = simd.splat_f32s(0.0);
    for x in S::as_mut_simd_f32s(row).0 {
        let e = simd.exp_f32s(simd.sub_f32s(*x, sh));
        *x = e;
        sum = simd.add_f32s(sum, e);
    }
    simd.reduce_sum_f32s(sum)
}
