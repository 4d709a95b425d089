//! Merging partial attention results computed over disjoint subsets of the keys: by this
//! crate's split-KV decode, by another shard of the KV cache (another device or machine, as
//! ring / context-parallel attention does), or by a previous chunk of the cache.

use crate::element::FloatElement;
use crate::error::{AttnError, TensorName};
use crate::layout::{AttentionShape, TensorMut, TensorRef};
use crate::validate::{check_no_overlap, reach};

/// One partial result: output rows normalised over its keys (`[B, Hq, Sq, Dv]` through the
/// strides) and their LSE (`[B, Hq, Sq]`, contiguous), as [`crate::attention`] writes them when
/// given an LSE buffer. A sink belongs to exactly one part.
#[derive(Clone, Copy, Debug)]
pub struct PartialResult<'a, T> {
    pub out: TensorRef<'a, T>,
    pub lse: &'a [f32],
}

/// `out = sum_k exp(lse_k - lse) out_k` with `lse = log sum_k exp(lse_k)`, row by row, which is
/// exactly attention over the union of the parts' keys. Parts are combined in the order given
/// (accumulating in f64), so the result does not depend on how the caller scheduled them.
/// Rows that are empty in every part (all `lse_k = -inf`) get zeros and `lse = -inf`. Only
/// `batch`, `q_heads`, `seq_q` and `v_head_dim` of `shape` are used.
pub fn merge_partials<TP: FloatElement, TO: FloatElement>(
    shape: &AttentionShape,
    parts: &[PartialResult<'_, TP>],
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
) -> Result<(), AttnError> {
    let s = shape;
    if s.v_head_dim == 0 {
        return Err(AttnError::ZeroDim { dim: "v_head_dim" });
    }
    let rows = s
        .batch
        .checked_mul(s.q_heads)
        .and_then(|x| x.checked_mul(s.seq_q))
        .ok_or(AttnError::SizeOverflow { tensor: TensorName::Lse })?;
    let dims = |st: &crate::layout::Strides| [(s.batch, st.batch), (s.q_heads, st.head), (s.seq_q, st.seq)];
    for part in parts {
        let needed = reach(TensorName::Partial, &dims(&part.out.strides), s.v_head_dim)?;
        if needed > part.out.data.len() {
            return Err(AttnError::BufferTooSmall { tensor: TensorName::Partial, needed, len: part.out.data.len() });
        }
        if part.lse.len() < rows {
            return Err(AttnError::BufferTooSmall { tensor: TensorName::Lse, needed: rows, len: part.lse.len() });
        }
    }
    let needed = reach(TensorName::Out, &dims(&out.strides), s.v_head_dim)?;
    if needed > out.data.len() {
        return Err(AttnError::BufferTooSmall { tensor: TensorName::Out, needed, len: out.data.len() });
    }
    let st = out.strides;
    check_no_overlap(
        TensorName::Out,
        &[("batch", s.batch, st.batch), ("head", s.q_heads, st.head), ("seq", s.seq_q, st.seq)],
        s.v_head_dim,
    )?;
    if let Some(l) = &lse {
        if l.len() < rows {
            return Err(AttnError::BufferTooSmall { tensor: TensorName::Lse, needed: rows, len: l.len() });
        }
    }

    if rows == 0 {
        return Ok(());
    }
    let mut lse = lse;
    let mut acc = crate::error::try_vec(core::iter::repeat_n(0.0f64, s.v_head_dim))?;
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq_q {
                let r = (b * s.q_heads + h) * s.seq_q + i;
                let m = parts.iter().map(|p| p.lse[r]).fold(f32::NEG_INFINITY, f32::max);
                acc.fill(0.0);
                let mut total = 0.0f64;
                if m != f32::NEG_INFINITY {
                    for p in parts {
                        if p.lse[r] == f32::NEG_INFINITY {
                            continue;
                        }
                        let w = (p.lse[r] as f64 - m as f64).exp();
                        total += w;
                        let o = p.out.strides.offset(b, h, i);
                        for (a, x) in acc.iter_mut().zip(&p.out.data[o..o + s.v_head_dim]) {
                            *a += w * x.to_f64();
                        }
                    }
                }
                let o = st.offset(b, h, i);
                let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
                for (d, a) in out.data[o..o + s.v_head_dim].iter_mut().zip(&acc) {
                    *d = TO::from_f32((a * inv) as f32);
                }
                if let Some(l) = lse.as_deref_mut() {
                    l[r] = if total > 0.0 { (m as f64 + total.ln()) as f32 } else { f32::NEG_INFINITY };
                }
            }
        }
    }
    Ok(())
}
