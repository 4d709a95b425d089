//! The decode path (a few query rows against a long KV cache): every ISA, f32 and f16 storage,
//! every option, several key partitions merged, against the f64 reference; identical bits for
//! 1, 2 and 3 threads and for host-driven shares with the merge step.

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use simd_attn::plan::work::{PlanKind, DECODE_MIN_PART_LEN, DECODE_PART_LEN};
use simd_attn::*;

fn decode_spec() -> impl Strategy<Value = Spec> {
    (spec_strategy(Options::Any), 1..=16usize, 128..=3200usize, prop_oneof![Just(1usize), Just(2), Just(4), Just(8)]).prop_map(
        |(mut s, sq, skv, group)| {
            s.seq_q = sq;
            s.seq_kv = skv;
            s.group = group;
            s.batch = s.batch.min(2);
            if let Some(l) = s.kv_lens.as_mut() {
                l.truncate(s.batch);
                l.iter_mut().for_each(|x| *x = (*x * 977) % (skv + 1));
                while l.len() < s.batch {
                    l.push(skv);
                }
            }
            if s.layout == Layout::PackedQkv {
                s.layout = Layout::Bshd;
            }
            s
        },
    )
}

/// Decode units of at most a vector of rows (a GQA group's heads x one or two new tokens) with
/// head dims in whole vectors take the few-row kernel (`decode_few`): every row count from 1 to
/// 16 (padded to 1, 2, 4, 8 or 16 interleaved rows; 16 is one key per vector on AVX-512, 8 on
/// AVX2), V wider or narrower than K.
fn decode_few_spec() -> impl Strategy<Value = Spec> {
    (decode_spec(), 1..=2usize, 1..=8usize, prop_oneof![Just(16usize), Just(32), Just(64), Just(128)], prop_oneof![3 => Just(0usize), 1 => (1..=8usize).prop_map(|v| 16 * v)])
        .prop_map(|(mut s, sq, group, d, dv)| {
            s.seq_q = sq;
            s.group = group;
            s.head_dim = d;
            s.v_head_dim = if dv == 0 { d } else { dv };
            s
        })
}

/// K/V heads side by side (`[B, S, Hkv, D]`) with rows that fit the few-row kernel: decode
/// units then span every KV head, run in lockstep (2 to 8 heads, partitions shortened to give
/// enough units, masked V rows holding NaN where the options put them).
fn decode_across_heads_spec() -> impl Strategy<Value = Spec> {
    (decode_few_spec(), 2..=8usize, 1..=4usize, 16..=2500usize).prop_map(|(mut s, kv_heads, group, skv)| {
        s.kv_heads = kv_heads;
        s.group = group;
        s.seq_kv = skv;
        s.layout = Layout::Bshd;
        if let Some(l) = s.kv_lens.as_mut() {
            l.iter_mut().for_each(|x| *x = (*x * 977) % (skv + 1));
        }
        s
    })
}

/// [`check_decode`], and that every SIMD path whose vectors hold a KV head's rows ran units
/// spanning all KV heads.
fn check_across_heads<TQ: FloatElement, TKV: Element, TO: FloatElement>(spec: &Spec, store_eps: f64) -> Result<(), TestCaseError> {
    check_decode::<TQ, TKV, TO>(spec, store_eps)?;
    let case = Case::build(spec);
    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Portable) {
        let lanes = simd_attn::selftest::lanes(isa).unwrap();
        let fits = lanes > 1 && (spec.group * spec.seq_q).next_power_of_two() <= lanes && spec.head_dim.is_multiple_of(lanes) && spec.v_head_dim.is_multiple_of(lanes);
        let (_, info) = run::<TQ, TKV, TO>(&case, RunConfig { isa: Some(isa), threads: Some(1) });
        let PlanKind::Decode { kv_span, .. } = info.plan.kind else { unreachable!("checked above") };
        prop_assert_eq!(kv_span, if fits { spec.kv_heads } else { 1 }, "[{}] lanes {}", isa, lanes);
    }
    Ok(())
}

fn run<TQ: FloatElement, TKV: Element, TO: FloatElement>(case: &Case, config: RunConfig) -> (Outcome, RunInfo) {
    let mut info = None;
    let got = run_typed::<TQ, TKV, TO>(case, |s, q, k, v, o, l, p| {
        let r = attention_with(&config, s, q, k, v, o, l, p);
        info = r.clone().ok();
        r
    });
    (got, info.unwrap())
}

fn host<TQ: FloatElement, TKV: Element, TO: FloatElement>(case: &Case, isa: Isa, nth: usize) -> Outcome {
    let config = RunConfig { isa: Some(isa), threads: None };
    run_typed::<TQ, TKV, TO>(case, |s, q, k, v, o, l, p| {
        let plan = HostPlan::new(&config, s, q, k, v, o, l, p, nth)?;
        let info = std::thread::scope(|sc| {
            let runs: Vec<_> = (0..nth).map(|ith| {
                let plan = &plan;
                sc.spawn(move || plan.run(ith, &mut vec![f32::NAN; plan.workspace_len()]))
            }).collect();
            runs.into_iter().map(|h| h.join().unwrap()).collect::<Result<Vec<_>, _>>()
        })?;
        std::thread::scope(|sc| {
            for ith in 0..nth {
                let plan = &plan;
                sc.spawn(move || plan.merge(ith, &mut vec![f32::NAN; plan.workspace_len()]).unwrap());
            }
        });
        Ok(info[0])
    })
}

fn bits(o: &Outcome) -> Vec<u32> {
    o.out.iter().chain(&o.lse).map(|x| x.to_bits()).collect()
}

fn check_decode<TQ: FloatElement, TKV: Element, TO: FloatElement>(spec: &Spec, store_eps: f64) -> Result<(), TestCaseError> {
    let mut case = Case::build(spec);
    case.round_for::<TQ, TKV, TO>();
    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Portable) {
        let (one, info) = run::<TQ, TKV, TO>(&case, RunConfig { isa: Some(isa), threads: Some(1) });
        let PlanKind::Decode { parts, part_len, kv_span, .. } = info.plan.kind else {
            return Err(TestCaseError::fail(format!("[{isa}] did not take the decode path: {:?}", info.plan)));
        };
        // Partitions cover the keys some row can see: up to the longest kv_lens entry. Units
        // spanning every KV head (heads side by side in K/V) take shorter ones, to have units
        // enough for the threads.
        let keys = case.kv_lens.as_ref().map_or(spec.seq_kv, |l| l.iter().copied().max().unwrap_or(0));
        prop_assert!(kv_span == 1 || kv_span == spec.kv_heads, "kv_span {}", kv_span);
        if kv_span == 1 {
            prop_assert_eq!((parts, part_len), (keys.div_ceil(DECODE_PART_LEN).max(1), DECODE_PART_LEN));
        } else {
            prop_assert!(part_len <= DECODE_PART_LEN && part_len.is_multiple_of(DECODE_MIN_PART_LEN), "part_len {}", part_len);
            prop_assert_eq!(parts, keys.max(1).div_ceil(part_len));
        }
        check_rounded_weights(&case, &one, store_eps, weight_eps::<TQ, TKV>(isa)).map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
        let want = bits(&one);
        for threads in [2, 3] {
            let (got, _) = run::<TQ, TKV, TO>(&case, RunConfig { isa: Some(isa), threads: Some(threads) });
            prop_assert!(bits(&got) == want, "[{isa}] {threads} threads differ");
        }
        for nth in [2, 3] {
            prop_assert!(bits(&host::<TQ, TKV, TO>(&case, isa, nth)) == want, "[{isa}] {nth} host shares differ");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 8 + 1, ..ProptestConfig::default() })]

    #[test]
    fn decode_f32(spec in decode_spec()) {
        check_decode::<f32, f32, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_f16_kv(spec in decode_spec()) {
        check_decode::<f32, f16, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_f16_everything(spec in decode_spec()) {
        check_decode::<f16, f16, f16>(&spec, 1.0 / 2048.0)?;
    }

    #[test]
    fn decode_bf16_kv(spec in decode_spec()) {
        check_decode::<f32, bf16, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_bf16_everything(spec in decode_spec()) {
        check_decode::<bf16, bf16, bf16>(&spec, 1.0 / 256.0)?;
    }

    #[test]
    fn decode_few_rows_f32(spec in decode_few_spec()) {
        check_decode::<f32, f32, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_few_rows_f16_kv(spec in decode_few_spec()) {
        check_decode::<f32, f16, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_few_rows_f16_everything(spec in decode_few_spec()) {
        check_decode::<f16, f16, f16>(&spec, 1.0 / 2048.0)?;
    }

    #[test]
    fn decode_few_rows_bf16_kv(spec in decode_few_spec()) {
        check_decode::<f32, bf16, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_across_kv_heads_f32(spec in decode_across_heads_spec()) {
        check_across_heads::<f32, f32, f32>(&spec, 0.0)?;
    }

    #[test]
    fn decode_across_kv_heads_f16_kv(spec in decode_across_heads_spec()) {
        check_across_heads::<f32, f16, f32>(&spec, 0.0)?;
    }
}
