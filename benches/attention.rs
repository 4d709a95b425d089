//! Criterion benches of the fused kernel; throughput is declared in FLOPs so criterion reports
//! FLOP/s. `cargo bench` runs them; the shape sweep with roofline figures is the
//! `simd-attn-bench` binary.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use simd_attn::{attention_flops, attention_with, AttentionParams, AttentionShape, Isa, RunConfig, TensorMut, TensorRef};
use std::hint::black_box;

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    for (isa, d, causal) in Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .flat_map(|isa| [(isa, 64, false), (isa, 128, false), (isa, 128, true)])
    {
        let s = AttentionShape::new(1, 8, 2, 512, 512, d);
        let [qs, ks, vs, os] = s.bhsd_strides();
        let [nq, nk, nv, no] = s.bhsd_lens();
        let (q, k, v) = (vec![0.5f32; nq], vec![0.25f32; nk], vec![1.0f32; nv]);
        let mut out = vec![0.0f32; no];
        let params = AttentionParams::new().causal(causal);
        g.throughput(Throughput::Elements(attention_flops(&s, &params) as u64));
        let id = BenchmarkId::new(format!("{isa}/d{d}"), if causal { "causal" } else { "full" });
        let config = RunConfig { isa: Some(isa), threads: Some(1) };
        g.bench_function(id, |bench| {
            bench.iter(|| {
                attention_with(&config, &s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params)
                    .unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, prefill);
criterion_main!(benches);
