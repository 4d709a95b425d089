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
use super::microkernel::{all_finite, pv_direct, pv_skip_zero, qk_dot_group, RowsAt};
use super::{lanes_unit, strided_row_terms};
use super::terms::any_terms;
use crate::element::{Element, KvPair};
use crate::plan::work::WorkUnit;
use crate::problem::Problem;
use crate::simd::SimdExt;

/// How far ahead (in keys) K and V rows are hinted into L2. Decode has nothing to hide memory
/// latency behind but its own arithmetic, and the hardware prefetcher stops at page boundaries.
/// One chunk ahead measured best on the decode targets (32 to 128 keys were within noise of
/// each other; none at all was 1.3x slower).
const PREFETCH_AHEAD: usize = CHUNK;

/// Keys per head step when a unit runs several KV heads in lockstep.
const HEADS_CHUNK: usize = 16;

/// Whether a unit of `rows` rows takes this path on `S`: the rows (rounded up to a power of two)
/// fit one vector, and the head dims are whole vectors (no tails in the dot products or P.V).
/// A full vector of rows leaves one key per vector: each key's dot products then need a whole
/// transpose-sum of their own, still far cheaper than the row-tile kernel's padding to a tile of
/// keys (a few new tokens per head under GQA, as speculative decoding gives). Scalar code (one
/// lane) keeps the row-tile path.
#[inline(always)]
pub(crate) fn takes<S: SimdExt>(rows: usize, head_dim: usize, v_head_dim: usize) -> bool {
    takes_lanes(S::F32_LANES, rows, head_dim, v_head_dim)
}

/// [`takes`] for vectors of `lanes` f32 (what the planner knows of an ISA).
pub(crate) fn takes_lanes(lanes: usize, rows: usize, head_dim: usize, v_head_dim: usize) -> bool {
    lanes > 1 && rows.next_power_of_two() <= lanes && head_dim.is_multiple_of(lanes) && v_head_dim.is_multiple_of(lanes)
}

/// Runs unit `w` (at most `R` rows per KV head, `R` a power of two with `R <= lanes`), head `t`
/// of it into slot `t` of the scratch (`sc.acc` rows `t * R..`, `sc.max` / `sc.sum` entries
/// likewise), rows ordered as [`super::decode::decode_unit`] orders them. `next` is the unit
/// after `w`, whose first keys the last chunk hints. A head whose accumulators are not all
/// finite runs again alone with P.V skipping zero weights, so NaN or Inf in the V row of a key
/// the mask hides never reaches them (see [`pv_skip_zero`]).
#[inline(always)]
pub(crate) fn decode_few<S: SimdExt, TKV: KvPair, const D: usize, const R: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    next: Option<&WorkUnit>,
    sc: &mut Scratch,
) {
    let group = p.shape.group_size();
    // (unit, its first slot, skip zero weights): the whole unit first, then each head that needs
    // it. One call site of the pass, the flag hidden from the optimiser, so its body is compiled
    // once per `R` (an engine compiles it for every head dim, storage type and ISA).
    let mut pass = (*w, 0, false);
    let mut t_next = 0;
    loop {
        let (unit, slot, skip_zero) = pass;
        few_pass::<S, TKV, D, R>(simd, p, &unit, if skip_zero { None } else { next }, sc, slot, core::hint::black_box(skip_zero));
        let dv_pad = sc.dv_pad;
        let Some(t) = (t_next..w.kv_heads()).find(|&t| !all_finite(simd, &sc.acc[t * R * dv_pad..(t + 1) * R * dv_pad])) else {
            return;
        };
        (pass, t_next) = ((w.kv_sub(t, group), t, true), t + 1);
    }
}

/// One pass over unit `w`'s keys into slots `slot..`. A unit spanning several KV heads runs its
/// single-head units in lockstep, chunk by chunk: every K/V byte of a chunk's tokens is then
/// used within a short window, where a head at a time would fetch the lines of the heads beside
/// it and lose them (see [`crate::plan::work`]). Lockstep heads step [`HEADS_CHUNK`] keys at a
/// time, a single head [`CHUNK`] (so their rounding differs; the plan, fixed by the shape,
/// decides which runs).
#[inline(always)]
fn few_pass<S: SimdExt, TKV: KvPair, const D: usize, const R: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    next: Option<&WorkUnit>,
    sc: &mut Scratch,
    slot: usize,
    skip_zero: bool,
) {
    let (group, heads) = (p.shape.group_size(), w.kv_heads());
    for t in 0..heads {
        few_begin::<S, TKV, D, R>(p, &w.kv_sub(t, group), sc, slot + t);
    }
    // A row's key interval does not depend on its head, so every head has the same keys.
    let (k0, k1) = unit_keys(p, w);
    let step = if heads > 1 { HEADS_CHUNK } else { CHUNK };
    let mut j0 = k0;
    while j0 < k1 {
        let n = step.min(k1 - j0);
        for t in 0..heads {
            few_chunk::<S, TKV, D, R>(simd, p, &w.kv_sub(t, group), (w, t), next, sc, slot + t, (j0, n, k1), skip_zero);
        }
        j0 += n;
    }
    // The register tiles read V in units of `lanes_unit` (fp8 E4M3: over 2^8); the
    // accumulators get it back once per pass, not once per loaded V vector. (The zero-skipping
    // pass reads V exactly.)
    let v_unit = lanes_unit::<TKV::V>();
    if v_unit != 1.0 && !skip_zero {
        let u = simd.splat_f32s(v_unit);
        let dv_pad = sc.dv_pad;
        let acc = S::as_mut_simd_f32s(&mut sc.acc[slot * R * dv_pad..(slot + heads) * R * dv_pad]).0;
        acc.iter_mut().for_each(|x| *x = simd.mul_f32s(*x, u));
    }
}

/// Starts unit `w` in slot `slot`: Q rows, pre-scaled, row-major (padding rows zero, starting
/// empty); the accumulators zero; the rows' starting max and sum.
#[inline(always)]
fn few_begin<S: SimdExt, TKV: KvPair, const D: usize, const R: usize>(p: &Problem<'_, TKV>, w: &WorkUnit, sc: &mut Scratch, slot: usize) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let per_head = w.q_end - w.q_start;
    let rows = (w.head_end - w.head_start) * per_head;
    let row_of = |r: usize| (w.head_start + r / per_head, w.q_start + r % per_head);
    for r in 0..R {
        let at = slot * R + r;
        let st = pack_q_row(p, w, (r < rows).then(|| row_of(r)), d, &mut sc.qt[at * d..(at + 1) * d], 1);
        (sc.max[at], sc.sum[at]) = (st.max, st.sum);
    }
    sc.acc[slot * R * sc.dv_pad..(slot + 1) * R * sc.dv_pad].fill(0.0);
}

/// Keys `j0..j0 + n` of unit `w` (whose keys end at `k1`), into slot `slot`; `hint` is the
/// unit `w` is head `t` of, `(unit, t)` (`(w, 0)` alone), and `next` the unit after it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn few_chunk<S: SimdExt, TKV: KvPair, const D: usize, const R: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    w: &WorkUnit,
    hint: (&WorkUnit, usize),
    next: Option<&WorkUnit>,
    sc: &mut Scratch,
    slot: usize,
    (j0, n, k1): (usize, usize, usize),
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

    let mut state = Interleaved::<S, R>::load(&sc.max[slot * R..(slot + 1) * R], &sc.sum[slot * R..(slot + 1) * R]);
    let terms = any_terms(p);
    let (kd, vd) = (p.k.data, p.v.data);
    let k_bytes = d / TKV::K::BLOCK * size_of::<TKV::K>();
    let q = S::as_simd_f32s(&sc.qt[slot * R * d..(slot + 1) * R * d]).0;
    let ahead = HintRows::new(p, hint, k1, next);
    // Rows per 4 KiB page, less one, as a mask: a power of two no larger than a page's worth of
    // the wider-spaced tensor's rows (a paged cache's slots within a page), so sampling rows at
    // multiples of it misses no page.
    let (k_span, v_span) = (p.k.run(j0).1.max(d / TKV::K::BLOCK) * size_of::<TKV::K>(), p.v.run(j0).1.max(p.shape.v_head_dim / TKV::V::BLOCK) * size_of::<TKV::V>());
    let page_rows = (4096 / k_span.max(v_span)).max(1);
    let page_rows = (1usize << page_rows.ilog2()) - 1;
    let walk_pages = ahead.walks_pages() && crate::simd::hints_page_walks();
    let mut alpha = [0.0f32; 16];
    // Where each key's K and V rows start, and the rows a chunk ahead to hint (null past the
    // unit and the next one). A table rather than a stride, so the same loops read a contiguous
    // cache and one whose pages end inside a chunk; filling it costs a few scalar operations per
    // key against the key's `2 * D` loaded elements.
    let (mut k_at, mut v_at) = ([0usize; CHUNK], [0usize; CHUNK]);
    let (mut k_ahead, mut v_ahead) = ([core::ptr::null::<TKV::K>(); CHUNK], [core::ptr::null::<TKV::V>(); CHUNK]);

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
        // retirement behind a miss to memory; on AMD Zen 5 the hint itself stalled, so AMD
        // CPUs skip it: see `simd::hints_page_walks`). Only addresses are computed: a hint is
        // never dereferenced, so it needs no bounds.
        for (c, kp) in k_ahead[..n].iter().enumerate().skip(c0).take(group) {
            let kp = kp.cast::<u8>();
            if !kp.is_null() {
                for line in (0..k_bytes).step_by(64) {
                    simd.prefetch_l2(kp.wrapping_add(line));
                }
            }
            if walk_pages && (c & page_rows == 0 || c == CHUNK - 1) {
                if let Some((kq, vq)) = ahead.rows(j0 + c + 2 * PREFETCH_AHEAD) {
                    simd.prefetch_l2(kq.cast::<u8>());
                    simd.prefetch_l2(vq.cast::<u8>());
                }
            }
        }
        let mut k_rows: [&[TKV::K]; 16] = [&[]; 16];
        for (c, row) in k_rows[..group].iter_mut().enumerate() {
            *row = &kd[k_at[(c0 + c).min(n - 1)]..][..d / TKV::K::BLOCK];
        }
        *out = qk_dot_group::<S, TKV::K, R>(simd, dl, q, &k_rows);
    }
    // K was read in units of `lanes_unit` (fp8 E4M3: over 2^8); one multiply per vector of
    // scores restores them instead of one per loaded K vector.
    let k_unit = lanes_unit::<TKV::K>();
    if k_unit != 1.0 {
        let u = simd.splat_f32s(k_unit);
        sv.iter_mut().for_each(|x| *x = simd.mul_f32s(*x, u));
    }
    s[n * R..].fill(f32::NEG_INFINITY);
    super::scale_scores(simd, p, b, hk, j0, n, s, R, sc.row);
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
    super::scale_weights(simd, p, b, hk, j0, n, s, R, sc.row);

    // O = O * alpha + P V, V rows read in place.
    let acc = S::as_mut_simd_f32s(&mut sc.acc[slot * R * dv_pad..(slot + 1) * R * dv_pad]).0;
    if skip_zero {
        pv_skip_zero::<S, TKV::V>(simd, n, rows, s, R, (vd, RowsAt::Table(&v_at[..n])), acc, (dvv, dvv), &alpha, rescale);
    } else {
        pv_tiles::<S, TKV::V, R>(simd, n, s, (vd, &v_at[..n]), acc, dvv, &alpha, rescale, &v_ahead[..n]);
    }
    state.store(&mut sc.max[slot * R..(slot + 1) * R], &mut sc.sum[slot * R..(slot + 1) * R]);
}

/// O = O * alpha + P V for `n` keys of interleaved weights `s`, V rows read in place (`v_rows`:
/// the data and each key's row offset; `v_hint`: the rows to hint meanwhile), register tile by
/// register tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tiles<S: SimdExt, TV: Element, const R: usize>(
    simd: S,
    n: usize,
    s: &[f32],
    v_rows: (&[TV], &[usize]),
    acc: &mut [S::f32s],
    dvv: usize,
    alpha: &[f32; 16],
    rescale: bool,
    v_hint: &[*const TV],
) {
    let lanes = S::F32_LANES;
    let v_hint = Some(v_hint);
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
                pv_direct::<S, TV, R, 8>(simd, n, s, R, v_rows, x, acc, dvv, alpha, rescale, v_hint);
                8
            }
            4 if x + 4 <= dvv => {
                pv_direct::<S, TV, R, 4>(simd, n, s, R, v_rows, x, acc, dvv, alpha, rescale, v_hint);
                4
            }
            // (With 8-lane vectors 8 rows x 2 would take all 16 registers.)
            8 if lanes > 8 && x + 2 <= dvv => {
                pv_direct::<S, TV, R, 2>(simd, n, s, R, v_rows, x, acc, dvv, alpha, rescale, v_hint);
                2
            }
            _ => {
                pv_direct::<S, TV, R, 1>(simd, n, s, R, v_rows, x, acc, dvv, alpha, rescale, v_hint);
                1
            }
        };
    }
}

/// Where the K/V rows hinted ahead of a unit lie: key `j` of the unit while `j < k1`, and past
/// that the first keys of the unit the worker runs next (its `k0 + (j - k1)`), so that unit does
/// not start on rows nothing has asked for. Only addresses are computed, never dereferenced, and
/// only of keys some row of either unit sees (so a paged cache has their pages).
///
/// For head `t` of a unit spanning `heads` KV heads (run in lockstep), hint `c` of a chunk of `n`
/// refers instead to head `(t n + c) % heads` of key `j + (t n + c) / heads`: over the heads'
/// steps the hints sweep the next chunk's tokens, every head of each, in address order (the
/// heads of a token lie side by side there), which the memory system streams; each head hinting
/// its own rows would ask for a few hundred bytes in every token's span at a time.
struct HintRows<'p, 'a, TKV: KvPair> {
    p: &'p Problem<'a, TKV>,
    /// This unit's batch entry, first KV head, KV heads, end key, and the head being run.
    here: (usize, usize, usize, usize, usize),
    /// The next unit's batch entry, first KV head, KV heads and keys.
    next: Option<(usize, usize, usize, usize, usize)>,
}

impl<'p, 'a, TKV: KvPair> HintRows<'p, 'a, TKV> {
    /// Hints for head `t` of unit `w` (whose keys end at `k1`), followed by unit `next`.
    #[inline(always)]
    fn new(p: &'p Problem<'a, TKV>, (w, t): (&WorkUnit, usize), k1: usize, next: Option<&WorkUnit>) -> Self {
        let next = next.map(|n| {
            let (nk0, nk1) = unit_keys(p, n);
            (n.batch, n.kv_head, n.kv_heads(), nk0, nk1)
        });
        if w.kv_heads() > 1 && !(p.k.heads_side_by_side() && p.v.heads_side_by_side()) {
            // Heads apart (head-major pages): each head hints its own rows, which lie together.
            let next = next.map(|(nb, nhk, nheads, nk0, nk1)| (nb, nhk + t.min(nheads - 1), 1, nk0, nk1));
            return Self { p, here: (w.batch, w.kv_head + t, 1, k1, 0), next };
        }
        Self { p, here: (w.batch, w.kv_head, w.kv_heads(), k1, t), next }
    }

    /// `k[c]` and `v[c]` = the rows hint `j + c` refers to ([`Self::rows`]; spread over the
    /// heads, see the type docs), null past both units; for one head, a page-table lookup per
    /// page, not per row.
    #[inline(always)]
    fn fill(&self, j: usize, k: &mut [*const TKV::K], v: &mut [*const TKV::V]) {
        let (b, hk, heads, k1, t) = self.here;
        let n = k.len();
        if heads > 1 {
            // Row offsets of the first head for the keys before `k1` (a page lookup per page,
            // not a division per hint); another head's row is a head stride further.
            let (first, last) = (j + t * n / heads, j + (t * n + n - 1) / heads);
            let inside = k1.min(last + 1).saturating_sub(first);
            let (mut k_at, mut v_at) = ([0usize; CHUNK], [0usize; CHUNK]);
            self.p.k.row_offsets(b, hk, first, &mut k_at[..inside]);
            self.p.v.row_offsets(b, hk, first, &mut v_at[..inside]);
            let (ks, vs) = (self.p.k.head_stride(), self.p.v.head_stride());
            let (kd, vd) = (self.p.k.data.as_ptr(), self.p.v.data.as_ptr());
            let (mut key, mut h) = (first, t * n % heads);
            for c in 0..n {
                if c > 0 {
                    h += 1;
                    if h == heads {
                        (key, h) = (key + 1, 0);
                    }
                }
                if key < k1 {
                    let i = key - first;
                    (k[c], v[c]) = (kd.wrapping_add(k_at[i] + h * ks), vd.wrapping_add(v_at[i] + h * vs));
                    continue;
                }
                // Past this unit: the next one's first keys.
                let row = self.next.and_then(|(nb, nhk, nheads, nk0, nk1)| {
                    let jn = nk0 + (key - k1);
                    (jn < nk1).then_some((nb, nhk + h.min(nheads - 1), jn))
                });
                (k[c], v[c]) = match row {
                    Some((b, h, key)) => self.at(b, h, key),
                    None => (core::ptr::null(), core::ptr::null()),
                };
            }
            return;
        }
        let mut at = [0usize; CHUNK];
        let here = k1.saturating_sub(j).min(n);
        let (nb, nhk, nk0, there) = match self.next {
            Some((nb, nhk, _, nk0, nk1)) => (nb, nhk, nk0 + j.saturating_sub(k1), (nk1.saturating_sub(nk0 + j.saturating_sub(k1))).min(n - here)),
            None => (0, 0, 0, 0),
        };
        // K and V (of their own storage types) the same way.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn hint_rows<T>(src: &crate::kv::KvSource<'_, T>, out: &mut [*const T], at: &mut [usize], (b, hk, j, here): (usize, usize, usize, usize), (nb, nhk, nk0, there): (usize, usize, usize, usize)) {
            src.row_offsets(b, hk, j, &mut at[..here]);
            src.row_offsets(nb, nhk, nk0, &mut at[here..here + there]);
            for (o, &a) in out.iter_mut().zip(&at[..here + there]) {
                *o = src.data.as_ptr().wrapping_add(a);
            }
            out[here + there..].fill(core::ptr::null());
        }
        hint_rows(&self.p.k, k, &mut at, (b, hk, j, here), (nb, nhk, nk0, there));
        hint_rows(&self.p.v, v, &mut at, (b, hk, j, here), (nb, nhk, nk0, there));
    }

    /// Whether this head's step hints the pages two chunks ahead: every head's when each
    /// hints its own rows, the first head's when the heads share their tokens' pages.
    #[inline(always)]
    fn walks_pages(&self) -> bool {
        self.here.4 == 0
    }

    /// The K and V rows that hint `j` refers to (of the head being run), or `None` past both
    /// units.
    #[inline(always)]
    fn rows(&self, j: usize) -> Option<(*const TKV::K, *const TKV::V)> {
        let (b, hk, _, k1, t) = self.here;
        if j < k1 {
            return Some(self.at(b, hk + t, j));
        }
        let (nb, nhk, nheads, nk0, nk1) = self.next?;
        let jn = nk0 + (j - k1);
        (jn < nk1).then(|| self.at(nb, nhk + t.min(nheads - 1), jn))
    }

    /// The addresses of key `j`'s K and V rows of KV head `hk`, sequence `b`.
    #[inline(always)]
    fn at(&self, b: usize, hk: usize, j: usize) -> (*const TKV::K, *const TKV::V) {
        let (k, v) = (&self.p.k, &self.p.v);
        (k.data.as_ptr().wrapping_add(k.offset(b, hk, j)), v.data.as_ptr().wrapping_add(v.offset(b, hk, j)))
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
    /// The state of rows with maxima `max[..R]` and sums `sum[..R]`.
    #[inline(always)]
    fn load(max: &[f32], sum: &[f32]) -> Self {
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
