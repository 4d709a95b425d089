//! Storage types: f16 tensors (any mix engines use) on every path, against the reference
//! computed on the f16-rounded inputs. Arithmetic stays f32; an f16 output adds one rounding
//! (2^-11 relative, the `store_eps` of the tolerance).

mod common;

use common::*;
use half::f16;
use proptest::prelude::*;
use simd_attn::{attention_with, Element, Isa, RunConfig};

const F16_EPS: f64 = 1.0 / 2048.0;

fn every_isa<TQ: Element, TKV: Element, TO: Element>(spec: &Spec, store_eps: f64) -> Result<(), TestCaseError> {
    let mut case = Case::build(spec);
    case.round_to::<f16>(); // the values every storage type represents exactly
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(1) };
        let got = run_typed::<TQ, TKV, TO>(&case, |s, q, k, v, o, l, p| attention_with(&config, s, q, k, v, o, l, p));
        check(&case, &got, store_eps).map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 4 + 1, ..ProptestConfig::default() })]

    #[test]
    fn f16_everywhere(spec in spec_strategy(Options::Any)) {
        every_isa::<f16, f16, f16>(&spec, F16_EPS)?;
    }

    #[test]
    fn f32_q_f16_kv_f32_out(spec in spec_strategy(Options::Any)) {
        every_isa::<f32, f16, f32>(&spec, 0.0)?;
    }
}
