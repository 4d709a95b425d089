//! # simd-attn
//!
//! Fused, flash-style attention kernels for CPUs. One call computes
//! `out = softmax(scale * Q K^T + bias, masked) V` for every batch entry and head with an
//! online softmax over tiles of keys, never storing the score matrix.
//!
//! - Any layout through element strides ([`Strides`]): `[B, H, S, D]`, `[B, S, H, D]`, packed
//!   QKV buffers, without copies; `v_head_dim` may differ from `head_dim`.
//! - GQA / MQA, bottom-right-aligned causal masks, sliding windows, per-batch KV lengths, logit
//!   softcap, additive bias / masks with broadcasting, ALiBi, attention sinks and LSE output,
//!   all combinable ([`AttentionParams`] states the exact semantics).
//! - The classic score functions ([`Score`]): dot, cosine, general (multiplicative) and
//!   additive (Bahdanau), fused the same way; [`attention_inspect`] also returns the exact
//!   alignment matrix and coverage from a second tiled pass.
//! - Storage: f32, f16 and bf16 for any tensor; K/V caches may also be int8 or fp8 (E4M3, E5M2) codes with
//!   dequantization factors per tensor, KV head or token ([`KvScales`]), or ggml q8_0 blocks
//!   ([`BlockQ8_0`]), read in place.
//! - An f64 reference ([`reference`]) that follows the contract literally; every kernel is
//!   property-tested against it.
//!
//! Data flow: [`attention`] (api) → validate → score (per-call projections and norms) → plan
//! (tiles) → kernel (per query block) → store.

mod api;
mod append;
mod request;
mod rows;
mod rope;
mod dtypes;
#[doc(hidden)]
pub mod capi;
mod exec;
#[cfg(feature = "rayon")]
mod pool;
pub mod element;
pub mod error;
pub mod isa;
pub mod layout;
mod mask;
pub mod merge;
pub mod params;
pub mod plan;
pub mod quant;
mod problem;
mod score;
pub mod reference;
mod store;
mod validate;
mod kernel;
mod kv;
mod simd;
#[doc(hidden)]
pub mod selftest;

pub use api::{attention, attention_in, attention_inspect, attention_with, run, Inspect, default_threads, set_default_threads, HostPlan, RunConfig, RunInfo};
pub use dtypes::{AnyKv, AnyMut, AnyRef, Kv};
pub use request::Request;
pub use append::{attention_with_kvcache, KvCacheMut, NewKv};
pub use rope::Rope;
pub use exec::Workspace;
pub use plan::work::{WorkPlan, WorkUnit};
pub use element::{BlockQ8_0, DType, Element, F8E4M3, F8E5M2, FloatElement};
pub use error::{AttnError, TensorName};
pub use isa::{isa_override, resolve_isa, set_isa_override, Isa};
pub use merge::{merge_partials, PartialResult};
pub use layout::{AttentionShape, BiasRef, BiasStrides, PageStrides, PageTable, PagedKv, Strides, TensorMut, TensorRef};
pub use quant::{Dequant, KvScales};
pub use params::{AdditiveProjection, AttentionParams, Score, Window, COSINE_EPS};
/// The bound on the additive score's vectorised `tanh` error (absolute, per element): an
/// additive score `sum_a v_a tanh(..)` carries at most this times `sum_a |v_a|` from it.
pub use simd::tanh::TANH_MAX_ABS_ERROR as ADDITIVE_TANH_MAX_ABS_ERROR;
pub use reference::{reference_attention, Reference, ReferenceOutput, ReferenceRow};

/// FLOPs of one call as the benchmarks count them: `2 * (D + Dv)` per visible (row, key) pair
/// of every query head (`4 * D` when `Dv == D`). Masked pairs are not counted.
pub fn attention_flops(shape: &AttentionShape, params: &AttentionParams<'_>) -> f64 {
    let masker = mask::RowMasker::new(shape, params);
    let mut pairs = 0u128;
    if shape.seq_q == 0 {
        return 0.0; // no row: nothing to count, however many batch entries
    }
    for b in 0..shape.batch {
        let kv_len = params.kv_len(b, shape.seq_kv);
        // A packed sequence's rows are the last `q_len` of `seq_q` (see `rows`).
        for i in shape.seq_q.saturating_sub(params.q_len(b, shape.seq_q))..shape.seq_q {
            let (lo, hi) = masker.interval(kv_len, i);
            pairs += (hi - lo) as u128;
        }
    }
    pairs as f64 * shape.q_heads as f64 * 2.0 * (shape.head_dim + shape.v_head_dim) as f64
}

/// The README's examples are compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
