//! The work plan: how one call splits into independent units, and which units each worker runs.
//!
//! A unit is one query block (`br` rows) of one batch entry for one KV head, run for every query
//! head that shares the KV head (GQA: the K/V tiles a unit brings into cache serve the whole
//! group). Units touch disjoint output rows, and a unit's result does not depend on who runs
//! it, so the output is bitwise identical for every thread count and both ways of running.
//!
//! Units are numbered with the query block outermost and *descending*: under a causal mask the
//! last query blocks see the most keys, so low numbers are the expensive units. Workers either
//! take units dynamically in that order (the crate's pool: largest first), or take a fixed
//! share (host-driven `(ith, nth)`): a snake over the numbering, so each share mixes expensive
//! and cheap units. Both need no allocation: the plan is a handful of integers.

use crate::layout::AttentionShape;
use crate::mask::RowMasker;
use crate::params::AttentionParams;

/// One unit of work: rows `q_start..q_end` of batch `batch`, for every query head of KV head
/// `kv_head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkUnit {
    pub batch: usize,
    pub kv_head: usize,
    pub q_start: usize,
    pub q_end: usize,
}

/// The units of one call and how they are shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkPlan {
    batch: usize,
    kv_heads: usize,
    seq_q: usize,
    block_rows: usize,
    q_blocks: usize,
}

impl WorkPlan {
    /// The plan for a shape with query blocks of `block_rows` rows (the kernel's `br`; it does
    /// not depend on the thread count).
    pub fn new(shape: &AttentionShape, block_rows: usize) -> Self {
        let block_rows = block_rows.max(1);
        Self {
            batch: shape.batch,
            kv_heads: shape.kv_heads,
            seq_q: shape.seq_q,
            block_rows,
            q_blocks: shape.seq_q.div_ceil(block_rows),
        }
    }

    pub fn units(&self) -> usize {
        self.batch * self.kv_heads * self.q_blocks
    }

    /// Unit number `u` (`u < units()`).
    pub fn unit(&self, u: usize) -> WorkUnit {
        let per_block = self.batch * self.kv_heads;
        let qb = self.q_blocks - 1 - u / per_block;
        let r = u % per_block;
        let q_start = qb * self.block_rows;
        WorkUnit {
            batch: r / self.kv_heads,
            kv_head: r % self.kv_heads,
            q_start,
            q_end: (q_start + self.block_rows).min(self.seq_q),
        }
    }

    /// The unit numbers of worker `ith` of `nth`: in round `k` (units `k*nth .. (k+1)*nth`),
    /// worker `i` takes position `i` when `k` is even and `nth - 1 - i` when odd.
    pub fn share(&self, ith: usize, nth: usize) -> impl Iterator<Item = usize> {
        let total = self.units();
        let rounds = if ith < nth { total.div_ceil(nth) } else { 0 };
        (0..rounds)
            .map(move |k| k * nth + if k % 2 == 0 { ith } else { nth - 1 - ith })
            .filter(move |&u| u < total)
    }

    /// Visible (row, key) pairs of a unit, summed over its query heads: its cost, for
    /// inspecting balance.
    pub fn cost(&self, unit: &WorkUnit, shape: &AttentionShape, params: &AttentionParams<'_>) -> u64 {
        let masker = RowMasker::new(shape, params);
        let kv_len = params.kv_lens.map_or(shape.seq_kv, |l| l.get(unit.batch).copied().unwrap_or(0));
        let pairs: u64 = (unit.q_start..unit.q_end)
            .map(|i| {
                let (lo, hi) = masker.interval(kv_len, i);
                (hi - lo) as u64
            })
            .sum();
        pairs * shape.group_size() as u64
    }

    /// Cost of each of `nth` shares (for tests and tuning).
    pub fn share_costs(&self, nth: usize, shape: &AttentionShape, params: &AttentionParams<'_>) -> Vec<u64> {
        (0..nth).map(|i| self.share(i, nth).map(|u| self.cost(&self.unit(u), shape, params)).sum()).collect()
    }
}
