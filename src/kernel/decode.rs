//! The decode kernel: a few query rows (all query heads of a KV head's sub-group x all query
//! rows) against one key partition, in one pass over that partition's K and V.
//!
//! Decode is bound by reading K and V, so the kernel reads each K/V element once, straight from
//! the caller's memory, converting f16 in registers: Q.K^T as dot products with the head dim
//! along the lanes (no packing, no lanes wasted on absent rows), then the online softmax per
//! row and P.V through the same `pv_tile` the prefill kernel uses. It leaves the rows
//! *unnormalised* (accumulator, running max and sum) so partitions can be merged.

use super::convert_row;
use super::microkernel::pv_tile;
use super::softmax::RowState;
use super::terms::{any_terms, mask_outside, score_terms};
use crate::element::Element;
use crate::plan::work::WorkUnit;
use crate::problem::Problem;
use crate::simd::SimdExt;

/// Keys per chunk: the scores, weights and converted K/V rows of a chunk stay in L1.
const CHUNK: usize = 64;

#[inline(always)]
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Buffers of one worker, carved from its workspace.
pub(crate) struct Scratch<'w> {
    q: &'w mut [f32],
    k: &'w mut [f32],
    v: &'w mut [f32],
    s: &'w mut [f32],
    pt: &'w mut [f32],
    /// Unnormalised output rows (pitch `dv_pad`).
    pub acc: &'w mut [f32],
    pub max: &'w mut [f32],
    pub sum: &'w mut [f32],
    alpha: &'w mut [f32],
    pub dv_pad: usize,
}

fn parts(rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> [usize; 9] {
    let r = round_up(rows, mr);
    let (d, dv) = (round_up(head_dim, lanes), round_up(v_head_dim, lanes));
    [r * d, CHUNK * d, CHUNK * dv, r * CHUNK, CHUNK * r, r * dv, r, r, r]
}

impl<'w> Scratch<'w> {
    pub fn len(rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> usize {
        parts(rows, mr, lanes, head_dim, v_head_dim).iter().sum()
    }

    pub fn new(mut buf: &'w mut [f32], rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> Self {
        let [q, k, v, s, pt, acc, max, sum, alpha] = parts(rows, mr, lanes, head_dim, v_head_dim).map(|n| super::carve(&mut buf, n));
        Self { q, k, v, s, pt, acc, max, sum, alpha, dv_pad: round_up(v_head_dim, lanes) }
    }
}

/// Runs unit `w` into `sc.acc` / `sc.max` / `sc.sum` (rows ordered head-major:
/// `r = (h - head_start) * rows_per_head + (i - q_start)`). The sink joins partition 0 only, so
/// a merge counts it once.
#[inline(always)]
pub(crate) fn decode_unit<S: SimdExt, TQ: Element, TKV: Element, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TQ, TKV>,
    w: &WorkUnit,
    sc: &mut Scratch,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let dv = p.shape.v_head_dim;
    let lanes = S::F32_LANES;
    let (d_pad, dv_pad) = (round_up(d, lanes), sc.dv_pad);
    let (dvec, dvv) = (d_pad / lanes, dv_pad / lanes);
    let per_head = w.q_end - w.q_start;
    let rows = (w.head_end - w.head_start) * per_head;
    let rows_pad = round_up(rows, MR);
    let b = w.batch;
    let kv_len = p.kv_len(b);
    let row_of = |r: usize| (w.head_start + r / per_head, w.q_start + r % per_head);

    for r in 0..rows_pad {
        let dst = &mut sc.q[r * d_pad..(r + 1) * d_pad];
        let st = if r < rows {
            let (h, i) = row_of(r);
            let o = p.q.strides.offset(b, h, i);
            for (x, y) in dst.iter_mut().zip(&p.q.data[o..o + d]) {
                *x = y.to_f32() * p.scale;
            }
            dst[d..].fill(0.0);
            RowState::start(if w.part == 0 { p.sink(h) } else { f32::NEG_INFINITY })
        } else {
            dst.fill(0.0);
            RowState::start(f32::NEG_INFINITY)
        };
        (sc.max[r], sc.sum[r]) = (st.max, st.sum);
    }
    sc.acc[..rows_pad * dv_pad].fill(0.0);

    // Keys some row may see, within the partition (intervals are monotone in the row).
    let (lo, _) = p.masker.interval(kv_len, w.q_start);
    let (_, hi) = p.masker.interval(kv_len, w.q_end - 1);
    let (k0, k1) = (lo.max(w.key_start), hi.min(w.key_end));
    let terms = any_terms(p);

    let mut j0 = k0;
    while j0 < k1 {
        let n = CHUNK.min(k1 - j0);
        // K rows of the chunk, widened to f32 and zero-padded to whole vectors.
        for c in 0..n {
            let o = p.k.strides.offset(b, w.kv_head, j0 + c);
            let row = &mut sc.k[c * d_pad..(c + 1) * d_pad];
            convert_row(simd, &p.k.data[o..o + d], row);
            row[d..].fill(0.0);
        }
        // Scores, row-major: s[r][c] = q_r . k_c.
        {
            let q = S::as_simd_f32s(&sc.q[..rows * d_pad]).0;
            let k = S::as_simd_f32s(&sc.k[..n * d_pad]).0;
            for c in 0..n {
                let kc = &k[c * dvec..(c + 1) * dvec];
                for r in 0..rows {
                    let qr = &q[r * dvec..(r + 1) * dvec];
                    let mut a0 = simd.splat_f32s(0.0);
                    let mut a1 = simd.splat_f32s(0.0);
                    let mut x = 0;
                    while x + 2 <= dvec {
                        a0 = simd.mul_add_e_f32s(qr[x], kc[x], a0);
                        a1 = simd.mul_add_e_f32s(qr[x + 1], kc[x + 1], a1);
                        x += 2;
                    }
                    if x < dvec {
                        a0 = simd.mul_add_e_f32s(qr[x], kc[x], a0);
                    }
                    sc.s[r * CHUNK + c] = simd.reduce_sum_f32s(simd.add_f32s(a0, a1));
                }
            }
        }
        // Terms, masks and the online softmax, row by row.
        let mut rescale = false;
        for r in 0..rows_pad {
            let row = &mut sc.s[r * CHUNK..(r + 1) * CHUNK];
            if r >= rows {
                row.fill(0.0);
                sc.alpha[r] = 1.0;
                continue;
            }
            let (h, i) = row_of(r);
            if terms {
                score_terms(p, b, h, i, j0, &mut row[..n]);
            }
            let interval = p.masker.interval(kv_len, i);
            if interval.0 > j0 || interval.1 < j0 + n {
                mask_outside(&mut row[..n], j0, interval);
            }
            row[n..].fill(f32::NEG_INFINITY);
            let mut m = simd.splat_f32s(f32::NEG_INFINITY);
            for &x in S::as_simd_f32s(row).0 {
                m = simd.max_f32s(m, x);
            }
            let new_max = sc.max[r].max(simd.reduce_max_f32s(m));
            let shift = if new_max == f32::NEG_INFINITY { 0.0 } else { new_max };
            let sh = simd.splat_f32s(shift);
            let mut sum = simd.splat_f32s(0.0);
            for x in S::as_mut_simd_f32s(row).0 {
                let e = simd.exp_f32s(simd.sub_f32s(*x, sh));
                *x = e;
                sum = simd.add_f32s(sum, e);
            }
            let alpha = if new_max > sc.max[r] { (sc.max[r] - shift).exp() } else { 1.0 };
            rescale |= alpha != 1.0;
            sc.alpha[r] = alpha;
            sc.sum[r] = sc.sum[r] * alpha + simd.reduce_sum_f32s(sum);
            sc.max[r] = new_max;
        }
        // Weights key-major for pv_tile.
        for c in 0..n {
            for r in 0..rows_pad {
                sc.pt[c * rows_pad + r] = sc.s[r * CHUNK + c];
            }
        }
        // V rows: in place when f32 rows are whole vectors apart, else widened into scratch.
        let v_in_place = TKV::as_f32_slice(p.v.data).filter(|_| dv == dv_pad && p.v.strides.seq % lanes == 0);
        let (vrows, ld_v) = match v_in_place {
            Some(v) => {
                let o = p.v.strides.offset(b, w.kv_head, j0);
                (S::as_simd_f32s(&v[o..o + (n - 1) * p.v.strides.seq + dv]).0, p.v.strides.seq / lanes)
            }
            None => {
                for c in 0..n {
                    let o = p.v.strides.offset(b, w.kv_head, j0 + c);
                    let row = &mut sc.v[c * dv_pad..(c + 1) * dv_pad];
                    convert_row(simd, &p.v.data[o..o + dv], row);
                    row[dv..].fill(0.0);
                }
                (S::as_simd_f32s(&sc.v[..n * dv_pad]).0, dvv)
            }
        };
        let acc = S::as_mut_simd_f32s(&mut sc.acc[..rows_pad * dv_pad]).0;
        let mut x = 0;
        while x < dvv {
            let wide = x + NRV <= dvv;
            for sub in (0..rows_pad).step_by(MR) {
                let (pt, alpha, o) = (&sc.pt[sub..], &sc.alpha[sub..sub + MR], &mut acc[sub * dvv + x..]);
                if wide {
                    pv_tile::<S, MR, NRV>(simd, n, pt, rows_pad, &vrows[x..], ld_v, o, dvv, alpha, rescale);
                } else {
                    pv_tile::<S, MR, 1>(simd, n, pt, rows_pad, &vrows[x..], ld_v, o, dvv, alpha, rescale);
                }
            }
            x += if wide { NRV } else { 1 };
        }
        j0 += n;
    }
}
