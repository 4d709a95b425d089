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
    /// `cu_seqlens_q` of a packed call (empty otherwise). A plain slice and a flag rather than
    /// an `Option`, so no branch can depend on the bytes of a `None`'s payload.
    cu: &'a [i32],
    packed: bool,
    seq_q: usize,
    q_heads: usize,
}

impl<'a> QRows<'a> {
    pub fn new(shape: &AttentionShape, params: &AttentionParams<'a>) -> Self {
        let cu = params.cu_seqlens_q.unwrap_or(&[]);
        Self { cu, packed: params.cu_seqlens_q.is_some(), seq_q: shape.seq_q, q_heads: shape.q_heads }
    }

    /// The first present virtual row of sequence `b` (0 unless packed).
    #[inline(always)]
    pub fn first(&self, b: usize) -> usize {
        if self.packed { self.seq_q - (self.cu[b + 1] - self.cu[b]) as usize } else { 0 }
    }

    /// The token of virtual row `i` of a packed sequence `b`.
    #[inline(always)]
    fn token(cu: &[i32], first: usize, b: usize, i: usize) -> usize {
        cu[b] as usize + (i - first)
    }

    /// Element offset of row `(b, h, i)` (`i` virtual, present) of a tensor with `strides`.
    #[inline(always)]
    pub fn offset(&self, strides: &Strides, b: usize, h: usize, i: usize) -> usize {
        if self.packed {
            Self::token(self.cu, self.first(b), b, i) * strides.seq + h * strides.head
        } else {
            strides.offset(b, h, i)
        }
    }

    /// Index of row `(b, h, i)`'s LSE: `[B, Hq, Sq]`, or `[Hq, total_tokens]` when packed.
    #[inline(always)]
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        if self.packed {
            h * self.cu[self.cu.len() - 1] as usize + Self::token(self.cu, self.first(b), b, i)
        } else {
            (b * self.q_heads + h) * self.seq_q + i
        }
    }

    /// `w` with its rows clipped to the present ones, or `None` when it has none.
    #[inline(always)]
    pub fn clip(&self, w: WorkUnit) -> Option<WorkUnit> {
        let q_start = w.q_start.max(self.first(w.batch));
        (q_start < w.q_end).then_some(WorkUnit { q_start, ..w })
    }
}
