//! The crate's thread pool (`src/pool.rs`): every share runs once, shares drain a shared
//! counter, a call from inside a call is refused, and a panicking share is re-raised after the
//! others finish. Through the hidden `simd_attn::selftest::pool_run` probe.
#![cfg(feature = "rayon")]

use simd_attn::selftest::pool_run as run;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The pool is process-wide: tests that need it free take turns.
static TURN: Mutex<()> = Mutex::new(());

#[test]
fn every_share_runs_once_per_call() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for threads in [1, 2, 3, 5, 2, 1, 4] {
        for _ in 0..50 {
            let seen: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            let mine = run(threads, &|i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
                i
            });
            assert_eq!(mine, Ok(0), "the caller runs share 0 and gets its result");
            let counts: Vec<usize> = seen.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            assert_eq!(counts, vec![1; threads], "threads = {threads}");
        }
    }
}

#[test]
fn a_shared_counter_is_drained_by_all_shares() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let next = AtomicUsize::new(0);
    let done: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
    run(3, &|_| {
        while let Some(u) = Some(next.fetch_add(1, Ordering::Relaxed)).filter(|&u| u < done.len()) {
            done[u].fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(done.iter().all(|c| c.load(Ordering::Relaxed) == 1));
}

#[test]
fn a_call_from_a_helper_or_during_a_call_is_refused() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let inner: Vec<Mutex<Option<Result<(), ()>>>> = (0..2).map(|_| Mutex::new(None)).collect();
    run(2, &|i| {
        // Share 0 runs on the caller (the pool is busy with this call); share 1 on a helper.
        *inner[i].lock().unwrap() = Some(run(2, &|_| ()));
    })
    .unwrap();
    assert_eq!(*inner[0].lock().unwrap(), Some(Err(())));
    assert_eq!(*inner[1].lock().unwrap(), Some(Err(())));
    // And the pool is usable again afterwards.
    assert_eq!(run(2, &|i| i), Ok(0));
}

#[test]
fn a_panicking_share_is_reraised_after_all_shares_finish() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for bad in [0, 1] {
        let finished = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(3, &|i| {
                if i == bad {
                    panic!("share {i} fails");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err(), "share {bad}'s panic reaches the caller");
        assert_eq!(finished.load(Ordering::Relaxed), 2, "the other shares ran to the end first");
    }
    assert_eq!(run(3, &|i| i), Ok(0), "the pool still works after a panic");
}
