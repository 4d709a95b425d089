//! Decode with a few query rows per unit: at most a vector of them, which is what GQA decoding
//! gives (one row per query head of a KV head's group, times a few new tokens).
//!
//! With so few rows, every per-key step must do only the rows' work, or the kernel stops being
//! bound by reading K and V. So the scores of a chunk of keys are kept key-major with the rows
//! interleaved, `s[c * R + r]`: one vector holds `lanes / R` keys x `R` rows and no lane is
//! padding. Q.K^T fills a whole such vector per group of keys (`qk_dot_group`), the online
//! softmax runs on those vectors with its running max and sum kept as vectors whose lane `i`
//! belongs to row `i % R` (`interleaved_softmax`), and P.V reads the V rows in place, widening
//! f16 in registers (`pv_direct`). K and V are read once, straight from the caller's memory,
//! with the rows a fixed distance ahead hinted into L2.

use super::decode::{pack_q_row, unit_keys, Scratch, CHUNK};
use super::microkernel::{pv_direct, pv_skip_zero, qk_dot_group};
use super::strided_row_terms;
use super::terms::any_terms;
use crate::element::Element;
use crate::plan::work::WorkUnit;
use crate::problem::Problem;
use crate::simd::SimdExt;

/// How far ahead (in keys) K and V rows are hinted into L2. Decode has nothing to hide memory
/// latency behind but its own arithmetic, and the hardware prefetcher stops at page boundaries.
/// One chunk ahead measured best on the decode targets (32 to 128 keys were within noise of
/// each other; none at all was 1.3x slower).
const PREFETCH_AHEAD: usize = CHUNK;

/// Whether a unit of `rows` rows takes this path on `S`: the rows (rounded up to a power of two)
/// fit one vector, and the head dims are whole vectors (no tails in the dot products or P.V).
/// A full vector of rows leaves one key per vector: each key's dot products then need a whole
/// transpose-sum of their own, still far cheaper than the row-tile kernel's padding to a tile of
/// keys (a few new tokens per head under GQA, as speculative decoding gives). Scalar code (one
/// lane) keeps the row-tile path.
#[inline(always)]
pub(crate) fn takes<S: SimdExt>(rows: usize, head_dim: usize, v_head_dim: usize) -> bool {
    let lanes = S::F32_LANES;
    lanes > 1 && rows.next_power_of_two() <= lanes && head_dim.is_multiple_of(lanes) && v_head_dim.is_multiple_of(lanes)
}

/// Runs unit `w` (at most `R` rows, `R` a power of two with `R <= lanes`) into `sc.acc` /
/// `sc.max` / `sc.sum`, rows ordered as [`super::decode::decode_unit`] orders them.
#[inline(always)]
pub(crate) fn decode_few<S: SimdExt, TKV: Element, const D: usize, const R: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    next: Option<&WorkUnit>,
    sc: &mut Scratch,
    skip_zero: bool,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let lanes = S::F32_LANES;
    let group = lanes / R;
    let dl = d / lanes;
    let dv_pad = sc.dv_pad;
    let dvv = dv_pad / lanes;
    let per_head = w.q_end - w.q_start;
    let rows = (w.head_end - w.head_start) * per_head;
    let (b, hk) = (w.batch, w.kv_head);
    let kv_len = p.kv_len(b);
    let row_of = |r: usize| (w.head_start + r / per_head, w.q_start + r % per_head);

    // Q rows, pre-scaled, row-major; padding rows are zero and start empty.
    let (mut max0, mut sum0) = ([f32::NEG_INFINITY; 16], [0.0f32; 16]);
    for r in 0..R {
        let st = pack_q_row(p, w, (r < rows).then(|| row_of(r)), d, &mut sc.qt[r * d..(r + 1) * d], 1);
        (max0[r], sum0[r]) = (st.max, st.sum);
    }
    let mut state = Interleaved::<S, R>::new(&max0, &sum0);
    sc.acc[..R * dv_pad].fill(0.0);

    let (k0, k1) = unit_keys(p, w);
    let terms = any_terms(p);
    let (kd, ko, kld) = (p.k.data, p.k.strides.offset(b, hk, 0), p.k.strides.seq);
    let (vd, vo, vld) = (p.v.data, p.v.strides.offset(b, hk, 0), p.v.strides.seq);
    let k_bytes = d * size_of::<TKV>();
    let q = S::as_simd_f32s(&sc.qt[..R * d]).0;
    let ahead = HintRows::new(p, (ko, vo, k1), next);
    let k_span = kld.max(d) * size_of::<TKV>();
    let v_span = vld.max(p.shape.v_head_dim) * size_of::<TKV>();
    // Rows per page, less one, as a mask: a power of two no larger than a page's worth of the
    // wider-spaced tensor's rows, so sampling rows at multiples of it misses no page.
    let page_rows = (4096 / k_span.max(v_span)).max(1);
    let page_rows = (1usize << page_rows.ilog2()) - 1;
    let mut alpha = [0.0f32; 16];

    let mut j0 = k0;
    while j0 < k1 {
        let n = CHUNK.min(k1 - j0);
        let n_pad = n.div_ceil(group) * group;
        let s = &mut sc.s[..n_pad * R];

        // S = Q K^T, keys by rows; a partial last group repeats its last key.
        let sv = S::as_mut_simd_f32s(s).0;
        // Each K row of the chunk hints the row a chunk on (V rows likewise, inside P.V), which
        // may be the next unit's.
        let (k_hint, v_hint) = ahead.offsets(kd, vd, j0);
        let k_here = kd.as_ptr().wrapping_add(ko).wrapping_add(j0.wrapping_mul(kld));
        for (g, out) in sv.iter_mut().enumerate() {
            let c0 = g * group;
            // K rows a chunk ahead hinted into L2, and a row of every page two chunks ahead
            // hinted too (every `page_rows + 1`-th row and the last): the hardware prefetcher
            // stops at every 4 KiB page, and that hint's page walk brings the page into the TLB
            // before the hints of its rows arrive (on the Xeon this was measured on, 1-4% faster
            // than walking it with a demand read, which stalls retirement behind a miss to
            // memory). The hint addresses are computed once per chunk plus a stride per row (the
            // scalar work competes with the vector ports): 10-13% less time per key with K/V in
            // L2, 2-3% with K/V in memory. Only addresses are computed: a hint is never
            // dereferenced, so it needs no bounds.
            for c in c0..c0 + group {
                let kp = k_here.wrapping_add(c.wrapping_mul(kld)).wrapping_offset(k_hint).cast::<u8>();
                for line in (0..k_bytes).step_by(64) {
                    simd.prefetch_l2(kp.wrapping_add(line));
                }
                if c & page_rows == 0 || c == CHUNK - 1 {
                    if let Some((kq, vq)) = ahead.rows(kd, vd, j0 + c + 2 * PREFETCH_AHEAD) {
                        simd.prefetch_l2(kq);
                        simd.prefetch_l2(vq);
                    }
                }
            }
            let mut k_rows: [&[TKV]; 16] = [&[]; 16];
            for (c, row) in k_rows[..group].iter_mut().enumerate() {
                let j = j0 + (c0 + c).min(n - 1);
                *row = &kd[ko + j * kld..][..d];
            }
            *out = qk_dot_group::<S, TKV, R>(simd, dl, q, &k_rows);
        }
        s[n * R..].fill(f32::NEG_INFINITY);
        if let Some(scales) = p.key_scales(b, hk, j0, n) {
            super::scale_keys(simd, s, R, scales);
        }
        // Optional terms and masks, per real row (strided: rows are interleaved).
        for r in 0..rows {
            let (h, i) = row_of(r);
            let interval = p.masker.interval(kv_len, i);
            let mask = (interval.0 > j0 || interval.1 < j0 + n).then_some(interval);
            if terms || mask.is_some() {
                strided_row_terms(p, terms, mask, (b, h, i), j0, s, R, r, &mut sc.row[..n]);
            }
        }

        let rescale = state.update(simd, S::as_mut_simd_f32s(s).0, &mut alpha);

        // O = O * alpha + P V, V rows read in place.
        let acc = S::as_mut_simd_f32s(&mut sc.acc[..R * dv_pad]).0;
        let v_rows = (vd, vo + j0 * vld, vld);
        if skip_zero {
            pv_skip_zero::<S, TKV>(simd, n, rows, s, R, v_rows, acc, (dvv, dvv), &alpha, rescale);
            j0 += n;
            continue;
        }
        // V rows are hinted from inside P.V (`v_hint`), a V row's segment per key, so the hints
        // spread over the whole chunk rather than arriving in one burst that stalls on the fill
        // buffers.
        // Register tiles of R x {8, 8, 4, 2} vectors keep at most 16 accumulators, leaving
        // registers for the widened V row and the broadcast weights (AVX2 has 16 in all, so its
        // wider tiles spill a little; still faster than re-reading V); the rest one at a time.
        let mut x = 0;
        while x < dvv {
            x += match R {
                1 | 2 if x + 8 <= dvv => {
                    pv_direct::<S, TKV, R, 8>(simd, n, s, R, v_rows, x, acc, dvv, &alpha, rescale, v_hint);
                    8
                }
                4 if x + 4 <= dvv => {
                    pv_direct::<S, TKV, R, 4>(simd, n, s, R, v_rows, x, acc, dvv, &alpha, rescale, v_hint);
                    4
                }
                // (With 8-lane vectors 8 rows x 2 would take all 16 registers.)
                8 if lanes > 8 && x + 2 <= dvv => {
                    pv_direct::<S, TKV, R, 2>(simd, n, s, R, v_rows, x, acc, dvv, &alpha, rescale, v_hint);
                    2
                }
                _ => {
                    pv_direct::<S, TKV, R, 1>(simd, n, s, R, v_rows, x, acc, dvv, &alpha, rescale, v_hint);
                    1
                }
            };
        }
        j0 += n;
    }
    state.store(&mut sc.max[..R], &mut sc.sum[..R]);
}

/// Where the K/V rows hinted ahead of a unit lie: key `j` of the unit while `j < k1`, and past
/// that the first keys of the unit the worker runs next (its `k0 + (j - k1)`), so that unit does
/// not start on rows nothing has asked for. Only addresses are computed, never dereferenced.
#[derive(Clone, Copy)]
struct HintRows {
    /// This unit's K and V offsets of key 0, and its end key.
    here: (usize, usize, usize),
    /// The next unit's K and V offsets of key 0, and its keys.
    next: Option<(usize, usize, usize, usize)>,
    k_ld: usize,
    v_ld: usize,
}

impl HintRows {
    #[inline(always)]
    fn new<TKV>(p: &Problem<'_, TKV>, here: (usize, usize, usize), next: Option<&WorkUnit>) -> Self {
        let (k, v) = (&p.k.strides, &p.v.strides);
        let next = next.map(|n| {
            let (nk0, nk1) = unit_keys(p, n);
            (k.offset(n.batch, n.kv_head, 0), v.offset(n.batch, n.kv_head, 0), nk0, nk1)
        });
        Self { here, next, k_ld: k.seq, v_ld: v.seq }
    }

    /// The K and V row addresses that hint `j` refers to, or `None` past both units.
    #[inline(always)]
    fn rows<T>(&self, k: &[T], v: &[T], j: usize) -> Option<(*const u8, *const u8)> {
        let (ko, vo, k1) = self.here;
        let (ko, vo, j) = if j < k1 {
            (ko, vo, j)
        } else {
            let (nko, nvo, nk0, nk1) = self.next?;
            let jn = nk0 + (j - k1);
            if jn >= nk1 {
                return None;
            }
            (nko, nvo, jn)
        };
        let kp = k.as_ptr().wrapping_add(ko).wrapping_add(j.wrapping_mul(self.k_ld)).cast::<u8>();
        let vp = v.as_ptr().wrapping_add(vo).wrapping_add(j.wrapping_mul(self.v_ld)).cast::<u8>();
        Some((kp, vp))
    }

    /// For the K and V rows of the chunk starting at key `j0`, the offsets (in elements) from
    /// each row to the row it hints: where [`Self::rows`] puts key `j0 + PREFETCH_AHEAD`, less
    /// where key `j0` is (a chunk whose targets straddle this unit's end hints past it,
    /// harmlessly); [`PREFETCH_AHEAD`] rows on when nothing follows.
    #[inline(always)]
    fn offsets<T>(&self, k: &[T], v: &[T], j0: usize) -> (isize, isize) {
        let size = size_of::<T>().max(1) as isize;
        let apart = |to: *const u8, from: *const u8| (to as isize).wrapping_sub(from as isize) / size;
        match (self.rows(k, v, j0 + PREFETCH_AHEAD), self.rows(k, v, j0)) {
            (Some((kt, vt)), Some((kf, vf))) => (apart(kt, kf), apart(vt, vf)),
            _ => {
                let ahead = PREFETCH_AHEAD as isize;
                (ahead.wrapping_mul(self.k_ld as isize), ahead.wrapping_mul(self.v_ld as isize))
            }
        }
    }
}

/// The online-softmax state of `R` interleaved rows: lane `i` holds row `i % R`'s running max and
/// sum, so a chunk's update is whole-vector arithmetic plus `log2(lanes / R)` rotations to
/// combine the lanes of each row.
struct Interleaved<S: SimdExt, const R: usize> {
    max: S::f32s,
    sum: S::f32s,
}

impl<S: SimdExt, const R: usize> Interleaved<S, R> {
    #[inline(always)]
    fn new(max: &[f32; 16], sum: &[f32; 16]) -> Self {
        let lanes = S::F32_LANES;
        let (mut m, mut l) = ([0.0f32; 16], [0.0f32; 16]);
        for i in 0..lanes {
            (m[i], l[i]) = (max[i % R], sum[i % R]);
        }
        Self { max: S::as_simd_f32s(&m[..lanes]).0[0], sum: S::as_simd_f32s(&l[..lanes]).0[0] }
    }

    /// Rotations by `R`, `2R`, ... `lanes / 2` fold every lane of a row into each of them: the
    /// max when `MAX`, else the sum (a const parameter, not a closure: a closure would be
    /// compiled without the ISA's features).
    #[inline(always)]
    fn fold<const MAX: bool>(simd: S, mut x: S::f32s) -> S::f32s {
        let mut step = R;
        while step < S::F32_LANES {
            let y = simd.rotate_right_f32s(x, step);
            x = if MAX { simd.max_f32s(x, y) } else { simd.add_f32s(x, y) };
            step *= 2;
        }
        x
    }

    /// Turns the scores `s` (interleaved, masked keys `-inf`) into weights `exp(s - max)`, folds
    /// them into the running max and sum, and writes each row's rescale factor to `alpha[..R]`.
    /// Returns whether any factor differs from 1. A row that has seen nothing keeps max `-inf`
    /// and shifts by 0, so its weights (`exp(-inf)`) and factor are 0, never NaN.
    #[inline(always)]
    fn update(&mut self, simd: S, s: &mut [S::f32s], alpha: &mut [f32; 16]) -> bool {
        let mut tile_max = simd.splat_f32s(f32::NEG_INFINITY);
        for &x in s.iter() {
            tile_max = simd.max_f32s(tile_max, x);
        }
        let tile_max = Self::fold::<true>(simd, tile_max);
        let new = simd.max_f32s(self.max, tile_max);
        let shift = simd.select_f32s(simd.equal_f32s(new, simd.splat_f32s(f32::NEG_INFINITY)), simd.splat_f32s(0.0), new);
        let factor = simd.exp_f32s(simd.sub_f32s(self.max, shift));
        let mut tile_sum = simd.splat_f32s(0.0);
        for x in s.iter_mut() {
            *x = simd.exp_f32s(simd.sub_f32s(*x, shift));
            tile_sum = simd.add_f32s(tile_sum, *x);
        }
        let tile_sum = Self::fold::<false>(simd, tile_sum);
        self.sum = simd.mul_add_e_f32s(self.sum, factor, tile_sum);
        self.max = new;
        let lanes = S::F32_LANES;
        S::as_mut_simd_f32s(&mut alpha[..lanes]).0[0] = factor;
        alpha[..R].iter().any(|&a| a != 1.0)
    }

    #[inline(always)]
    fn store(&self, max: &mut [f32], sum: &mut [f32]) {
        let lanes = S::F32_LANES;
        let (mut m, mut l) = ([0.0f32; 16], [0.0f32; 16]);
        S::as_mut_simd_f32s(&mut m[..lanes]).0[0] = self.max;
        S::as_mut_simd_f32s(&mut l[..lanes]).0[0] = self.sum;
        max[..R].copy_from_slice(&m[..R]);
        sum[..R].copy_from_slice(&l[..R]);
    }
}
