//! Kernels: each computes the final (normalised) output rows and LSE of one query block.
//! They never write to the caller's output; `store` does.

#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16dot;
pub(crate) mod decode;
pub(crate) mod decode_few;
pub(crate) mod flash;
pub(crate) mod microkernel;
pub(crate) mod portable;
pub(crate) mod softmax;
pub(crate) mod terms;

use crate::element::{Element, KvPair};

/// Splits the first `n` elements off a workspace buffer.
pub(crate) fn carve<'w>(buf: &mut &'w mut [f32], n: usize) -> &'w mut [f32] {
    let (head, tail) = core::mem::take(buf).split_at_mut(n);
    *buf = tail;
    head
}

/// `dst[..values] = src` as f32: f16, bf16, int8, fp8 and q8_0 blocks are widened in registers a
/// vector at a time, f32 copied.
#[inline(always)]
pub(crate) fn convert_row<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, src: &[T], dst: &mut [f32]) {
    let dst = &mut dst[..src.len() * T::BLOCK];
    if let Some(blocks) = T::as_q8_0_slice(src) {
        // Whole vectors: a block's 32 values are whole vectors on every ISA.
        for (t, d) in S::as_mut_simd_f32s(dst).0.iter_mut().enumerate() {
            *d = simd.load_q8_0s(blocks, t * S::F32_LANES);
        }
    } else if let Some(h) = T::as_f16_slice(src) {
        widen_row(simd, h, dst);
    } else if let Some(h) = T::as_bf16_slice(src) {
        widen_row(simd, h, dst);
    } else if let Some(h) = T::as_i8_slice(src) {
        widen_row(simd, h, dst);
    } else if let Some(h) = T::as_e4m3_slice(src) {
        widen_row(simd, h, dst);
    } else if let Some(h) = T::as_e5m2_slice(src) {
        widen_row(simd, h, dst);
    } else {
        for (d, x) in dst.iter_mut().zip(src) {
            *d = x.to_f32();
        }
    }
}

/// `dst = src` widened: whole vectors in registers, the tail element by element.
#[inline(always)]
fn widen_row<S: crate::simd::SimdExt, H: crate::simd::Widen>(simd: S, h: &[H], dst: &mut [f32]) {
    let lanes = S::F32_LANES;
    let whole = h.len() / lanes * lanes;
    let (vecs, _) = S::as_mut_simd_f32s(&mut dst[..whole]);
    // Two vectors per step: one 128-bit load's worth of 16-bit values on NEON.
    let mut pairs = vecs.chunks_exact_mut(2);
    for (i, d) in pairs.by_ref().enumerate() {
        (d[0], d[1]) = H::load_pair(simd, &h[2 * i * lanes..]);
    }
    if let [d] = pairs.into_remainder() {
        *d = H::load(simd, &h[whole - lanes..]);
    }
    for (d, &x) in dst[whole..].iter_mut().zip(&h[whole..]) {
        *d = x.widen();
    }
}

/// Rows `j0..j0 + n` of K or V (KV head `hk` of batch `b`), converted to f32 at pitch `pitch`
/// (zero-padded past `width`); rows `n..n_pad` are zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_rows<S: crate::simd::SimdExt, T: crate::element::Element>(
    simd: S,
    t: &crate::kv::KvSource<'_, T>,
    b: usize,
    hk: usize,
    j0: usize,
    n: usize,
    n_pad: usize,
    width: usize,
    pitch: usize,
    dst: &mut [f32],
) {
    // Row offsets a chunk at a time: one page-table lookup per page, not a division per row.
    let mut at = [0usize; 64];
    for c0 in (0..n).step_by(at.len()) {
        let m = at.len().min(n - c0);
        t.row_offsets(b, hk, j0 + c0, &mut at[..m]);
        for (c, &o) in (c0..c0 + m).zip(&at[..m]) {
            let row = &mut dst[c * pitch..(c + 1) * pitch];
            convert_row(simd, &t.data[o..o + width / T::BLOCK], row);
            row[width..].fill(0.0);
        }
    }
    dst[n * pitch..n_pad * pitch].fill(0.0);
}

/// The K rows of one key block as `qk_tile` reads them, in groups of `mr` keys: f32 K is read in
/// place (only a partial last group is copied, zero-padded, into scratch); other storage is
/// widened into scratch.
pub(crate) struct KRows<'a> {
    src: &'a [f32],
    base: usize,
    ld: usize,
    full_groups: usize,
    packed: &'a [f32],
    d: usize,
    mr: usize,
}

impl<'a> KRows<'a> {
    /// Keys `j0..j0 + n` of KV head `hk`, batch `b`; `scratch` holds `round_up(n, mr) * d`.
    /// `d` is the head dim as the caller knows it: pass the specialisation's constant, so the
    /// packed groups' pitch stays a compile-time constant in `qk_tile`'s addressing.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn new<S: crate::simd::SimdExt, TKV: KvPair>(
        simd: S,
        p: &'a crate::problem::Problem<'a, TKV>,
        b: usize,
        hk: usize,
        j0: usize,
        n: usize,
        d: usize,
        mr: usize,
        scratch: &'a mut [f32],
    ) -> Self {
        let n_pad = n.div_ceil(mr) * mr;
        // In place when the block's rows lie one stride apart (always, unless a page ends
        // inside the block).
        let (run, ld) = p.k.run(j0);
        let in_place = TKV::K::as_f32_slice(p.k.data).filter(|_| run >= n);
        let full = if in_place.is_some() { n - n % mr } else { 0 };
        pack_rows(simd, &p.k, b, hk, j0 + full, n - full, n_pad - full, d, d, scratch);
        Self {
            src: in_place.unwrap_or(&[]),
            base: if in_place.is_some() { p.k.offset(b, hk, j0) } else { 0 },
            ld,
            full_groups: full / mr,
            packed: scratch,
            d,
            mr,
        }
    }

    /// Group `g` (keys `g * mr ..`) and its row pitch.
    #[inline(always)]
    pub fn group(&self, g: usize) -> (&'a [f32], usize) {
        if g < self.full_groups {
            (&self.src[self.base + g * self.mr * self.ld..], self.ld)
        } else {
            (&self.packed[(g - self.full_groups) * self.mr * self.d..], self.d)
        }
    }
}

/// The V rows of keys `j0..j0 + n` as vectors, and their pitch in vectors: f32 V is read in place
/// when its rows are whole vectors apart and need no padding; otherwise the rows are widened into
/// `scratch` (pitch `dv_pad`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn v_rows<'a, S: crate::simd::SimdExt, TKV: KvPair>(
    simd: S,
    p: &'a crate::problem::Problem<'a, TKV>,
    b: usize,
    hk: usize,
    j0: usize,
    n: usize,
    dv_pad: usize,
    scratch: &'a mut [f32],
) -> (&'a [S::f32s], usize) {
    let (dv, lanes) = (p.shape.v_head_dim, S::F32_LANES);
    let (run, ld) = p.v.run(j0);
    match TKV::V::as_f32_slice(p.v.data).filter(|_| dv == dv_pad && ld.is_multiple_of(lanes) && run >= n) {
        Some(v) => {
            let o = p.v.offset(b, hk, j0);
            (S::as_simd_f32s(&v[o..o + (n - 1) * ld + dv]).0, ld / lanes)
        }
        None => {
            pack_rows(simd, &p.v, b, hk, j0, n, n, dv, dv_pad, scratch);
            (S::as_simd_f32s(&scratch[..n * dv_pad]).0, dv_pad / lanes)
        }
    }
}

/// Score terms and (with `mask = Some(interval)`) the visibility mask for one query row whose
/// scores sit strided in a key-major tile: `s[c * rt + lane]` for keys `j0 + c`, `c < buf.len()`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_row_terms<TKV: KvPair>(
    p: &crate::problem::Problem<'_, TKV>,
    terms: bool,
    mask: Option<(usize, usize)>,
    (b, h, i): (usize, usize, usize),
    j0: usize,
    s: &mut [f32],
    rt: usize,
    lane: usize,
    buf: &mut [f32],
) {
    for (c, x) in buf.iter_mut().enumerate() {
        *x = s[c * rt + lane];
    }
    if terms {
        terms::score_terms(p, b, h, i, j0, buf);
    }
    if let Some(interval) = mask {
        terms::mask_outside(buf, j0, interval);
    }
    for (c, &x) in buf.iter().enumerate() {
        s[c * rt + lane] = x;
    }
}

/// Vector `t` (elements `t * lanes ..`) of a K or V row, widened to f32 in registers.
#[inline(always)]
pub(crate) fn load_lanes<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, row: &[T], t: usize) -> S::f32s {
    let lanes = S::F32_LANES;
    if let Some(blocks) = T::as_q8_0_slice(row) {
        return simd.load_q8_0s(blocks, t * lanes);
    }
    let row = &row[t * lanes..(t + 1) * lanes];
    if let Some(h) = T::as_f16_slice(row) {
        simd.load_f16s(h)
    } else if let Some(h) = T::as_bf16_slice(row) {
        simd.load_bf16s(h)
    } else if let Some(h) = T::as_i8_slice(row) {
        simd.load_i8s(h)
    } else if let Some(h) = T::as_e4m3_slice(row) {
        simd.load_e4m3s(h)
    } else if let Some(h) = T::as_e5m2_slice(row) {
        simd.load_e5m2s(h)
    } else if let Some(f) = T::as_f32_slice(row) {
        S::as_simd_f32s(f).0[0]
    } else {
        let mut buf = [0.0f32; 16];
        for (d, s) in buf.iter_mut().zip(row) {
            *d = s.to_f32();
        }
        S::as_simd_f32s(&buf[..lanes]).0[0]
    }
}

/// The factor [`load_lanes_unit`] leaves out of storage type `T`'s values: 2^8 for fp8 E4M3
/// (whose register widening yields the value over 2^8: see [`SimdExt::load_e4m3s_raw`]), 1 for
/// every other type. A kernel that loads through [`load_lanes_unit`] multiplies its dot products
/// or accumulators by it once, instead of every loaded vector; a power of two, so the result's
/// bits are those of the exact loads (short of f32 underflow, below 2^-118 of the values).
///
/// [`SimdExt::load_e4m3s_raw`]: crate::simd::SimdExt::load_e4m3s_raw
#[inline(always)]
pub(crate) fn lanes_unit<T: crate::element::Element>() -> f32 {
    if matches!(T::DTYPE, crate::element::DType::F8E4M3) {
        256.0
    } else {
        1.0
    }
}

/// [`load_lanes`] in units of [`lanes_unit`]: the loaded values divided by it.
#[inline(always)]
pub(crate) fn load_lanes_unit<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, row: &[T], t: usize) -> S::f32s {
    let lanes = S::F32_LANES;
    match T::as_e4m3_slice(row) {
        Some(codes) => simd.load_e4m3s_raw(&codes[t * lanes..(t + 1) * lanes]),
        None => load_lanes(simd, row, t),
    }
}

/// [`load_lanes_unit`] for a kernel that walks a row's vectors in order: a `q8_0` block's f16
/// scale is widened at the walk's first vector (`fresh`) and at each block's first, and kept in
/// `scale` for the block's other vectors (1 to 7 more, by ISA) instead of widened for each.
/// The same bits as [`load_lanes`] (the codes times the widened scale).
#[inline(always)]
pub(crate) fn load_lanes_walk<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, row: &[T], t: usize, fresh: bool, scale: &mut S::f32s) -> S::f32s {
    use crate::element::BlockQ8_0;
    if let Some(blocks) = T::as_q8_0_slice(row) {
        let at = t * S::F32_LANES;
        let block = &blocks[at / BlockQ8_0::LEN];
        if fresh || at % BlockQ8_0::LEN == 0 {
            *scale = simd.q8_0_scale(block);
        }
        return simd.mul_f32s(*scale, simd.load_i8s(&block.qs[at % BlockQ8_0::LEN..]));
    }
    load_lanes_unit(simd, row, t)
}

/// Hints every cache line of row `j` of K or V (KV head `hk`, batch `b`, `width` elements) into
/// L2. Rows from `len` on (past the sequence's keys) are skipped.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefetch_row<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, t: &crate::kv::KvSource<'_, T>, len: usize, b: usize, hk: usize, j: usize, width: usize) {
    if let Some(row) = t.hint(b, hk, j, len) {
        let base = row.cast::<u8>();
        for line in (0..width / T::BLOCK * size_of::<T>()).step_by(64) {
            simd.prefetch_l2(base.wrapping_add(line));
        }
    }
}

/// The per-key factors on the scores of keys `j0..j0 + n` of KV head `hk` (a key-major tile,
/// `rt` rows per key): cosine's `1 / |k|`, or a quantized K's dequantization factors (gathered
/// into `buf`, at least `n` long). Before the score terms, which add to `scale * q.k`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scale_scores<S: crate::simd::SimdExt, TKV: KvPair>(simd: S, p: &crate::problem::Problem<'_, TKV>, b: usize, hk: usize, j0: usize, n: usize, s: &mut [f32], rt: usize, buf: &mut [f32]) {
    if let Some(scales) = p.key_scales(b, hk, j0, n) {
        scale_keys(simd, s, rt, scales);
    }
    if p.k_factors.fill(b, hk, j0, &mut buf[..n]) {
        scale_keys(simd, s, rt, &buf[..n]);
    }
}

/// Multiplies the softmax weights of keys `j0..j0 + n` (key-major, `rt` rows per key) by a
/// quantized V's dequantization factors (gathered into `buf`), after the weights have joined
/// the rows' sums and before P.V: `sum_j p_j (f_j code_j) = sum_j (p_j f_j) code_j`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scale_weights<S: crate::simd::SimdExt, TKV: KvPair>(simd: S, p: &crate::problem::Problem<'_, TKV>, b: usize, hk: usize, j0: usize, n: usize, s: &mut [f32], rt: usize, buf: &mut [f32]) {
    if p.v_factors.fill(b, hk, j0, &mut buf[..n]) {
        scale_keys(simd, s, rt, &buf[..n]);
    }
}

/// Multiplies each key's scores in a key-major tile (`rt` rows per key) by that key's factor
/// (cosine's `1 / |k|`).
#[inline(always)]
pub(crate) fn scale_keys<S: crate::simd::SimdExt>(simd: S, s: &mut [f32], rt: usize, scales: &[f32]) {
    for (c, &f) in scales.iter().enumerate() {
        // Whole vectors when a key's scores fill them (row tiles), element-wise otherwise (the
        // few-row decode kernel interleaves fewer rows than a vector holds).
        let (vecs, tail) = S::as_mut_simd_f32s(&mut s[c * rt..(c + 1) * rt]);
        let fv = simd.splat_f32s(f);
        for x in vecs {
            *x = simd.mul_f32s(*x, fv);
        }
        for x in tail {
            *x *= f;
        }
    }
}
