//! The portable flash kernel: plain Rust, no intrinsics.
//!
//! It is the fallback for CPUs the SIMD kernels do not cover and the baseline they are
//! measured against. The loops are ordered so the compiler can vectorise them with the
//! baseline ISA without reassociating sums: Q.K^T runs over a packed K^T tile (keys along the
//! inner loop), P.V over V rows (head dim along the inner loop).

use super::softmax::RowState;
use super::terms::{mask_outside, score_terms};
use crate::element::{Element, KvPair};
use crate::plan::Tiles;
use crate::problem::Problem;
use crate::score::{AdditiveData, ScoreData};

/// Buffers of one worker for one call, carved from its workspace (no allocation).
pub(crate) struct Scratch<'w> {
    q: &'w mut [f32],
    kt: &'w mut [f32],
    vt: &'w mut [f32],
    s: &'w mut [f32],
    /// Output rows of the current block; normalised when `query_block` returns.
    pub acc: &'w mut [f32],
    /// LSE of the rows of the current block.
    pub lse: &'w mut [f32],
    max: &'w mut [f32],
    sum: &'w mut [f32],
}

fn scratch_parts(tiles: &Tiles, head_dim: usize, v_head_dim: usize) -> [usize; 8] {
    let (br, bc) = (tiles.br, tiles.bc);
    // Saturating: the planner rejects a total near the limit instead of wrapping.
    [br.saturating_mul(head_dim), head_dim.saturating_mul(kt_pitch(bc)), bc.saturating_mul(v_head_dim), br * bc, br.saturating_mul(v_head_dim), br, br, br]
}

impl<'w> Scratch<'w> {
    /// f32 elements of workspace one worker needs.
    pub fn len(tiles: &Tiles, head_dim: usize, v_head_dim: usize) -> usize {
        scratch_parts(tiles, head_dim, v_head_dim).iter().fold(0, |a: usize, &x| a.saturating_add(x))
    }

    /// `buf` holds at least [`Scratch::len`] elements, contents irrelevant.
    pub fn new(mut buf: &'w mut [f32], tiles: &Tiles, head_dim: usize, v_head_dim: usize) -> Self {
        let [q, kt, vt, s, acc, lse, max, sum] = scratch_parts(tiles, head_dim, v_head_dim).map(|n| super::carve(&mut buf, n));
        Self { q, kt, vt, s, acc, lse, max, sum }
    }
}

/// Row pitch of the packed K^T tile: one cache line more than the block, so the rows of the
/// tile (1 KiB apart for 256 keys) do not all fall into the same few L1 sets.
fn kt_pitch(bc: usize) -> usize {
    bc + 16
}

/// Computes the rows `[i0, i1)` of batch `b`, query head `h` (`i1 - i0 <= tiles.br`) into
/// `sc.acc` (normalised, `v_head_dim` per row) and `sc.lse`.
pub(crate) fn query_block<TKV: KvPair>(
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    sc: &mut Scratch,
) {
    // One copy per kind of score, chosen once per block: with a single copy, LLVM hoisted the
    // additive arm's slice-bound arithmetic out of the row loop and the backend turned it into
    // a branch, so dot-score calls branched on the bytes of the inactive `Additive` variant
    // (harmless, the result was never used, but valgrind rightly cannot tell). The dot copy
    // never reads the additive payload at all.
    match p.score {
        ScoreData::Additive(a) => block::<TKV, true>(p, Some(a), tiles, b, h, i0, i1, sc),
        _ => block::<TKV, false>(p, None, tiles, b, h, i0, i1, sc),
    }
}

/// [`query_block`] for the additive score (`ADDITIVE`, with its data) or the dot scores.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<TKV: KvPair, const ADDITIVE: bool>(
    p: &Problem<'_, TKV>,
    additive: Option<AdditiveData<'_>>,
    tiles: &Tiles,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    sc: &mut Scratch,
) {
    let (d, dv, bc) = (p.shape.head_dim, p.shape.v_head_dim, tiles.bc);
    let pitch = kt_pitch(bc);
    let rows = i1 - i0;
    let hk = p.kv_head(h);
    let kv_len = p.kv_len(b);
    let keys = p.masker.block(kv_len, i0, i1);

    let dot = !ADDITIVE;
    for r in 0..rows {
        // Q as given (the additive score reads its prepared q' rows instead).
        if dot {
            let dst = &mut sc.q[r * d..(r + 1) * d];
            p.q_row(b, h, i0 + r, d, |t, x| dst[t] = x);
        }
        let st = RowState::start(p.sink(h));
        (sc.max[r], sc.sum[r]) = (st.max, st.sum);
    }
    sc.acc[..rows * dv].fill(0.0);

    let mut j0 = keys.union.0;
    while j0 < keys.union.1 {
        let j1 = (j0 + bc).min(keys.union.1);
        let n = j1 - j0;
        // Transpose K in groups of 16 keys, so the writes of each group stay in a few lines
        // (the additive score reads its prepared k' rows instead).
        // A quantized cache is dequantized as it is packed (`value = factor * code`), its
        // factors gathered into the score buffer, which the rows overwrite afterwards.
        let f = &mut sc.s[..n];
        let k_scaled = p.k_factors.fill(b, hk, j0, f);
        for c0 in (0..n).step_by(16).filter(|_| dot) {
            for c in c0..(c0 + 16).min(n) {
                let fc = if k_scaled { f[c] } else { 1.0 };
                let row = p.k.row(b, hk, j0 + c, d);
                for t in 0..d {
                    sc.kt[t * pitch + c] = fc * TKV::K::value(row, t);
                }
            }
        }
        let v_scaled = p.v_factors.fill(b, hk, j0, f);
        for c in 0..n {
            let fc = if v_scaled { f[c] } else { 1.0 };
            let row = &mut sc.vt[c * dv..(c + 1) * dv];
            if fc == 0.0 {
                // A zero factor contributes nothing, like a zero weight (the SIMD kernels fold
                // it into the weight): 0 times a NaN in the row does not reach the output.
                row.fill(0.0);
                continue;
            }
            let src = p.v.row(b, hk, j0 + c, dv);
            for (t, dst) in row.iter_mut().enumerate() {
                *dst = fc * TKV::V::value(src, t);
            }
        }
        let all_visible = keys.all_visible(j0, j1);

        for r in 0..rows {
            let s = &mut sc.s[r * bc..r * bc + n];
            match additive.filter(|_| ADDITIVE) {
                Some(a) => {
                    let q = a.q_row(&p.shape, b, h, i0 + r);
                    let k = a.k_rows(&p.shape, b, hk, j0, n);
                    for (c, x) in s.iter_mut().enumerate() {
                        let kc = &k[c * a.a_pad..(c + 1) * a.a_pad];
                        *x = q.iter().zip(kc).zip(a.v).map(|((&qa, &ka), &va)| va * (qa + ka).tanh()).sum();
                    }
                }
                None => {
                    s.fill(0.0);
                    for (t, &qv) in sc.q[r * d..(r + 1) * d].iter().enumerate() {
                        for (x, &kv) in s.iter_mut().zip(&sc.kt[t * pitch..t * pitch + n]) {
                            *x += qv * kv;
                        }
                    }
                    let scale = p.q_scale(b, h, i0 + r);
                    s.iter_mut().for_each(|x| *x *= scale);
                    if let Some(scales) = p.key_scales(b, hk, j0, n) {
                        s.iter_mut().zip(scales).for_each(|(x, &f)| *x *= f);
                    }
                }
            }
            score_terms(p, b, h, i0 + r, j0, s);
            if !all_visible {
                mask_outside(s, j0, p.masker.interval(kv_len, i0 + r));
            }

            // Online softmax: rescale what was accumulated only when the max grows.
            let (st_max, st_sum) = (&mut sc.max[r], &mut sc.sum[r]);
            let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = st_max.max(tile_max);
            if new_max == f32::NEG_INFINITY {
                continue; // nothing visible to this row yet
            }
            let mut tile_sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - new_max).exp();
                tile_sum += *x;
            }
            let acc = &mut sc.acc[r * dv..(r + 1) * dv];
            if new_max > *st_max {
                let alpha = (*st_max - new_max).exp();
                acc.iter_mut().for_each(|a| *a *= alpha);
                *st_sum *= alpha;
            }
            *st_sum += tile_sum;
            *st_max = new_max;

            // A zero weight (a masked key) is skipped, not multiplied: 0 times a NaN or Inf
            // left in an invisible cache slot's V row would reach the row.
            for (c, &pc) in s.iter().enumerate().filter(|&(_, &pc)| pc != 0.0) {
                for (a, &vv) in acc.iter_mut().zip(&sc.vt[c * dv..(c + 1) * dv]) {
                    *a += pc * vv;
                }
            }
        }
        j0 = j1;
    }

    for r in 0..rows {
        let (inv, lse) = RowState { max: sc.max[r], sum: sc.sum[r] }.finish();
        sc.acc[r * dv..(r + 1) * dv].iter_mut().for_each(|a| *a *= inv);
        sc.lse[r] = lse;
    }
}
