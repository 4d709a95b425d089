//! The decode kernel: a few query rows (all query heads of a KV head's sub-group x all query
//! rows) against one key partition, in one pass over that partition's K and V.
//!
//! Decode is bound by reading K and V, so each K/V element is read once. Units of at most a vector
//! of rows (GQA decoding's usual case) go to [`super::decode_few`], which reads K and V in
//! place. Taller units fill whole row tiles: Q.K^T through `qk_tile` (rows along the lanes), the
//! online softmax per row and P.V through the same `pv_rows` as prefill, with the next chunk's
//! K and V rows prefetched. Either way the rows are left *unnormalised* (accumulator, running
//! max and sum) so partitions can be merged.

use super::flash::online_softmax;
use super::{strided_row_terms, v_rows, KRows};
use super::microkernel::{all_finite, as_f32s, pv_rows, pv_skip_zero, qk_tile, RowsAt};
use super::softmax::RowState;
use super::terms::any_terms;
use crate::element::KvPair;
use crate::plan::work::WorkUnit;
use crate::problem::Problem;
use crate::simd::SimdExt;

/// Keys per chunk: the scores, weights and converted K/V rows of a chunk stay in L1.
pub(crate) const CHUNK: usize = crate::plan::work::DECODE_MIN_PART_LEN;

pub(crate) use super::decode_few::takes_lanes as takes_few;

#[inline(always)]
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

/// Query rows per row tile: one vector of rows, or two on narrow ISAs where a vector holds
/// fewer rows than one P.V register tile (scalar, NEON).
#[inline(always)]
fn row_tile(mr: usize, lanes: usize) -> usize {
    if lanes >= mr { lanes } else { 2 * lanes }
}

/// Buffers of one worker, carved from its workspace.
pub(crate) struct Scratch<'w> {
    pub(super) qt: &'w mut [f32],
    k: &'w mut [f32],
    v: &'w mut [f32],
    pub(super) s: &'w mut [f32],
    pub(super) row: &'w mut [f32],
    /// Unnormalised output rows (pitch `dv_pad`).
    pub acc: &'w mut [f32],
    pub max: &'w mut [f32],
    pub sum: &'w mut [f32],
    alpha: &'w mut [f32],
    pub dv_pad: usize,
}

fn parts(rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> [usize; 9] {
    let rt = row_tile(mr, lanes);
    let r = round_up(rows, rt);
    let dv = round_up(v_head_dim, lanes);
    // Saturating: the planner rejects a total near the limit instead of wrapping.
    [r.saturating_mul(head_dim), CHUNK.saturating_mul(head_dim), CHUNK.saturating_mul(dv), CHUNK * rt, CHUNK, r.saturating_mul(dv), r, r, rt]
}

impl<'w> Scratch<'w> {
    pub fn len(rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> usize {
        parts(rows, mr, lanes, head_dim, v_head_dim).iter().fold(0, |a: usize, &x| a.saturating_add(x))
    }

    pub fn new(mut buf: &'w mut [f32], rows: usize, mr: usize, lanes: usize, head_dim: usize, v_head_dim: usize) -> Self {
        let [qt, k, v, s, row, acc, max, sum, alpha] = parts(rows, mr, lanes, head_dim, v_head_dim).map(|n| super::carve(&mut buf, n));
        Self { qt, k, v, s, row, acc, max, sum, alpha, dv_pad: round_up(v_head_dim, lanes) }
    }
}

/// Writes query row `row` = `(h, i)` of unit `w`'s batch entry, pre-scaled, to `dst[t * stride]`
/// for `t < d` (zeros for a padding row, `None`), and returns the state the row starts from: the
/// sink joins partition 0 only, so a merge counts it once.
#[inline(always)]
pub(super) fn pack_q_row<TKV: KvPair>(
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    row: Option<(usize, usize)>,
    d: usize,
    dst: &mut [f32],
    stride: usize,
) -> RowState {
    let Some((h, i)) = row else {
        dst.iter_mut().step_by(stride).take(d).for_each(|y| *y = 0.0);
        return RowState::start(f32::NEG_INFINITY);
    };
    let scale = p.q_scale(w.batch, h, i);
    p.q_row(w.batch, h, i, d, |t, x| dst[t * stride] = x * scale);
    RowState::start(if w.part == 0 { p.sink(h) } else { f32::NEG_INFINITY })
}

/// Keys some row of unit `w` may see, within its partition (a row's interval is monotone in
/// the row, so the first and last rows bound them).
#[inline(always)]
pub(super) fn unit_keys<TKV: KvPair>(p: &Problem<'_, TKV>, w: &WorkUnit) -> (usize, usize) {
    let kv_len = p.kv_len(w.batch);
    let (lo, _) = p.masker.interval(kv_len, w.q_start);
    let (_, hi) = p.masker.interval(kv_len, w.q_end - 1);
    (lo.max(w.key_start), hi.min(w.key_end))
}

/// Runs unit `w` into `sc.acc` / `sc.max` / `sc.sum` (rows ordered head-major:
/// `r = (h - head_start) * rows_per_head + (i - q_start)`). The sink joins partition 0 only, so
/// a merge counts it once. `next` is the unit the worker runs after this one, if it knows it:
/// its first keys are hinted while this one's last chunk computes. A unit whose accumulators
/// are not all finite runs again with P.V skipping zero weights, so NaN or Inf in the V row of
/// a key the mask hides never reaches them (see [`pv_skip_zero`]).
#[inline(always)]
pub(crate) fn decode_unit<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    next: Option<&WorkUnit>,
    sc: &mut Scratch,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    // Rows per KV head: a unit spanning KV heads (see [`crate::plan::work`]) runs each head's
    // rows into its own slot of the scratch, `R` rows each (the head's rows rounded up to a
    // power of two): accumulator rows `t * R..`, maxima and sums likewise.
    let rows = (w.head_end - w.head_start) / w.kv_heads() * (w.q_end - w.q_start);
    // At most a vector of rows (one or a few query rows per head of a GQA group, say).
    if super::decode_few::takes::<S>(rows, d, p.shape.v_head_dim) {
        macro_rules! few {
            ($($r:literal)*) => {
                match rows.next_power_of_two() {
                    $($r => return super::decode_few::decode_few::<S, TKV, D, $r>(simd, p, w, next, sc),)*
                    _ => {}
                }
            };
        }
        few!(1 2 4 8 16);
    }
    if w.kv_heads() > 1 {
        unreachable!("the planner spans KV heads only for rows the few-rows kernel takes");
    }
    // The second pass, if any, skips zero weights. One call site, and the flag hidden from the
    // optimiser: the row-tile kernel is compiled once, not once per pass.
    let mut skip_zero = false;
    loop {
        if S::F32_LANES >= MR {
            decode_rows::<S, TKV, D, MR, NRV, 1>(simd, p, w, sc, core::hint::black_box(skip_zero));
        } else {
            decode_rows::<S, TKV, D, MR, NRV, 2>(simd, p, w, sc, core::hint::black_box(skip_zero));
        }
        if skip_zero || all_finite(simd, &sc.acc[..rows * sc.dv_pad]) {
            return;
        }
        skip_zero = true;
    }
}

/// [`decode_unit`] with row tiles of `RV` vectors, Q.K^T by `qk_tile` and P.V in register tiles
/// of `MR` rows x `NRV` vectors.
#[inline(always)]
fn decode_rows<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize, const RV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    sc: &mut Scratch,
    skip_zero: bool,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let lanes = S::F32_LANES;
    let rt = RV * lanes;
    let dv_pad = sc.dv_pad;
    let dvv = dv_pad / lanes;
    let per_head = w.q_end - w.q_start;
    let rows = (w.head_end - w.head_start) * per_head;
    let rows_pad = round_up(rows, rt);
    let b = w.batch;
    let kv_len = p.kv_len(b);
    let row_of = |r: usize| (w.head_start + r / per_head, w.q_start + r % per_head);

    // Q, pre-scaled, padding rows zero, transposed in row tiles (rows along the lanes).
    for r in 0..rows_pad {
        let dst = &mut sc.qt[(r / rt * d) * rt + r % rt..];
        let st = pack_q_row(p, w, (r < rows).then(|| row_of(r)), d, dst, rt);
        (sc.max[r], sc.sum[r]) = (st.max, st.sum);
    }
    sc.acc[..rows_pad * dv_pad].fill(0.0);

    let (k0, k1) = unit_keys(p, w);
    let terms = any_terms(p);
    let hk = w.kv_head;
    let dv = p.shape.v_head_dim;

    let mut j0 = k0;
    while j0 < k1 {
        let n = CHUNK.min(k1 - j0);
        let n_pad = round_up(n, MR);
        let k = KRows::new(simd, p, b, hk, j0, n, d, MR, sc.k);
        let (vrows, ld_v) = v_rows(simd, p, b, hk, j0, n, dv_pad, sc.v);

        for tile in 0..rows_pad / rt {
            let r0 = tile * rt;
            let real = rt.min(rows - r0);
            // S^T = K Q^T for the row tile (keys by rows, key-major).
            let qt = S::as_simd_f32s(&sc.qt[r0 * d..(r0 + rt) * d]).0;
            let s = S::as_mut_simd_f32s(&mut sc.s[..n_pad * rt]).0;
            for g in 0..n_pad / MR {
                if tile == 0 {
                    // The next chunk's rows are hinted into L2 while this one computes: the
                    // hardware prefetcher restarts at every page, and decode has nothing else to
                    // hide memory behind. (A loop, not a closure: closures are compiled without
                    // the ISA's features and are not always inlined.)
                    for c in j0 + CHUNK + g * MR..(j0 + CHUNK + (g + 1) * MR).min(k1) {
                        super::prefetch_row(simd, &p.k, kv_len, b, hk, c, d);
                        super::prefetch_row(simd, &p.v, kv_len, b, hk, c, dv);
                    }
                }
                let (k, ld) = k.group(g);
                qk_tile::<S, MR, RV>(simd, d, k, ld, qt, &mut s[g * MR * RV..]);
            }
            super::scale_scores(simd, p, b, hk, j0, n, sc.s, rt, sc.row);
            // Optional terms and masks, per real row (strided: rows are lanes).
            for r in 0..real {
                let (h, i) = row_of(r0 + r);
                let interval = p.masker.interval(kv_len, i);
                let mask = (interval.0 > j0 || interval.1 < j0 + n).then_some(interval);
                if terms || mask.is_some() {
                    strided_row_terms(p, terms, mask, (b, h, i), j0, sc.s, rt, r, &mut sc.row[..n]);
                }
            }
            sc.s[n * rt..n_pad * rt].fill(f32::NEG_INFINITY);
            let rescale = online_softmax::<S, RV>(simd, &mut sc.s[..n * rt], &mut sc.max[r0..r0 + rt], &mut sc.sum[r0..r0 + rt], sc.alpha);
            super::scale_weights(simd, p, b, hk, j0, n, sc.s, rt, sc.row);

            // O += P V for the sub-tiles of MR rows that hold real rows.
            let acc = S::as_mut_simd_f32s(&mut sc.acc[r0 * dv_pad..(r0 + rt) * dv_pad]).0;
            if skip_zero {
                let v = (as_f32s::<S>(vrows), RowsAt::Strided { at: 0, ld: ld_v * lanes });
                pv_skip_zero::<S, f32>(simd, n, real, sc.s, rt, v, acc, (dvv, dvv), sc.alpha, rescale);
            } else {
                pv_rows::<S, MR, NRV>(simd, n, real, sc.s, rt, vrows, ld_v, acc, dvv, sc.alpha, rescale);
            }
        }
        j0 += n;
    }
}
