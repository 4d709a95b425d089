//! Where a call's query rows live: a padded `[B, H, Sq]` tensor, or packed variable-length
//! sequences (`cu_seqlens_q`, as `flash_attn_varlen_func` takes them).
//!
//! A packed sequence `b` of `q_len` rows runs as the **last** `q_len` rows of a padded
//! sequence of `seq_q` rows: row `i` of `b` is the virtual row `i + (seq_q - q_len)`. With
//! that, the masker's bottom-right alignment (`i_virtual + kv_len - seq_q = i + kv_len - q_len`)
//! and ALiBi positions are already each sequence's own, the work plan keeps its fixed units,
//! and the kernels run unchanged: only the rows a unit covers are clipped to the present ones
//! ([`QRows::clip`]), and Q, out and LSE offsets are mapped to tokens here.

use crate::layout::{AttentionShape, Strides};
use crate::params::AttentionParams;
use crate::plan::work::WorkUnit;

/// The row layout of one (validated) call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QRows<'a> {
    /// `cu_seqlens_q`, for a packed call.
    cu: Option<&'a [i32]>,
    seq_q: usize,
    q_heads: usize,
}

impl<'a> QRows<'a> {
    pub fn new(shape: &AttentionShape, params: &AttentionParams<'a>) -> Self {
        Self { cu: params.cu_seqlens_q, seq_q: shape.seq_q, q_heads: shape.q_heads }
    }

    /// The first present virtual row of sequence `b` (0 unless packed).
    #[inline(always)]
    pub fn first(&self, b: usize) -> usize {
        match self.cu {
            None => 0,
            Some(cu) => self.seq_q - (cu[b + 1] - cu[b]) as usize,
        }
    }

    /// The token of virtual row `i` of a packed sequence `b`.
    #[inline(always)]
    fn token(cu: &[i32], first: usize, b: usize, i: usize) -> usize {
        cu[b] as usize + (i - first)
    }

    /// Element offset of row `(b, h, i)` (`i` virtual, present) of a tensor with `strides`.
    #[inline(always)]
    pub fn offset(&self, strides: &Strides, b: usize, h: usize, i: usize) -> usize {
        match self.cu {
            None => strides.offset(b, h, i),
            Some(cu) => Self::token(cu, self.first(b), b, i) * strides.seq + h * strides.head,
        }
    }

    /// Index of row `(b, h, i)`'s LSE: `[B, Hq, Sq]`, or `[Hq, total_tokens]` when packed.
    #[inline(always)]
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        match self.cu {
            None => (b * self.q_heads + h) * self.seq_q + i,
            Some(cu) => h * cu[cu.len() - 1] as usize + Self::token(cu, self.first(b), b, i),
        }
    }

    /// `w` with its rows clipped to the present ones, or `None` when it has none.
    #[inline(always)]
    pub fn clip(&self, w: WorkUnit) -> Option<WorkUnit> {
        let q_start = w.q_start.max(self.first(w.batch));
        (q_start < w.q_end).then_some(WorkUnit { q_start, ..w })
    }
}
