//! Regression tests for the edges found by fuzzing the C descriptor and the Rust API: empty
//! calls (with any other dims, up to the integer limits), non-finite values where the contract
//! gives them a meaning (V rows of masked keys, bias entries), allocation failure, and the
//! smaller promises of `RunInfo` and host plans. Every test runs on every path this machine has.

use half::f16;
use simd_attn::*;

/// A call on every available path with the given shape; buffers as the BHSD strides need.
fn every_isa() -> Vec<Isa> {
    Isa::available()
}

fn config(isa: Isa, threads: usize) -> RunConfig {
    RunConfig { isa: Some(isa), threads: Some(threads) }
}

#[test]
fn an_empty_step_on_the_decode_path_is_ok() {
    // An engine step with no new tokens: seq_q = 0 against a long cache (decode shapes).
    let shape = AttentionShape::new(1, 8, 2, 0, 4096, 128);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [_, nk, nv, _] = shape.bhsd_lens();
    let (k, v) = (vec![0.5f32; nk], vec![0.5f32; nv]);
    for isa in every_isa() {
        for threads in [1, 2] {
            let mut lse: [f32; 0] = [];
            let info = attention_with(&config(isa, threads), &shape, TensorRef::new(&[] as &[f32], qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut [] as &mut [f32], os), Some(&mut lse), &AttentionParams::new().causal(true))
                .unwrap_or_else(|e| panic!("{isa}: {e}"));
            assert_eq!(info.plan.units(), 0, "{isa}");
            let mut ws = Workspace::new();
            attention_in(&mut ws, &config(isa, 1), &shape, TensorRef::new(&[] as &[f32], qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut [] as &mut [f32], os), None, &AttentionParams::new()).unwrap();
        }
    }
}

#[test]
fn empty_calls_with_dims_near_the_integer_limits_are_ok_and_allocate_nothing() {
    let none: &[f32] = &[];
    for isa in every_isa() {
        for (batch, seq_q, d, dv) in [(0, 1, 32, 1usize << 62), (0, 1, 32, i64::MAX as usize), (0, 1, 32, 1 << 40), (0, 1, (1 << 61) - 1, 32), (0, 1, usize::MAX / 2, 7), (1, 0, 1 << 61, 1 << 61)] {
            let shape = AttentionShape::new(batch, 2, 1, seq_q, 300, d).with_v_head_dim(dv);
            let zero = Strides::new(0, 0, 0);
            // K and V need one row each; with zero strides every index reaches it.
            let kv: Vec<f32> = Vec::new();
            let r = attention_with(&config(isa, 2), &shape, TensorRef::new(none, zero), TensorRef::new(&kv, zero), TensorRef::new(&kv, zero), TensorMut::new(&mut [] as &mut [f32], zero), None, &AttentionParams::new());
            // batch 0: nothing reaches K/V either, so the call is valid and empty. seq_q 0 with
            // batch 1: K/V reach d elements that the empty slice does not hold.
            if batch == 0 {
                let info = r.unwrap_or_else(|e| panic!("{isa} B=0 d={d} dv={dv}: {e}"));
                assert_eq!((info.plan.units(), info.threads, info.specialised_head_dim), (0, 1, None));
            } else {
                assert!(matches!(r, Err(AttnError::BufferTooSmall { .. })), "{isa}: {r:?}");
            }
            if batch == 0 {
                let plan = HostPlan::new(&config(isa, 1), &shape, TensorRef::new(none, zero), TensorRef::new(&kv, zero), TensorRef::new(&kv, zero), TensorMut::new(&mut [] as &mut [f32], zero), None, &AttentionParams::new(), 3)
                    .unwrap_or_else(|e| panic!("{isa} plan B=0 d={d} dv={dv}: {e}"));
                assert_eq!(plan.workspace_len(), 0, "an empty plan needs no workspace");
                assert!(!plan.needs_merge());
                for ith in 0..3 {
                    plan.run(ith, &mut []).unwrap();
                    plan.merge(ith, &mut []).unwrap();
                }
            }
        }
    }
}

#[test]
fn a_call_with_nothing_to_do_returns_at_once_whatever_its_head_or_batch_count() {
    // K/V broadcast (zero strides, one row of D), Sq = 0: no output row, so no work at all.
    let k = vec![1.0f32; 15];
    let zero = Strides::new(0, 0, 0);
    for isa in every_isa() {
        for (batch, q_heads) in [(1usize, 1usize << 62), (1 << 62, 1), (1 << 62, 1 << 62)] {
            let shape = AttentionShape::new(batch, q_heads, 1, 0, 16, 15);
            let start = std::time::Instant::now();
            attention_with(&config(isa, 1), &shape, TensorRef::new(&[] as &[f32], zero), TensorRef::new(&k, zero), TensorRef::new(&k, zero), TensorMut::new(&mut [] as &mut [f32], zero), None, &AttentionParams::new()).unwrap();
            assert!(start.elapsed().as_secs() < 5, "{isa}: B={batch} Hq={q_heads} took {:?}", start.elapsed());
        }
    }
}

#[test]
fn coverage_of_an_empty_call_is_all_zeros() {
    let shape = AttentionShape::new(2, 4, 2, 0, 37, 32);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [_, nk, nv, _] = shape.bhsd_lens();
    let (k, v) = (vec![0.5f32; nk], vec![0.5f32; nv]);
    for isa in every_isa() {
        for score in [Score::ScaledDot, Score::Cosine { temperature: 2.0 }] {
            let mut coverage = vec![f32::NAN; 2 * 4 * 37];
            let mut alignment: [f32; 0] = [];
            let inspect = Inspect { alignment: Some(&mut alignment), coverage: Some(&mut coverage) };
            attention_inspect(&config(isa, 2), &shape, TensorRef::new(&[] as &[f32], qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut [] as &mut [f32], os), None, &AttentionParams::new().score(score), inspect).unwrap();
            assert!(coverage.iter().all(|&c| c == 0.0), "{isa}: {coverage:?}");
        }
    }
}

/// Attention of `sq` rows against `skv` keys with `bad` written into the V rows of `poisoned`
/// keys; checks every path's output against the reference (which never reads those rows for
/// rows that cannot see them) and that no row that cannot see a poisoned key is non-finite.
fn check_poisoned_v<T: FloatElement>(sq: usize, skv: usize, d: usize, params: &AttentionParams<'_>, poisoned: &[usize], bad: f32) {
    let shape = AttentionShape::new(1, 4, 2, sq, skv, d);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let mut state = 0x2545f4914f6cdd1du64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        T::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
    };
    let q: Vec<T> = (0..nq).map(|_| rnd()).collect();
    let k: Vec<T> = (0..nk).map(|_| rnd()).collect();
    let mut v: Vec<T> = (0..nv).map(|_| rnd()).collect();
    for hk in 0..2 {
        for &j in poisoned {
            for x in &mut v[(hk * skv + j) * d..(hk * skv + j + 1) * d] {
                *x = T::from_f32(bad);
            }
        }
    }
    let r = reference_attention(&shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), params).unwrap();
    for isa in every_isa() {
        for threads in [1, 2] {
            let mut out = vec![0.0f32; no];
            attention_with(&config(isa, threads), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, params).unwrap();
            for (n, (&got, &want)) in out.iter().zip(&r.out).enumerate() {
                let row = n / d;
                if want.is_finite() {
                    assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{isa} x{threads} {}: row {row} elem {}: {got} vs {want} (sq {sq}, skv {skv})", core::any::type_name::<T>(), n % d);
                } else {
                    assert!(!got.is_finite(), "{isa}: row {row} sees a poisoned key and must carry it ({got})");
                }
            }
        }
    }
}

#[test]
fn nan_or_inf_in_the_v_row_of_a_masked_key_never_reaches_a_row() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        // The case: Sq = Skv = 8, causal, key 7 poisoned: rows 0..6 cannot see it.
        check_poisoned_v::<f32>(8, 8, 64, &AttentionParams::new().causal(true), &[7], bad);
        check_poisoned_v::<f16>(8, 8, 64, &AttentionParams::new().causal(true), &[7], bad);
        // Prefill with several blocks, a window, D off the specialisations.
        check_poisoned_v::<f32>(100, 130, 48, &AttentionParams::new().causal(true).window(Some(20), Some(0)), &[3, 64, 129], bad);
        check_poisoned_v::<f32>(70, 70, 128, &AttentionParams::new().causal(true), &[69, 40], bad);
        // Decode shapes (few rows, long cache): several new tokens, causal, so the last keys
        // are hidden from the earlier rows; both decode kernels (4 and 32 rows per unit).
        check_poisoned_v::<f32>(4, 3000, 128, &AttentionParams::new().causal(true), &[2999, 2998], bad);
        check_poisoned_v::<f16>(2, 2100, 64, &AttentionParams::new().causal(true), &[2099], bad);
        check_poisoned_v::<f32>(16, 500, 64, &AttentionParams::new().causal(true), &[499, 490], bad);
    }
}

#[test]
fn nan_in_the_v_row_of_a_key_a_minus_inf_bias_hides_is_harmless() {
    for (sq, skv) in [(8, 8), (3, 1500), (40, 300)] {
        // Key 5 is hidden from every row of head 0 only (-inf bias), and poisoned.
        let mut bias = vec![0.0f32; 4 * sq * skv];
        for i in 0..sq {
            bias[i * skv + 5] = f32::NEG_INFINITY;
        }
        for h in 1..4 {
            for i in 0..sq {
                // The other heads hide it too, except head 3 row 0 which sees it.
                if !(h == 3 && i == 0) {
                    bias[(h * sq + i) * skv + 5] = f32::NEG_INFINITY;
                }
            }
        }
        let b = BiasRef::new(&bias, BiasStrides { batch: 0, head: sq * skv, row: skv });
        check_poisoned_v::<f32>(sq, skv, 64, &AttentionParams::new().bias(b), &[5], f32::NAN);
    }
}

#[test]
fn bias_entries_must_be_finite_or_minus_inf() {
    let shape = AttentionShape::new(1, 2, 1, 3, 20, 16);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
    for (bad, at) in [(f32::INFINITY, 7usize), (f32::NAN, 59), (-f32::NAN, 0)] {
        let mut bias = vec![0.0f32; 2 * 3 * 20];
        bias[at] = bad;
        bias[1] = f32::NEG_INFINITY; // a mask: allowed
        let params = AttentionParams::new().bias(BiasRef::new(&bias, BiasStrides { batch: 0, head: 60, row: 20 }));
        for isa in every_isa() {
            let mut out = vec![5.0f32; no];
            let r = attention_with(&config(isa, 1), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params);
            match r {
                Err(AttnError::InvalidValue { arg: "bias", index, .. }) => assert_eq!(index, at, "{isa}"),
                other => panic!("{isa}: bias {bad} at {at}: {other:?}"),
            }
            assert!(out.iter().all(|&x| x == 5.0), "output untouched on error");
        }
        let r = reference_attention(&shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), &params);
        assert!(matches!(r, Err(AttnError::InvalidValue { arg: "bias", .. })));
    }
    // A broadcast bias (zero strides) is scanned through its one row.
    let mut row = vec![0.0f32; 20];
    row[19] = f32::INFINITY;
    let params = AttentionParams::new().bias(BiasRef::new(&row, BiasStrides::default()));
    let mut out = vec![0.0f32; no];
    let r = attention(&shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params);
    assert!(matches!(r, Err(AttnError::InvalidValue { arg: "bias", index: 19, .. })), "{r:?}");
}

#[test]
fn allocation_failure_is_an_error_not_an_abort() {
    // The reference with K/V broadcast over 2^36 keys needs 2^36 scores per row.
    let shape = AttentionShape::new(1, 1, 1, 1, 1 << 36, 4);
    let zero = Strides::new(0, 0, 0);
    let q = [1.0f32; 4];
    let r = reference_attention(&shape, TensorRef::new(&q, zero), TensorRef::new(&q, zero), TensorRef::new(&q, zero), &AttentionParams::new());
    assert!(matches!(r, Err(AttnError::OutOfMemory { .. })), "{r:?}");
    // Merging nothing into nothing, with a huge row width, allocates nothing.
    let shape = AttentionShape::new(0, 1, 1, 1, 1, 1).with_v_head_dim(1 << 36);
    let parts: [PartialResult<'_, f32>; 0] = [];
    merge_partials(&shape, &parts, TensorMut::new(&mut [] as &mut [f32], zero), None).unwrap();
    // The decode path's partials for 2^40 broadcast keys do not fit in memory.
    let shape = AttentionShape::new(1, 8, 1, 1, 1 << 40, 4);
    let mut out = vec![0.0f32; 8 * 4];
    let r = attention(&shape, TensorRef::new(&[1.0f32; 4], zero), TensorRef::new(&q, zero), TensorRef::new(&q, zero), TensorMut::new(&mut out, Strides::new(32, 4, 4)), None, &AttentionParams::new());
    assert!(matches!(r, Err(AttnError::OutOfMemory { .. }) | Err(AttnError::SizeOverflow { .. })), "{r:?}");
    assert!(out.iter().all(|&x| x == 0.0));
}

/// Found by the fuzzer: a general-score call with Q broadcast over 2^31 rows and a short
/// output projected every Q row (gigabytes, minutes) before the output's length was checked.
/// The output is checked first now, on every entry.
#[test]
fn a_short_output_is_rejected_before_a_general_score_projects_q() {
    let shape = AttentionShape::new(1, 1, 1, i32::MAX as usize, 4, 2);
    let zero = Strides::new(0, 0, 0);
    let (q, kv, w) = ([0.5f32; 8], [0.25f32; 8], [0.1f32; 16]);
    let params = AttentionParams::new().score(Score::General { w: &w, q_dim: 8 });
    let mut out = vec![7.0f32; 36];
    for isa in every_isa() {
        let r = attention_with(&config(isa, 1), &shape, TensorRef::new(&q, zero), TensorRef::new(&kv, Strides::new(8, 8, 2)), TensorRef::new(&kv, Strides::new(8, 8, 2)), TensorMut::new(&mut out, Strides::new(0, 0, 2)), None, &params);
        assert!(matches!(r, Err(AttnError::BufferTooSmall { tensor: TensorName::Out, .. })), "[{isa}] {r:?}");
        let mut ws = Workspace::new();
        let r = attention_in(&mut ws, &config(isa, 1), &shape, TensorRef::new(&q, zero), TensorRef::new(&kv, Strides::new(8, 8, 2)), TensorRef::new(&kv, Strides::new(8, 8, 2)), TensorMut::new(&mut out, Strides::new(0, 0, 2)), None, &params);
        assert!(matches!(r, Err(AttnError::BufferTooSmall { tensor: TensorName::Out, .. })), "[{isa}] workspace: {r:?}");
    }
    assert!(out.iter().all(|&x| x == 7.0));
}

#[test]
fn run_info_names_the_head_dim_specialisation_that_ran() {
    for isa in every_isa() {
        for (d, dv, additive, decode) in [(64, 64, false, false), (128, 128, false, false), (64, 64, false, true), (128, 128, false, true), (96, 96, false, false), (64, 32, false, false), (32, 32, true, false), (128, 128, true, false)] {
            let (sq, skv) = if decode { (1, 2048) } else { (40, 40) };
            let shape = AttentionShape::new(1, 4, 2, sq, skv, d).with_v_head_dim(dv);
            let [qs, ks, vs, os] = shape.bhsd_strides();
            let [nq, nk, nv, no] = shape.bhsd_lens();
            let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
            let av = vec![0.5f32; d];
            let params = if additive { AttentionParams::new().score(Score::Additive { v: &av, projection: None }) } else { AttentionParams::new() };
            let want = (isa != Isa::Portable && !additive && d == dv && (d == 64 || d == 128)).then_some(d);
            for threads in [1, 2] {
                let mut out = vec![0.0f32; no];
                let info = attention_with(&config(isa, threads), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params).unwrap();
                assert_eq!(info.specialised_head_dim, want, "{isa} x{threads} d={d} dv={dv} additive={additive} decode={decode}");
                // The additive score reports its attention dim (A = d here, padded to 16) apart.
                let want_a = (isa != Isa::Portable && additive && (d == 64 || d == 128)).then_some(d);
                assert_eq!(info.specialised_additive_dim, want_a, "{isa} additive d={d}");
            }
            if !additive {
                let mut out = vec![0.0f32; no];
                let plan = HostPlan::new(&config(isa, 1), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params, 2).unwrap();
                let mut ws = vec![0.0f32; plan.workspace_len()];
                for ith in 0..2 {
                    assert_eq!(plan.run(ith, &mut ws).unwrap().specialised_head_dim, want, "{isa} host share {ith}");
                }
            }
        }
    }
}

#[test]
fn merging_a_plan_without_a_merge_is_a_no_op_even_before_its_runs() {
    let shape = AttentionShape::new(1, 4, 2, 64, 64, 32);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
    let mut out = vec![0.0f32; no];
    let plan = HostPlan::new(&RunConfig::default(), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &AttentionParams::new(), 2).unwrap();
    assert!(!plan.needs_merge());
    let mut ws = vec![0.0f32; plan.workspace_len()];
    plan.merge(0, &mut ws).unwrap();
    plan.merge(1, &mut ws).unwrap();
    assert_eq!(plan.merge(2, &mut ws), Err(AttnError::ShareOutOfRange { ith: 2, nth: 2 }));
}

#[test]
fn a_fully_masked_row_with_a_finite_sink_has_zero_output_and_the_sinks_lse() {
    // kv_lens = 0: nothing visible; the sink alone makes the denominator, so lse = sink.
    let shape = AttentionShape::new(1, 2, 1, 1, 8, 16);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
    let sinks = [1.5f32, f32::NEG_INFINITY];
    let lens = [0usize];
    let params = AttentionParams::new().sinks(&sinks).kv_lens(&lens);
    for isa in every_isa() {
        let mut out = vec![9.0f32; no];
        let mut lse = vec![0.0f32; 2];
        attention_with(&config(isa, 1), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), Some(&mut lse), &params).unwrap();
        assert!(out.iter().all(|&x| x == 0.0), "{isa}");
        assert_eq!(lse, [1.5, f32::NEG_INFINITY], "{isa}");
    }
}
