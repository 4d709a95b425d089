//! Score preparation: what a score function needs once per row or once per key, computed once
//! per call after validation and before any kernel runs (data flow: validate → **score** → plan
//! → kernel). The kernels then only ever do per-pair work:
//!
//! - scaled dot and dot need nothing (the scale folds into Q as it is packed);
//! - cosine needs `temperature / |q|` per query row and `1 / |k|` per key: Q rows are scaled as
//!   they are packed and each key's scores are scaled once per tile;
//! - general projects Q once (`q' = W^T q`) and runs the dot kernel on `q'` (see `api`);
//! - additive needs `q'` and `k'` as f32 rows padded to whole vectors (projected, or widened
//!   when the caller gives them already projected) and `v` padded with zeros, so padding lanes
//!   add `0 * tanh(..) = 0`.

use crate::dtypes::AnyRef;
use crate::element::Element;
use crate::error::AttnError;
use crate::exec::try_zeroed;
use crate::kv::KvSource;
use crate::layout::{AttentionShape, TensorRef};
use crate::params::{AttentionParams, Score, COSINE_EPS};

/// Row pitch of the additive `q'` / `k'` buffers: a multiple of every ISA's f32 lanes.
pub(crate) const ADDITIVE_PAD: usize = 16;

/// The per-call data of a score function, borrowed by the kernels through `Problem`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScoreData<'a> {
    /// `p.scale * (q . k)`.
    Dot,
    /// `q_scale[(b * Hq + h) * Sq + i] * (q . k) * k_scale[(b * Hkv + hk) * Skv + j]`.
    Cosine { q_scale: &'a [f32], k_scale: &'a [f32] },
    Additive(AdditiveData<'a>),
}

/// `q'` as `[B, Hq, Sq, a_pad]`, `k'` as `[B, Hkv, Skv, a_pad]` and `v` as `[a_pad]`, all f32,
/// zero past the attention dim.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdditiveData<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub a_pad: usize,
}

impl<'a> AdditiveData<'a> {
    #[inline(always)]
    pub fn q_row(self, shape: &AttentionShape, b: usize, h: usize, i: usize) -> &'a [f32] {
        let r = (b * shape.q_heads + h) * shape.seq_q + i;
        &self.q[r * self.a_pad..(r + 1) * self.a_pad]
    }

    /// Keys `j0..j0 + n` of KV head `hk`, rows `a_pad` apart.
    #[inline(always)]
    pub fn k_rows(self, shape: &AttentionShape, b: usize, hk: usize, j0: usize, n: usize) -> &'a [f32] {
        let r = (b * shape.kv_heads + hk) * shape.seq_kv + j0;
        &self.k[r * self.a_pad..(r + n) * self.a_pad]
    }
}

/// The owned buffers behind a [`ScoreData`].
pub(crate) struct ScoreBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a_pad: usize,
}

impl ScoreBuffers {
    /// Prepares the score of a validated call (`params.score` is not `General`: that one is
    /// projected into a plain Q before validation of the rest, see `api`).
    pub fn prepare<TKV: Element>(
        shape: &AttentionShape,
        q: &AnyRef<'_>,
        k: &KvSource<'_, TKV>,
        params: &AttentionParams<'_>,
    ) -> Result<Self, AttnError> {
        // Rows a paged or packed K may lack (past the sequence's length) are never scored.
        let k_row = |b: usize, h: usize, j: usize| (!k.bounded_by_len() || j < params.kv_len(b, shape.seq_kv)).then(|| k.row(b, h, j, shape.head_dim));
        let s = shape;
        let none = || Ok(Self { q: Vec::new(), k: Vec::new(), v: Vec::new(), a_pad: 0 });
        match params.score {
            Score::ScaledDot | Score::Dot | Score::General { .. } => none(),
            Score::Cosine { temperature } => Ok(Self {
                q: match q {
                    AnyRef::F32(q) => inv_norms(tensor_rows(q, s.head_dim), s.batch, s.q_heads, s.seq_q, s.head_dim, temperature as f64)?,
                    AnyRef::F16(q) => inv_norms(tensor_rows(q, s.head_dim), s.batch, s.q_heads, s.seq_q, s.head_dim, temperature as f64)?,
                    AnyRef::Bf16(q) => inv_norms(tensor_rows(q, s.head_dim), s.batch, s.q_heads, s.seq_q, s.head_dim, temperature as f64)?,
                },
                k: inv_norms(k_row, s.batch, s.kv_heads, s.seq_kv, s.head_dim, 1.0)?,
                v: Vec::new(),
                a_pad: 0,
            }),
            Score::Additive { v, projection } => {
                let a = v.len();
                let a_pad = a.next_multiple_of(ADDITIVE_PAD);
                let mut vp = try_zeroed(a_pad)?;
                vp[..a].copy_from_slice(v);
                let (qp, kp) = match projection {
                    None => (
                        project_any(q, s.batch, s.q_heads, s.seq_q, s.head_dim, None, a_pad)?,
                        project_rows(k_row, s.batch, s.kv_heads, s.seq_kv, s.head_dim, None, a_pad)?,
                    ),
                    Some(pr) => (
                        project_any(q, s.batch, s.q_heads, s.seq_q, pr.q_dim, Some(&transpose(pr.w_q, a, pr.q_dim)?), a_pad)?,
                        project_rows(k_row, s.batch, s.kv_heads, s.seq_kv, s.head_dim, Some(&transpose(pr.w_k, a, s.head_dim)?), a_pad)?,
                    ),
                };
                Ok(Self { q: qp, k: kp, v: vp, a_pad })
            }
        }
    }

    pub fn data(&self, score: &Score<'_>) -> ScoreData<'_> {
        match score {
            Score::Cosine { .. } => ScoreData::Cosine { q_scale: &self.q, k_scale: &self.k },
            Score::Additive { .. } => ScoreData::Additive(AdditiveData { q: &self.q, k: &self.k, v: &self.v, a_pad: self.a_pad }),
            _ => ScoreData::Dot,
        }
    }
}

/// Q projected for [`Score::General`]: `q' = W^T q` as contiguous `[B, Hq, Sq, head_dim]` f32.
pub(crate) fn project_general(shape: &AttentionShape, q: &AnyRef<'_>, w: &[f32], q_dim: usize) -> Result<Vec<f32>, AttnError> {
    let s = shape;
    project_any(q, s.batch, s.q_heads, s.seq_q, q_dim, Some(w), s.head_dim)
}

/// `w` (`rows x cols`, row-major) transposed, so projections run as row-times-matrix with the
/// output along the inner loop.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, AttnError> {
    let mut t = try_zeroed(rows * cols)?;
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    Ok(t)
}

/// Every row `x` (`in_dim` wide) of a `[batch, heads, seq, in_dim]` tensor as `x W` with `w`
/// of `[in_dim, pitch-or-fewer]` (row-major, `w.len() / in_dim` columns), or `x` itself when
/// `w` is `None`; contiguous rows of `pitch` f32, zero-padded. `rows(b, h, i)` is the row, or
/// `None` for one that is never read (its output stays zero).
fn project_rows<'t, T: Element + 't>(
    rows: impl Fn(usize, usize, usize) -> Option<&'t [T]>,
    batch: usize,
    heads: usize,
    seq: usize,
    in_dim: usize,
    w: Option<&[f32]>,
    pitch: usize,
) -> Result<Vec<f32>, AttnError> {
    // Inputs may broadcast (zero strides), so `batch * heads * seq` rows can exceed anything the
    // slices bound: an overflow is an allocation that cannot succeed.
    let mut out = try_zeroed(row_count(&[batch, heads, seq, pitch])?)?;
    let cols = w.map_or(in_dim, |w| w.len() / in_dim);
    let mut x = vec![0.0f32; in_dim];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let Some(row) = rows(b, h, i) else { continue };
                let r = (b * heads + h) * seq + i;
                let dst = &mut out[r * pitch..r * pitch + cols];
                for (d, s) in x.iter_mut().zip(row) {
                    *d = s.to_f32();
                }
                match w {
                    None => dst.copy_from_slice(&x),
                    Some(w) => {
                        // Output along the inner loop: vectorises without reassociating sums.
                        for (c, &xc) in x.iter().enumerate() {
                            for (d, &wv) in dst.iter_mut().zip(&w[c * cols..(c + 1) * cols]) {
                                *d += xc * wv;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// [`project_rows`] of an erased input.
fn project_any(q: &AnyRef<'_>, batch: usize, heads: usize, seq: usize, in_dim: usize, w: Option<&[f32]>, pitch: usize) -> Result<Vec<f32>, AttnError> {
    match q {
        AnyRef::F32(t) => project_rows(tensor_rows(t, in_dim), batch, heads, seq, in_dim, w, pitch),
        AnyRef::F16(t) => project_rows(tensor_rows(t, in_dim), batch, heads, seq, in_dim, w, pitch),
        AnyRef::Bf16(t) => project_rows(tensor_rows(t, in_dim), batch, heads, seq, in_dim, w, pitch),
    }
}

/// The product of `dims`, or `OutOfMemory` when it overflows.
fn row_count(dims: &[usize]) -> Result<usize, AttnError> {
    dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or(AttnError::OutOfMemory { bytes: usize::MAX })
}

/// `factor / max(|x|, eps)` for every row of a `[batch, heads, seq, d]` tensor (`rows` as for
/// [`project_rows`]), the norm in f64
/// (so neither tiny nor huge rows underflow or overflow), clamped into f32's finite range.
fn inv_norms<'t, T: Element + 't>(rows: impl Fn(usize, usize, usize) -> Option<&'t [T]>, batch: usize, heads: usize, seq: usize, d: usize, factor: f64) -> Result<Vec<f32>, AttnError> {
    let mut out = try_zeroed(row_count(&[batch, heads, seq])?)?;
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let Some(row) = rows(b, h, i) else { continue };
                // Eight partial sums: independent chains the compiler can vectorise.
                let mut acc = [0.0f64; 8];
                for (c, x) in row[..d].iter().enumerate() {
                    let x = x.to_f64();
                    acc[c % 8] += x * x;
                }
                let norm = acc.iter().sum::<f64>().sqrt();
                let f = factor / norm.max(COSINE_EPS);
                out[(b * heads + h) * seq + i] = f.clamp(f32::MIN as f64, f32::MAX as f64) as f32;
            }
        }
    }
    Ok(out)
}

/// The rows of a strided tensor, `width` elements each, as [`project_rows`] reads them.
fn tensor_rows<'t, T>(t: &TensorRef<'t, T>, width: usize) -> impl Fn(usize, usize, usize) -> Option<&'t [T]> {
    let (data, strides) = (t.data, t.strides);
    move |b, h, i| {
        let o = strides.offset(b, h, i);
        Some(&data[o..o + width])
    }
}
