//! Criterion benches: prefill (f32 / f16 storage, D 64 / 128, causal and not, GQA), decode
//! (Sq 1 / 4 against an f16 KV cache), the generic head-dim path and the classic score
//! functions (dot, cosine, general, additive), on every SIMD path this machine has. Prefill
//! declares its throughput in FLOPs (criterion prints FLOP/s as "elem/s"), decode in K/V bytes
//! read (bytes/s), the additive score in (pair x attention dim) elements.
//!
//! `cargo bench` runs the quick profile (a few minutes); `SIMD_ATTN_BENCH=full cargo bench`
//! the full one (more shapes, longer measurements). The shape sweep with roofline figures,
//! JSON/CSV and charts is the `simd-attn-bench` binary.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use simd_attn::{attention_flops, attention_with, AttentionParams, AttentionShape, Element, FloatElement, Isa, RunConfig, Score, TensorMut, TensorRef};
use std::hint::black_box;
use std::time::Duration;

fn full() -> bool {
    std::env::var("SIMD_ATTN_BENCH").is_ok_and(|v| v == "full")
}

/// The SIMD paths this machine can run (the portable kernel is the sweep's baseline, and the
/// one-lane scalar body is only a correctness path).
fn isas() -> Vec<Isa> {
    Isa::available().into_iter().filter(|&i| !matches!(i, Isa::Portable | Isa::Scalar)).collect()
}

fn values<T: Element>(n: usize, seed: u32) -> Vec<T> {
    (0..n).map(|i| T::from_f32(((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)).collect()
}

fn configure<'c>(c: &'c mut Criterion, name: &str) -> criterion::BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    if full() {
        g.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    } else {
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    }
    g
}

/// Benches one shape on one path; `bytes` switches the throughput to K/V bytes.
#[allow(clippy::too_many_arguments)]
fn bench<TQ: FloatElement, TKV: Element>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    isa: Isa,
    s: AttentionShape,
    causal: bool,
    bytes: bool,
    score: Score<'_>,
) {
    let [qs, ks, vs, os] = s.bhsd_strides();
    let [nq, nk, nv, no] = s.bhsd_lens();
    let (q, k, v) = (values::<TQ>(nq, 1), values::<TKV>(nk, 2), values::<TKV>(nv, 3));
    let mut out = vec![0.0f32; no];
    let params = AttentionParams::new().causal(causal).score(score);
    g.throughput(if bytes {
        Throughput::Bytes(((nk + nv) * core::mem::size_of::<TKV>()) as u64)
    } else if matches!(score, Score::Additive { .. }) {
        // Visible pairs x attention dim (attention_flops counts 4 D per pair).
        Throughput::Elements((attention_flops(&s, &params) / 4.0) as u64)
    } else {
        Throughput::Elements(attention_flops(&s, &params) as u64)
    });
    let config = RunConfig { isa: Some(isa), threads: Some(1) };
    g.bench_function(id, |bench| {
        bench.iter(|| {
            attention_with(&config, &s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params)
                .unwrap();
            black_box(&out);
        })
    });
}

fn prefill(c: &mut Criterion) {
    let mut g = configure(c, "prefill");
    let seq = if full() { vec![512, 2048] } else { vec![512] };
    for isa in isas() {
        for &s in &seq {
            for (d, causal, f16_storage) in [(64, false, false), (128, false, false), (128, true, false), (128, true, true), (64, true, true)] {
                // GQA 8:2, as in most current models.
                let shape = AttentionShape::new(1, 8, 2, s, s, d);
                let id = BenchmarkId::new(format!("{isa}/{}/d{d}/{}", if f16_storage { "f16" } else { "f32" }, if causal { "causal" } else { "full" }), s);
                if f16_storage {
                    bench::<f16, f16>(&mut g, id, isa, shape, causal, false, Score::ScaledDot);
                } else {
                    bench::<f32, f32>(&mut g, id, isa, shape, causal, false, Score::ScaledDot);
                }
            }
        }
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = configure(c, "decode");
    let lens = if full() { vec![1024, 4096, 16384, 32768] } else { vec![1024, 8192] };
    for isa in isas() {
        for sq in [1, 4] {
            for &skv in &lens {
                let shape = AttentionShape::new(1, 32, 8, sq, skv, 128);
                bench::<f32, f16>(&mut g, BenchmarkId::new(format!("{isa}/f16kv/sq{sq}"), skv), isa, shape, true, true, Score::ScaledDot);
            }
        }
    }
    g.finish();
}

fn generic_head_dim(c: &mut Criterion) {
    let mut g = configure(c, "generic-head-dim");
    let dims: &[usize] = if full() { &[48, 96, 160] } else { &[96] };
    for isa in isas() {
        for &d in dims {
            let shape = AttentionShape::new(1, 8, 8, 512, 512, d);
            bench::<f32, f32>(&mut g, BenchmarkId::new(format!("{isa}/f32/full"), d), isa, shape, false, false, Score::ScaledDot);
        }
    }
    g.finish();
}

/// The classic scores on one prefill shape: FLOPs for the dot family, (pair x attention dim)
/// elements for the additive score.
fn scores(c: &mut Criterion) {
    let mut g = configure(c, "scores");
    let dims: &[usize] = if full() { &[64, 128, 48] } else { &[64] };
    for isa in isas() {
        for &d in dims {
            let shape = AttentionShape::new(1, 8, 8, 512, 512, d);
            let (w, v) = (values::<f32>(d * d, 4), values::<f32>(d, 5));
            for (name, score) in [
                ("dot", Score::Dot),
                ("cosine", Score::Cosine { temperature: 10.0 }),
                ("general", Score::General { w: &w, q_dim: d }),
                ("additive", Score::Additive { v: &v, projection: None }),
            ] {
                bench::<f32, f32>(&mut g, BenchmarkId::new(format!("{isa}/{name}"), d), isa, shape, false, false, score);
            }
        }
    }
    g.finish();
}

criterion_group!(benches, prefill, decode, generic_head_dim, scores);
criterion_main!(benches);
