//! The SIMD flash kernel: one generic body for every ISA, specialised at compile time per head
//! dim (`D`, 0 = the generic path with the head dim known only at run time) and per register
//! tile (`MR` keys/rows x `NRV` vectors) from `kernels/`.
//!
//! Query rows run along the vector lanes, in row tiles of `RT = NRV * lanes` rows. Per query
//! block (`br` rows of one batch entry and query head): pack Q^T (pre-scaled) once. Per key
//! block (`bc` keys): copy K and V rows into f32 scratch (a plain copy, or the f16 conversion),
//! then per row tile: `qk_tile` gives S^T key-major, the optional score terms and boundary masks
//! touch it, the online softmax runs down the keys with one running max and sum per lane (no
//! horizontal reductions), and `pv_tile` accumulates P.V in sub-tiles of `MR` rows, folding the
//! rescale (only when some row's max grew) into its accumulator load.

use super::microkernel::{additive_row, all_finite, as_f32s, pv_rows, pv_skip_zero, qk_tile, RowsAt};
use super::softmax::RowState;
use super::terms::any_terms;
use super::{strided_row_terms, v_rows, KRows};
use crate::element::KvPair;
use crate::plan::Tiles;
use crate::problem::Problem;
use crate::score::ScoreData;
use crate::simd::SimdExt;

#[inline(always)]
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

/// Buffers of one worker for one call, carved from its workspace (no allocation).
pub(crate) struct Scratch<'w> {
    pub qt: &'w mut [f32],
    pub k: &'w mut [f32],
    pub v: &'w mut [f32],
    pub s: &'w mut [f32],
    /// Output rows of the current block (pitch `dv_pad`), normalised when a block returns.
    pub acc: &'w mut [f32],
    pub lse: &'w mut [f32],
    pub max: &'w mut [f32],
    pub sum: &'w mut [f32],
    pub alpha: &'w mut [f32],
    pub row: &'w mut [f32],
    /// Each row's score factor, for kernels that apply it after the dot product (bf16).
    pub qs: &'w mut [f32],
    pub dv_pad: usize,
}

/// Sizes of the scratch buffers, in the order `Scratch` carves them.
fn scratch_parts(tiles: &Tiles, lanes: usize, head_dim: usize, v_head_dim: usize) -> [usize; 11] {
    let rt = tiles.nr;
    let br = round_up(tiles.br, rt);
    let bc = round_up(tiles.bc, tiles.mr);
    let dv_pad = round_up(v_head_dim, lanes);
    // Saturating: the planner rejects a total near the limit instead of wrapping.
    [br.saturating_mul(head_dim), bc.saturating_mul(head_dim), bc.saturating_mul(dv_pad), bc * rt, br.saturating_mul(dv_pad), br, br, br, rt, bc, br]
}

impl<'w> Scratch<'w> {
    /// f32 elements of workspace one worker needs.
    pub fn len(tiles: &Tiles, lanes: usize, head_dim: usize, v_head_dim: usize) -> usize {
        scratch_parts(tiles, lanes, head_dim, v_head_dim).iter().fold(0, |a: usize, &x| a.saturating_add(x))
    }

    /// `buf` holds at least [`Scratch::len`] elements; its contents do not matter (every
    /// buffer is written before it is read).
    pub fn new(mut buf: &'w mut [f32], tiles: &Tiles, lanes: usize, head_dim: usize, v_head_dim: usize) -> Self {
        let [qt, k, v, s, acc, lse, max, sum, alpha, row, qs] =
            scratch_parts(tiles, lanes, head_dim, v_head_dim).map(|n| super::carve(&mut buf, n));
        Self { qt, k, v, s, acc, lse, max, sum, alpha, row, qs, dv_pad: round_up(v_head_dim, lanes) }
    }
}

/// Computes rows `[i0, i1)` of batch `b`, query head `h` into `sc.acc` / `sc.lse`. A block
/// whose output is not all finite runs again with P.V skipping zero weights, so NaN or Inf in
/// the V row of a key the mask hides never reaches it (see [`pv_skip_zero`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_block<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    sc: &mut Scratch,
) {
    query_block_pass::<S, TKV, D, MR, NRV>(simd, p, tiles, (b, h, i0, i1), sc, false);
    if !all_finite(simd, &sc.acc[..(i1 - i0) * sc.dv_pad]) {
        query_block_pass::<S, TKV, D, MR, NRV>(simd, p, tiles, (b, h, i0, i1), sc, true);
    }
}

/// One pass of [`query_block`]; `skip_zero` picks the P.V that skips zero weights.
#[inline(always)]
pub(crate) fn query_block_pass<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    (b, h, i0, i1): (usize, usize, usize, usize),
    sc: &mut Scratch,
    skip_zero: bool,
) {
    let additive = matches!(p.score, ScoreData::Additive(_));
    let d = if D == 0 || additive { p.shape.head_dim } else { D };
    let dv = p.shape.v_head_dim;
    let lanes = S::F32_LANES;
    let rt = NRV * lanes;
    let bc = round_up(tiles.bc, MR);
    let dv_pad = sc.dv_pad;
    let dvv = dv_pad / lanes;
    let rows = i1 - i0;
    let rows_pad = round_up(rows, rt);
    let hk = p.kv_head(h);
    let kv_len = p.kv_len(b);
    let keys = p.masker.block(kv_len, i0, i1);
    let terms = any_terms(p);

    if !additive {
        pack_qt(p, b, h, i0, rows, rows_pad, d, rt, sc.qt);
    }
    start_rows(p, h, rows, rows_pad, sc);

    for (j0, n) in key_blocks(&keys, bc) {
        let bkeys = KeySource::new(simd, p, b, hk, j0, n, d, MR, sc.k);
        let (vrows, ld_v) = v_rows(simd, p, b, hk, j0, n, dv_pad, sc.v);

        for tile in 0..rows_pad / rt {
            let r0 = tile * rt;
            // The keys of this block the tile's own rows can see: tiles below a causal
            // diagonal stop early, tiles that see nothing here are skipped.
            let Some((n, mask)) = tile_keys(p, &keys, kv_len, i0, i1, r0, rt, j0, n) else { continue };
            let tile = TileRows { b, h, i0, r0, real: rt.min(rows.saturating_sub(r0)) };
            score_tile::<S, TKV, D, MR, NRV>(simd, p, &bkeys, sc.qt, &tile, j0, n, mask, terms, sc.s, sc.row);

            let rescale = online_softmax::<S, NRV>(
                simd,
                &mut sc.s[..n * rt],
                &mut sc.max[r0..r0 + rt],
                &mut sc.sum[r0..r0 + rt],
                sc.alpha,
            );
            super::scale_weights(simd, p, b, hk, j0, n, sc.s, rt, sc.row);

            let acc = S::as_mut_simd_f32s(&mut sc.acc[r0 * dv_pad..(r0 + rt) * dv_pad]).0;
            // Sub-tiles holding only padding rows (past the block's last row) are skipped.
            if skip_zero {
                let v = (as_f32s::<S>(vrows), RowsAt::Strided { at: 0, ld: ld_v * lanes });
                pv_skip_zero::<S, f32>(simd, n, rt.min(rows - r0), sc.s, rt, v, acc, (dvv, dvv), sc.alpha, rescale);
            } else {
                pv_rows::<S, MR, NRV>(simd, n, rt.min(rows - r0), sc.s, rt, vrows, ld_v, acc, dvv, sc.alpha, rescale);
            }
        }
    }
    finish_rows(rows, dv, sc);
}

/// Starts the online softmax of a query block: each row's state at its sink (padding rows at
/// -inf), the accumulators at 0.
#[inline(always)]
pub(crate) fn start_rows<TKV: KvPair>(p: &Problem<'_, TKV>, h: usize, rows: usize, rows_pad: usize, sc: &mut Scratch) {
    for r in 0..rows_pad {
        let st = if r < rows { RowState::start(p.sink(h)) } else { RowState::start(f32::NEG_INFINITY) };
        sc.max[r] = st.max;
        sc.sum[r] = st.sum;
    }
    sc.acc[..rows_pad * sc.dv_pad].fill(0.0);
}

/// The key blocks `(j0, n)` of a query block, at most `bc` keys each. Blocks never straddle
/// the edge of the keys every row sees, so interior blocks skip masking and the masked edges
/// stay narrow.
#[inline(always)]
pub(crate) fn key_blocks(keys: &crate::mask::BlockKeys, bc: usize) -> impl Iterator<Item = (usize, usize)> {
    let (u0, u1) = keys.union;
    let (c0, c1) = (keys.common.0.clamp(u0, u1), keys.common.1.clamp(u0, u1));
    let edges = if c0 < c1 { [c0, c1] } else { [u1, u1] };
    let mut j0 = u0;
    core::iter::from_fn(move || {
        (j0 < u1).then(|| {
            let seg_end = edges.into_iter().find(|&e| e > j0).unwrap_or(u1);
            let n = bc.min(seg_end - j0);
            let block = (j0, n);
            j0 += n;
            block
        })
    })
}

/// Ends a query block: each row normalised by its sum, its LSE stored.
#[inline(always)]
pub(crate) fn finish_rows(rows: usize, dv: usize, sc: &mut Scratch) {
    let dv_pad = sc.dv_pad;
    for r in 0..rows {
        let (inv, lse) = RowState { max: sc.max[r], sum: sc.sum[r] }.finish();
        sc.acc[r * dv_pad..r * dv_pad + dv].iter_mut().for_each(|a| *a *= inv);
        sc.lse[r] = lse;
    }
}

/// The keys of one key block as the score function reads them: K rows for the dot scores,
/// the prepared `k'` rows (f32, `a_pad` apart) for the additive one.
pub(crate) enum KeySource<'a> {
    Dot(KRows<'a>),
    Additive(&'a [f32]),
}

impl<'a> KeySource<'a> {
    /// Keys `j0..j0 + n` of KV head `hk`, batch `b` (`scratch` as for [`KRows::new`]).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn new<S: SimdExt, TKV: KvPair>(
        simd: S,
        p: &'a Problem<'a, TKV>,
        b: usize,
        hk: usize,
        j0: usize,
        n: usize,
        d: usize,
        mr: usize,
        scratch: &'a mut [f32],
    ) -> Self {
        match p.score {
            ScoreData::Additive(a) => KeySource::Additive(a.k_rows(&p.shape, b, hk, j0, n)),
            _ => KeySource::Dot(KRows::new(simd, p, b, hk, j0, n, d, mr, scratch)),
        }
    }
}

/// Which query rows a row tile holds: rows `i0 + r0 ..` of batch `b`, head `h`, `real` of them
/// (the rest of the tile's lanes are padding).
pub(crate) struct TileRows {
    pub b: usize,
    pub h: usize,
    pub i0: usize,
    pub r0: usize,
    pub real: usize,
}

/// How many keys from `j0` (of a block of `n`) the row tile at `r0` must score, and whether
/// some of its rows need the visibility mask there; `None` when the tile sees none of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_keys<TKV: KvPair>(
    p: &Problem<'_, TKV>,
    keys: &crate::mask::BlockKeys,
    kv_len: usize,
    i0: usize,
    i1: usize,
    r0: usize,
    rt: usize,
    j0: usize,
    n: usize,
) -> Option<(usize, bool)> {
    if keys.all_visible(j0, j0 + n) {
        return Some((n, false));
    }
    let tk = p.masker.block(kv_len, i0 + r0, (i0 + r0 + rt).min(i1));
    let n_tile = tk.union.1.saturating_sub(j0).min(n);
    if n_tile == 0 || tk.union.0 >= j0 + n_tile {
        return None;
    }
    Some((n_tile, !tk.all_visible(j0, j0 + n_tile)))
}

/// The final scores S^T of a row tile against keys `j0..j0 + n` (key-major: `NRV` vectors of
/// rows per key, into `s`): the score function, the per-key cosine factors, the optional terms
/// and, with `mask`, each row's visibility (masked keys get -inf, as do keys `n..` up to the
/// register tile). Shared by the fused pass and the alignment pass, so both see the same
/// numbers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_tile<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    keys: &KeySource<'_>,
    qt: &[f32],
    tile: &TileRows,
    j0: usize,
    n: usize,
    mask: bool,
    terms: bool,
    s: &mut [f32],
    row: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let rt = NRV * lanes;
    let n_pad = round_up(n, MR);
    let TileRows { b, h, i0, r0, real } = *tile;
    match keys {
        // S^T = K Q^T for the row tile, MR keys at a time.
        KeySource::Dot(k) => {
            let d = if D == 0 { p.shape.head_dim } else { D };
            let qt = S::as_simd_f32s(&qt[r0 * d..(r0 + rt) * d]).0;
            let s = S::as_mut_simd_f32s(&mut s[..n_pad * rt]).0;
            for g in 0..n_pad / MR {
                let (k, ld) = k.group(g);
                qk_tile::<S, MR, NRV>(simd, d, k, ld, qt, &mut s[g * MR * NRV..]);
            }
        }
        // One row at a time (the attention dim runs along the lanes); padding rows score 0.
        KeySource::Additive(k) => {
            let ScoreData::Additive(a) = p.score else { unreachable!("additive keys come with additive data") };
            let av = if D == 0 { a.a_pad / lanes } else { D / lanes };
            if real < rt {
                s[..n * rt].fill(0.0);
            }
            let (v, k) = (S::as_simd_f32s(a.v).0, S::as_simd_f32s(k).0);
            for r in 0..real {
                let q = S::as_simd_f32s(a.q_row(&p.shape, b, h, i0 + r0 + r)).0;
                additive_row(simd, av, q, v, k, n, &mut s[r..], rt);
            }
        }
    }
    finish_scores(simd, p, tile, j0, n, n_pad, mask, terms, s, rt, row);
}

/// What follows the score function on a row tile's S^T (`rt` rows per key, keys `j0..j0 + n`
/// of `n_pad`): the per-key cosine factors, the optional terms, each row's visibility with
/// `mask`, and -inf for the padding keys up to `n_pad`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_scores<S: SimdExt, TKV: KvPair>(
    simd: S,
    p: &Problem<'_, TKV>,
    tile: &TileRows,
    j0: usize,
    n: usize,
    n_pad: usize,
    mask: bool,
    terms: bool,
    s: &mut [f32],
    rt: usize,
    row: &mut [f32],
) {
    let TileRows { b, h, i0, r0, real } = *tile;
    super::scale_scores(simd, p, b, p.kv_head(h), j0, n, s, rt, row);
    // Optional terms and boundary masks, row by row (strided: rows are lanes here).
    if terms || mask {
        let kv_len = p.kv_len(b);
        for r in 0..real {
            let i = i0 + r0 + r;
            let interval = mask.then(|| p.masker.interval(kv_len, i));
            strided_row_terms(p, terms, interval, (b, h, i), j0, s, rt, r, &mut row[..n]);
        }
    }
    s[n * rt..n_pad * rt].fill(f32::NEG_INFINITY);
}

/// The attention probabilities of rows `[i0, i1)` of batch `b`, query head `h`, recomputed
/// from their final LSE (`lse[r]` for row `i0 + r`) in a second tiled pass: `exp(s - lse)` for
/// visible keys, 0 elsewhere. `probs` (if any) receives the rows, `seq_kv` apart and zeroed
/// here first; `coverage` (if any, `seq_kv` long) accumulates each key's sum over these rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn alignment_block<S: SimdExt, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    simd: S,
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    (b, h, i0, i1): (usize, usize, usize, usize),
    lse: &[f32],
    sc: &mut Scratch,
    mut probs: Option<&mut [f32]>,
    mut coverage: Option<&mut [f32]>,
) {
    let additive = matches!(p.score, ScoreData::Additive(_));
    let d = if D == 0 || additive { p.shape.head_dim } else { D };
    let lanes = S::F32_LANES;
    let rt = NRV * lanes;
    let bc = round_up(tiles.bc, MR);
    let rows = i1 - i0;
    let rows_pad = round_up(rows, rt);
    let (hk, kv_len, skv) = (p.kv_head(h), p.kv_len(b), p.shape.seq_kv);
    let keys = p.masker.block(kv_len, i0, i1);
    let terms = any_terms(p);
    if let Some(pr) = probs.as_deref_mut() {
        pr[..rows * skv].fill(0.0);
    }
    if !additive {
        pack_qt(p, b, h, i0, rows, rows_pad, d, rt, sc.qt);
    }
    // exp(s - shift): a row without any weight (lse = -inf) shifts by +inf, so all its
    // probabilities are exactly 0; padding rows likewise.
    for (r, shift) in sc.max[..rows_pad].iter_mut().enumerate() {
        *shift = match lse.get(r).filter(|_| r < rows) {
            Some(&l) if l != f32::NEG_INFINITY => l,
            _ => f32::INFINITY,
        };
    }
    let (u0, u1) = keys.union;
    let mut j0 = u0;
    while j0 < u1 {
        let n = bc.min(u1 - j0);
        let bkeys = KeySource::new(simd, p, b, hk, j0, n, d, MR, sc.k);
        for tile in 0..rows_pad / rt {
            let r0 = tile * rt;
            let Some((n, mask)) = tile_keys(p, &keys, kv_len, i0, i1, r0, rt, j0, n) else { continue };
            let real = rt.min(rows - r0);
            let tile = TileRows { b, h, i0, r0, real };
            score_tile::<S, TKV, D, MR, NRV>(simd, p, &bkeys, sc.qt, &tile, j0, n, mask, terms, sc.s, sc.row);
            let mut shift = [simd.splat_f32s(0.0); NRV];
            for (v, sh) in shift.iter_mut().enumerate() {
                *sh = S::as_simd_f32s(&sc.max[r0 + v * lanes..r0 + (v + 1) * lanes]).0[0];
            }
            let s = S::as_mut_simd_f32s(&mut sc.s[..n * rt]).0;
            for (c, key) in s.chunks_exact_mut(NRV).enumerate() {
                let mut total = simd.splat_f32s(0.0);
                for v in 0..NRV {
                    key[v] = simd.exp_f32s(simd.sub_f32s(key[v], shift[v]));
                    total = simd.add_f32s(total, key[v]);
                }
                if let Some(cov) = coverage.as_deref_mut() {
                    cov[j0 + c] += simd.reduce_sum_f32s(total);
                }
            }
            if let Some(pr) = probs.as_deref_mut() {
                for r in 0..real {
                    let dst = &mut pr[(r0 + r) * skv + j0..][..n];
                    for (c, x) in dst.iter_mut().enumerate() {
                        *x = sc.s[c * rt + r];
                    }
                }
            }
        }
        j0 += n;
    }
}

/// One key block of the online softmax for a row tile, down the keys. `s` is key-major
/// (`NRV` vectors of rows per key) and becomes the weights `exp(s - new_max)`; `max` / `sum`
/// are the rows' running state and `alpha` receives each row's rescale factor. Returns whether
/// any row's max grew (so the accumulator needs rescaling).
#[inline(always)]
pub(crate) fn online_softmax<S: SimdExt, const NRV: usize>(
    simd: S,
    s: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) -> bool {
    let lanes = S::F32_LANES;
    let s = S::as_mut_simd_f32s(s).0;
    let mut tile_max = [simd.splat_f32s(f32::NEG_INFINITY); NRV];
    for key in s.chunks_exact(NRV) {
        for v in 0..NRV {
            tile_max[v] = simd.max_f32s(tile_max[v], key[v]);
        }
    }
    let neg_inf = simd.splat_f32s(f32::NEG_INFINITY);
    let mut shift = [simd.splat_f32s(0.0); NRV];
    let mut alphas = [simd.splat_f32s(0.0); NRV];
    for v in 0..NRV {
        let old = simd.partial_load_f32s(&max[v * lanes..(v + 1) * lanes]);
        let new = simd.max_f32s(old, tile_max[v]);
        // A row that has seen nothing keeps max -inf; shifting by 0 keeps its weights 0
        // (exp(-inf) = 0), and its alpha exp(-inf - 0) = 0 multiplies an all-zero state.
        shift[v] = simd.select_f32s(simd.equal_f32s(new, neg_inf), simd.splat_f32s(0.0), new);
        alphas[v] = simd.exp_f32s(simd.sub_f32s(old, shift[v]));
        simd.partial_store_f32s(&mut max[v * lanes..(v + 1) * lanes], new);
    }
    let mut tile_sum = [simd.splat_f32s(0.0); NRV];
    for key in s.chunks_exact_mut(NRV) {
        for v in 0..NRV {
            let e = simd.exp_f32s(simd.sub_f32s(key[v], shift[v]));
            key[v] = e;
            tile_sum[v] = simd.add_f32s(tile_sum[v], e);
        }
    }
    for v in 0..NRV {
        let l = simd.partial_load_f32s(&sum[v * lanes..(v + 1) * lanes]);
        let l = simd.mul_add_e_f32s(l, alphas[v], tile_sum[v]);
        simd.partial_store_f32s(&mut sum[v * lanes..(v + 1) * lanes], l);
        simd.partial_store_f32s(&mut alpha[v * lanes..(v + 1) * lanes], alphas[v]);
    }
    alpha[..NRV * lanes].iter().any(|&a| a != 1.0)
}

/// Q^T of the block, pre-scaled, in row tiles: `qt[(tile * d + t) * rt + lane]` is element `t`
/// of row `tile * rt + lane`; padding rows are zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_qt<TKV: KvPair>(p: &Problem<'_, TKV>, b: usize, h: usize, i0: usize, rows: usize, rows_pad: usize, d: usize, rt: usize, qt: &mut [f32]) {
    for r in 0..rows_pad {
        let (tile, lane) = (r / rt, r % rt);
        let dst = &mut qt[tile * d * rt..(tile + 1) * d * rt];
        if r < rows {
            let scale = p.q_scale(b, h, i0 + r);
            p.q_row(b, h, i0 + r, d, |t, x| dst[t * rt + lane] = x * scale);
        } else {
            for t in 0..d {
                dst[t * rt + lane] = 0.0;
            }
        }
    }
}
