//! Which keys a query row may see: causal, sliding window and per-batch KV length.
//!
//! All three masks make the visible keys of row `i` one interval `[lo(i), hi(i))`, and both
//! ends are non-decreasing in `i`. The kernels use that to skip whole key tiles and to pay for
//! per-element masking only on tiles that straddle an interval end. (The reference does not use
//! this module: it tests each pair against the contract literally, so the two cross-check.)

use crate::layout::AttentionShape;
use crate::params::AttentionParams;

/// The interval rule of one call.
#[derive(Clone, Copy, Debug)]
pub struct RowMasker {
    seq_q: i64,
    causal: bool,
    /// Window bounds, `i64::MAX` when unbounded: plain integers rather than `Option`s, so every
    /// byte of a masker is initialised (LLVM speculated compares on the payload of a `None`,
    /// which valgrind reported as a branch on uninitialised memory) and the interval
    /// arithmetic below needs no branch.
    left: i64,
    right: i64,
}

#[inline(always)]
fn to_i64(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

impl RowMasker {
    pub fn new(shape: &AttentionShape, params: &AttentionParams<'_>) -> Self {
        let w = params.window.unwrap_or_default();
        Self {
            seq_q: to_i64(shape.seq_q),
            causal: params.causal,
            left: w.left.map_or(i64::MAX, to_i64),
            right: w.right.map_or(i64::MAX, to_i64),
        }
    }

    /// Visible keys `[lo, hi)` of query row `i` when `kv_len` keys are valid; `lo == hi` when
    /// none is.
    #[inline]
    pub fn interval(&self, kv_len: usize, i: usize) -> (usize, usize) {
        let n = to_i64(kv_len);
        let pos = to_i64(i).saturating_add(n).saturating_sub(self.seq_q); // i + off
        let mut hi = n;
        if self.causal {
            hi = hi.min(pos.saturating_add(1));
        }
        // Unbounded sides saturate to no constraint: pos + MAX + 1 >= n, pos - MAX <= 0.
        hi = hi.min(pos.saturating_add(self.right).saturating_add(1));
        let lo = 0i64.max(pos.saturating_sub(self.left));
        let lo = lo.clamp(0, n);
        let hi = hi.clamp(lo, n);
        (lo as usize, hi as usize)
    }

    /// For the query rows `[i0, i1)` (non-empty): the keys some row may see (`union`) and the
    /// keys every row sees (`common`, possibly empty). Relies on the ends being monotone.
    #[inline]
    pub fn block(&self, kv_len: usize, i0: usize, i1: usize) -> BlockKeys {
        let (first_lo, first_hi) = self.interval(kv_len, i0);
        let (last_lo, last_hi) = self.interval(kv_len, i1 - 1);
        BlockKeys {
            union: (first_lo, last_hi.max(first_lo)),
            common: (last_lo, first_hi.max(last_lo)),
        }
    }
}

/// Key ranges of one query block; see [`RowMasker::block`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKeys {
    pub union: (usize, usize),
    pub common: (usize, usize),
}

impl BlockKeys {
    /// Whether every row of the block sees every key of `[j0, j1)`, so no mask is needed.
    #[inline(always)]
    pub fn all_visible(&self, j0: usize, j1: usize) -> bool {
        self.common.0 <= j0 && j1 <= self.common.1
    }
}
