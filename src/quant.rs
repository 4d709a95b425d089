//! Dequantization of quantized K/V caches: the factor each stored code is multiplied by.
//!
//! A quantized cache stores codes (`i8` today) and, beside them, the factors that turn codes into
//! values: `value = factor * code`, with one factor per tensor, per KV head, or per (token, KV
//! head). The kernels never build dequantized copies of K or V. A K factor is constant over a
//! key's dot product, so it multiplies the key's scores (`s_ij = scale * f_j * (q_i . code_j)`).
//! A V factor multiplies the key's softmax weight after that weight has joined the row's sum
//! (`o_i = sum_j p_ij * f_j * code_j / sum_j p_ij`). Either way it costs one multiply per (row,
//! key) instead of one per element. Per-token factors are found like a K row of one element:
//! through the same strides, packed-sequence offsets or page table as the cache itself.
//! Per-token factors may be stored as f32 or as f16 (engines that keep f16 scales beside an
//! int8 cache): an f16 factor widens exactly, so either reads as the same f32 factor.

use crate::error::{AttnError, TensorName};
use crate::kv::KvSource;
use crate::layout::{PageStrides, Strides};
use half::f16;

/// The dequantization factors of one quantized tensor (K or V): `value = factor * code`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dequant<'a> {
    /// One factor for the whole tensor (vLLM's per-tensor `k_scale` / `v_scale`).
    Tensor(f32),
    /// One factor per KV head: `kv_heads` entries.
    Head(&'a [f32]),
    /// One factor per (token, KV head) of a strided cache, addressed like a K row of one
    /// element: `(b, hk, j)` at `b * batch + hk * head + j * seq`. With packed keys
    /// (`cu_seqlens_k`), key `j` of sequence `b` is token `cu[b] + j` (`seq` apart, `batch`
    /// unused), as for K.
    Token(&'a [f32], Strides),
    /// One factor per (token, KV head) of a paged cache: slot `s` of page `p`, KV head `hk` at
    /// `p * page + hk * head + s * slot`, the page found through the call's block table.
    PagedToken(&'a [f32], PageStrides),
    /// [`Dequant::Token`] with the factors stored as f16 (each widened exactly to f32).
    TokenF16(&'a [f16], Strides),
    /// [`Dequant::PagedToken`] with the factors stored as f16.
    PagedTokenF16(&'a [f16], PageStrides),
}

/// The dequantization factors of a call's K and V (see [`Dequant`]); set with
/// [`crate::AttentionParams::kv_scales`]. Without them every factor is 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvScales<'a> {
    pub k: Dequant<'a>,
    pub v: Dequant<'a>,
}

/// Validated factors of K or V, as the kernels read them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Factors<'a> {
    /// Every factor is 1 (no scales given).
    One,
    Const(f32),
    Head(&'a [f32]),
    Token(KvSource<'a, f32>),
    TokenF16(KvSource<'a, f16>),
}

/// Keys looked up per page-table pass when gathering per-token factors.
const GATHER: usize = 64;

impl Factors<'_> {
    /// Writes the factors of keys `j0..j0 + out.len()` of KV head `hk`, sequence `b` (keys some
    /// row sees) to `out`; returns `false`, writing nothing, when they are all 1.
    #[inline(always)]
    pub fn fill(&self, b: usize, hk: usize, j0: usize, out: &mut [f32]) -> bool {
        match self {
            Factors::One => return false,
            Factors::Const(f) => out.fill(*f),
            Factors::Head(h) => out.fill(h[hk]),
            Factors::Token(src) => gather(src, b, hk, j0, out, |f| f),
            Factors::TokenF16(src) => gather(src, b, hk, j0, out, f16::to_f32),
        }
        true
    }
}

/// The per-token factors of keys `j0..j0 + out.len()`, widened by `to_f32`.
#[inline(always)]
fn gather<T: Copy>(src: &KvSource<'_, T>, b: usize, hk: usize, j0: usize, out: &mut [f32], to_f32: impl Fn(T) -> f32) {
    let mut at = [0usize; GATHER];
    for (c0, chunk) in out.chunks_mut(GATHER).enumerate() {
        src.row_offsets(b, hk, j0 + c0 * GATHER, &mut at[..chunk.len()]);
        for (y, &o) in chunk.iter_mut().zip(&at) {
            *y = to_f32(src.data[o]);
        }
    }
}

/// How a call's K/V are laid out, for checking per-token factors against them.
pub(crate) enum KvLayout<'p, 'a> {
    /// Strided tensors; `Some(cu)` with packed keys.
    Tensors(Option<&'a [i32]>),
    /// A paged pool with this table, and each sequence's key count.
    Paged(&'p crate::layout::PageTable<'a>, &'p dyn Fn(usize) -> usize),
}

/// Checks one tensor's factors against the call: a head factor per KV head, per-token factors
/// in the layout the cache has, every (token, head) the shape reaches inside the slice.
pub(crate) fn validate<'a>(
    tensor: TensorName,
    d: Dequant<'a>,
    shape: &crate::layout::AttentionShape,
    layout: &KvLayout<'_, 'a>,
) -> Result<Factors<'a>, AttnError> {
    let s = shape;
    Ok(match (d, layout) {
        (Dequant::Tensor(f), _) => Factors::Const(f),
        (Dequant::Head(h), _) => {
            if h.len() != s.kv_heads {
                let arg = if tensor == TensorName::KScale { "kv_scales.k (one per KV head)" } else { "kv_scales.v (one per KV head)" };
                return Err(AttnError::WrongLength { arg, expected: s.kv_heads, got: h.len() });
            }
            Factors::Head(h)
        }
        (Dequant::Token(data, st), KvLayout::Tensors(cu)) => Factors::Token(strided_tokens(tensor, data, st, shape, *cu)?),
        (Dequant::TokenF16(data, st), KvLayout::Tensors(cu)) => Factors::TokenF16(strided_tokens(tensor, data, st, shape, *cu)?),
        (Dequant::PagedToken(data, st), KvLayout::Paged(table, lens)) => Factors::Token(paged_tokens(tensor, data, st, shape, table, lens)?),
        (Dequant::PagedTokenF16(data, st), KvLayout::Paged(table, lens)) => Factors::TokenF16(paged_tokens(tensor, data, st, shape, table, lens)?),
        (Dequant::Token(..) | Dequant::TokenF16(..), KvLayout::Paged(..)) => {
            return Err(AttnError::Unsupported { what: "strided per-token K/V scales with a paged cache (give them as Dequant::PagedToken, through the cache's block table)" })
        }
        (Dequant::PagedToken(..) | Dequant::PagedTokenF16(..), KvLayout::Tensors(_)) => {
            return Err(AttnError::Unsupported { what: "paged per-token K/V scales with a strided cache (give them as Dequant::Token)" })
        }
    })
}

/// Per-token factors of strided tensors (`Some(cu)`: packed keys), as rows of one element.
fn strided_tokens<'a, T>(tensor: TensorName, data: &'a [T], st: Strides, s: &crate::layout::AttentionShape, cu: Option<&'a [i32]>) -> Result<KvSource<'a, T>, AttnError> {
    if let Some(cu) = cu {
        return crate::kv::validate_packed(tensor, data, st, cu, s.kv_heads, 1);
    }
    let dims = [(s.batch, st.batch), (s.kv_heads, st.head), (s.seq_kv, st.seq)];
    let needed = crate::validate::reach(tensor, &dims, 1)?;
    if needed > data.len() {
        return Err(AttnError::BufferTooSmall { tensor, needed, len: data.len() });
    }
    Ok(KvSource::strided(data, st))
}

/// Per-token factors of a paged cache, found through its block table.
fn paged_tokens<'a, T>(
    tensor: TensorName,
    data: &'a [T],
    st: PageStrides,
    s: &crate::layout::AttentionShape,
    table: &crate::layout::PageTable<'a>,
    lens: &dyn Fn(usize) -> usize,
) -> Result<KvSource<'a, T>, AttnError> {
    crate::kv::validate_paged(tensor, data, st, table, s.batch, s.kv_heads, 1, (0..s.batch).map(lens))
}
