//! The work plan: how one call splits into independent units, and which units each worker runs.
//!
//! **Prefill** (many query rows): a unit is one query block (`br` rows) of one batch entry for
//! one KV head, run for every query head that shares the KV head (GQA: the K/V tiles a unit
//! brings into cache serve the whole group).
//!
//! **Decode** (a few query rows against a long KV cache): a unit is one *key partition* of
//! `part_len` keys (fixed by the shape, never by the thread count) of one batch entry and KV
//! head, for all query rows of a sub-group of that KV head's query heads at once, so each K/V
//! byte is read once per call rather than once per query head. A unit leaves an unnormalised
//! partial result; a merge step combines the partitions of each (batch, KV head, sub-group) in
//! partition order.
//!
//! When the K/V rows of a token's KV heads lie side by side (`[B, S, Hkv, D]` tensors,
//! token-major pages), a decode unit instead covers *every* KV head of a key partition and runs
//! them chunk by chunk in lockstep: one head alone would read a few hundred bytes out of every
//! `Hkv * D` elements, and the hardware prefetchers would fetch the neighbouring heads' lines and
//! lose them before those heads' units ran (on the Xeon this was measured on, such decode read at
//! half the bandwidth of `[B, Hkv, S, D]`). Partitions are then shorter, so a call still has
//! enough units to share.
//!
//! Units touch disjoint output rows (or partial slots), and a unit's result does not depend on
//! who runs it, so the output is bitwise identical for every thread count and both ways of
//! running. Units are numbered most expensive first (prefill: the last query blocks, which see
//! the most keys under a causal mask); workers either take them dynamically in that order (the
//! crate's pool) or take a fixed share (host-driven `(ith, nth)`): a snake over the numbering,
//! so each share mixes expensive and cheap units. Neither needs allocation: the plan is a
//! handful of integers.

use crate::layout::AttentionShape;
use crate::mask::RowMasker;
use crate::params::AttentionParams;

/// Query rows (heads x rows) one decode unit keeps in flight at most.
pub const DECODE_MAX_ROWS: usize = 64;
/// Keys per decode partition (the longest; see [`WorkPlan::decode`]).
pub const DECODE_PART_LEN: usize = 1024;
/// Units a decode plan whose units span every KV head aims for at least, by shortening its
/// partitions (to no fewer than [`DECODE_MIN_PART_LEN`] keys): enough to share among the
/// threads that one sequence's decode step scales to before memory bandwidth is the limit.
pub const DECODE_MIN_UNITS: usize = 8;
/// The shortest decode partition: one chunk of the decode kernel.
pub const DECODE_MIN_PART_LEN: usize = 64;

/// One unit of work: rows `q_start..q_end` of query heads `head_start..head_end` (all of KV
/// head `kv_head`'s group, or a sub-group in decode) of batch `batch`, against keys
/// `key_start..key_end`. `part` numbers the key partition (always 0 in prefill). A decode unit
/// may span KV heads `kv_head..kv_head_end` (and then all their query heads): it is run as its
/// [`WorkUnit::kv_sub`] units in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkUnit {
    pub batch: usize,
    pub kv_head: usize,
    pub kv_head_end: usize,
    pub head_start: usize,
    pub head_end: usize,
    pub q_start: usize,
    pub q_end: usize,
    pub key_start: usize,
    pub key_end: usize,
    pub part: usize,
}

impl WorkUnit {
    /// KV heads the unit spans.
    pub fn kv_heads(&self) -> usize {
        self.kv_head_end - self.kv_head
    }

    /// The part of the unit on its `t`-th KV head (`t < kv_heads()`; the unit itself when it
    /// spans one), whose query heads are that KV head's group of `group`.
    pub fn kv_sub(&self, t: usize, group: usize) -> WorkUnit {
        if self.kv_heads() == 1 {
            return *self;
        }
        let kv_head = self.kv_head + t;
        WorkUnit { kv_head, kv_head_end: kv_head + 1, head_start: kv_head * group, head_end: (kv_head + 1) * group, ..*self }
    }
}

/// Which kernel a plan is for. A decode plan splits each KV head's query heads into `subs`
/// sub-groups of `heads_per_sub`, the keys into `parts` partitions of `part_len`, and runs
/// `kv_span` KV heads per unit (1, or all of them with `subs == 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanKind {
    Prefill { block_rows: usize, q_blocks: usize },
    Decode { heads_per_sub: usize, subs: usize, parts: usize, part_len: usize, kv_span: usize },
}

/// The units of one call and how they are shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkPlan {
    batch: usize,
    kv_heads: usize,
    group: usize,
    seq_q: usize,
    seq_kv: usize,
    pub kind: PlanKind,
}

impl WorkPlan {
    /// A prefill plan with query blocks of `block_rows` rows (the kernel's `br`; it does not
    /// depend on the thread count).
    pub fn new(shape: &AttentionShape, block_rows: usize) -> Self {
        let block_rows = block_rows.max(1);
        Self::with_kind(shape, PlanKind::Prefill { block_rows, q_blocks: shape.seq_q.div_ceil(block_rows) })
    }

    /// A decode plan: sub-groups of at most [`DECODE_MAX_ROWS`] rows, partitions of
    /// [`DECODE_PART_LEN`] keys, one KV head per unit.
    pub fn decode(shape: &AttentionShape) -> Self {
        let group = shape.group_size();
        let heads_per_sub = (DECODE_MAX_ROWS / shape.seq_q.max(1)).clamp(1, group.max(1));
        let subs = group.div_ceil(heads_per_sub);
        let parts = shape.seq_kv.div_ceil(DECODE_PART_LEN).max(1);
        Self::with_kind(shape, PlanKind::Decode { heads_per_sub, subs, parts, part_len: DECODE_PART_LEN, kv_span: 1 })
    }

    /// A decode plan whose units span every KV head (for K/V whose heads lie side by side in
    /// each token; see the module docs): one sub-group per KV head (the caller checked that a
    /// KV head's rows fit one unit), and partitions of at most [`DECODE_PART_LEN`] keys,
    /// shortened so that the call has [`DECODE_MIN_UNITS`] units where its keys allow. Depends
    /// on the shape only, so results do not depend on the thread count.
    pub fn decode_across_heads(shape: &AttentionShape) -> Self {
        let group = shape.group_size().max(1);
        let keys = shape.seq_kv.max(1);
        let want = DECODE_MIN_UNITS.div_ceil(shape.batch.max(1));
        let parts = keys.div_ceil(DECODE_PART_LEN).max(want).min(keys.div_ceil(DECODE_MIN_PART_LEN));
        let part_len = keys.div_ceil(parts).next_multiple_of(DECODE_MIN_PART_LEN);
        let parts = keys.div_ceil(part_len);
        let kind = PlanKind::Decode { heads_per_sub: group, subs: 1, parts, part_len, kv_span: shape.kv_heads.max(1) };
        Self::with_kind(shape, kind)
    }

    fn with_kind(shape: &AttentionShape, kind: PlanKind) -> Self {
        Self {
            batch: shape.batch,
            kv_heads: shape.kv_heads,
            group: shape.group_size(),
            seq_q: shape.seq_q,
            seq_kv: shape.seq_kv,
            kind,
        }
    }

    /// Whether `shape` should run the decode path: a few query rows against many keys.
    pub fn prefers_decode(shape: &AttentionShape) -> bool {
        shape.seq_q <= 16 && shape.seq_kv >= 16
    }

    pub fn units(&self) -> usize {
        match self.kind {
            // Saturating: sizes that do not fit are rejected before any plan runs.
            PlanKind::Prefill { q_blocks, .. } => self.batch.saturating_mul(self.kv_heads).saturating_mul(q_blocks),
            PlanKind::Decode { subs, parts, kv_span, .. } => {
                self.batch.saturating_mul(self.kv_heads / kv_span).saturating_mul(subs).saturating_mul(parts)
            }
        }
    }

    /// Key partitions per (batch, KV head, sub-group): more than one means a merge step.
    pub fn parts(&self) -> usize {
        match self.kind {
            PlanKind::Prefill { .. } => 1,
            PlanKind::Decode { parts, .. } => parts,
        }
    }

    /// Unit number `u`, or `None` past the last one.
    pub fn get(&self, u: usize) -> Option<WorkUnit> {
        (u < self.units()).then(|| self.unit(u))
    }

    /// Unit number `u`; `u < units()` (the plan's own iterators only yield such numbers).
    pub(crate) fn unit(&self, u: usize) -> WorkUnit {
        let per_block = self.batch * self.kv_heads;
        match self.kind {
            PlanKind::Prefill { block_rows, q_blocks } => {
                let qb = q_blocks - 1 - u / per_block;
                let r = u % per_block;
                let (batch, kv_head) = (r / self.kv_heads, r % self.kv_heads);
                let q_start = qb * block_rows;
                WorkUnit {
                    batch,
                    kv_head,
                    kv_head_end: kv_head + 1,
                    head_start: kv_head * self.group,
                    head_end: (kv_head + 1) * self.group,
                    q_start,
                    q_end: (q_start + block_rows).min(self.seq_q),
                    key_start: 0,
                    key_end: self.seq_kv,
                    part: 0,
                }
            }
            PlanKind::Decode { heads_per_sub, subs, part_len, kv_span, .. } => {
                // Partition outermost, last partitions (which causal rows may not all see)
                // numbered last.
                let spans = self.kv_heads / kv_span;
                let part = u / (self.batch * spans * subs);
                let r = u % (self.batch * spans * subs);
                let (bk, sub) = (r / subs, r % subs);
                let (batch, kv_head) = (bk / spans, bk % spans * kv_span);
                let head_start = kv_head * self.group + sub * heads_per_sub;
                let head_end = if kv_span > 1 { (kv_head + kv_span) * self.group } else { (head_start + heads_per_sub).min((kv_head + 1) * self.group) };
                let key_start = part * part_len;
                WorkUnit {
                    batch,
                    kv_head,
                    kv_head_end: kv_head + kv_span,
                    head_start,
                    head_end,
                    q_start: 0,
                    q_end: self.seq_q,
                    key_start,
                    key_end: (key_start + part_len).min(self.seq_kv),
                    part,
                }
            }
        }
    }

    /// Slot of a (single KV head) decode unit's partial result: `(batch, kv_head, sub-group,
    /// part)` flattened.
    pub fn partial_slot(&self, unit: &WorkUnit) -> usize {
        match self.kind {
            PlanKind::Prefill { .. } => 0,
            PlanKind::Decode { heads_per_sub, subs, parts, .. } => {
                let sub = (unit.head_start - unit.kv_head * self.group) / heads_per_sub;
                ((unit.batch * self.kv_heads + unit.kv_head) * subs + sub) * parts + unit.part
            }
        }
    }

    /// Groups whose partitions a merge combines: `(batch, kv_head, sub-group)` flattened.
    pub fn merge_groups(&self) -> usize {
        match self.kind {
            PlanKind::Prefill { .. } => 0,
            PlanKind::Decode { subs, .. } => self.batch * self.kv_heads * subs,
        }
    }

    /// The unit numbers of worker `ith` of `nth`: in round `k` (units `k*nth .. (k+1)*nth`),
    /// worker `i` takes position `i` when `k` is even and `nth - 1 - i` when odd.
    pub fn share(&self, ith: usize, nth: usize) -> impl Iterator<Item = usize> {
        snake(self.units(), ith, nth)
    }

    /// Visible (row, key) pairs of a unit, summed over its query heads: its cost, for
    /// inspecting balance.
    pub fn cost(&self, unit: &WorkUnit, shape: &AttentionShape, params: &AttentionParams<'_>) -> u64 {
        let masker = RowMasker::new(shape, params);
        let kv_len = params.kv_len(unit.batch, shape.seq_kv);
        let first = shape.seq_q.saturating_sub(params.q_len(unit.batch, shape.seq_q));
        let pairs: u64 = (unit.q_start.max(first)..unit.q_end)
            .map(|i| {
                let (lo, hi) = masker.interval(kv_len, i);
                hi.min(unit.key_end).saturating_sub(lo.max(unit.key_start)) as u64
            })
            .sum();
        pairs * (unit.head_end - unit.head_start) as u64
    }

    /// Query rows of the decode kernel's scratch per worker: a sub-group's, or for units spanning
    /// KV heads, each head's rows rounded up to a power of two (the kernel's slot per head).
    pub fn decode_scratch_rows(&self) -> usize {
        match self.kind {
            PlanKind::Prefill { .. } => 0,
            PlanKind::Decode { heads_per_sub, kv_span: 1, .. } => heads_per_sub * self.seq_q,
            PlanKind::Decode { heads_per_sub, kv_span, .. } => kv_span * (heads_per_sub * self.seq_q).next_power_of_two(),
        }
    }

    /// Cost of each of `nth` shares (for tests and tuning).
    pub fn share_costs(&self, nth: usize, shape: &AttentionShape, params: &AttentionParams<'_>) -> Vec<u64> {
        (0..nth).map(|i| self.share(i, nth).map(|u| self.cost(&self.unit(u), shape, params)).sum()).collect()
    }
}

/// Worker `ith`'s share of `total` items numbered most expensive first (see [`WorkPlan::share`]).
pub fn snake(total: usize, ith: usize, nth: usize) -> impl Iterator<Item = usize> {
    let rounds = if ith < nth { total.div_ceil(nth) } else { 0 };
    (0..rounds)
        .map(move |k| k * nth + if k % 2 == 0 { ith } else { nth - 1 - ith })
        .filter(move |&u| u < total)
}
