//! The AVX512_BF16 flash kernel: bf16 Q and K/V through `vdpbf16ps`, which does two
//! multiply-adds per f32 lane (pairs of bf16) where an FMA does one.
//!
//! The same blocking as the f32 kernel (`flash`): query rows along the lanes in row tiles of
//! `NRV` vectors, S^T key-major, the f32 online softmax and the f32 accumulators unchanged.
//! What differs is how the two products are fed:
//! - Q.K^T: Q^T is packed in head-dim pairs (`qt[(t/2) * rt + row]` holds elements `t, t+1` of
//!   the row as two bf16), so one `vdpbf16ps` against a broadcast K pair adds two depth steps.
//!   A K row's pairs are already adjacent in bf16 storage: K is read in place, never copied,
//!   whatever its layout (strided or paged). Q stays exactly as stored; the score factor
//!   (softmax scale, cosine's `1 / |q|`) multiplies the f32 scores afterwards.
//! - P.V: the weights are rounded to bf16 in key pairs (`pp[(j/2) * rt + row]` holds the
//!   weights of keys `j, j+1`), and V is packed once per key block key-pair interleaved
//!   (`vp[(j/2) * dvv + x]` lane `l` holds `V[j][16x + l], V[j+1][16x + l]`), so one
//!   `vdpbf16ps` per accumulator adds two keys.
//!
//! Accuracy: scores are exact bf16 x bf16 products summed in f32 (as the f32 kernel sums
//! them); the one extra rounding is P's, at most `2^-8` relative per weight (bf16 keeps 8 significant bits), so the output moves
//! by at most `2^-8 * max|v|` beyond the f32 kernel's bound (the normaliser is the f32 sum of
//! the unrounded weights). `vdpbf16ps` treats bf16 subnormals (below 2^-126) as zero, as the
//! instruction is defined to.
//!
//! A block whose output is not finite (NaN or Inf in the V row of a masked key, multiplied by
//! its zero weight) runs again on the f32 kernel's zero-skipping pass, as the f32 kernel does.

use super::flash::{self, finish_scores, tile_keys, Scratch, TileRows};
use super::microkernel::all_finite;
use super::terms::any_terms;
use crate::dtypes::AnyRef;
use crate::element::{DType, Element, KvPair};
use crate::plan::Tiles;
use crate::problem::Problem;
use crate::score::ScoreData;
use crate::simd::Bf16Dot;
use core::arch::x86_64::*;
use seq_macro::seq;

/// f32 lanes of a zmm register.
const L: usize = 16;

/// Whether a call runs here: bf16 Q and K/V (both read exactly as stored), a dot-product score
/// on Q as stored (no RoPE, no projection: those produce f32 rows that would need rounding),
/// and head dims of whole pairs.
pub(crate) fn takes<TKV: KvPair>(p: &Problem<'_, TKV>) -> bool {
    TKV::K::DTYPE == DType::Bf16 && TKV::V::DTYPE == DType::Bf16
        && matches!(p.q, AnyRef::Bf16(_))
        && p.rope.rotary_dim == 0
        && !matches!(p.score, ScoreData::Additive(_))
        && p.shape.head_dim.is_multiple_of(2)
        // Dequantization factors (kv_scales on a bf16 cache) run on the widening kernels.
        && matches!((p.k_factors, p.v_factors), (crate::quant::Factors::One, crate::quant::Factors::One))
}

#[inline(always)]
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

/// `f32` scratch as `u32` words: the packed bf16 pairs live in the f32 kernel's buffers.
#[inline(always)]
fn words(s: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment and every bit pattern is valid for
    // both; the borrow moves into the result.
    unsafe { core::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) }
}

/// `acc + a.pairs . b.pairs` per lane.
#[inline(always)]
fn dp(_: Bf16Dot, acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: a `Bf16Dot` exists only inside `run_avx512bf16`, where AVX512_BF16 is present and
    // enabled; registers only.
    unsafe { _mm512_dpbf16_ps(acc, core::mem::transmute::<__m512i, __m512bh>(a), core::mem::transmute::<__m512i, __m512bh>(b)) }
}

/// The word permutation that interleaves the two 256-bit halves of a register: output pair `l`
/// is (word `l`, word `16 + l`).
#[inline(always)]
fn interleave_halves(_: Bf16Dot) -> __m512i {
    const IDX: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut l = 0;
        while l < 16 {
            idx[2 * l] = l as u16;
            idx[2 * l + 1] = 16 + l as u16;
            l += 1;
        }
        idx
    };
    // SAFETY: 64 readable bytes; AVX-512F is enabled with every Bf16Dot.
    unsafe { _mm512_loadu_si512(IDX.as_ptr().cast()) }
}

/// Computes rows `[i0, i1)` of batch `b`, query head `h` into `sc.acc` / `sc.lse`, like
/// [`flash::query_block`]; `p` is a call [`takes`] accepts.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_block<TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    bf: Bf16Dot,
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    sc: &mut Scratch,
) {
    dot_pass::<TKV, D, MR, NRV>(bf, p, tiles, (b, h, i0, i1), sc);
    if !all_finite(bf.v4, &sc.acc[..(i1 - i0) * sc.dv_pad]) {
        flash::query_block_pass::<pulp::x86::V4, TKV, D, MR, NRV>(bf.v4, p, tiles, (b, h, i0, i1), sc, true);
    }
}

#[inline(always)]
fn dot_pass<TKV: KvPair, const D: usize, const MR: usize, const NRV: usize>(
    bf: Bf16Dot,
    p: &Problem<'_, TKV>,
    tiles: &Tiles,
    (b, h, i0, i1): (usize, usize, usize, usize),
    sc: &mut Scratch,
) {
    let d = if D == 0 { p.shape.head_dim } else { D };
    let d2 = d / 2;
    let dv = p.shape.v_head_dim;
    let rt = NRV * L;
    let bc = round_up(tiles.bc, MR);
    let dv_pad = sc.dv_pad;
    let dvv = dv_pad / L;
    let rows = i1 - i0;
    let rows_pad = round_up(rows, rt);
    let hk = p.kv_head(h);
    let kv_len = p.kv_len(b);
    let keys = p.masker.block(kv_len, i0, i1);
    let terms = any_terms(p);
    let k = TKV::K::as_bf16_slice(p.k.data).expect("takes() admits bf16 K only");

    pack_q_pairs(p, b, h, i0, rows, rows_pad, d, rt, words(sc.qt), sc.qs);
    flash::start_rows(p, h, rows, rows_pad, sc);

    for (j0, n) in flash::key_blocks(&keys, bc) {
        pack_v_pairs(bf, p, b, hk, j0, n, dv, dvv, words(sc.v));

        for tile in 0..rows_pad / rt {
            let r0 = tile * rt;
            let Some((n, mask)) = tile_keys(p, &keys, kv_len, i0, i1, r0, rt, j0, n) else { continue };
            let tile = TileRows { b, h, i0, r0, real: rt.min(rows.saturating_sub(r0)) };
            let n_pad = round_up(n, MR);
            let qt = &words(sc.qt)[r0 * d2..(r0 + rt) * d2];
            let mut at = [0usize; MR];
            for g in 0..n_pad / MR {
                // The group's K rows; a partial last group repeats its last key (scored, then
                // set to -inf with the padding).
                let m = MR.min(n - g * MR);
                p.k.row_offsets(b, hk, j0 + g * MR, &mut at[..m]);
                for x in m..MR {
                    at[x] = at[m - 1];
                }
                let mut kr = [&k[..0]; MR];
                for (row, &o) in kr.iter_mut().zip(&at) {
                    *row = &k[o..o + d];
                }
                qk_tile_pairs::<MR, NRV>(bf, d2, &kr, qt, &sc.qs[r0..r0 + rt], &mut sc.s[g * MR * rt..(g + 1) * MR * rt]);
            }
            finish_scores(bf.v4, p, &tile, j0, n, n_pad, mask, terms, sc.s, rt, sc.row);

            let rescale = flash::online_softmax::<pulp::x86::V4, NRV>(
                bf.v4,
                &mut sc.s[..n * rt],
                &mut sc.max[r0..r0 + rt],
                &mut sc.sum[r0..r0 + rt],
                sc.alpha,
            );
            // An odd key count: the pair's second weight is 0 (its scores were -inf padding).
            let n2 = n.div_ceil(2);
            sc.s[n * rt..2 * n2 * rt].fill(0.0);
            weights_to_pairs::<NRV>(bf, sc.s, n2);
            let acc = &mut sc.acc[r0 * dv_pad..(r0 + rt) * dv_pad];
            pv_rows_pairs::<MR, NRV>(bf, n2, rt.min(rows - r0), words(sc.s), rt, words(sc.v), dvv, acc, sc.alpha, rescale);
        }
    }
    flash::finish_rows(rows, dv, sc);
}

/// Q^T of the block in head-dim pairs: `qt[(tile * d/2 + t/2) * rt + lane]` holds elements
/// `t` (low half) and `t + 1` of row `tile * rt + lane` as stored; `qs[r]` its score factor.
/// Padding rows are zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_q_pairs<TKV: KvPair>(p: &Problem<'_, TKV>, b: usize, h: usize, i0: usize, rows: usize, rows_pad: usize, d: usize, rt: usize, qt: &mut [u32], qs: &mut [f32]) {
    let d2 = d / 2;
    for r in 0..rows_pad {
        let (tile, lane) = (r / rt, r % rt);
        let dst = &mut qt[tile * d2 * rt..(tile + 1) * d2 * rt];
        for t2 in 0..d2 {
            dst[t2 * rt + lane] = 0;
        }
        if r < rows {
            qs[r] = p.q_scale(b, h, i0 + r);
            // Q is bf16 (see `takes`), so its widened value's top half is the stored bf16.
            p.q_row(b, h, i0 + r, d, |t, x| dst[(t / 2) * rt + lane] |= (x.to_bits() >> 16) << (16 * (t % 2)));
        } else {
            qs[r] = 0.0;
        }
    }
}

/// One depth pair of the S^T tile: NRV vectors of Q^T pairs, one broadcast K pair per key.
#[inline(always)]
fn qk_step<const MR: usize, const NRV: usize>(bf: Bf16Dot, acc: &mut [[__m512; NRV]; MR], k: &[*const u32; MR], qt: &[u32], t2: usize) {
    let mut q = [bf.v4.avx512f._mm512_setzero_si512(); NRV];
    for v in 0..NRV {
        // SAFETY: `qt` holds d/2 * NRV * 16 words (checked by the caller) and t2 < d/2.
        q[v] = unsafe { _mm512_loadu_si512(qt.as_ptr().add((t2 * NRV + v) * L).cast()) };
    }
    for m in 0..MR {
        // SAFETY: each K row holds d = 2 * (d/2) bf16 (checked by the caller): word t2 < d/2
        // is in it; unaligned reads are fine.
        let kb = bf.v4.avx512f._mm512_set1_epi32(unsafe { k[m].add(t2).read_unaligned() } as i32);
        for v in 0..NRV {
            acc[m][v] = dp(bf, acc[m][v], q[v], kb);
        }
    }
}

/// `s[(m * NRV + v) * 16 + l]` = `qs[v * 16 + l]` * the dot product of K row `m` with Q row
/// `v * 16 + l` of the tile, for MR keys.
#[allow(clippy::identity_op)]
#[inline(always)]
fn qk_tile_pairs<const MR: usize, const NRV: usize>(bf: Bf16Dot, d2: usize, k: &[&[half::bf16]; MR], qt: &[u32], qs: &[f32], s: &mut [f32]) {
    let qt = &qt[..d2 * NRV * L];
    let (qs, s) = (&qs[..NRV * L], &mut s[..MR * NRV * L]);
    let mut kp = [core::ptr::null::<u32>(); MR];
    for (p, row) in kp.iter_mut().zip(k) {
        assert!(row.len() >= 2 * d2, "a K row holds the head dim");
        *p = row.as_ptr().cast::<u32>();
    }
    let zero = bf.v4.avx512f._mm512_setzero_ps();
    let mut acc = [[zero; NRV]; MR];
    let mut t2 = 0;
    while t2 + 4 <= d2 {
        seq!(U in 0..4 {
            qk_step::<MR, NRV>(bf, &mut acc, &kp, qt, t2 + U);
        });
        t2 += 4;
    }
    while t2 < d2 {
        qk_step::<MR, NRV>(bf, &mut acc, &kp, qt, t2);
        t2 += 1;
    }
    for v in 0..NRV {
        // SAFETY: in bounds of the slices sliced above; AVX-512F is enabled.
        let f = unsafe { _mm512_loadu_ps(qs.as_ptr().add(v * L)) };
        for m in 0..MR {
            unsafe { _mm512_storeu_ps(s.as_mut_ptr().add((m * NRV + v) * L), _mm512_mul_ps(acc[m][v], f)) };
        }
    }
}

/// The weights of a row tile (key-major f32, `NRV` vectors per key, `2 * n2` keys) rounded to
/// bf16 in key pairs, in place: vector `c * NRV + v` becomes the pairs of keys `2c, 2c + 1`.
/// (Vector `c * NRV + v` is written after vectors `2c * NRV + v` and `(2c + 1) * NRV + v` are
/// read, and no later step reads it.)
#[inline(always)]
fn weights_to_pairs<const NRV: usize>(bf: Bf16Dot, s: &mut [f32], n2: usize) {
    let s = &mut s[..2 * n2 * NRV * L];
    let idx = interleave_halves(bf);
    for c in 0..n2 {
        for v in 0..NRV {
            // SAFETY: every offset is inside `s` (sliced above); AVX-512F/BW and AVX512_BF16
            // are enabled with every Bf16Dot.
            unsafe {
                let a = _mm512_loadu_ps(s.as_ptr().add((2 * c * NRV + v) * L));
                let b = _mm512_loadu_ps(s.as_ptr().add(((2 * c + 1) * NRV + v) * L));
                // Low half: key 2c's 16 rows, high half: key 2c+1's (round to nearest even).
                let x = core::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                _mm512_storeu_si512(s.as_mut_ptr().add((c * NRV + v) * L).cast(), _mm512_permutexvar_epi16(idx, x));
            }
        }
    }
}

/// V rows `j0..j0 + n` of KV head `hk`, batch `b`, key-pair interleaved into `dst`:
/// `dst[((j/2) * dvv + x) * 16 + l]` holds `V[j][16x + l]` (low half) and `V[j+1][16x + l]`;
/// dims past `dv` and the second key of an odd last pair are zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_v_pairs<TKV: KvPair>(bf: Bf16Dot, p: &Problem<'_, TKV>, b: usize, hk: usize, j0: usize, n: usize, dv: usize, dvv: usize, dst: &mut [u32]) {
    let v = TKV::V::as_bf16_slice(p.v.data).expect("takes() admits bf16 V only");
    let n2 = n.div_ceil(2);
    let dst = &mut dst[..n2 * dvv * L];
    let idx = interleave_halves(bf);
    let mut at = [0usize; 64];
    for c0 in (0..n).step_by(at.len()) {
        let m = at.len().min(n - c0);
        p.v.row_offsets(b, hk, j0 + c0, &mut at[..m]);
        for c in (0..m).step_by(2) {
            let lo = &v[at[c]..at[c] + dv];
            let hi = if c + 1 < m { Some(&v[at[c + 1]..at[c + 1] + dv]) } else { None };
            let pair = (c0 + c) / 2;
            for x in 0..dvv {
                let (a, z) = (load_16(bf, lo, x), hi.map_or(bf.v4.avx._mm256_setzero_si256(), |r| load_16(bf, r, x)));
                // SAFETY: `pair * dvv + x < n2 * dvv` (dst sliced above); AVX-512F/BW enabled.
                unsafe {
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), z);
                    _mm512_storeu_si512(dst.as_mut_ptr().add((pair * dvv + x) * L).cast(), _mm512_permutexvar_epi16(idx, both));
                }
            }
        }
    }
}

/// Elements `16x .. 16x + 16` of a bf16 row, zero past its end.
#[inline(always)]
fn load_16(_: Bf16Dot, row: &[half::bf16], x: usize) -> __m256i {
    let at = x * L;
    if at + L <= row.len() {
        // SAFETY: 16 elements = 32 bytes inside the row; AVX is enabled.
        unsafe { _mm256_loadu_si256(row.as_ptr().add(at).cast()) }
    } else {
        let mut buf = [0u16; L];
        for (d, s) in buf.iter_mut().zip(row.get(at..).unwrap_or(&[])) {
            *d = s.to_bits();
        }
        // SAFETY: a 32-byte local; AVX is enabled.
        unsafe { _mm256_loadu_si256(buf.as_ptr().cast()) }
    }
}

/// `o[r][x0..x0 + NV]` = `o[r][x0..] * alpha[r]` (when `rescale`) + the sum over key pairs
/// `c < n2` of the weight pair `pp[c * rt + r]` . the V pair vectors `vp[c * dvv + x0 ..]`, for
/// MR rows (`o` at pitch `dvv` vectors).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tile_pairs<const MR: usize, const NV: usize>(
    bf: Bf16Dot,
    n2: usize,
    pp: &[u32],
    rt: usize,
    vp: &[u32],
    dvv: usize,
    x0: usize,
    o: &mut [f32],
    alpha: &[f32],
    rescale: bool,
) {
    assert!(x0 + NV <= dvv && o.len() >= ((MR - 1) * dvv + x0 + NV) * L && alpha.len() >= MR);
    if n2 > 0 {
        assert!(pp.len() >= (n2 - 1) * rt + MR && vp.len() >= ((n2 - 1) * dvv + x0 + NV) * L);
    }
    let zero = bf.v4.avx512f._mm512_setzero_ps();
    let mut acc = [[zero; NV]; MR];
    // SAFETY (every block below): the offsets stay inside the slices (asserted above);
    // AVX-512F is enabled with every Bf16Dot.
    for r in 0..MR {
        let a = bf.v4.avx512f._mm512_set1_ps(alpha[r]);
        for x in 0..NV {
            let cur = unsafe { _mm512_loadu_ps(o.as_ptr().add((r * dvv + x0 + x) * L)) };
            acc[r][x] = if rescale { bf.v4.avx512f._mm512_mul_ps(cur, a) } else { cur };
        }
    }
    for c in 0..n2 {
        let mut vv = [bf.v4.avx512f._mm512_setzero_si512(); NV];
        for x in 0..NV {
            vv[x] = unsafe { _mm512_loadu_si512(vp.as_ptr().add((c * dvv + x0 + x) * L).cast()) };
        }
        for r in 0..MR {
            let pb = bf.v4.avx512f._mm512_set1_epi32(unsafe { *pp.get_unchecked(c * rt + r) } as i32);
            for x in 0..NV {
                acc[r][x] = dp(bf, acc[r][x], pb, vv[x]);
            }
        }
    }
    for r in 0..MR {
        for x in 0..NV {
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add((r * dvv + x0 + x) * L), acc[r][x]) };
        }
    }
}

/// P.V of a row tile (`rows` real rows) over `n2` key pairs, as `microkernel::pv_rows` does it
/// for f32: key pairs in chunks that keep their V slices in L1, dims `NV` vectors at a time,
/// rows `MR` at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_rows_pairs<const MR: usize, const NV: usize>(
    bf: Bf16Dot,
    n2: usize,
    rows: usize,
    pp: &[u32],
    rt: usize,
    vp: &[u32],
    dvv: usize,
    o: &mut [f32],
    alpha: &[f32],
    rescale: bool,
) {
    // Pairs per pass: 32 keys, as the f32 kernel (see `pv_rows`); V pairs are as wide per key
    // pair as f32 V rows are per key, so the same chunk fits L1.
    const PV_PAIRS: usize = 16;
    let mut c0 = 0;
    while c0 < n2 {
        let kc = if n2 <= 2 * PV_PAIRS { n2 } else { PV_PAIRS.min(n2 - c0) };
        let (pp, vp) = (&pp[c0 * rt..], &vp[c0 * dvv * L..]);
        let rescale = rescale && c0 == 0;
        let mut x = 0;
        while x < dvv {
            let wide = x + NV <= dvv;
            for sub in (0..rows).step_by(MR) {
                let (pp, alpha, o) = (&pp[sub..], &alpha[sub..sub + MR], &mut o[sub * dvv * L..]);
                if wide {
                    pv_tile_pairs::<MR, NV>(bf, kc, pp, rt, vp, dvv, x, o, alpha, rescale);
                } else {
                    pv_tile_pairs::<MR, 1>(bf, kc, pp, rt, vp, dvv, x, o, alpha, rescale);
                }
            }
            x += if wide { NV } else { 1 };
        }
        c0 += kc;
    }
}
