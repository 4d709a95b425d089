//! `simd-attn-bench`: a sweep of standard attention shapes. For each row it prints the median
//! time, GFLOP/s (visible pairs only), the fraction of this machine's FMA peak measured in the
//! same run, the speedup over the unfused baseline, and the max error against the f64
//! reference on sampled rows.
//!
//! Usage: simd-attn-bench [--set standard|seqlen|all] [--reps N] [--min-time SECONDS] [--no-check]

mod machine;
mod unfused;

use simd_attn::{attention, attention_flops, AttentionParams, AttentionShape, Reference, TensorMut, TensorRef};
use std::time::Instant;

struct Case {
    name: &'static str,
    shape: AttentionShape,
    causal: bool,
}

fn case(name: &'static str, b: usize, hq: usize, hkv: usize, sq: usize, skv: usize, d: usize, causal: bool) -> Case {
    Case { name, shape: AttentionShape::new(b, hq, hkv, sq, skv, d), causal }
}

fn cases(set: &str) -> Vec<Case> {
    let standard = || {
        vec![
            case("prefill", 1, 8, 8, 1024, 1024, 128, false),
            case("prefill", 1, 8, 8, 1024, 1024, 64, false),
            case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true),
            case("small", 1, 8, 8, 128, 128, 128, false),
            case("decode", 1, 32, 8, 1, 4096, 128, true),
        ]
    };
    let seqlen = || {
        [128, 256, 512, 1024, 2048, 4096, 8192]
            .into_iter()
            .map(|s| case("seqlen", 1, 8, 8, s, s, 128, true))
            .collect::<Vec<_>>()
    };
    match set {
        "standard" => standard(),
        "seqlen" => seqlen(),
        "all" => standard().into_iter().chain(seqlen()).collect(),
        other => {
            eprintln!("unknown --set {other} (standard | seqlen | all)");
            std::process::exit(2);
        }
    }
}

/// Uniform values in [-1, 1) from a fixed seed: the same inputs in every run.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// Median and spread (max/min - 1) of repeated runs after one warm-up.
fn time(reps: usize, min_time: f64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < reps || (start.elapsed().as_secs_f64() < min_time && t.len() < 1000) {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[t.len() / 2], t[t.len() - 1] / t[0] - 1.0)
}

fn main() {
    let mut set = "standard".to_string();
    let mut reps = 3;
    let mut min_time = 0.5;
    let mut check = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--set" => set = val("--set"),
            "--reps" => reps = val("--reps").parse().expect("--reps N"),
            "--min-time" => min_time = val("--min-time").parse().expect("--min-time SECONDS"),
            "--no-check" => check = false,
            "-h" | "--help" => {
                println!("simd-attn-bench [--set standard|seqlen|all] [--reps N] [--min-time SECONDS] [--no-check]");
                return;
            }
            other => {
                eprintln!("unknown argument {other}; see --help");
                std::process::exit(2);
            }
        }
    }

    let peak = machine::fma_peak_gflops();
    println!("# simd-attn {} | {} | 1 thread", env!("CARGO_PKG_VERSION"), machine::cpu_model());
    let bw = machine::read_bandwidth_gbs();
    println!("# measured: f32 FMA peak {peak:.1} GFLOP/s per core, memory read bandwidth {bw:.1} GB/s");
    println!(
        "{:<12} {:>2} {:>3} {:>3} {:>5} {:>5} {:>4} {:>6} {:>9} {:>7} {:>7} {:>6} {:>6} {:>5} {:>8} {:>9}",
        "case", "B", "Hq", "Hkv", "Sq", "Skv", "D", "causal", "ms", "spread", "GFLOP/s", "%peak", "GB/s", "%bw", "x unfused", "max err"
    );
    let mut scores = Vec::new();
    for c in cases(&set) {
        let s = c.shape;
        let [qs, ks, vs, os] = s.bhsd_strides();
        let [nq, nk, nv, no] = s.bhsd_lens();
        let (q, k, v) = (random(nq, 1), random(nk, 2), random(nv, 3));
        let mut out = vec![0.0f32; no];
        let params = AttentionParams::new().causal(c.causal);
        let flops = attention_flops(&s, &params);
        let (t, spread) = time(reps, min_time, || {
            attention(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params)
                .expect("valid problem");
        });
        let mut base_out = vec![0.0f32; no];
        let (tb, _) = time(reps.min(3), 0.0, || unfused::attention(&s, c.causal, &q, &k, &v, &mut base_out, &mut scores));
        let err = if check {
            let r = Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), &params).unwrap();
            max_error(&s, &r, &out)
        } else {
            f64::NAN
        };
        let gflops = flops / t / 1e9;
        // K and V must be read at least once: what bounds decode.
        let kv_bytes = (s.batch * s.kv_heads * s.seq_kv * (s.head_dim + s.v_head_dim) * 4) as f64;
        let gbs = kv_bytes / t / 1e9;
        println!(
            "{:<12} {:>2} {:>3} {:>3} {:>5} {:>5} {:>4} {:>6} {:>9.3} {:>6.1}% {:>7.1} {:>5.1}% {:>6.1} {:>4.0}% {:>8.2}x {:>9.1e}",
            c.name, s.batch, s.q_heads, s.kv_heads, s.seq_q, s.seq_kv, s.head_dim, c.causal,
            t * 1e3, spread * 100.0, gflops, 100.0 * gflops / peak, gbs, 100.0 * gbs / bw, tb / t, err
        );
    }
}

/// Max |out - reference| over up to 48 rows spread across the problem (the f64 reference is
/// too slow to run on every row of the large shapes).
fn max_error(s: &AttentionShape, r: &Reference<'_, f32, f32>, out: &[f32]) -> f64 {
    let rows = s.batch * s.q_heads * s.seq_q;
    let samples = rows.min(48);
    let mut err = 0.0f64;
    for n in 0..samples {
        let row = n * rows / samples + (rows / samples) / 2;
        let (b, h, i) = (row / (s.q_heads * s.seq_q), (row / s.seq_q) % s.q_heads, row % s.seq_q);
        let want = r.row(b, h, i).unwrap();
        let got = &out[row * s.v_head_dim..(row + 1) * s.v_head_dim];
        for (g, w) in got.iter().zip(&want.out) {
            err = err.max((*g as f64 - w).abs());
        }
    }
    err
}
