//! The AVX512_BF16 dot-product kernel (`isa = avx512bf16`, bf16 Q and K/V): every bf16
//! specialisation of the generated table and the generic path, against the f64 reference on the
//! bf16 inputs, with the one extra rounding the README's accuracy contract states (each weight
//! to bf16: the output moves by at most `2^-8 * max|v|` more). On a CPU without AVX512_BF16 the
//! tests say so and check nothing else.

mod common;

use common::*;
use half::bf16;
use proptest::prelude::*;
use simd_attn::plan::SPECIALISATIONS;
use simd_attn::{attention_with, DType, Isa, Rope, RunConfig, RunInfo};

fn available() -> bool {
    let yes = Isa::Avx512Bf16.is_available();
    if !yes {
        eprintln!("skipped: this CPU has no AVX512_BF16, so the avx512bf16 kernels cannot run here");
    }
    yes
}

fn run_on<TO: simd_attn::FloatElement>(case: &Case, isa: Isa) -> (Outcome, RunInfo) {
    let mut info = None;
    let got = run_typed::<bf16, bf16, TO>(case, |s, q, k, v, o, l, p| {
        let r = attention_with(&RunConfig { isa: Some(isa), threads: Some(1) }, s, q, k, v, o, l, p);
        info = r.as_ref().ok().copied();
        r
    });
    (got, info.expect("generated problems are valid"))
}

fn check_dot(spec: &Spec, want_specialised: Option<usize>) -> Result<(), TestCaseError> {
    let mut case = Case::build(spec);
    case.round_to::<bf16>();
    let (got, info) = run_on::<bf16>(&case, Isa::Avx512Bf16);
    prop_assert_eq!(info.isa, Isa::Avx512Bf16);
    if want_specialised.is_some() {
        prop_assert_eq!(info.specialised_head_dim, want_specialised, "did not run its specialisation");
    }
    check_rounded_weights(&case, &got, 1.0 / 256.0, WEIGHT_EPS_BF16)?;
    let (got, _) = run_on::<f32>(&case, Isa::Avx512Bf16);
    check_rounded_weights(&case, &got, 0.0, WEIGHT_EPS_BF16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 2 + 1, ..ProptestConfig::default() })]

    /// Random shapes, layouts, masks, lengths, bias, ALiBi, softcap, sinks; mostly the generic
    /// path (odd head dims run the AVX-512 kernels: the pairs need an even one).
    #[test]
    fn dot_kernel_any_options(spec in spec_strategy(Options::Any)) {
        if available() {
            check_dot(&spec, None)?;
        }
    }

    #[test]
    fn dot_kernel_adversarial(spec in spec_strategy(Options::Adversarial)) {
        if available() {
            check_dot(&spec, None)?;
        }
    }

    /// Every bf16 specialisation the table declares.
    #[test]
    fn dot_kernel_every_specialisation(spec in spec_strategy(Options::Any)) {
        if available() {
            let mut ran = 0;
            for sp in SPECIALISATIONS.iter().filter(|s| s.dtype == DType::Bf16) {
                let mut spec = spec.clone();
                spec.head_dim = sp.head_dim;
                spec.v_head_dim = sp.head_dim;
                check_dot(&spec, Some(sp.head_dim))?;
                ran += 1;
            }
            prop_assert!(ran > 0, "kernels/ declares no bf16 specialisation");
        }
    }
}

/// The dot-product kernel rounds weights, so on data where that matters its result differs
/// from the widened AVX-512 kernel's; calls it does not take (RoPE on Q, f32 Q) run the
/// AVX-512 kernels bit for bit.
#[test]
fn avx512bf16_runs_the_dot_kernel_where_it_takes_the_call() {
    if !available() {
        return;
    }
    let mut spec = Spec::plain(1, 4, 2, 64, 200, 128);
    spec.causal = true;
    let mut case = Case::build(&spec);
    case.round_to::<bf16>();
    let bits = |o: &Outcome| o.out.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (dot, _) = run_on::<f32>(&case, Isa::Avx512Bf16);
    let (wide, _) = run_on::<f32>(&case, Isa::Avx512);
    assert_ne!(bits(&dot), bits(&wide), "avx512bf16 gave the widened kernel's bits: the dot kernel did not run");
    check_rounded_weights(&case, &dot, 0.0, WEIGHT_EPS_BF16).unwrap();

    // f32 Q: widened, exact.
    let run_f32q = |isa| {
        run_typed::<f32, bf16, f32>(&case, |s, q, k, v, o, l, p| attention_with(&RunConfig { isa: Some(isa), threads: Some(1) }, s, q, k, v, o, l, p))
    };
    assert_eq!(bits(&run_f32q(Isa::Avx512Bf16)), bits(&run_f32q(Isa::Avx512)));

    // RoPE on Q: widened too.
    let (cos, sin) = Rope::tables(10000.0, 128, 256);
    let rope = Rope { cos: &cos, sin: &sin, rotary_dim: 128, interleaved: false };
    let run_rope = |isa| {
        run_typed::<bf16, bf16, f32>(&case, |s, q, k, v, o, l, p| {
            let p = simd_attn::AttentionParams { rope: Some(rope), ..*p };
            attention_with(&RunConfig { isa: Some(isa), threads: Some(1) }, s, q, k, v, o, l, &p)
        })
    };
    assert_eq!(bits(&run_rope(Isa::Avx512Bf16)), bits(&run_rope(Isa::Avx512)));
}

/// The adversarial rows of the accuracy contract: one key dominating the rest by far (its
/// weight 1, the rest underflowing or tiny), and near-uniform weights over 10^5 keys (every
/// weight near 1, each rounded, summed 10^5 times).
#[test]
fn dot_kernel_holds_its_bound_on_adversarial_rows() {
    if !available() {
        return;
    }
    // One dominant key per row: K row j = 0 is aligned with every query, scaled up.
    let mut spec = Spec::plain(1, 2, 1, 48, 300, 64);
    spec.seed = 11;
    let mut case = Case::build(&spec);
    let (kb, ko, ks) = case.views[1];
    let (qb, qo, qs) = case.views[0];
    for i in 0..spec.seq_q * 2 {
        let o = qo + (i / spec.seq_q) * qs.head + (i % spec.seq_q) * qs.seq;
        case.bufs[qb][o..o + 64].iter_mut().for_each(|x| *x = 1.0);
    }
    case.bufs[kb][ko..ko + 64].iter_mut().for_each(|x| *x = 8.0);
    let _ = ks;
    case.round_to::<bf16>();
    let (got, _) = run_on::<f32>(&case, Isa::Avx512Bf16);
    check_rounded_weights(&case, &got, 0.0, WEIGHT_EPS_BF16).unwrap();

    // Near-uniform over 10^5 keys: tiny logits (Q scaled down), so every weight is within
    // 1e-3 of 1 and each is rounded.
    let mut spec = Spec::plain(1, 1, 1, 32, 100_000, 64);
    spec.seed = 12;
    let mut case = Case::build(&spec);
    let qb = case.views[0].0;
    case.bufs[qb].iter_mut().for_each(|x| *x *= 1e-3);
    case.round_to::<bf16>();
    let (got, info) = run_on::<f32>(&case, Isa::Avx512Bf16);
    assert!(matches!(info.plan.kind, simd_attn::plan::work::PlanKind::Prefill { .. }), "{:?}", info.plan);
    check_rounded_weights(&case, &got, 0.0, WEIGHT_EPS_BF16).unwrap();
}

/// Automatic choice (no per-call ISA, no override, no `SIMD_ATTN_ISA`): bf16 prefill runs the
/// dot kernel exactly where `Isa::prefers_bf16_dot` says (AVX512_BF16 on an AMD CPU), and
/// gives the forced avx512bf16 path's bits; f32 Q, decode and a call that asks for its
/// alignment stay on the best path.
#[test]
fn automatic_choice_takes_the_dot_kernel_where_it_is_faster() {
    if std::env::var("SIMD_ATTN_ISA").is_ok_and(|v| !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("auto")) {
        eprintln!("skipped: SIMD_ATTN_ISA is set, so no call here is chosen automatically");
        return;
    }
    let vendor_amd = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("vendor_id") && l.ends_with("AuthenticAMD")))
        .unwrap_or(false);
    assert_eq!(Isa::prefers_bf16_dot(), Isa::Avx512Bf16.is_available() && vendor_amd);
    let auto = RunConfig { isa: None, threads: Some(1) };
    let bits = |o: &Outcome| o.out.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

    let mut spec = Spec::plain(1, 4, 2, 64, 200, 128);
    spec.causal = true;
    let mut case = Case::build(&spec);
    case.round_to::<bf16>();
    let mut info = None;
    let got = run_typed::<bf16, bf16, f32>(&case, |s, q, k, v, o, l, p| {
        let r = attention_with(&auto, s, q, k, v, o, l, p);
        info = r.as_ref().ok().copied();
        r
    });
    let want_isa = if Isa::prefers_bf16_dot() { Isa::Avx512Bf16 } else { Isa::best() };
    assert_eq!(info.unwrap().isa, want_isa);
    assert_eq!(bits(&got), bits(&run_on::<f32>(&case, want_isa).0));

    let f32q = run_typed::<f32, bf16, f32>(&case, |s, q, k, v, o, l, p| {
        let r = attention_with(&auto, s, q, k, v, o, l, p);
        assert_eq!(r.as_ref().unwrap().isa, Isa::best(), "f32 Q");
        r
    });
    check_rounded_weights(&case, &f32q, 0.0, 0.0).unwrap();

    let mut decode = Case::build(&Spec::plain(1, 8, 2, 1, 300, 128));
    decode.round_to::<bf16>();
    run_typed::<bf16, bf16, f32>(&decode, |s, q, k, v, o, l, p| {
        let r = attention_with(&auto, s, q, k, v, o, l, p);
        assert_eq!(r.as_ref().unwrap().isa, Isa::best(), "decode");
        r
    });

    let (s, mut alignment) = (Spec::plain(1, 2, 1, 16, 40, 64), vec![0.0f32; 2 * 16 * 40]);
    let mut small = Case::build(&s);
    small.round_to::<bf16>();
    run_typed::<bf16, bf16, f32>(&small, |sh, q, k, v, o, l, p| {
        let inspect = simd_attn::Inspect { alignment: Some(&mut alignment), ..Default::default() };
        let r = simd_attn::attention_inspect(&auto, sh, q, k, v, o, l, p, inspect);
        assert_eq!(r.as_ref().unwrap().isa, Isa::best(), "alignment");
        r
    });
}
