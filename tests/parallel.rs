//! Parallel execution: the plan covers every unit once and balances causal work; results are
//! bitwise identical for every thread count, on the pool and host-driven, on every ISA.

mod common;

use common::*;
use proptest::prelude::*;
use simd_attn::*;

fn bits(o: &Outcome) -> (Vec<u32>, Vec<u32>) {
    (o.out.iter().map(|x| x.to_bits()).collect(), o.lse.iter().map(|x| x.to_bits()).collect())
}

fn pool(case: &Case, isa: Isa, threads: usize) -> Outcome {
    let config = RunConfig { isa: Some(isa), threads: Some(threads) };
    run_typed::<f32, f32, f32>(case, |s, q, k, v, o, l, p| attention_with(&config, s, q, k, v, o, l, p))
}

fn host(case: &Case, isa: Isa, nth: usize) -> Outcome {
    let config = RunConfig { isa: Some(isa), threads: None };
    run_typed::<f32, f32, f32>(case, |s, q, k, v, o, l, p| {
        let plan = HostPlan::new(&config, s, q, k, v, o, l, p, nth)?;
        let infos: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..nth)
                .map(|ith| {
                    let plan = &plan;
                    sc.spawn(move || {
                        let mut ws = vec![f32::NAN; plan.workspace_len()]; // garbage must not matter
                        plan.run(ith, &mut ws)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Decode plans that split the keys merge after every share ran (the scope's end is
        // the barrier); a no-op otherwise.
        std::thread::scope(|sc| {
            for ith in 0..nth {
                let plan = &plan;
                sc.spawn(move || plan.merge(ith, &mut vec![f32::NAN; plan.workspace_len()]).unwrap());
            }
        });
        infos.into_iter().next().unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 4 + 1, ..ProptestConfig::default() })]

    #[test]
    fn same_bits_for_every_thread_count_and_mode(spec in spec_strategy(Options::Any)) {
        let case = Case::build(&spec);
        for isa in Isa::available() {
            let one = pool(&case, isa, 1);
            check(&case, &one, 0.0)?;
            let want = bits(&one);
            for threads in [2, 3] {
                prop_assert!(bits(&pool(&case, isa, threads)) == want, "[{isa}] pool with {threads} threads differs");
            }
            for nth in [1, 2, 3, 5] {
                prop_assert!(bits(&host(&case, isa, nth)) == want, "[{isa}] host-driven with {nth} shares differs");
            }
        }
    }
}

#[test]
fn shares_cover_every_unit_once() {
    let shape = AttentionShape::new(3, 8, 2, 300, 300, 64);
    let plan = WorkPlan::new(&shape, 64);
    assert_eq!(plan.units(), 3 * 2 * 5);
    assert_eq!(plan.get(plan.units()), None);
    for nth in 1..=9 {
        let mut seen = vec![0; plan.units()];
        for ith in 0..nth {
            for u in plan.share(ith, nth) {
                seen[u] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "nth={nth}: {seen:?}");
        assert_eq!(plan.share(nth, nth).count(), 0);
    }
    // Units tile every (batch, kv head, row) exactly once.
    let mut rows = vec![0; 3 * 2 * 300];
    for u in 0..plan.units() {
        let w = plan.get(u).unwrap();
        for i in w.q_start..w.q_end {
            rows[(w.batch * 2 + w.kv_head) * 300 + i] += 1;
        }
    }
    assert!(rows.iter().all(|&n| n == 1));
}

#[test]
fn causal_shares_are_balanced() {
    let shape = AttentionShape::new(1, 8, 2, 2048, 2048, 128);
    let params = AttentionParams::new().causal(true);
    let plan = WorkPlan::new(&shape, 64);
    for nth in [2, 3, 4, 8, 16] {
        let costs = plan.share_costs(nth, &shape, &params);
        let mean = costs.iter().sum::<u64>() as f64 / nth as f64;
        let worst = *costs.iter().max().unwrap() as f64;
        assert!(worst / mean < 1.10, "nth={nth}: shares {costs:?}");
    }
}

#[test]
fn host_plan_rejects_misuse() {
    let shape = AttentionShape::new(1, 2, 1, 70, 70, 16);
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
    let mut out = vec![0.0f32; no];
    let params = AttentionParams::new();
    fn make<'a>(
        shape: &AttentionShape,
        (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
        out: &'a mut [f32],
        params: &AttentionParams<'a>,
        nth: usize,
    ) -> Result<HostPlan<'a, 'a, f32, f32, f32>, AttnError> {
        let [qs, ks, vs, os] = shape.bhsd_strides();
        HostPlan::new(&RunConfig::default(), shape, TensorRef::new(q, qs), TensorRef::new(k, ks), TensorRef::new(v, vs), TensorMut::new(out, os), None, params, nth)
    }
    assert_eq!(make(&shape, (&q, &k, &v), &mut out, &params, 0).err(), Some(AttnError::ZeroDim { dim: "nth" }));
    let plan = make(&shape, (&q, &k, &v), &mut out, &params, 2).unwrap();
    let mut ws = vec![0.0f32; plan.workspace_len()];
    assert_eq!(plan.run(2, &mut ws).err(), Some(AttnError::ShareOutOfRange { ith: 2, nth: 2 }));
    let mut small = vec![0.0f32; plan.workspace_len() - 1];
    assert!(matches!(plan.run(0, &mut small), Err(AttnError::WorkspaceTooSmall { .. })));
    plan.run(0, &mut ws).unwrap();
    assert_eq!(plan.run(0, &mut ws).err(), Some(AttnError::ShareAlreadyRun { ith: 0 }));
    plan.run(1, &mut ws).unwrap();
    drop(plan);
    assert!(out.iter().all(|&x| (x - 0.3).abs() < 1e-6));
}

#[test]
fn caller_workspace_is_reused() {
    let mut spec = Spec::plain(2, 4, 2, 33, 77, 64);
    spec.causal = true;
    let case = Case::build(&spec);
    let mut ws = Workspace::new();
    let config = RunConfig::default();
    let first = run_typed::<f32, f32, f32>(&case, |s, q, k, v, o, l, p| attention_in(&mut ws, &config, s, q, k, v, o, l, p));
    check(&case, &first, 0.0).unwrap();
    let again = run_typed::<f32, f32, f32>(&case, |s, q, k, v, o, l, p| attention_in(&mut ws, &config, s, q, k, v, o, l, p));
    assert!(bits(&first) == bits(&again));
    assert!(bits(&first) == bits(&pool(&case, resolve_isa(None).unwrap(), 2)));
}

#[test]
fn pool_really_splits_large_work_and_keeps_the_bits() {
    for (causal, hq, hkv, s, d) in [(true, 8, 2, 600, 64), (false, 4, 4, 300, 128)] {
        let mut spec = Spec::plain(1, hq, hkv, s, s, d);
        spec.causal = causal;
        let case = Case::build(&spec);
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
            let one = pool(&case, isa, 1);
            for threads in [2, 3] {
                let config = RunConfig { isa: Some(isa), threads: Some(threads) };
                let mut info = None;
                let got = run_typed::<f32, f32, f32>(&case, |s, q, k, v, o, l, p| {
                    let r = attention_with(&config, s, q, k, v, o, l, p);
                    info = r.clone().ok();
                    r
                });
                // Workers beyond the cores would only take turns: the pool caps them there.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                assert_eq!(info.unwrap().threads, threads.min(cores), "[{isa}] did not run {threads} workers");
                assert!(bits(&got) == bits(&one), "[{isa}] {threads} threads differ from 1");
            }
        }
    }
}

#[test]
fn tiny_work_stays_on_one_thread() {
    let case = Case::build(&Spec::plain(1, 2, 2, 4, 4, 8));
    let config = RunConfig { isa: None, threads: Some(8) };
    let mut info = None;
    run_typed::<f32, f32, f32>(&case, |s, q, k, v, o, l, p| {
        let r = attention_with(&config, s, q, k, v, o, l, p);
        info = r.clone().ok();
        r
    });
    assert_eq!(info.unwrap().threads, 1);
}
