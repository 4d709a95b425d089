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
use super::microkernel::{pv_direct, pv_skip_zero, qk_dot_group, RowsAt};
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
    let (kd, vd) = (p.k.data, p.v.data);
    let k_bytes = d * size_of::<TKV>();
    let q = S::as_simd_f32s(&sc.qt[..R * d]).0;
    let ahead = HintRows::new(p, w, k1, next);
    // Rows per 4 KiB page, less one, as a mask: a power of two no larger than a page's worth of
    // the wider-spaced tensor's rows (a paged cache's slots within a page), so sampling rows at
    // multiples of it misses no page.
    let (k_span, v_span) = (p.k.run(k0).1.max(d) * size_of::<TKV>(), p.v.run(k0).1.max(p.shape.v_head_dim) * size_of::<TKV>());
    let page_rows = (4096 / k_span.max(v_span)).max(1);
    let page_rows = (1usize << page_rows.ilog2()) - 1;
    let mut alpha = [0.0f32; 16];
    // Per chunk: where each key's K and V rows start, and the rows a chunk ahead to hint (null
    // past the unit and the next one). A table rather than a stride, so the same loops read a
    // contiguous cache and one whose pages end inside a chunk; filling it costs a few scalar
    // operations per key against the key's `2 * D` loaded elements.
    let (mut k_at, mut v_at) = ([0usize; CHUNK], [0usize; CHUNK]);
    let (mut k_ahead, mut v_ahead) = ([core::ptr::null::<TKV>(); CHUNK], [core::ptr::null::<TKV>(); CHUNK]);

    let mut j0 = k0;
    while j0 < k1 {
        let n = CHUNK.min(k1 - j0);
        let n_pad = n.div_ceil(group) * group;
        let s = &mut sc.s[..n_pad * R];
        p.k.row_offsets(b, hk, j0, &mut k_at[..n]);
        p.v.row_offsets(b, hk, j0, &mut v_at[..n]);
        ahead.fill(j0 + PREFETCH_AHEAD, &mut k_ahead[..n], &mut v_ahead[..n]);

        // S = Q K^T, keys by rows; a partial last group repeats its last key.
        let sv = S::as_mut_simd_f32s(s).0;
        for (g, out) in sv.iter_mut().enumerate() {
            let c0 = g * group;
            // K rows a chunk ahead hinted into L2 (each K row of the chunk hints the row a chunk
            // on, which may be the next unit's; V rows likewise, inside P.V), and a row of every
            // page two chunks ahead hinted too (every `page_rows + 1`-th row and the last): the
            // hardware prefetcher stops at every 4 KiB page, and that hint's page walk brings the
            // page into the TLB before the hints of its rows arrive (on the Xeon this was
            // measured on, 1-4% faster than walking it with a demand read, which stalls
            // retirement behind a miss to memory). Only addresses are computed: a hint is never
            // dereferenced, so it needs no bounds.
            for (c, kp) in k_ahead[..n].iter().enumerate().skip(c0).take(group) {
                let kp = kp.cast::<u8>();
                if !kp.is_null() {
                    for line in (0..k_bytes).step_by(64) {
                        simd.prefetch_l2(kp.wrapping_add(line));
                    }
                }
                if c & page_rows == 0 || c == CHUNK - 1 {
                    if let Some((kq, vq)) = ahead.rows(j0 + c + 2 * PREFETCH_AHEAD) {
                        simd.prefetch_l2(kq.cast::<u8>());
                        simd.prefetch_l2(vq.cast::<u8>());
                    }
                }
            }
            let mut k_rows: [&[TKV]; 16] = [&[]; 16];
            for (c, row) in k_rows[..group].iter_mut().enumerate() {
                *row = &kd[k_at[(c0 + c).min(n - 1)]..][..d];
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
        let v_rows = (vd, &v_at[..n]);
        let v_hint = Some(&v_ahead[..n]);
        if skip_zero {
            pv_skip_zero::<S, TKV>(simd, n, rows, s, R, (vd, RowsAt::Table(&v_at[..n])), acc, (dvv, dvv), &alpha, rescale);
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
/// not start on rows nothing has asked for. Only addresses are computed, never dereferenced, and
/// only of keys some row of either unit sees (so a paged cache has their pages).
struct HintRows<'p, 'a, TKV> {
    p: &'p Problem<'a, TKV>,
    /// This unit's batch entry, KV head and end key.
    here: (usize, usize, usize),
    /// The next unit's batch entry, KV head and keys.
    next: Option<(usize, usize, usize, usize)>,
}

impl<'p, 'a, TKV> HintRows<'p, 'a, TKV> {
    #[inline(always)]
    fn new(p: &'p Problem<'a, TKV>, w: &WorkUnit, k1: usize, next: Option<&WorkUnit>) -> Self {
        let next = next.map(|n| {
            let (nk0, nk1) = unit_keys(p, n);
            (n.batch, n.kv_head, nk0, nk1)
        });
        Self { p, here: (w.batch, w.kv_head, k1), next }
    }

    /// `k[c]` and `v[c]` = the rows hint `j + c` refers to ([`Self::rows`]), null past both
    /// units; a page-table lookup per page, not per row.
    #[inline(always)]
    fn fill(&self, j: usize, k: &mut [*const TKV], v: &mut [*const TKV]) {
        let (b, hk, k1) = self.here;
        let mut at = [0usize; CHUNK];
        let n = k.len();
        let here = k1.saturating_sub(j).min(n);
        let (nb, nhk, nk0, there) = match self.next {
            Some((nb, nhk, nk0, nk1)) => (nb, nhk, nk0 + j.saturating_sub(k1), (nk1.saturating_sub(nk0 + j.saturating_sub(k1))).min(n - here)),
            None => (0, 0, 0, 0),
        };
        for (src, (out, data)) in [(&self.p.k, (&mut *k, self.p.k.data)), (&self.p.v, (&mut *v, self.p.v.data))] {
            src.row_offsets(b, hk, j, &mut at[..here]);
            src.row_offsets(nb, nhk, nk0, &mut at[here..here + there]);
            for (o, &a) in out.iter_mut().zip(&at[..here + there]) {
                *o = data.as_ptr().wrapping_add(a);
            }
            out[here + there..].fill(core::ptr::null());
        }
    }

    /// The K and V rows that hint `j` refers to, or `None` past both units.
    #[inline(always)]
    fn rows(&self, j: usize) -> Option<(*const TKV, *const TKV)> {
        let (b, hk, k1) = self.here;
        let (b, hk, j) = if j < k1 {
            (b, hk, j)
        } else {
            let (nb, nhk, nk0, nk1) = self.next?;
            let jn = nk0 + (j - k1);
            if jn >= nk1 {
                return None;
            }
            (nb, nhk, jn)
        };
        let (k, v) = (&self.p.k, &self.p.v);
        Some((k.data.as_ptr().wrapping_add(k.offset(b, hk, j)), v.data.as_ptr().wrapping_add(v.offset(b, hk, j))))
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
