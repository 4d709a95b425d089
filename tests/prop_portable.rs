//! Property tests: the portable kernel against the f64 reference over random shapes,
//! layouts, options and adversarial values. Cases per property: PROPTEST_CASES (default 256).

mod common;

use common::*;
use proptest::prelude::*;
use simd_attn::{attention_with, Isa, RunConfig};

fn run_portable(spec: &Spec) -> Result<(), TestCaseError> {
    let case = Case::build(spec);
    let config = RunConfig { isa: Some(Isa::Portable), threads: Some(1) };
    let got = run_typed::<f32, f32, f32>(&case, |s, q, k, v, o, l, p| attention_with(&config, s, q, k, v, o, l, p));
    check(&case, &got, 0.0)
}

proptest! {
    #[test]
    fn plain_attention(spec in spec_strategy(Options::Plain)) {
        run_portable(&spec)?;
    }

    #[test]
    fn each_option_alone(spec in spec_strategy(Options::One)) {
        run_portable(&spec)?;
    }

    #[test]
    fn options_combined(spec in spec_strategy(Options::Any)) {
        run_portable(&spec)?;
    }

    #[test]
    fn adversarial(spec in spec_strategy(Options::Adversarial)) {
        run_portable(&spec)?;
    }
}
