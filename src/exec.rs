//! Execution: running the units of a work plan on a kernel, on one thread, on the crate's pool,
//! or as one share of a host-driven run.

use crate::element::{DType, KvPair};
use crate::error::AttnError;
use crate::isa::Isa;
use crate::kernel::{decode, flash, portable};
use crate::kernel::softmax::RowState;
use crate::plan::work::{PlanKind, WorkPlan, WorkUnit};
use crate::plan::{for_each_simd_family, Family, Tiles};
use crate::problem::Problem;
use crate::simd::{run_avx2, run_avx512, run_neon, run_scalar, SimdExt, WithSimdExt};
use crate::score::ScoreData;
use crate::store::{InspectRows, OutRows};
use core::cell::RefCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Which units a worker runs: a fixed share, or the next free unit of a shared counter.
#[derive(Clone, Copy)]
pub(crate) enum Units<'n> {
    Share { ith: usize, nth: usize },
    Dynamic { next: &'n AtomicUsize },
}

/// Iterates a worker's unit numbers. A plain struct, not a closure, so it inlines into the
/// ISA-specific function that runs the kernel.
struct UnitIter<'n> {
    units: Units<'n>,
    total: usize,
    round: usize,
}

impl UnitIter<'_> {
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        match self.units {
            Units::Dynamic { next } => Some(next.fetch_add(1, Ordering::Relaxed)).filter(|&u| u < self.total),
            Units::Share { ith, nth } => {
                if ith >= nth {
                    return None;
                }
                let k = self.round;
                self.round += 1;
                let u = k * nth + if k.is_multiple_of(2) { ith } else { nth - 1 - ith };
                (u < self.total).then_some(u)
            }
        }
    }
}

/// Everything a worker needs besides its scratch and its units.
pub(crate) struct Job<'j, 'a, 'o, TKV: KvPair> {
    pub p: &'j Problem<'a, TKV>,
    pub out: &'j OutRows<'o>,
    pub plan: WorkPlan,
    pub tiles: Tiles,
    pub isa: Isa,
    /// Where decode units leave their unnormalised results when a merge follows.
    pub partials: Partials<'j>,
    /// Set for the alignment pass: the units then recompute probabilities from the LSE into
    /// these outputs instead of running attention.
    pub align: Option<AlignPass<'j>>,
}

/// The second pass of a call that asked for its attention probabilities or coverage.
#[derive(Clone, Copy)]
pub(crate) struct AlignPass<'j> {
    pub out: &'j InspectRows<'j>,
    /// The final LSE of every row, `[B, Hq, Sq]`.
    pub lse: &'j [f32],
}

/// The unnormalised results of decode units, one slot per (batch, KV head, sub-group,
/// partition): `rows` accumulator rows of `v_head_dim`, then `rows` maxima, then `rows` sums.
/// Shared by the call's workers like `OutRows`: each unit writes only its own slot, and the
/// merge reads them only after every unit has run.
#[derive(Clone, Copy)]
pub(crate) struct Partials<'j> {
    ptr: *mut f32,
    len: usize,
    rows: usize,
    dv: usize,
    _borrow: core::marker::PhantomData<&'j mut [f32]>,
}

// SAFETY: see the type docs: disjoint writes, reads after a barrier.
unsafe impl Send for Partials<'_> {}
unsafe impl Sync for Partials<'_> {}

impl<'j> Partials<'j> {
    /// Floats needed for a plan (0 when no merge follows), or `None` if that does not fit in
    /// memory at all (`seq_kv` is bounded by no buffer when K/V have a zero sequence stride).
    pub fn len_for(plan: &WorkPlan, shape: &crate::layout::AttentionShape) -> Option<usize> {
        match plan.kind {
            PlanKind::Decode { heads_per_sub, subs, parts, .. } if parts > 1 => {
                let n = [shape.batch, shape.kv_heads, subs, parts, heads_per_sub, shape.seq_q, shape.v_head_dim + 2]
                    .iter()
                    .try_fold(1u128, |a, &x| a.checked_mul(x as u128))?;
                (n <= (isize::MAX as u128) / 4).then_some(n as usize)
            }
            _ => Some(0),
        }
    }

    /// No partials (a pass that never merges).
    pub fn empty() -> Self {
        Self { ptr: core::ptr::null_mut(), len: 0, rows: 0, dv: 0, _borrow: core::marker::PhantomData }
    }

    pub fn new(buf: &'j mut [f32], plan: &WorkPlan, shape: &crate::layout::AttentionShape) -> Self {
        // SAFETY: a live, exclusively borrowed buffer for 'j.
        unsafe { Self::from_raw(buf.as_mut_ptr(), buf.len(), plan, shape) }
    }

    /// # Safety
    /// `ptr..ptr + len` is valid for reads and writes for 'j and accessed only through
    /// `Partials` values made from it.
    pub unsafe fn from_raw(ptr: *mut f32, len: usize, plan: &WorkPlan, shape: &crate::layout::AttentionShape) -> Self {
        let rows = match plan.kind {
            PlanKind::Decode { heads_per_sub, .. } => heads_per_sub * shape.seq_q,
            PlanKind::Prefill { .. } => 0,
        };
        Self { ptr, len, rows, dv: shape.v_head_dim, _borrow: core::marker::PhantomData }
    }

    fn slot_len(&self) -> usize {
        self.rows * (self.dv + 2)
    }

    /// # Safety
    /// Only the unit owning `slot` writes it, and nobody reads it meanwhile.
    // `&mut` from `&self` is the point: the buffer is raw and shared by the call's workers,
    // and the contract above makes each returned slice exclusive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot_mut(&self, slot: usize) -> &mut [f32] {
        let n = self.slot_len();
        assert!((slot + 1) * n <= self.len, "partial slot inside the buffer");
        // SAFETY: in bounds (checked); exclusive per the contract above.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(slot * n), n) }
    }

    /// # Safety
    /// Every unit has finished writing (a barrier separates them from this read).
    unsafe fn slot(&self, slot: usize) -> &[f32] {
        let n = self.slot_len();
        assert!((slot + 1) * n <= self.len, "partial slot inside the buffer");
        // SAFETY: in bounds; no writer remains.
        unsafe { core::slice::from_raw_parts(self.ptr.add(slot * n), n) }
    }
}

impl<TKV: KvPair> Clone for Job<'_, '_, '_, TKV> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<TKV: KvPair> Copy for Job<'_, '_, '_, TKV> {}

/// The plan, block sizes, per-worker scratch length and decode-partials length (f32 elements)
/// of a path for a problem. Decode shapes get the decode plan on the SIMD paths; the portable
/// kernel, the baseline, always runs the prefill plan.
/// `keys` bounds the keys any row can see (the longest `kv_lens` entry, else `seq_kv`);
/// `decode` false keeps the prefill plan (the additive score has no decode kernel);
/// `kv_heads_side_by_side` says a token's KV heads lie next to each other in K or V (see
/// [`WorkPlan::decode_across_heads`]).
pub(crate) fn plan_for(
    isa: Isa,
    kv_dtype: DType,
    shape: &crate::layout::AttentionShape,
    keys: usize,
    decode: bool,
    kv_heads_side_by_side: bool,
) -> Result<(WorkPlan, Tiles, usize, usize), AttnError> {
    let family = Family::for_call(isa, kv_dtype);
    let (d, dv) = (shape.head_dim, shape.v_head_dim);
    let tiles = family.tiles(d, dv);
    let too_big = AttnError::SizeOverflow { tensor: crate::error::TensorName::K };
    if shape.batch == 0 || shape.seq_q == 0 {
        // An empty call: no unit, no scratch, whatever the other dims say.
        return Ok((WorkPlan::new(shape, tiles.br), tiles, 0, 0));
    }
    let (plan, scratch) = if isa == Isa::Portable {
        (WorkPlan::new(shape, tiles.br), portable::Scratch::len(&tiles, d, dv))
    } else if decode && WorkPlan::prefers_decode(shape) {
        // Partitions cover only the keys some row can see (`keys`, the longest `kv_lens`).
        let seen = crate::layout::AttentionShape { seq_kv: keys.min(shape.seq_kv), ..*shape };
        // Units across KV heads run on the few-rows kernel only: a KV head's rows must fit it.
        let across = kv_heads_side_by_side && shape.kv_heads > 1 && decode::takes_few(family.lanes, shape.group_size() * shape.seq_q, d, dv);
        let plan = if across { WorkPlan::decode_across_heads(&seen) } else { WorkPlan::decode(&seen) };
        (plan, decode::Scratch::len(plan.decode_scratch_rows(), family.mr, family.lanes, d, dv))
    } else {
        (WorkPlan::new(shape, tiles.br), flash::Scratch::len(&tiles, family.lanes, d, dv))
    };
    // Scratch sizes saturate rather than wrap; anything near that is no real buffer.
    if plan.units() == usize::MAX || scratch > isize::MAX as usize / 8 {
        return Err(too_big);
    }
    let partials = Partials::len_for(&plan, shape).ok_or(too_big)?;
    Ok((plan, tiles, scratch, partials))
}

/// The alignment pass's path, plan, tiles and per-worker scratch: units of every query row of
/// a batch entry and KV head's query heads (each unit then owns those heads' coverage), on the
/// SIMD flash kernel's score code. The portable path runs it on the scalar `Simd`, the same
/// code at one lane.
pub(crate) fn alignment_plan(isa: Isa, kv_dtype: DType, shape: &crate::layout::AttentionShape) -> (Isa, WorkPlan, Tiles, usize) {
    let isa = if isa == Isa::Portable { Isa::Scalar } else { isa };
    let family = Family::for_call(isa, kv_dtype);
    let tiles = family.tiles(shape.head_dim, shape.v_head_dim);
    let scratch = flash::Scratch::len(&tiles, family.lanes, shape.head_dim, shape.v_head_dim);
    (isa, WorkPlan::new(shape, shape.seq_q.max(1)), tiles, scratch)
}

/// Scratch floats the merge of `plan` needs (one output row), 0 when it has no merge.
pub(crate) fn merge_row_len(plan: &WorkPlan, shape: &crate::layout::AttentionShape) -> usize {
    if plan.parts() > 1 { shape.v_head_dim } else { 0 }
}

/// A zeroed buffer of `len` floats, or `OutOfMemory` instead of aborting.
pub(crate) fn try_zeroed(len: usize) -> Result<Vec<f32>, AttnError> {
    crate::error::try_vec(core::iter::repeat_n(0.0, len))
}

/// Runs `units` of `job` with `scratch` (at least the length `tiles_and_scratch` gave).
/// Returns the specialised head dim that ran, or `None` for the generic path; `Err` if the
/// job's ISA cannot run here.
pub(crate) fn run_units<TKV: KvPair>(
    job: Job<'_, '_, '_, TKV>,
    units: Units<'_>,
    scratch: &mut [f32],
) -> Result<Option<usize>, ()> {
    let iter = UnitIter { units, total: job.plan.units(), round: 0 };
    if iter.total == 0 {
        // An empty call's plan: its scratch was sized 0, so no kernel may carve it.
        return Ok(None);
    }
    if job.isa == Isa::Portable {
        run_portable(job, iter, scratch);
        return Ok(None);
    }
    let (d, dv) = (job.p.shape.head_dim, job.p.shape.v_head_dim);
    // The AVX512_BF16 path has kernels for bf16 K/V only; other storage runs AVX-512's.
    let isa = if job.isa == Isa::Avx512Bf16 && Family::find(job.isa, TKV::FAMILY).is_none() { Isa::Avx512 } else { job.isa };
    // A storage type without a family of its own runs the f32 family's kernel body, which
    // converts through `Element` (correct for every storage type, if not the fastest).
    let dtype = if Family::find(isa, TKV::FAMILY).is_some() { TKV::FAMILY } else { DType::F32 };
    macro_rules! run_isa {
        (Scalar, $op:expr) => { run_scalar($op) };
        (Avx2, $op:expr) => { run_avx2($op) };
        (Avx512, $op:expr) => { run_avx512($op) };
        (Neon, $op:expr) => { run_neon($op) };
        (Avx512Bf16, $op:expr) => { crate::simd::run_bf16_dot($op) };
    }
    // The additive score specialises on its padded attention dim instead of the head dim.
    let additive = match job.p.score {
        ScoreData::Additive(a) => Some(a.a_pad),
        _ => None,
    };
    macro_rules! arms {
        ($([$isa:ident, $dt:ident, $mr:literal, $nrv:literal, [$($hd:literal),*], [$($ad:literal),*]])*) => {
            $(
                if isa == Isa::$isa && dtype == DType::$dt {
                    match additive {
                        Some(a) => {
                            $(
                                if a == $ad {
                                    return run_isa!($isa, Specialised::<_, $ad, $mr, $nrv> { job, iter, scratch }).ok_or(());
                                }
                            )*
                        }
                        None => {
                            $(
                                if d == $hd && dv == $hd {
                                    return run_isa!($isa, Specialised::<_, $hd, $mr, $nrv> { job, iter, scratch }).ok_or(());
                                }
                            )*
                        }
                    }
                    return run_isa!($isa, Specialised::<_, 0, $mr, $nrv> { job, iter, scratch }).ok_or(());
                }
            )*
        };
    }
    for_each_simd_family!(arms);
    Err(())
}

fn run_portable<TKV: KvPair>(job: Job<'_, '_, '_, TKV>, mut iter: UnitIter<'_>, scratch: &mut [f32]) {
    let s = &job.p.shape;
    let mut sc = portable::Scratch::new(scratch, &job.tiles, s.head_dim, s.v_head_dim);
    while let Some(u) = iter.next() {
        let Some(w) = job.p.rows.clip(job.plan.unit(u)) else { continue };
        for h in w.head_start..w.head_end {
            portable::query_block(job.p, &job.tiles, w.batch, h, w.q_start, w.q_end, &mut sc);
            let n = w.q_end - w.q_start;
            // SAFETY: unit `u` is run once (see `store`), so its rows have no other writer.
            unsafe { job.out.store(w.batch, h, w.q_start, sc.acc, s.v_head_dim, n, sc.lse) };
        }
    }
}

/// A job bound to one specialisation: head dim `D` (0 = generic) and register tile `MR x NRV`.
struct Specialised<'j, 'a, 'o, 'n, 's, TKV: KvPair, const D: usize, const MR: usize, const NRV: usize> {
    job: Job<'j, 'a, 'o, TKV>,
    iter: UnitIter<'n>,
    scratch: &'s mut [f32],
}

impl<TKV: KvPair, const D: usize, const MR: usize, const NRV: usize> WithSimdExt
    for Specialised<'_, '_, '_, '_, '_, TKV, D, MR, NRV>
{
    type Output = Option<usize>;

    #[inline(always)]
    fn with_simd<S: SimdExt>(self, simd: S) -> Option<usize> {
        let Specialised { job, mut iter, scratch } = self;
        let s = &job.p.shape;
        if let Some(al) = job.align {
            let mut sc = flash::Scratch::new(scratch, &job.tiles, S::F32_LANES, s.head_dim, s.v_head_dim);
            let (br, skv) = (job.tiles.br.max(1), s.seq_kv);
            while let Some(u) = iter.next() {
                let w = job.plan.unit(u);
                for h in w.head_start..w.head_end {
                    // SAFETY: unit `u` runs once and owns every row of its heads.
                    let (mut probs, mut cov) = unsafe { al.out.head(w.batch, h) };
                    if let Some(c) = cov.as_deref_mut() {
                        c.fill(0.0);
                    }
                    for i0 in (w.q_start..w.q_end).step_by(br) {
                        let i1 = (i0 + br).min(w.q_end);
                        let lse = &al.lse[(w.batch * s.q_heads + h) * s.seq_q + i0..][..i1 - i0];
                        let rows = probs.as_deref_mut().map(|p| &mut p[i0 * skv..i1 * skv]);
                        let at = (w.batch, h, i0, i1);
                        flash::alignment_block::<S, TKV, D, MR, NRV>(simd, job.p, &job.tiles, at, lse, &mut sc, rows, cov.as_deref_mut());
                    }
                }
            }
            return (D != 0).then_some(D);
        }
        if let PlanKind::Decode { .. } = job.plan.kind {
            let mut sc = decode::Scratch::new(scratch, job.plan.decode_scratch_rows(), MR, S::F32_LANES, s.head_dim, s.v_head_dim);
            // The next unit is claimed before this one runs, so the kernel can hint its first
            // keys while this one's last chunk computes: otherwise every unit starts on K/V that
            // nothing has asked for yet (one chunk in sixteen of a 1024-key partition).
            // Units without a present row (packed sequences shorter than `seq_q`) are skipped.
            let mut claim = || loop {
                match iter.next() {
                    None => break None,
                    Some(u) => {
                        if let Some(w) = job.p.rows.clip(job.plan.unit(u)) {
                            break Some(w);
                        }
                    }
                }
            };
            let mut next = claim();
            while let Some(w) = next {
                next = claim();
                let after = next;
                decode::decode_unit::<S, TKV, D, MR, NRV>(simd, job.p, &w, after.as_ref(), &mut sc);
                if w.kv_heads() == 1 {
                    finish_decode_unit(&job, &w, sc.acc, sc.max, sc.sum, sc.dv_pad);
                } else {
                    // Each KV head's rows sit in their own slot of the scratch (see `decode`).
                    let slot = (w.head_end - w.head_start) / w.kv_heads() * (w.q_end - w.q_start);
                    let slot = slot.next_power_of_two();
                    for t in 0..w.kv_heads() {
                        let acc = &mut sc.acc[t * slot * sc.dv_pad..(t + 1) * slot * sc.dv_pad];
                        let at = t * slot..(t + 1) * slot;
                        finish_decode_unit(&job, &w.kv_sub(t, s.group_size()), acc, &sc.max[at.clone()], &sc.sum[at], sc.dv_pad);
                    }
                }
            }
            return (D != 0).then_some(D);
        }
        let mut sc = flash::Scratch::new(scratch, &job.tiles, S::F32_LANES, s.head_dim, s.v_head_dim);
        while let Some(u) = iter.next() {
            let Some(w) = job.p.rows.clip(job.plan.unit(u)) else { continue };
            for h in w.head_start..w.head_end {
                flash::query_block::<S, TKV, D, MR, NRV>(simd, job.p, &job.tiles, w.batch, h, w.q_start, w.q_end, &mut sc);
                let n = w.q_end - w.q_start;
                // SAFETY: unit `u` is run once (see `store`), so its rows have no other writer.
                unsafe { job.out.store(w.batch, h, w.q_start, sc.acc, sc.dv_pad, n, sc.lse) };
            }
        }
        (D != 0).then_some(D)
    }
}

/// The AVX512_BF16 path: prefill units of calls the dot-product kernel takes run it; every
/// other unit (decode, the alignment pass, inputs it does not take) runs the AVX-512 kernels.
impl<TKV: KvPair, const D: usize, const MR: usize, const NRV: usize> crate::simd::WithBf16Dot
    for Specialised<'_, '_, '_, '_, '_, TKV, D, MR, NRV>
{
    type Output = Option<usize>;

    #[inline(always)]
    fn with_bf16(self, bf: crate::simd::Bf16Dot) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernel::bf16dot;
            if self.job.align.is_some() || !matches!(self.job.plan.kind, PlanKind::Prefill { .. }) || !bf16dot::takes(self.job.p) {
                return self.with_simd(bf.v4);
            }
            let Specialised { job, mut iter, scratch } = self;
            let s = &job.p.shape;
            let mut sc = flash::Scratch::new(scratch, &job.tiles, 16, s.head_dim, s.v_head_dim);
            while let Some(u) = iter.next() {
                let Some(w) = job.p.rows.clip(job.plan.unit(u)) else { continue };
                for h in w.head_start..w.head_end {
                    bf16dot::query_block::<TKV, D, MR, NRV>(bf, job.p, &job.tiles, w.batch, h, w.q_start, w.q_end, &mut sc);
                    let n = w.q_end - w.q_start;
                    // SAFETY: unit `u` is run once (see `store`), so its rows have no other writer.
                    unsafe { job.out.store(w.batch, h, w.q_start, sc.acc, sc.dv_pad, n, sc.lse) };
                }
            }
            (D != 0).then_some(D)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = bf;
            unreachable!("a Bf16Dot exists only on x86-64")
        }
    }
}

/// A decode unit's rows: normalised into the output when its partition is the only one, else
/// left in its partial slot for the merge.
fn finish_decode_unit<TKV: KvPair>(job: &Job<'_, '_, '_, TKV>, w: &WorkUnit, acc: &mut [f32], max: &[f32], sum: &[f32], pitch: usize) {
    let s = &job.p.shape;
    let per_head = w.q_end - w.q_start;
    let rows = (w.head_end - w.head_start) * per_head;
    if job.plan.parts() == 1 {
        for r in 0..rows {
            let (inv, lse) = RowState { max: max[r], sum: sum[r] }.finish();
            let row = &mut acc[r * pitch..r * pitch + s.v_head_dim];
            row.iter_mut().for_each(|x| *x *= inv);
            let (h, i) = (w.head_start + r / per_head, w.q_start + r % per_head);
            // SAFETY: this unit is the only one covering these rows (one partition).
            unsafe { job.out.store(w.batch, h, i, row, pitch, 1, &[lse]) };
        }
        return;
    }
    let dv = s.v_head_dim;
    // SAFETY: the slot belongs to this unit alone; merges read it after every unit ran.
    let slot = unsafe { job.partials.slot_mut(job.plan.partial_slot(w)) };
    let full = job.partials.rows;
    for r in 0..rows {
        slot[r * dv..(r + 1) * dv].copy_from_slice(&acc[r * pitch..r * pitch + dv]);
    }
    slot[full * dv..full * dv + rows].copy_from_slice(&max[..rows]);
    slot[full * dv + full..full * dv + full + rows].copy_from_slice(&sum[..rows]);
}

/// Combines the partitions of merge group `g` (a batch entry, KV head and sub-group) in
/// partition order and stores the normalised rows and their LSE.
///
/// # Safety
/// Every unit of the plan has finished (the caller's barrier), and only this call merges `g`.
pub(crate) unsafe fn merge_group<TKV: KvPair>(job: &Job<'_, '_, '_, TKV>, g: usize, row: &mut [f32]) {
    let PlanKind::Decode { heads_per_sub, subs, parts, .. } = job.plan.kind else { return };
    if parts == 1 {
        return;
    }
    let s = &job.p.shape;
    let (dv, full) = (s.v_head_dim, job.partials.rows);
    let (bk, sub) = (g / subs, g % subs);
    let (b, hk) = (bk / s.kv_heads, bk % s.kv_heads);
    let head_start = hk * s.group_size() + sub * heads_per_sub;
    let heads = heads_per_sub.min((hk + 1) * s.group_size() - head_start);
    // The rows the units stored: the present ones (see `rows`), head by head.
    let first = job.p.rows.first(b);
    let per_head = s.seq_q - first;
    for r in 0..heads * per_head {
        let slots = |p: usize| {
            // SAFETY: every unit has run (contract).
            unsafe { job.partials.slot((g * parts) + p) }
        };
        let max = (0..parts).map(|p| slots(p)[full * dv + r]).fold(f32::NEG_INFINITY, f32::max);
        let row = &mut row[..dv];
        row.fill(0.0);
        let mut sum = 0.0f32;
        if max != f32::NEG_INFINITY {
            for p in 0..parts {
                let slot = slots(p);
                let m = slot[full * dv + r];
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let scale = (m - max).exp();
                sum += slot[full * dv + full + r] * scale;
                for (o, &a) in row.iter_mut().zip(&slot[r * dv..(r + 1) * dv]) {
                    *o += a * scale;
                }
            }
        }
        let (inv, lse) = RowState { max, sum }.finish();
        row.iter_mut().for_each(|x| *x *= inv);
        let (h, i) = (head_start + r / per_head, first + r % per_head);
        // SAFETY: group `g`'s rows are merged by this call only.
        unsafe { job.out.store(b, h, i, row, dv, 1, &[lse]) };
    }
}

/// Reusable scratch memory for one worker. Create it once and pass it to every call (or let
/// the crate use a per-thread one): calls then never allocate once it has grown to size.
#[derive(Default, Debug)]
pub struct Workspace {
    buf: Vec<f32>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of `len` elements, growing (the only allocation) when it is too small.
    pub(crate) fn get(&mut self, len: usize) -> Result<&mut [f32], AttnError> {
        if self.buf.len() < len {
            self.buf
                .try_reserve_exact(len - self.buf.len())
                .map_err(|_| crate::error::out_of_memory::<f32>(len))?;
            self.buf.resize(len, 0.0);
        }
        Ok(&mut self.buf[..len])
    }
}

thread_local! {
    /// The workspace of calls that bring none: one per thread, so pool workers never share.
    static THREAD_WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::new());
    /// Decode partials of calls that bring no workspace, kept by the calling thread.
    static THREAD_PARTIALS: RefCell<Workspace> = RefCell::new(Workspace::new());
}

/// Runs `f` with `len` elements of this thread's partials buffer (fresh if it is in use).
pub(crate) fn with_thread_partials<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> Result<R, AttnError> {
    THREAD_PARTIALS.with(|ws| match ws.try_borrow_mut() {
        Ok(mut ws) => Ok(f(ws.get(len)?)),
        Err(_) => Ok(f(&mut try_zeroed(len)?)),
    })
}

/// Runs `f` with `len` elements of this thread's workspace (a fresh buffer if the thread's
/// is already in use by an enclosing call on the same thread).
pub(crate) fn with_thread_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> Result<R, AttnError> {
    THREAD_WORKSPACE.with(|ws| match ws.try_borrow_mut() {
        Ok(mut ws) => Ok(f(ws.get(len)?)),
        Err(_) => Ok(f(&mut try_zeroed(len)?)),
    })
}

/// The scratch buffers of a pooled call's workers, one per worker, allocated by the caller
/// before any unit runs: a worker that failed to allocate after the others had written rows
/// would leave a half-written output behind an error. Taken from a process-wide cache and
/// returned to it on drop, so steady-state calls do not allocate.
#[cfg(feature = "rayon")]
pub(crate) struct WorkerScratch {
    bufs: Vec<Vec<f32>>,
}

#[cfg(feature = "rayon")]
static POOL_SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

#[cfg(feature = "rayon")]
impl WorkerScratch {
    /// `workers` buffers of at least `len` floats each, or `OutOfMemory`.
    pub fn take(workers: usize, len: usize) -> Result<Self, AttnError> {
        // A concurrent pooled call (on rayon's threads) may hold the cache: then this one
        // allocates its own.
        let mut bufs = core::mem::take(&mut *POOL_SCRATCH.lock().unwrap_or_else(|e| e.into_inner()));
        bufs.truncate(workers);
        let oom = || crate::error::out_of_memory::<f32>(len);
        bufs.try_reserve_exact(workers - bufs.len()).map_err(|_| oom())?;
        while bufs.len() < workers {
            bufs.push(Vec::new());
        }
        for b in &mut bufs {
            if b.len() < len {
                b.try_reserve_exact(len - b.len()).map_err(|_| oom())?;
                b.resize(len, 0.0);
            }
        }
        Ok(Self { bufs })
    }
}

#[cfg(feature = "rayon")]
impl Drop for WorkerScratch {
    fn drop(&mut self) {
        let mut cache = POOL_SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() < self.bufs.len() {
            *cache = core::mem::take(&mut self.bufs);
        }
    }
}

/// Runs every unit on as many workers as `scratch` has buffers (the calling thread is one of
/// them), each taking the next unit from a shared counter, largest units first, then merges.
/// The workers are the crate's spinning helpers ([`crate::pool`]), or rayon's when those are
/// busy with another call. Its only allocation, the list of per-worker slots
/// (one entry per worker), comes before any unit runs: no failure can follow a written row.
#[cfg(feature = "rayon")]
pub(crate) fn run_pool<TKV: KvPair>(
    job: Job<'_, '_, '_, TKV>,
    scratch: &mut WorkerScratch,
) -> Result<Option<usize>, AttnError> {
    let threads = scratch.bufs.len();
    let next = AtomicUsize::new(0);
    // Worker indices are distinct, so each lock is taken by one worker only.
    let slots: Vec<std::sync::Mutex<&mut [f32]>> = scratch.bufs.iter_mut().map(|b| std::sync::Mutex::new(&mut b[..])).collect();
    let worker = |i: usize| {
        let mut sc = slots[i].lock().unwrap_or_else(|e| e.into_inner());
        run_units(job, Units::Dynamic { next: &next }, &mut sc)
    };
    let first = match crate::pool::run(threads, &worker) {
        Ok(first) => first,
        Err(()) => {
            let mut first = Ok(None);
            rayon::scope(|scope| {
                for i in 1..threads {
                    let worker = &worker;
                    scope.spawn(move |_| {
                        let _ = worker(i);
                    });
                }
                first = worker(0);
            });
            first
        }
    };
    let specialised = first.map_err(|_| AttnError::IsaUnavailable { isa: job.isa })?;
    // The scope's end is the barrier the merge needs.
    let mut row = slots[0].lock().unwrap_or_else(|e| e.into_inner());
    merge_all(&job, &mut row);
    Ok(specialised)
}

/// Merges every group on the calling thread (after all units ran); `row` is scratch of at
/// least `v_head_dim` floats whenever the plan has a merge ([`merge_row_len`]).
pub(crate) fn merge_all<TKV: KvPair>(job: &Job<'_, '_, '_, TKV>, row: &mut [f32]) {
    if job.plan.parts() <= 1 {
        return;
    }
    let row = &mut row[..job.p.shape.v_head_dim];
    for g in 0..job.plan.merge_groups() {
        // SAFETY: called after every unit has run, once per group.
        unsafe { merge_group(job, g, row) };
    }
}
