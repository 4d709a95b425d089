//! The naive f64 reference: the contract of [`AttentionParams`] followed literally.
//!
//! It materialises every score, tests every (row, key) pair against each mask rule as written
//! in the docs, and accumulates in f64. It is slow on purpose and shares no code with the
//! kernels beyond validation, so it can serve as the oracle for all of them. Engines can use
//! it to check their integration (strides, GQA mapping, masks) on small shapes.

use crate::element::Element;
use crate::error::{out_of_memory, try_vec, AttnError, TensorName};
use crate::kv::{validate_packed, validate_paged};
use crate::layout::{AttentionShape, PagedKv, TensorRef};
use crate::params::{AttentionParams, Score, COSINE_EPS};
use crate::validate::{validate_inputs, validate_kv_tensors};

/// A validated problem that computes reference rows on demand.
pub struct Reference<'a, TQ, TK, TV = TK> {
    shape: AttentionShape,
    q: TensorRef<'a, TQ>,
    k: TensorRef<'a, TK>,
    v: TensorRef<'a, TV>,
    params: AttentionParams<'a>,
    scale: f64,
}

/// One query row's reference result.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceRow {
    /// `v_head_dim` values.
    pub out: Vec<f64>,
    /// Natural-log sum of exponentials (sink included); `-inf` when nothing is visible.
    pub lse: f64,
    /// How many real keys are visible (weight may still be 0 through a `-inf` bias).
    pub visible: usize,
}

/// Every row: `out` is contiguous `[B, Hq, Sq, Dv]`, `lse` is `[B, Hq, Sq]`. With packed
/// queries (`cu_seqlens_q`) row `i` of sequence `b` is its `i`-th token, at `(b, h, i)` here;
/// the rows past a sequence's `q_len` are 0 (out) and NaN (LSE), and the accessors say `None`.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    pub shape: AttentionShape,
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    /// Rows per sequence with packed queries; empty otherwise.
    pub q_lens: Vec<usize>,
}

impl ReferenceOutput {
    fn row_index(&self, b: usize, h: usize, i: usize) -> Option<usize> {
        let s = &self.shape;
        let present = self.q_lens.get(b).is_none_or(|&n| i < n);
        (b < s.batch && h < s.q_heads && i < s.seq_q && present).then(|| (b * s.q_heads + h) * s.seq_q + i)
    }
    /// Output row `(b, h, i)`, or `None` out of range.
    pub fn out_row(&self, b: usize, h: usize, i: usize) -> Option<&[f64]> {
        let dv = self.shape.v_head_dim;
        self.row_index(b, h, i).map(|r| &self.out[r * dv..(r + 1) * dv])
    }
    /// LSE of row `(b, h, i)`, or `None` out of range.
    pub fn lse_at(&self, b: usize, h: usize, i: usize) -> Option<f64> {
        self.row_index(b, h, i).map(|r| self.lse[r])
    }
}

impl<'a, TQ: Element, TK: Element, TV: Element> Reference<'a, TQ, TK, TV> {
    pub fn new(
        shape: &AttentionShape,
        q: TensorRef<'a, TQ>,
        k: TensorRef<'a, TK>,
        v: TensorRef<'a, TV>,
        params: &AttentionParams<'a>,
    ) -> Result<Self, AttnError> {
        let scale = validate_inputs(shape, (q.data.len(), q.strides), params)? as f64;
        let units = crate::validate::kv_units::<TK, TV>(shape)?;
        match params.cu_seqlens_k {
            Some(cu) => {
                validate_packed(TensorName::K, k.data, k.strides, cu, shape.kv_heads, units.head_dim)?;
                validate_packed(TensorName::V, v.data, v.strides, cu, shape.kv_heads, units.v_head_dim)?;
            }
            None => validate_kv_tensors(&units, (k.data.len(), k.strides), (v.data.len(), v.strides))?,
        }
        if let Some(sc) = params.kv_scales {
            if !matches!(params.score, Score::ScaledDot | Score::Dot | Score::General { .. }) {
                return Err(AttnError::UnsupportedScore { score: params.score.name(), operation: "a quantized K/V cache (int8, fp8 or q8_0 K/V, or kv_scales)" });
            }
            let layout = crate::quant::KvLayout::Tensors(params.cu_seqlens_k);
            crate::quant::validate(TensorName::KScale, sc.k, shape, &layout)?;
            crate::quant::validate(TensorName::VScale, sc.v, shape, &layout)?;
        } else if (TK::DTYPE.is_quantized() || TV::DTYPE.is_quantized()) && !matches!(params.score, Score::ScaledDot | Score::Dot | Score::General { .. }) {
            return Err(AttnError::UnsupportedScore { score: params.score.name(), operation: "a quantized K/V cache (int8, fp8 or q8_0 K/V, or kv_scales)" });
        }
        Ok(Self { shape: *shape, q, k, v, params: *params, scale })
    }

    /// The dequantization factor of key `j` of KV head `hk`, sequence `b`, in K (`value`
    /// false) or V, as [`crate::Dequant`] defines it; 1 without `kv_scales`.
    fn factor(&self, value: bool, b: usize, hk: usize, j: usize) -> f64 {
        let Some(sc) = self.params.kv_scales else { return 1.0 };
        match if value { sc.v } else { sc.k } {
            crate::Dequant::Tensor(f) => f as f64,
            crate::Dequant::Head(h) => h[hk] as f64,
            crate::Dequant::Token(data, st) => data[self.kv_offset(&st, b, hk, j)] as f64,
            crate::Dequant::TokenF16(data, st) => data[self.kv_offset(&st, b, hk, j)].to_f64(),
            crate::Dequant::PagedToken(..) | crate::Dequant::PagedTokenF16(..) => unreachable!("validated: the reference takes tensors"),
        }
    }

    /// Rows of sequence `b`: its `cu_seqlens_q` segment, else `seq_q`.
    fn q_len(&self, b: usize) -> usize {
        self.params.q_len(b, self.shape.seq_q)
    }

    /// Keys of sequence `b`: `kv_lens[b]`, else its `cu_seqlens_k` segment, else `seq_kv`.
    fn kv_len(&self, b: usize) -> usize {
        self.params.kv_len(b, self.shape.seq_kv)
    }

    /// Where row `(b, h, i)` of Q starts: token `cu_seqlens_q[b] + i` when packed.
    fn q_offset(&self, b: usize, h: usize, i: usize) -> usize {
        let st = &self.q.strides;
        match self.params.cu_seqlens_q {
            Some(cu) => (cu[b] as usize + i) * st.seq + h * st.head,
            None => st.offset(b, h, i),
        }
    }

    /// Where key row `j` of KV head `hk`, sequence `b` starts in a K or V tensor.
    fn kv_offset(&self, st: &crate::layout::Strides, b: usize, hk: usize, j: usize) -> usize {
        match self.params.cu_seqlens_k {
            Some(cu) => (cu[b] as usize + j) * st.seq + hk * st.head,
            None => st.offset(b, hk, j),
        }
    }

    /// Whether key `j` is visible to row `i` of batch `b`, as the contract words it.
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let kv_len = self.kv_len(b) as i128;
        let (i, j) = (i as i128, j as i128);
        let pos = i + kv_len - self.q_len(b) as i128; // i + off
        let w = self.params.window.unwrap_or_default();
        j < kv_len
            && (!self.params.causal || j <= pos)
            && w.left.is_none_or(|l| j >= pos - l as i128)
            && w.right.is_none_or(|r| j <= pos + r as i128)
    }

    /// `f(q, k)` of the score function, in f64, straight from its definition.
    fn score(&self, q: &[f64], k: &[f64]) -> f64 {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let norm = |a: &[f64]| dot(a, a).sqrt().max(COSINE_EPS);
        let d = k.len();
        match self.params.score {
            Score::ScaledDot | Score::Dot => self.scale * dot(q, k),
            Score::Cosine { temperature } => temperature as f64 * dot(q, k) / (norm(q) * norm(k)),
            Score::General { w, .. } => {
                q.iter().enumerate().map(|(r, &qr)| qr * w[r * d..(r + 1) * d].iter().zip(k).map(|(&wv, kc)| wv as f64 * kc).sum::<f64>()).sum()
            }
            Score::Additive { v, projection } => {
                let proj = |w: &[f32], x: &[f64], a: usize| w[a * x.len()..(a + 1) * x.len()].iter().zip(x).map(|(&wv, xv)| wv as f64 * xv).sum::<f64>();
                (0..v.len())
                    .map(|a| {
                        let (qa, ka) = match projection {
                            None => (q[a], k[a]),
                            Some(pr) => (proj(pr.w_q, q, a), proj(pr.w_k, k, a)),
                        };
                        v[a] as f64 * (qa + ka).tanh()
                    })
                    .sum()
            }
        }
    }

    /// Every key's final logit for row `(b, h, i)` (`-inf` where invisible), and how many real
    /// keys are visible.
    fn scores(&self, b: usize, h: usize, i: usize) -> Result<(Vec<f64>, usize), AttnError> {
        let s = &self.shape;
        let p = &self.params;
        let hk = h / s.group_size();
        let pos = i as f64 + self.kv_len(b) as f64 - self.q_len(b) as f64;
        let qo = self.q_offset(b, h, i);
        let mut q = try_vec(self.q.data[qo..qo + p.score.q_dim(s.head_dim)].iter().map(|x| x.to_f64()))?;
        if let Some(rope) = &p.rope {
            // Rotated at the row's position, pair by pair, as the contract words it.
            let at = (i + self.kv_len(b) - self.q_len(b)) * (rope.rotary_dim / 2);
            let x = q.clone();
            let half = rope.rotary_dim / 2;
            for t in 0..half {
                let (a, bb) = if rope.interleaved { (2 * t, 2 * t + 1) } else { (t, t + half) };
                let (c, sn) = (rope.cos[at + t] as f64, rope.sin[at + t] as f64);
                q[a] = x[a] * c - x[bb] * sn;
                q[bb] = x[bb] * c + x[a] * sn;
            }
        }

        let mut scores = try_vec(core::iter::repeat_n(f64::NEG_INFINITY, s.seq_kv))?;
        let mut k = try_vec(core::iter::repeat_n(0.0, s.head_dim))?;
        let mut visible = 0;
        for (j, score) in scores.iter_mut().enumerate() {
            if !self.visible(b, i, j) {
                continue;
            }
            visible += 1;
            let ko = self.kv_offset(&self.k.strides, b, hk, j);
            let f = self.factor(false, b, hk, j);
            // Dequantized literally: value `t` of the row (a block format's `d * q`), times its factor.
            let row = &self.k.data[ko..ko + s.head_dim / TK::BLOCK];
            k.iter_mut().enumerate().for_each(|(t, y)| *y = f * TK::value(row, t) as f64);
            let mut x = self.score(&q, &k);
            if let Some(c) = p.softcap {
                let c = c as f64;
                x = c * (x / c).tanh();
            }
            if let Some(bias) = &p.bias {
                x += bias.data[bias.row(b, h, i) + j] as f64;
            }
            if let Some(slopes) = p.alibi_slopes {
                x += slopes[h] as f64 * (j as f64 - pos);
            }
            *score = x;
        }
        Ok((scores, visible))
    }

    /// The result for batch `b`, query head `h`, row `i`; `None` if out of range.
    ///
    /// # Panics
    /// If the row's buffers (`seq_kv` scores) cannot be allocated; [`Reference::try_row`]
    /// returns that as an error.
    pub fn row(&self, b: usize, h: usize, i: usize) -> Option<ReferenceRow> {
        self.try_row(b, h, i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Reference::row`], with allocation failure as `OutOfMemory`.
    pub fn try_row(&self, b: usize, h: usize, i: usize) -> Result<Option<ReferenceRow>, AttnError> {
        let s = &self.shape;
        if b >= s.batch || h >= s.q_heads || i >= s.seq_q || i >= self.q_len(b) {
            return Ok(None);
        }
        let hk = h / s.group_size();
        let (scores, visible) = self.scores(b, h, i)?;
        let sink = self.params.sinks.map_or(f64::NEG_INFINITY, |sk| sk[h] as f64);
        let m = scores.iter().copied().fold(sink, f64::max);
        let mut out = try_vec(core::iter::repeat_n(0.0, s.v_head_dim))?;
        if m == f64::NEG_INFINITY {
            return Ok(Some(ReferenceRow { out, lse: f64::NEG_INFINITY, visible }));
        }
        let mut denom = (sink - m).exp();
        for (j, &x) in scores.iter().enumerate() {
            if x == f64::NEG_INFINITY {
                continue;
            }
            let w = (x - m).exp();
            denom += w;
            // A weight of exactly 0 (possible only for scores over 745 below the max) adds
            // nothing, as in the kernels: a NaN in its V row does not reach the row.
            // So does a V row whose dequantization factor is exactly 0 (the kernels fold the
            // factor into the weight).
            let f = self.factor(true, b, hk, j);
            if w == 0.0 || f == 0.0 {
                continue;
            }
            let vo = self.kv_offset(&self.v.strides, b, hk, j);
            let row = &self.v.data[vo..vo + s.v_head_dim / TV::BLOCK];
            for (t, o) in out.iter_mut().enumerate() {
                *o += w * (f * TV::value(row, t) as f64);
            }
        }
        out.iter_mut().for_each(|o| *o /= denom);
        Ok(Some(ReferenceRow { out, lse: m + denom.ln(), visible }))
    }

    /// The attention probabilities of row `(b, h, i)` over all `seq_kv` keys (one row of the
    /// alignment matrix): 0 for invisible keys, all 0 when nothing is visible; with a sink
    /// the row sums to less than 1. `None` if out of range.
    pub fn probabilities(&self, b: usize, h: usize, i: usize) -> Option<Vec<f64>> {
        self.try_probabilities(b, h, i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Reference::probabilities`], with allocation failure as `OutOfMemory`.
    pub fn try_probabilities(&self, b: usize, h: usize, i: usize) -> Result<Option<Vec<f64>>, AttnError> {
        let Some(row) = self.try_row(b, h, i)? else { return Ok(None) };
        let (mut scores, _) = self.scores(b, h, i)?;
        for x in scores.iter_mut() {
            *x = if row.lse == f64::NEG_INFINITY { 0.0 } else { (*x - row.lse).exp() };
        }
        Ok(Some(scores))
    }

    /// All rows.
    ///
    /// # Panics
    /// If the result cannot be allocated; [`Reference::try_compute`] returns that as an error.
    pub fn compute(&self) -> ReferenceOutput {
        self.try_compute().unwrap_or_else(|e| panic!("{e}"))
    }

    /// All rows, with allocation failure as `OutOfMemory` (what the C ABI calls).
    pub fn try_compute(&self) -> Result<ReferenceOutput, AttnError> {
        let s = self.shape;
        let too_big = AttnError::SizeOverflow { tensor: crate::error::TensorName::Out };
        let dims = [s.batch, s.q_heads, s.seq_q];
        let rows = if dims.contains(&0) { 0 } else { dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or(too_big.clone())? };
        if rows == 0 {
            // Nothing to loop over, however large the other dims.
            return Ok(ReferenceOutput { shape: s, out: Vec::new(), lse: Vec::new(), q_lens: Vec::new() });
        }
        let mut out = Vec::new();
        let mut lse = Vec::new();
        let floats = rows.checked_mul(s.v_head_dim).ok_or(too_big)?;
        out.try_reserve_exact(floats).map_err(|_| out_of_memory::<f64>(floats))?;
        lse.try_reserve_exact(rows).map_err(|_| out_of_memory::<f64>(rows))?;
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for i in 0..s.seq_q {
                    match self.try_row(b, h, i)? {
                        Some(r) => {
                            out.extend_from_slice(&r.out);
                            lse.push(r.lse);
                        }
                        // Past a packed sequence's rows.
                        None => {
                            out.extend(core::iter::repeat_n(0.0, s.v_head_dim));
                            lse.push(f64::NAN);
                        }
                    }
                }
            }
        }
        let q_lens = match self.params.cu_seqlens_q {
            Some(_) => (0..s.batch).map(|b| self.q_len(b)).collect(),
            None => Vec::new(),
        };
        Ok(ReferenceOutput { shape: s, out, lse, q_lens })
    }
}

/// Validate and compute every row of the reference.
pub fn reference_attention<TQ: Element, TK: Element, TV: Element>(
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TK>,
    v: TensorRef<'_, TV>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceOutput, AttnError> {
    Reference::new(shape, q, k, v, params)?.try_compute()
}

/// A paged pool gathered into contiguous `[B, Hkv, Skv, D]` K and `[B, Hkv, Skv, Dv]` V (the
/// strides `shape.bhsd_strides()` gives), literally: row `j < kv_lens[b]` of sequence `b` is
/// copied from slot `j % page_size` of page `block_table[b * pages_per_seq + j / page_size]`;
/// the rows past each sequence's length are zero (no row can see them). This is what the
/// reference means by a paged call: its result is the reference of the gathered tensors.
/// The pool is validated as a call validates it. Rows count storage units: for [`crate::BlockQ8_0`]
/// `D / 32` blocks (strides of the shape with its head dims divided by 32).
pub fn gather_paged<TK: Element, TV: Element>(shape: &AttentionShape, kv: &PagedKv<'_, TK, TV>, kv_lens: Option<&[usize]>) -> Result<(Vec<TK>, Vec<TV>), AttnError> {
    let s = shape;
    if let Some(l) = kv_lens {
        if l.len() != s.batch {
            return Err(AttnError::WrongLength { arg: "kv_lens", expected: s.batch, got: l.len() });
        }
    }
    let len = |b: usize| kv_lens.map_or(s.seq_kv, |l| l[b]);
    let units = crate::validate::kv_units::<TK, TV>(s)?;
    // K and V alike, each at its own storage type.
    #[allow(clippy::too_many_arguments)]
    fn gather<T: Element>(s: &AttentionShape, pages: &crate::layout::PageTable<'_>, len: &dyn Fn(usize) -> usize, tensor: TensorName, data: &[T], strides: crate::layout::PageStrides, dim: usize) -> Result<Vec<T>, AttnError> {
        let src = validate_paged(tensor, data, strides, pages, s.batch, s.kv_heads, dim, (0..s.batch).map(len))?;
        let n = [s.batch, s.kv_heads, s.seq_kv, dim].iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or(AttnError::SizeOverflow { tensor })?;
        let mut out = try_vec((0..n).map(|_| T::default()))?;
        for b in 0..s.batch {
            for hk in 0..s.kv_heads {
                for j in 0..len(b).min(s.seq_kv) {
                    let to = ((b * s.kv_heads + hk) * s.seq_kv + j) * dim;
                    out[to..to + dim].copy_from_slice(src.row(b, hk, j, dim * T::BLOCK));
                }
            }
        }
        Ok(out)
    }
    Ok((gather(s, &kv.pages, &len, TensorName::K, kv.k, kv.k_strides, units.head_dim)?, gather(s, &kv.pages, &len, TensorName::V, kv.v, kv.v_strides, units.v_head_dim)?))
}
