//! Property tests of every kernel variant: each specialisation that `kernels/` declares
//! (enumerated from the table build.rs generates) and the generic head-dim path, on every ISA
//! this machine can run, against the f64 reference.

mod common;

use common::*;
use proptest::prelude::*;
use simd_attn::plan::SPECIALISATIONS;
use simd_attn::{attention_with, DType, Isa, RunConfig, RunInfo};

fn run_isa(case: &Case, isa: Isa) -> (Outcome, RunInfo) {
    let mut info = None;
    let got = run_typed::<f32, f32, f32>(case, |s, q, k, v, o, l, p| {
        let r = attention_with(&RunConfig { isa: Some(isa), threads: Some(1) }, s, q, k, v, o, l, p);
        info = r.as_ref().ok().copied();
        r
    });
    (got, info.unwrap())
}

fn every_isa(spec: &Spec) -> Result<(), TestCaseError> {
    let case = Case::build(spec);
    for isa in Isa::available() {
        let (got, info) = run_isa(&case, isa);
        prop_assert_eq!(info.isa, isa);
        check(&case, &got, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
    }
    Ok(())
}

proptest! {
    /// Random head dims (mostly the generic path), every option, every ISA.
    #[test]
    fn every_isa_any_options(spec in spec_strategy(Options::Any)) {
        every_isa(&spec)?;
    }

    #[test]
    fn every_isa_each_option_alone(spec in spec_strategy(Options::One)) {
        every_isa(&spec)?;
    }

    #[test]
    fn every_isa_adversarial(spec in spec_strategy(Options::Adversarial)) {
        every_isa(&spec)?;
    }

    /// Every specialised head dim of the generated table, on its ISA when available.
    #[test]
    fn every_specialisation(spec in spec_strategy(Options::Any)) {
        let mut ran = 0;
        for sp in SPECIALISATIONS.iter().filter(|s| s.dtype == DType::F32 && s.isa.is_available()) {
            let mut spec = spec.clone();
            spec.head_dim = sp.head_dim;
            spec.v_head_dim = sp.head_dim;
            let case = Case::build(&spec);
            let (got, info) = run_isa(&case, sp.isa);
            prop_assert_eq!(info.specialised_head_dim, Some(sp.head_dim), "{:?} did not run its specialisation", sp);
            check(&case, &got, 0.0).map_err(|e| TestCaseError::fail(format!("[{:?}] {e}", sp)))?;
            ran += 1;
        }
        prop_assert!(ran > 0, "no specialisation is runnable here");
    }
}

#[test]
fn the_table_covers_every_isa_and_the_required_head_dims() {
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon] {
        for d in [64, 128] {
            assert!(
                SPECIALISATIONS.iter().any(|s| s.isa == isa && s.dtype == DType::F32 && s.head_dim == d),
                "kernels/ has no f32 D={d} specialisation for {isa}"
            );
        }
    }
    for s in SPECIALISATIONS {
        let t = s.tiles;
        assert!(t.br >= t.mr && t.br % t.mr == 0 && t.bc >= t.nr && t.bc % t.nr == 0, "{s:?}");
    }
}
