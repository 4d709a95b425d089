//! Per-element score terms and masks, shared by every kernel. They run only when an option
//! asks for them (and masks only on tiles that straddle a row's visible interval), so plain
//! attention never pays for them.

use crate::element::KvPair;
use crate::problem::Problem;

/// Softcap, bias and ALiBi for query row `i` over keys `j0..j0 + s.len()`; `s` already holds
/// `scale * q.k`.
#[inline]
pub(crate) fn score_terms<TKV: KvPair>(p: &Problem<'_, TKV>, b: usize, h: usize, i: usize, j0: usize, s: &mut [f32]) {
    if let Some(c) = p.params.softcap {
        let inv = 1.0 / c;
        s.iter_mut().for_each(|x| *x = c * (*x * inv).tanh());
    }
    if let Some(bias) = &p.params.bias {
        let o = bias.row(b, h, i) + j0;
        let n = s.len();
        s.iter_mut().zip(&bias.data[o..o + n]).for_each(|(x, &bb)| *x += bb);
    }
    if let Some(slopes) = p.params.alibi_slopes {
        let slope = slopes[h];
        // j - (i + off), as an exact integer before it becomes f32.
        let pos = (i + p.kv_len(b)) as i64 - p.shape.seq_q as i64;
        for (c, x) in s.iter_mut().enumerate() {
            *x += slope * ((j0 + c) as i64 - pos) as f32;
        }
    }
}

/// Whether any per-element term is on.
#[inline]
pub(crate) fn any_terms<TKV: KvPair>(p: &Problem<'_, TKV>) -> bool {
    p.params.softcap.is_some() || p.params.bias.is_some() || p.params.alibi_slopes.is_some()
}

/// Sets to -inf the scores of keys `j0 + c` outside the row's visible interval `[lo, hi)`.
#[inline]
pub(crate) fn mask_outside(s: &mut [f32], j0: usize, (lo, hi): (usize, usize)) {
    let n = s.len();
    let a = lo.saturating_sub(j0).min(n);
    let e = hi.saturating_sub(j0).clamp(a, n);
    s[..a].fill(f32::NEG_INFINITY);
    s[e..].fill(f32::NEG_INFINITY);
}
