//! Storage types: f16 and bf16 tensors (any mix engines use) on every path, against the
//! reference computed on the storage-rounded inputs. Arithmetic stays f32 on exactly widened
//! inputs; a 16-bit output adds one rounding (2^-11 relative for f16, 2^-8 for bf16: the
//! `store_eps` of the tolerance).

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use simd_attn::{attention_with, Element, FloatElement, Isa, RunConfig};

const F16_EPS: f64 = 1.0 / 2048.0;
const BF16_EPS: f64 = 1.0 / 256.0;

fn every_isa<TQ: FloatElement, TKV: Element, TO: FloatElement>(spec: &Spec, store_eps: f64) -> Result<(), TestCaseError> {
    let mut case = Case::build(spec);
    case.round_for::<TQ, TKV, TO>();
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(1) };
        let got = run_typed::<TQ, TKV, TO>(&case, |s, q, k, v, o, l, p| attention_with(&config, s, q, k, v, o, l, p));
        check_rounded_weights(&case, &got, store_eps, weight_eps::<TQ, TKV>(isa)).map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
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

    #[test]
    fn bf16_everywhere(spec in spec_strategy(Options::Any)) {
        every_isa::<bf16, bf16, bf16>(&spec, BF16_EPS)?;
    }

    #[test]
    fn f32_q_bf16_kv_f32_out(spec in spec_strategy(Options::Any)) {
        every_isa::<f32, bf16, f32>(&spec, 0.0)?;
    }

    /// An f32 output from bf16 inputs and a bf16 output from f32 ones: the output type is
    /// independent of the inputs'.
    #[test]
    fn bf16_q_and_kv_f32_out(spec in spec_strategy(Options::Any)) {
        every_isa::<bf16, bf16, f32>(&spec, 0.0)?;
    }

    #[test]
    fn f32_in_bf16_out(spec in spec_strategy(Options::Any)) {
        every_isa::<f32, f32, bf16>(&spec, BF16_EPS)?;
    }
}
