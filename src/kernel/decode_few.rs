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

use super::decode::{pack_q_row, Scratch, CHUNK};
use super::microkernel::{pv_direct, qk_dot_group};
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

/// Whether the row at `row`, of rows `span` bytes apart (or `span` bytes long, if longer), is the
/// first of them to start in its 4 KiB page: whatever the stride (rows packed one after another
/// as in BHSD, or a token's heads in between as in BSHD), exactly one row per page the rows start
/// in qualifies.
#[inline(always)]
fn starts_page(row: *const u8, span: usize) -> bool {
    (row as usize) % 4096 < span
}

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
pub(crate) fn decode_few<S: SimdExt, TQ: Element, TKV: Element, const D: usize, const R: usize>(
    simd: S,
    p: &Problem<'_, TQ, TKV>,
    w: &WorkUnit,
    sc: &mut Scratch,
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

    // Keys some row may see, within the partition (intervals are monotone in the row).
    let (lo, _) = p.masker.interval(kv_len, w.q_start);
    let (_, hi) = p.masker.interval(kv_len, w.q_end - 1);
    let (k0, k1) = (lo.max(w.key_start), hi.min(w.key_end));
    let terms = any_terms(p);
    let (kd, ko, kld) = (p.k.data, p.k.strides.offset(b, hk, 0), p.k.strides.seq);
    let (vd, vo, vld) = (p.v.data, p.v.strides.offset(b, hk, 0), p.v.strides.seq);
    let k_bytes = d * size_of::<TKV>();
    // V rows are hinted from inside P.V, a V row's segment per key, so the hints spread over
    // the whole chunk rather than arriving in one burst that stalls on the fill buffers.
    let v_hint = PREFETCH_AHEAD * vld;
    let q = S::as_simd_f32s(&sc.qt[..R * d]).0;
    let (k_base, v_base) = (kd.as_ptr().wrapping_add(ko), vd.as_ptr().wrapping_add(vo));
    let k_span = kld.max(d) * size_of::<TKV>();
    let v_span = vld.max(p.shape.v_head_dim) * size_of::<TKV>();
    let mut alpha = [0.0f32; 16];

    let mut j0 = k0;
    while j0 < k1 {
        let n = CHUNK.min(k1 - j0);
        let n_pad = n.div_ceil(group) * group;
        let s = &mut sc.s[..n_pad * R];

        // S = Q K^T, keys by rows; a partial last group repeats its last key.
        let sv = S::as_mut_simd_f32s(s).0;
        for (g, out) in sv.iter_mut().enumerate() {
            let c0 = g * group;
            // K rows a chunk ahead hinted into L2, and the first row of each page a further chunk
            // ahead hinted too: the hardware prefetcher stops at every 4 KiB page, and that hint's
            // page walk brings the page into the TLB before the hints of its rows arrive (on the
            // Xeon this was measured on, 1-4% faster than walking it with a demand read, which
            // stalls retirement behind a miss to memory). Only addresses are computed: a hint is never dereferenced, so it needs no bounds.
            let first = j0 + c0 + PREFETCH_AHEAD;
            for j in first..(first + group).min(k1) {
                let kp = k_base.wrapping_add(j * kld).cast::<u8>();
                for line in (0..k_bytes).step_by(64) {
                    simd.prefetch_l2(kp.wrapping_add(line));
                }
                let j2 = j + PREFETCH_AHEAD;
                if j2 < k1 {
                    let kq = k_base.wrapping_add(j2 * kld).cast::<u8>();
                    if starts_page(kq, k_span) {
                        simd.prefetch_l2(kq);
                    }
                    let vq = v_base.wrapping_add(j2 * vld).cast::<u8>();
                    if starts_page(vq, v_span) {
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
