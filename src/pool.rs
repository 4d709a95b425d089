//! The crate's own workers for multi-threaded calls: the calling thread plus helpers that keep
//! spinning for a short while after a call before they sleep.
//!
//! Decode steps are short (a few hundred microseconds to a few milliseconds) and come back to
//! back, one per layer and token. Handing such a call to a sleeping pool costs a wake-up on the
//! way in and another on the way out, and on virtual machines a wake-up of an idle CPU takes
//! 25-140 us (measured on the project's 2-vCPU VM: median 25 us right after the last wake, 90 us
//! after 5 ms idle). That is 5-15% of a 2-thread decode step. So, as OpenMP runtimes and ggml do,
//! the caller runs a share of the work itself and the helpers poll for the next call for
//! [`spin_us`] microseconds after each one before they park. A call that finds the pool busy
//! (another thread's call, or a call from inside a helper) returns its work untouched, so
//! the caller can run it elsewhere.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long helpers poll for the next call before parking, in microseconds:
/// `SIMD_ATTN_SPIN_US` if set (0 parks at once), else 2000: a token's decode steps across an
/// engine's layers follow each other far more closely than that.
pub(crate) fn spin_us() -> u64 {
    static SPIN: OnceLock<u64> = OnceLock::new();
    *SPIN.get_or_init(|| std::env::var("SIMD_ATTN_SPIN_US").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(2000))
}

/// The work of one call, erased to a raw pointer: valid from the generation bump that publishes
/// it until every participating helper has counted itself out of `pending`.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every helper is done with it.
unsafe impl Send for JobPtr {}

struct Shared {
    /// Bumped (under the `job` lock) to publish a call; helpers compare it with the last one they
    /// saw.
    generation: AtomicU64,
    /// The call being published: the job and how many helpers take part (helper `i` runs when
    /// `i < helpers`). Written only by the caller that holds `busy`, which bumps `generation`
    /// under this lock, so a helper reading both under it sees a job with its own generation.
    job: Mutex<Option<(JobPtr, usize)>>,
    /// Participating helpers that have not finished the current call.
    pending: AtomicUsize,
    /// Set when a helper's share panicked; the caller re-raises it.
    panicked: AtomicBool,
    /// Helpers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: &'static Shared,
    /// One call at a time; also guards `spawned`.
    busy: Mutex<usize>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared = Box::leak(Box::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        Pool { shared, busy: Mutex::new(0) }
    })
}

/// The cores this process may run on, read once: more workers than that only take turns.
pub(crate) fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Helper `index`'s life: poll, park, run its share of each call after generation `seen`
/// (the one current when it was spawned, so the call that spawned it is not missed).
fn helper_loop(shared: &'static Shared, index: usize, mut seen: u64) {
    let spin = Duration::from_micros(spin_us());
    loop {
        // Poll for the next call, then park.
        let start = Instant::now();
        let mut polls = 0u32;
        while shared.generation.load(Ordering::Acquire) == seen {
            core::hint::spin_loop();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) && start.elapsed() >= spin {
                let mut guard = shared.park.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                while shared.generation.load(Ordering::SeqCst) == seen {
                    guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
        let job = {
            let slot = shared.job.lock().unwrap_or_else(|e| e.into_inner());
            seen = shared.generation.load(Ordering::Acquire);
            *slot
        };
        let Some((JobPtr(f), helpers)) = job else { continue };
        if index >= helpers {
            continue;
        }
        // SAFETY: the caller keeps the job alive until `pending` reaches zero, which this
        // helper's decrement below is part of; nothing touches `f` after it.
        let f = unsafe { &*f };
        if catch_unwind(AssertUnwindSafe(|| f(index + 1))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Runs `f(0)` on the calling thread and `f(1)`, ..., `f(threads - 1)` on helpers, and returns
/// `f(0)`'s result once every share has finished. Returns `Err(())` without running anything
/// when the pool is busy with another call (which includes a call from one of its shares); the caller
/// then runs the work some other way. A panic in any share is re-raised here, after every share
/// has finished (so nothing outlives the borrow of `f`). Helpers that cannot be spawned are done
/// without: `f` must let any subset of its shares take all the work (a shared unit counter).
pub(crate) fn run<R>(threads: usize, f: &(dyn Fn(usize) -> R + Sync)) -> Result<R, ()> {
    let pool = pool();
    let mut spawned = match pool.busy.try_lock() {
        Ok(guard) => guard,
        // A panic re-raised by an earlier call left the lock poisoned; its state is sound.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return Err(()),
    };
    let shared = pool.shared;
    let wanted = threads.saturating_sub(1);
    // Only this caller bumps the generation, and it holds `busy`.
    let current = shared.generation.load(Ordering::Acquire);
    while *spawned < wanted {
        let index = *spawned;
        let started =
            std::thread::Builder::new().name(format!("simd-attn-{}", index + 1)).spawn(move || helper_loop(shared, index, current));
        if started.is_err() {
            break;
        }
        *spawned += 1;
    }
    let helpers = wanted.min(*spawned);
    let share = |i: usize| {
        f(i);
    };
    let erased: &(dyn Fn(usize) + Sync) = &share;
    // SAFETY: only the lifetime is erased; this function does not return (or unwind) before
    // `pending` is zero, i.e. before every helper is done with the pointer.
    let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { core::mem::transmute(erased as *const (dyn Fn(usize) + Sync)) };
    shared.panicked.store(false, Ordering::Relaxed);
    shared.pending.store(helpers, Ordering::Relaxed);
    {
        let mut slot = shared.job.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((JobPtr(erased), helpers));
        shared.generation.fetch_add(1, Ordering::SeqCst);
    }
    if shared.sleepers.load(Ordering::SeqCst) > 0 {
        let _guard = shared.park.lock().unwrap_or_else(|e| e.into_inner());
        shared.wake.notify_all();
    }
    let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
    // Wait for the helpers: spin briefly (their last units are usually close behind), then yield.
    let mut polls = 0u32;
    while shared.pending.load(Ordering::Acquire) > 0 {
        polls = polls.saturating_add(1);
        if polls < 1 << 16 {
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match mine {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(_) if shared.panicked.load(Ordering::Relaxed) => panic!("a simd-attn helper thread panicked"),
        Ok(r) => Ok(r),
    }
}
