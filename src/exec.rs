//! Execution: running the units of a work plan on a kernel, on one thread, on the crate's pool,
//! or as one share of a host-driven run.

use crate::element::{DType, Element};
use crate::isa::Isa;
use crate::kernel::{flash, portable};
use crate::plan::work::WorkPlan;
use crate::plan::{for_each_simd_family, Family, Tiles};
use crate::problem::Problem;
use crate::simd::{run_avx2, run_avx512, run_neon, run_scalar, SimdExt, WithSimdExt};
use crate::store::OutRows;
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
                let u = k * nth + if k % 2 == 0 { ith } else { nth - 1 - ith };
                (u < self.total).then_some(u)
            }
        }
    }
}

/// Everything a worker needs besides its scratch and its units.
pub(crate) struct Job<'j, 'a, 'o, TQ, TKV, TO> {
    pub p: &'j Problem<'a, TQ, TKV>,
    pub out: &'j OutRows<'o, TO>,
    pub plan: WorkPlan,
    pub tiles: Tiles,
    pub isa: Isa,
}

impl<TQ, TKV, TO> Clone for Job<'_, '_, '_, TQ, TKV, TO> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<TQ, TKV, TO> Copy for Job<'_, '_, '_, TQ, TKV, TO> {}

/// Block sizes and per-worker scratch length (f32 elements) of a path for a problem.
pub(crate) fn tiles_and_scratch(isa: Isa, kv_dtype: DType, head_dim: usize, v_head_dim: usize) -> (Tiles, usize) {
    let family = Family::find(isa, kv_dtype)
        .or_else(|| Family::find(isa, DType::F32))
        .expect("kernels/ declares an f32 family for every path");
    let tiles = family.tiles(head_dim, v_head_dim);
    let len = if isa == Isa::Portable {
        portable::Scratch::len(&tiles, head_dim, v_head_dim)
    } else {
        flash::Scratch::len(&tiles, family.lanes, head_dim, v_head_dim)
    };
    (tiles, len)
}

/// Runs `units` of `job` with `scratch` (at least the length `tiles_and_scratch` gave).
/// Returns the specialised head dim that ran, or `None` for the generic path; `Err` if the
/// job's ISA cannot run here.
pub(crate) fn run_units<TQ: Element, TKV: Element, TO: Element>(
    job: Job<'_, '_, '_, TQ, TKV, TO>,
    units: Units<'_>,
    scratch: &mut [f32],
) -> Result<Option<usize>, ()> {
    let iter = UnitIter { units, total: job.plan.units(), round: 0 };
    if job.isa == Isa::Portable {
        run_portable(job, iter, scratch);
        return Ok(None);
    }
    let (d, dv) = (job.p.shape.head_dim, job.p.shape.v_head_dim);
    let isa = job.isa;
    // A storage type without a family of its own runs the f32 family's kernel body, which
    // converts through `Element` (correct for every storage type, if not the fastest).
    let dtype = if Family::find(isa, TKV::DTYPE).is_some() { TKV::DTYPE } else { DType::F32 };
    macro_rules! run_isa {
        (Scalar, $op:expr) => { run_scalar($op) };
        (Avx2, $op:expr) => { run_avx2($op) };
        (Avx512, $op:expr) => { run_avx512($op) };
        (Neon, $op:expr) => { run_neon($op) };
    }
    macro_rules! arms {
        ($([$isa:ident, $dt:ident, $mr:literal, $nrv:literal, [$($hd:literal),*]])*) => {
            $(
                if isa == Isa::$isa && dtype == DType::$dt {
                    $(
                        if d == $hd && dv == $hd {
                            return run_isa!($isa, Specialised::<_, _, _, $hd, $mr, $nrv> { job, iter, scratch }).ok_or(());
                        }
                    )*
                    return run_isa!($isa, Specialised::<_, _, _, 0, $mr, $nrv> { job, iter, scratch }).ok_or(());
                }
            )*
        };
    }
    for_each_simd_family!(arms);
    Err(())
}

fn run_portable<TQ: Element, TKV: Element, TO: Element>(job: Job<'_, '_, '_, TQ, TKV, TO>, mut iter: UnitIter<'_>, scratch: &mut [f32]) {
    let s = &job.p.shape;
    let mut sc = portable::Scratch::new(scratch, &job.tiles, s.head_dim, s.v_head_dim);
    while let Some(u) = iter.next() {
        let w = job.plan.unit(u);
        for h in w.kv_head * s.group_size()..(w.kv_head + 1) * s.group_size() {
            portable::query_block(job.p, &job.tiles, w.batch, h, w.q_start, w.q_end, &mut sc);
            let n = w.q_end - w.q_start;
            // SAFETY: unit `u` is run once (see `store`), so its rows have no other writer.
            unsafe { job.out.store(w.batch, h, w.q_start, sc.acc, s.v_head_dim, n, sc.lse) };
        }
    }
}

/// A job bound to one specialisation: head dim `D` (0 = generic) and register tile `MR x NRV`.
struct Specialised<'j, 'a, 'o, 'n, 's, TQ, TKV, TO, const D: usize, const MR: usize, const NRV: usize> {
    job: Job<'j, 'a, 'o, TQ, TKV, TO>,
    iter: UnitIter<'n>,
    scratch: &'s mut [f32],
}

impl<TQ: Element, TKV: Element, TO: Element, const D: usize, const MR: usize, const NRV: usize> WithSimdExt
    for Specialised<'_, '_, '_, '_, '_, TQ, TKV, TO, D, MR, NRV>
{
    type Output = Option<usize>;

    #[inline(always)]
    fn with_simd<S: SimdExt>(self, simd: S) -> Option<usize> {
        let Specialised { job, mut iter, scratch } = self;
        let s = &job.p.shape;
        let mut sc = flash::Scratch::new(scratch, &job.tiles, S::F32_LANES, s.head_dim, s.v_head_dim);
        while let Some(u) = iter.next() {
            let w = job.plan.unit(u);
            for h in w.kv_head * s.group_size()..(w.kv_head + 1) * s.group_size() {
                flash::query_block::<S, TQ, TKV, D, MR, NRV>(simd, job.p, &job.tiles, w.batch, h, w.q_start, w.q_end, &mut sc);
                let n = w.q_end - w.q_start;
                // SAFETY: unit `u` is run once (see `store`), so its rows have no other writer.
                unsafe { job.out.store(w.batch, h, w.q_start, sc.acc, sc.dv_pad, n, sc.lse) };
            }
        }
        (D != 0).then_some(D)
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
    pub(crate) fn get(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len {
            self.buf.resize(len, 0.0);
        }
        &mut self.buf[..len]
    }
}

thread_local! {
    /// The workspace of calls that bring none: one per thread, so pool workers never share.
    static THREAD_WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::new());
}

/// Runs `f` with `len` elements of this thread's workspace (a fresh buffer if the thread's
/// is already in use by an enclosing call on the same thread).
pub(crate) fn with_thread_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    THREAD_WORKSPACE.with(|ws| match ws.try_borrow_mut() {
        Ok(mut ws) => f(ws.get(len)),
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Runs every unit on `threads` workers of the crate's pool (the calling thread is one of
/// them), each taking the next unit from a shared counter, largest units first.
#[cfg(feature = "rayon")]
pub(crate) fn run_pool<TQ: Element, TKV: Element, TO: Element>(
    job: Job<'_, '_, '_, TQ, TKV, TO>,
    threads: usize,
    scratch_len: usize,
) -> Result<Option<usize>, ()> {
    let next = AtomicUsize::new(0);
    let worker = || with_thread_scratch(scratch_len, |sc| run_units(job, Units::Dynamic { next: &next }, sc));
    let mut first = Ok(None);
    rayon::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| {
                let _ = worker();
            });
        }
        first = worker();
    });
    first
}
