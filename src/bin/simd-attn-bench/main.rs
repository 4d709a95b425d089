//! `simd-attn-bench`: a sweep of attention shapes. For each shape and path it prints the median
//! time and its spread, GFLOP/s (visible pairs only) at the median and at the best run, the
//! fraction of this machine's FMA peak and memory bandwidth measured in the same run, the
//! speedup over the portable kernel and over an unfused baseline, and the max error against the
//! f64 reference on sampled rows; optionally as JSON / CSV with the machine description, and as
//! an SVG chart. `simd-attn-bench compare OLD NEW` prints the ratios of two result files.

mod machine;
mod plot;
mod report;
mod unfused;

use report::{Machine, Row};

use half::{bf16, f16};
use simd_attn::{attention_flops, attention_inspect, attention_with_kvcache, KvCacheMut, NewKv, Rope, AttentionParams, AttentionShape, Dequant, DType, Element, FloatElement, Inspect, Isa, PageStrides, PageTable, PagedKv, Reference, Request, RunConfig, Score, Strides, TensorMut, TensorRef};
use std::io::IsTerminal;
use std::time::Instant;

const USAGE: &str = "simd-attn-bench [--set NAME] [--shape B,Hq,Hkv,Sq,Skv,D[,causal]]... [--isa auto|all|LIST]
                [--threads LIST] [--dtype f32|f16|f16kv|bf16|bf16kv|i8kv|e4m3kv|e5m2kv|q8_0kv|q8_0k_f16v] [--case SUBSTRING] [--reps N]
                [--min-time SECONDS] [--no-check] [--no-baselines]
                [--json PATH] [--csv PATH] [--plot PATH.svg]
simd-attn-bench compare OLD.json|csv NEW.json|csv
simd-attn-bench plot RESULTS.json|csv OUT.svg      (re-draws the chart of stored results)
  --set     standard (default), prefill, decode (Sq 1/4/16 x Skv 512..64k), headdim (D 32..256),
            scores (dot, cosine, general, additive A 48/64/128, alignment pass),
            phases (the prefill kernel's Q.K^T tile, online softmax and P.V tile timed alone on
            L1/L2-resident data, D 64/128 f32, next to the whole kernel at B1 H8 S1024),
            paged (K/V in shuffled pages of 16 and 256 tokens, head-major next to [B, Hkv, S, D]
            tensors and token-major (`-bshd`) next to [B, S, Hkv, D] ones; a packed varlen
            prefill of 4 sequences next to 4 separate calls; the decode step with its token
            appended and RoPE applied in the call, `-append`, next to the plain step),
            seqlen (causal prefill S 128..8192), bf16 (the bf16 targets' prefill and decode next
            to f32 and f16), quant (decode at Skv 8192 and 65536 and the causal prefill with an
            int8 cache, i8kv, fp8 caches, e4m3kv and e5m2kv, a ggml q8_0 cache, q8_0kv, and q8_0 K
            with f16 V, q8_0k_f16v, next to the f16 cache), all; --shape adds custom shapes (and with no
            --set, runs only them)
  --isa     paths to measure: auto (default: calls name no path, so the library chooses as it
            would for an engine: SIMD_ATTN_ISA, else the best, with bf16 prefill on the bf16 dot
            kernel where the CPU runs it at its FMA rate), all (every SIMD path), or a comma list
            of portable, scalar, avx2, avx512, avx512bf16, neon
  --threads comma list of thread counts to run each path with (default 1); %peak is then of
            threads x the single-core peak
  --dtype   storage of every case: f32, f16 (Q, K, V, out), f16kv (f32 Q and out, f16 K and V),
            bf16, bf16kv (the same in bfloat16), i8kv (f32 Q and out, int8 K and V with an f32
            factor per token and KV head, counted in the row's bytes), e4m3kv, e5m2kv (f32 Q and
            out, fp8 K and V with one f32 factor per tensor, as vLLM keeps them), q8_0kv (f32 Q
            and out, ggml q8_0 K and V: 34 bytes per 32 values, scales included), q8_0k_f16v
            (q8_0 K, f16 V, as llama.cpp's -ctk q8_0 -ctv f16);
            default: each case's own (decode cases use f16 K/V where the targets say so)
  --case    only the shapes named SUBSTRING, or else whose name contains it
  --no-baselines  skip the portable and unfused baselines (their columns print NaN)
  --json, --csv   also write the results with the machine description (CPU, cores, ISA, measured
            peak and bandwidth, crate version, git commit); `compare` reads either back
  --plot    draw GFLOP/s against sequence length for every path measured, as SVG
Decode rows rotate over enough K/V copies to exceed twice the last-level cache, and report
time / roofline with roofline = max(K/V bytes / bandwidth, flops / (peak x threads)), the
bandwidth (column BW) measured with the row's own thread count right after the row.";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    F16,
    F16Kv,
    Bf16,
    Bf16Kv,
    /// f32 Q and out, int8 K and V with an f32 factor per (token, KV head).
    I8Kv,
    /// f32 Q and out, fp8 E4M3 / E5M2 K and V with one f32 factor per tensor (vLLM's fp8 cache).
    E4m3Kv,
    E5m2Kv,
    /// f32 Q and out, ggml q8_0 K and V (blocks of 32 int8 codes and an f16 scale).
    Q80Kv,
    /// f32 Q and out, ggml q8_0 K with f16 V (llama.cpp `-ctk q8_0 -ctv f16`).
    Q80KF16V,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::F16Kv => "f16kv",
            Dtype::Bf16 => "bf16",
            Dtype::Bf16Kv => "bf16kv",
            Dtype::I8Kv => "i8kv",
            Dtype::E4m3Kv => "e4m3kv",
            Dtype::E5m2Kv => "e5m2kv",
            Dtype::Q80Kv => "q8_0kv",
            Dtype::Q80KF16V => "q8_0k_f16v",
        }
    }
    /// Bytes of dequantization factors per (token, KV head), K's and V's together.
    fn factor_bytes(self) -> usize {
        if self == Dtype::I8Kv { 8 } else { 0 }
    }
}

struct Case {
    name: String,
    shape: AttentionShape,
    causal: bool,
    dtype: Dtype,
    score: BenchScore,
    /// Also produce the alignment matrix and coverage (the second pass).
    inspect: bool,
    /// K/V as `[B, S, Hkv, D]` tensors (and token-major pages) instead of `[B, Hkv, S, D]`
    /// (and head-major pages).
    token_major: bool,
    /// K/V in a paged pool of pages of this many tokens (shuffled block table), read in place.
    paged: Option<usize>,
    /// A packed batch of sequences of these lengths (`seq_q` and `seq_kv` their maximum), run
    /// as one varlen call, or as one call per sequence (`separate`).
    varlen: Option<(&'static [usize], bool)>,
    /// Each call appends one new token per sequence (RoPE on it and on Q) to a cache filled
    /// to `seq_kv - 1`, then attends (`attention_with_kvcache`).
    append: bool,
}

/// The score function a case runs (weights are made up per case).
#[derive(Clone, Copy, PartialEq)]
enum BenchScore {
    ScaledDot,
    Dot,
    Cosine,
    General,
    /// Pre-projected q' and k' (the attention dim is the head dim).
    Additive,
}

fn with_score(mut c: Case, name: &str, score: BenchScore, inspect: bool) -> Case {
    c.name = name.to_string();
    c.score = score;
    c.inspect = inspect;
    c
}

#[allow(clippy::too_many_arguments)]
fn case(name: &str, b: usize, hq: usize, hkv: usize, sq: usize, skv: usize, d: usize, causal: bool) -> Case {
    Case {
        name: name.to_string(),
        shape: AttentionShape::new(b, hq, hkv, sq, skv, d),
        causal,
        dtype: Dtype::F32,
        score: BenchScore::ScaledDot,
        inspect: false,
        paged: None,
        token_major: false,
        varlen: None,
        append: false,
    }
}

/// The decode target's step with its token appended (and RoPE applied) in the same call.
fn append_case(token_major_kv: bool) -> Case {
    let mut c = with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), Dtype::F16Kv);
    if token_major_kv {
        c = token_major(c);
    }
    c.name = format!("{}-append", c.name);
    c.append = true;
    c
}

/// The varlen prefill of the target: four causal sequences (Hq8 Hkv2 D128), packed into one
/// call, or (`separate`) one call per sequence.
fn varlen_case(separate: bool) -> Case {
    const LENS: &[usize] = &[300, 1000, 2000, 700];
    let name = if separate { "varlen4-separate" } else { "varlen4" };
    let mut c = with_dtype(case(name, LENS.len(), 8, 2, 2000, 2000, 128, true), Dtype::F16);
    c.varlen = Some((LENS, separate));
    c
}

fn token_major(mut c: Case) -> Case {
    c.name = format!("{}-bshd", c.name);
    c.token_major = true;
    c
}

fn with_pages(mut c: Case, page_size: usize) -> Case {
    c.name = format!("{}-page{page_size}", c.name);
    c.paged = Some(page_size);
    c
}

fn with_dtype(mut c: Case, dtype: Dtype) -> Case {
    c.dtype = dtype;
    c
}

fn cases(set: &str) -> Vec<Case> {
    let standard = || {
        vec![
            case("prefill", 1, 8, 8, 1024, 1024, 128, false),
            case("prefill-d64", 1, 8, 8, 1024, 1024, 64, false),
            case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true),
            case("generic-d96", 1, 8, 8, 1024, 1024, 96, false),
            case("small", 1, 8, 8, 128, 128, 128, false),
            case("tiny", 1, 8, 8, 64, 64, 64, false),
            with_dtype(case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true), Dtype::F16),
            with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), Dtype::F16Kv),
            case("decode-b4", 4, 32, 8, 1, 4096, 64, true),
        ]
    };
    let decode = || {
        let mut v = vec![
            with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), Dtype::F16Kv),
            case("decode-b4", 4, 32, 8, 1, 4096, 64, true),
        ];
        for sq in [1, 4, 16] {
            for skv in [512, 2048, 8192, 32768, 65536] {
                v.push(with_dtype(case("decode-sweep", 1, 32, 8, sq, skv, 128, true), Dtype::F16Kv));
            }
        }
        v
    };
    let prefill = || {
        let mut v = Vec::new();
        for dtype in [Dtype::F32, Dtype::F16] {
            for d in [64, 128] {
                for causal in [false, true] {
                    v.push(with_dtype(case("prefill", 1, 8, 2, 2048, 2048, d, causal), dtype));
                }
            }
        }
        v
    };
    let headdim = || {
        [32, 64, 80, 96, 128, 160, 256]
            .into_iter()
            .map(|d| case("headdim", 1, 8, 8, 1024, 1024, d, false))
            .collect::<Vec<_>>()
    };
    let seqlen = || {
        [128, 256, 512, 1024, 2048, 4096, 8192]
            .into_iter()
            .map(|s| case("seqlen", 1, 8, 8, s, s, 128, true))
            .collect::<Vec<_>>()
    };
    // The classic scores on one prefill shape (and the additive one per specialised attention
    // dim, plus a decoder step), and the cost of the alignment pass.
    let scores = || {
        let base = || case("", 1, 8, 8, 1024, 1024, 64, false);
        vec![
            with_score(base(), "score-scaled", BenchScore::ScaledDot, false),
            with_score(base(), "score-dot", BenchScore::Dot, false),
            with_score(base(), "score-cosine", BenchScore::Cosine, false),
            with_score(base(), "score-general", BenchScore::General, false),
            with_score(base(), "score-additive", BenchScore::Additive, false),
            with_score(case("", 1, 8, 8, 1024, 1024, 128, false), "score-additive", BenchScore::Additive, false),
            with_score(case("", 1, 8, 8, 1024, 1024, 48, false), "score-additive", BenchScore::Additive, false),
            with_score(case("", 8, 1, 1, 1, 1024, 128, false), "score-additive", BenchScore::Additive, false),
            with_score(base(), "score-inspect", BenchScore::ScaledDot, true),
            with_score(base(), "addit-inspect", BenchScore::Additive, true),
        ]
    };
    // Paged K/V next to its contiguous twin (the row above it): decode at the decode target's
    // shape, and a GQA prefill.
    let paged = || {
        let mut v = Vec::new();
        let bases: [fn() -> Case; 4] = [
            || with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), Dtype::F16Kv),
            || token_major(with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), Dtype::F16Kv)),
            || with_dtype(case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true), Dtype::F16),
            || token_major(with_dtype(case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true), Dtype::F16)),
        ];
        for base in bases {
            v.push(base());
            for ps in [16, 256] {
                v.push(with_pages(base(), ps));
            }
        }
        v.push(append_case(false));
        v.push(append_case(true));
        v.push(varlen_case(true));
        v.push(varlen_case(false));
        v
    };
    // bf16 storage at the target shapes, next to f32 and f16 in the same run.
    let bf16 = || {
        let mut v = Vec::new();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            v.push(with_dtype(case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true), dtype));
        }
        for dtype in [Dtype::F16Kv, Dtype::Bf16Kv] {
            v.push(with_dtype(case("decode", 1, 32, 8, 1, 8192, 128, true), dtype));
        }
        v
    };
    // Quantized caches at the target shapes, next to the f16 cache in the same run.
    let quant = || {
        let mut v = Vec::new();
        for skv in [8192, 65536] {
            for dtype in [Dtype::F16Kv, Dtype::I8Kv, Dtype::E4m3Kv, Dtype::E5m2Kv, Dtype::Q80Kv, Dtype::Q80KF16V] {
                v.push(with_dtype(case("decode", 1, 32, 8, 1, skv, 128, true), dtype));
            }
        }
        for dtype in [Dtype::F16Kv, Dtype::I8Kv, Dtype::E4m3Kv, Dtype::Q80Kv] {
            v.push(with_dtype(case("prefill-gqa", 1, 8, 2, 2048, 2048, 128, true), dtype));
        }
        v
    };
    match set {
        "bf16" => bf16(),
        "quant" => quant(),
        // The whole kernel at the shapes whose phases `phase_table` times.
        "phases" => vec![case("prefill", 1, 8, 8, 1024, 1024, 128, false), case("prefill-d64", 1, 8, 8, 1024, 1024, 64, false)],
        "scores" => scores(),
        "paged" => paged(),
        "standard" => standard(),
        "prefill" => prefill(),
        "headdim" => headdim(),
        "seqlen" => seqlen(),
        "decode" => decode(),
        "none" => Vec::new(),
        "all" => standard().into_iter().chain(prefill()).chain(headdim()).chain(seqlen()).chain(decode()).chain(scores()).chain(paged()).chain(bf16()).chain(quant()).collect(),
        other => fail(&format!("unknown --set {other}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}\n\n{USAGE}");
    std::process::exit(2);
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

/// Median, best and spread (max/min - 1) of repeated runs after one warm-up.
fn time(reps: usize, min_time: f64, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < reps || (start.elapsed().as_secs_f64() < min_time && t.len() < 1000) {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[t.len() / 2], t[0], t[t.len() - 1] / t[0] - 1.0)
}

fn parse_isas(spec: &str) -> Vec<Isa> {
    match spec {
        "auto" => vec![simd_attn::resolve_isa(None).unwrap_or_else(|e| fail(&e.to_string()))],
        "all" => Isa::available().into_iter().filter(|&i| i != Isa::Portable).rev().collect(),
        list => list
            .split(',')
            .map(|n| {
                let isa = Isa::from_name(n).unwrap_or_else(|| fail(&format!("unknown ISA {n}")));
                if !isa.is_available() {
                    fail(&format!("{isa} cannot run on this machine"));
                }
                isa
            })
            .collect(),
    }
}

/// `B,Hq,Hkv,Sq,Skv,D[,causal]` (causal: `causal`, `1` or `true`).
fn parse_shape(spec: &str) -> Case {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let n: Vec<usize> = parts.iter().take(6).map(|p| p.parse().unwrap_or_else(|_| fail(&format!("--shape {spec}: {p} is not a number")))).collect();
    if n.len() != 6 || parts.len() > 7 {
        fail(&format!("--shape {spec}: expected B,Hq,Hkv,Sq,Skv,D[,causal]"));
    }
    let causal = parts.get(6).is_some_and(|c| matches!(*c, "causal" | "1" | "true"));
    case("custom", n[0], n[1], n[2], n[3], n[4], n[5], causal)
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn write_file(path: &str, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| fail(&format!("cannot write {path}: {e}")));
    eprintln!("wrote {path}");
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("compare") {
        let [old, new] = &argv[1..] else { fail("compare OLD NEW") };
        let (old, new) = (report::load(old).unwrap_or_else(|e| fail(&e)), report::load(new).unwrap_or_else(|e| fail(&e)));
        print!("{}", report::compare(&old, &new));
        return;
    }
    if argv.first().map(String::as_str) == Some("plot") {
        let [input, output] = &argv[1..] else { fail("plot RESULTS.json|csv OUT.svg") };
        let l = report::load(input).unwrap_or_else(|e| fail(&e));
        let g = |k: &str| l.machine.get(k).cloned().unwrap_or_else(|| "?".into());
        let title = format!("simd-attn {} ({}) on {}, {} cores", g("crate_version"), g("git_commit"), g("cpu"), g("cores"));
        match plot::svg(&l.to_rows(), l.machine_num("fma_peak_gflops_per_core"), l.machine_num("fma_peak_256bit_gflops_per_core"), &title) {
            Some(svg) => write_file(output, &svg),
            None => fail("no series with two or more sequence lengths"),
        }
        return;
    }
    let (mut set, mut isas, mut filter) = (None::<String>, "auto".to_string(), String::new());
    let mut thread_list = "1".to_string();
    let mut dtype_override = None;
    let (mut reps, mut min_time, mut check, mut baselines) = (5usize, 0.5f64, true, true);
    let (mut json, mut csv, mut plot_path) = (None::<String>, None::<String>, None::<String>);
    let mut shapes = Vec::new();
    let mut args = argv.into_iter();
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().unwrap_or_else(|| fail(&format!("{name} needs a value")));
        match a.as_str() {
            "--set" => set = Some(val("--set")),
            "--shape" => shapes.push(parse_shape(&val("--shape"))),
            "--isa" => isas = val("--isa"),
            "--case" => filter = val("--case"),
            "--threads" => thread_list = val("--threads"),
            "--dtype" => {
                dtype_override = Some(match val("--dtype").as_str() {
                    "f32" => Dtype::F32,
                    "f16" => Dtype::F16,
                    "f16kv" => Dtype::F16Kv,
                    "bf16" => Dtype::Bf16,
                    "bf16kv" => Dtype::Bf16Kv,
                    "i8kv" => Dtype::I8Kv,
                    "e4m3kv" => Dtype::E4m3Kv,
                    "e5m2kv" => Dtype::E5m2Kv,
                    "q8_0kv" => Dtype::Q80Kv,
                    "q8_0k_f16v" => Dtype::Q80KF16V,
                    other => fail(&format!("unknown --dtype {other}")),
                })
            }
            "--reps" => reps = val("--reps").parse().ok().filter(|&r| r > 0).unwrap_or_else(|| fail("--reps N (N >= 1)")),
            "--min-time" => min_time = val("--min-time").parse().unwrap_or_else(|_| fail("--min-time SECONDS")),
            "--no-check" => check = false,
            "--no-baselines" => baselines = false,
            "--json" => json = Some(val("--json")),
            "--csv" => csv = Some(val("--csv")),
            "--plot" => plot_path = Some(val("--plot")),
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other}")),
        }
    }
    let isa_spec = isas.clone();
    let isas = parse_isas(&isa_spec);
    let thread_counts: Vec<usize> = thread_list
        .split(',')
        .map(|t| t.trim().parse().ok().filter(|&n| n > 0).unwrap_or_else(|| fail(&format!("bad thread count {t}"))))
        .collect();
    let set = set.unwrap_or_else(|| if shapes.is_empty() { "standard".into() } else { "none".into() });
    let mut all = cases(&set);
    all.extend(shapes);
    let exact = all.iter().any(|c| c.name == filter);
    let selected: Vec<Case> = all.into_iter().filter(|c| if exact { c.name == filter } else { c.name.contains(filter.as_str()) }).collect();
    if selected.is_empty() {
        fail("no case matches");
    }

    let peak = machine::fma_peak_gflops(0).unwrap_or(f64::NAN);
    let peak256 = machine::fma_peak_gflops(256);
    // A row's roofline uses the bandwidth of its own thread count (decode rows: measured again
    // right after the row); the machine description keeps the 1-thread start-up figure.
    let bandwidth = machine::ReadBandwidth::new();
    let bws = bandwidth.at_counts(&thread_counts);
    let bw = bws[0].1;
    let m = Machine {
        cpu: machine::cpu_model(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        isa_best: Isa::best().name().into(),
        peak_gflops: peak,
        peak256_gflops: peak256.unwrap_or(f64::NAN),
        bandwidth_gbs: bw,
        llc_bytes: machine::llc_bytes(),
        version: env!("CARGO_PKG_VERSION").into(),
        commit: git_commit(),
        date_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    println!("# simd-attn {} ({}) | {} | {} cores, best ISA {}", m.version, m.commit, m.cpu, m.cores, m.isa_best);
    print!("# measured: f32 FMA peak {peak:.1} GFLOP/s per core (widest vectors)");
    if let Some(p) = peak256 {
        print!(", {p:.1} with 256-bit vectors");
    }
    if let Some(p) = machine::bf16_dot_peak_gflops() {
        print!(", bf16 dot (vdpbf16ps) peak {p:.1} ({:.2}x the f32 FMA peak)", p / peak);
    }
    let bw_list: Vec<String> = bws.iter().map(|(t, b)| format!("{b:.1} GB/s with {t} thread{}", if *t == 1 { "" } else { "s" })).collect();
    println!("; memory read bandwidth {}", bw_list.join(", "));
    println!("# %peak is of threads x the widest-vector peak; GFLOP/s counts 2*(D+Dv) per visible pair and head");
    let phases = if set == "phases" { phase_table(&isas, peak, peak256, min_time) } else { Vec::new() };
    println!("{}", report::table_header());
    let ctx = Ctx { isas, auto: isa_spec == "auto", thread_counts, reps, min_time, check, baselines, peak, bws, bandwidth, llc: m.llc_bytes };
    let mut rows = Vec::new();
    let total = selected.len();
    for (n, mut c) in selected.into_iter().enumerate() {
        if let Some(d) = dtype_override {
            c.dtype = d;
        }
        let s = c.shape;
        let progress = std::io::stderr().is_terminal();
        if progress {
            eprint!("\r[{}/{total}] {} B{} Hq{} Hkv{} Sq{} Skv{} D{} {} ...\x1b[K", n + 1, c.name, s.batch, s.q_heads, s.kv_heads, s.seq_q, s.seq_kv, s.head_dim, c.dtype.name());
        }
        let new = match c.dtype {
            Dtype::F32 => bench_case::<f32, f32, f32, f32>(&c, &ctx),
            Dtype::F16 => bench_case::<f16, f16, f16, f16>(&c, &ctx),
            Dtype::F16Kv => bench_case::<f32, f16, f16, f32>(&c, &ctx),
            Dtype::Bf16 => bench_case::<bf16, bf16, bf16, bf16>(&c, &ctx),
            Dtype::Bf16Kv => bench_case::<f32, bf16, bf16, f32>(&c, &ctx),
            Dtype::I8Kv => bench_case::<f32, i8, i8, f32>(&c, &ctx),
            Dtype::E4m3Kv => bench_case::<f32, simd_attn::F8E4M3, simd_attn::F8E4M3, f32>(&c, &ctx),
            Dtype::E5m2Kv => bench_case::<f32, simd_attn::F8E5M2, simd_attn::F8E5M2, f32>(&c, &ctx),
            Dtype::Q80Kv => bench_case::<f32, simd_attn::BlockQ8_0, simd_attn::BlockQ8_0, f32>(&c, &ctx),
            Dtype::Q80KF16V => bench_case::<f32, simd_attn::BlockQ8_0, f16, f32>(&c, &ctx),
        };
        if progress {
            eprint!("\r\x1b[K");
        }
        for r in &new {
            println!("{}", report::table_row(r));
        }
        rows.extend(new);
    }
    print_twin_ratios(&rows);
    print_phase_sums(&phases, &rows);
    if let Some(path) = json {
        write_file(&path, &report::to_json(&m, &rows));
    }
    if let Some(path) = csv {
        write_file(&path, &report::to_csv(&m, &rows));
    }
    if let Some(path) = plot_path {
        let title = format!("simd-attn {} ({}) on {}, {} cores", m.version, m.commit, m.cpu, m.cores);
        match plot::svg(&rows, peak, m.peak256_gflops, &title) {
            Some(svg) => write_file(&path, &svg),
            None => eprintln!("--plot: no series with two or more sequence lengths (try --set seqlen or decode)"),
        }
    }
}

struct Ctx {
    isas: Vec<Isa>,
    /// `--isa auto`: calls name no ISA (the library chooses, as an engine's would), and rows
    /// report the path `RunInfo` says ran (the bf16 dot kernel, where it is chosen).
    auto: bool,
    thread_counts: Vec<usize>,
    reps: usize,
    min_time: f64,
    check: bool,
    baselines: bool,
    peak: f64,
    /// Measured read bandwidth (GB/s) per thread count.
    bws: Vec<(usize, f64)>,
    bandwidth: machine::ReadBandwidth,
    llc: usize,
}

impl Ctx {
    fn config(&self, isa: Isa, threads: usize) -> RunConfig {
        let automatic = self.auto && isa != Isa::Portable;
        RunConfig { isa: if automatic { None } else { Some(isa) }, threads: Some(threads) }
    }

    fn bw(&self, threads: usize) -> f64 {
        self.bws.iter().find(|&&(t, _)| t == threads).map_or(f64::NAN, |&(_, b)| b)
    }
}

fn convert<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn bench_case<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(c: &Case, ctx: &Ctx) -> Vec<Row>
where
    (TK, TV): simd_attn::element::KvPair,
{
    let quantized = TK::DTYPE.is_quantized() || TV::DTYPE.is_quantized();
    if quantized && (c.varlen.is_some() || c.append || c.paged.is_some()) {
        eprintln!("{}: skipped with {} (the bench runs quantized caches as strided tensors only)", c.name, c.dtype.name());
        return Vec::new();
    }
    // (Float caches from here to the strided path, so K and V share their type.)
    if let Some((lens, separate)) = c.varlen {
        return bench_varlen::<TQ, TK, TO>(c, lens, separate, ctx);
    }
    if c.append {
        return match TK::DTYPE {
            DType::F32 => bench_append::<TQ, f32, TO>(c, ctx),
            DType::F16 => bench_append::<TQ, f16, TO>(c, ctx),
            DType::Bf16 => bench_append::<TQ, bf16, TO>(c, ctx),
            _ => unreachable!("quantized caches are skipped above"),
        };
    }
    let s = c.shape;
    let [qs, mut ks, mut vs, os] = s.bhsd_strides();
    if c.token_major {
        (ks, vs) = (Strides::bshd(s.kv_heads, s.seq_kv, s.head_dim), Strides::bshd(s.kv_heads, s.seq_kv, s.v_head_dim));
    }
    let [nq, nk, nv, no] = s.bhsd_lens();
    let (q32, k32, v32) = (random(nq, 1), random(nk, 2), random(nv, 3));
    let q: Vec<TQ> = convert(&q32);
    let tokens = s.batch * s.kv_heads * s.seq_kv;
    // A row's bytes at its storage type (q8_0: 34 bytes per 32 values, its scales included).
    let row_bytes = |width: usize, block: usize, size: usize| width / block * size;
    let kv_bytes = (tokens * (row_bytes(s.head_dim, TK::BLOCK, size_of::<TK>()) + row_bytes(s.v_head_dim, TV::BLOCK, size_of::<TV>()) + c.dtype.factor_bytes())) as f64;
    // Decode is bound by reading K/V: rotate over enough copies that none is still cached.
    let decode = s.seq_q <= 16;
    let copies = if decode { ((2 * ctx.llc) as f64 / kv_bytes).ceil().clamp(1.0, 64.0) as usize } else { 1 };
    // A quantized side: int8 codes with one factor per (token, KV head), `[B, Hkv, S]`; fp8
    // codes with one factor per tensor (stored as a factor per token, all equal, for `encode`).
    let fst = Strides::new(s.kv_heads * s.seq_kv, s.seq_kv, 1);
    let per_tensor = |x: &[f32], max: f32| {
        let m = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        vec![if m > 0.0 { m / max } else { 1.0 }; s.batch * s.kv_heads * s.seq_kv]
    };
    let factors = |dt: DType, x: &[f32], st: Strides, width: usize| match dt {
        DType::I8 => token_factors(&s, x, st, width, fst),
        DType::F8E4M3 => per_tensor(x, simd_attn::F8E4M3::MAX),
        DType::F8E5M2 => per_tensor(x, simd_attn::F8E5M2::MAX),
        _ => Vec::new(),
    };
    let (kf, vf) = (factors(TK::DTYPE, &k32, ks, s.head_dim), factors(TV::DTYPE, &v32, vs, s.v_head_dim));
    // A block format (q8_0) lays a row of D values out as D / 32 blocks in the same order, so
    // the same row order at strides counted in blocks; its scales are in the blocks.
    let unit_strides = |block: usize, st: Strides, width: usize| {
        if block == 1 {
            return st;
        }
        let u = AttentionShape { head_dim: width / block, ..s };
        let [_, k, _, _] = u.bhsd_strides();
        if c.token_major { Strides::bshd(u.kv_heads, u.seq_kv, u.head_dim) } else { k }
    };
    let (kst, vst) = (unit_strides(TK::BLOCK, ks, s.head_dim), unit_strides(TV::BLOCK, vs, s.v_head_dim));
    /// One side's storage: q8_0 blocks, float values, or codes over their factors.
    fn encode<T: Element>(s: &AttentionShape, x32: &[f32], st: Strides, fst: Strides, width: usize, f: &[f32]) -> Vec<T> {
        if T::BLOCK > 1 {
            let blocks: Vec<simd_attn::BlockQ8_0> = x32.chunks_exact(32).map(|c| simd_attn::BlockQ8_0::quantize(c.try_into().expect("32 values"))).collect();
            return *(Box::new(blocks) as Box<dyn std::any::Any>).downcast::<Vec<T>>().expect("the only block format is q8_0");
        }
        if !T::DTYPE.is_quantized() {
            return convert(x32);
        }
        let mut codes = vec![T::default(); x32.len()];
        for_each_row(s, st, fst, width, |o, fo| {
            for t in o..o + width {
                codes[t] = T::from_f32(x32[t] / f[fo]);
            }
        });
        codes
    }
    let kvs: Vec<(Vec<TK>, Vec<TV>)> = (0..copies).map(|_| (encode(&s, &k32, ks, fst, s.head_dim, &kf), encode(&s, &v32, vs, fst, s.v_head_dim, &vf))).collect();
    let pools: Vec<Pool<TK, TV>> = match c.paged {
        Some(ps) => kvs.iter().enumerate().map(|(n, (k, v))| Pool::new(&s, (k, kst), (v, vst), ps, c.token_major, n as u64)).collect(),
        None => Vec::new(),
    };
    let (w, att_v) = (random(s.head_dim * s.head_dim, 4), random(s.head_dim, 5));
    let score = match c.score {
        BenchScore::ScaledDot => Score::ScaledDot,
        BenchScore::Dot => Score::Dot,
        BenchScore::Cosine => Score::Cosine { temperature: 10.0 },
        BenchScore::General => Score::General { w: &w, q_dim: s.head_dim },
        BenchScore::Additive => Score::Additive { v: &att_v, projection: None },
    };
    let mut params = AttentionParams::new().causal(c.causal).score(score);
    // Each side's factors (1 for a side without any: a float or q8_0 side).
    let scaled = |dt: DType| matches!(dt, DType::I8 | DType::F8E4M3 | DType::F8E5M2);
    if scaled(TK::DTYPE) || scaled(TV::DTYPE) {
        fn side(dt: DType, f: &[f32], fst: Strides) -> Dequant<'_> {
            match dt {
                DType::I8 => Dequant::Token(f, fst),
                DType::F8E4M3 | DType::F8E5M2 => Dequant::Tensor(f[0]),
                _ => Dequant::Tensor(1.0),
            }
        }
        params = params.kv_scales(side(TK::DTYPE, &kf, fst), side(TV::DTYPE, &vf, fst));
    }
    let flops = attention_flops(&s, &params);
    let mut out = vec![TO::from_f32(0.0); no];
    let (mut alignment, mut coverage) = if c.inspect {
        (vec![0.0f32; s.batch * s.q_heads * s.seq_q * s.seq_kv], vec![0.0f32; s.batch * s.q_heads * s.seq_kv])
    } else {
        (Vec::new(), Vec::new())
    };
    let mut next = 0usize;
    let ran = std::cell::Cell::new(None);
    let mut run = |isa: Isa, threads: usize, out: &mut Vec<TO>, reps: usize, min_time: f64| {
        let config = ctx.config(isa, threads);
        time(reps, min_time, || {
            let copy = next % copies;
            next += 1;
            let (k, v) = &kvs[copy];
            let inspect = if c.inspect {
                Inspect { alignment: Some(&mut alignment), coverage: Some(&mut coverage) }
            } else {
                Inspect::default()
            };
            let info = match pools.get(copy) {
                Some(pool) => simd_attn::run(&config, Request::new(s, TensorRef::new(&q, qs), pool.kv(), TensorMut::new(out, os), params)),
                None => attention_inspect(&config, &s, TensorRef::new(&q, qs), TensorRef::new(k, kst), TensorRef::new(v, vst), TensorMut::new(out, os), None, &params, inspect),
            }
            .expect("valid problem");
            ran.set(Some(info.isa));
        })
    };
    let (t_portable, _, _) = if ctx.baselines { run(Isa::Portable, 1, &mut out, 3.min(ctx.reps), 0.0) } else { (f64::NAN, 0.0, 0.0) };
    // The unfused baseline computes in f32 on the same values.
    fn decode_values<T: Element>(s: &AttentionShape, x: &[T], st: Strides, fst: Strides, width: usize, f: &[f32]) -> Vec<f32> {
        let mut y: Vec<f32> = (0..x.len() * T::BLOCK).map(|i| T::value(x, i)).collect();
        if !f.is_empty() {
            for_each_row(s, st, fst, width, |o, fo| y[o..o + width].iter_mut().for_each(|e| *e *= f[fo]));
        }
        y
    }
    let (qr, kr, vr): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (q.iter().map(|x| x.to_f32()).collect(), decode_values(&s, &kvs[0].0, ks, fst, s.head_dim, &kf), decode_values(&s, &kvs[0].1, vs, fst, s.v_head_dim, &vf));
    let mut base_out = vec![0.0f32; no];
    let mut scores = Vec::new();
    // The unfused baseline is the scaled-dot score: no ratio for the others.
    let (t_unfused, _, _) = if ctx.baselines && c.score == BenchScore::ScaledDot && !c.inspect {
        time(3.min(ctx.reps), 0.0, || unfused::attention(&s, c.causal, &qr, &kr, &vr, &mut base_out, &mut scores))
    } else {
        (f64::NAN, 0.0, 0.0)
    };
    let reference = ctx.check.then(|| {
        Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&kvs[0].0, kst), TensorRef::new(&kvs[0].1, vst), &params).unwrap()
    });
    let mut rows = Vec::new();
    for &isa in &ctx.isas {
        for &threads in &ctx.thread_counts {
            let (reps, min_time) = if isa == Isa::Portable { (3.min(ctx.reps), 0.0) } else { (ctx.reps, ctx.min_time) };
            let (t, best, spread) = run(isa, threads, &mut out, reps, min_time);
            // Check the copy the last timed call used (all copies hold the same values).
            let err = reference.as_ref().map_or(f64::NAN, |r| max_error(&s, r, &out));
            // Decode rows are bound by memory: their bandwidth is measured right after them, so
            // the ratio compares the kernel with the machine in the same minute.
            let bw = if decode { ctx.bandwidth.gbs(threads) } else { ctx.bw(threads) };
            let roofline = (kv_bytes / (bw * 1e9)).max(flops / (ctx.peak * 1e9 * threads as f64));
            let isa = ran.get().unwrap_or(isa);
            rows.push(row_of(c, isa, threads, (t, best, spread), flops, kv_bytes, bw, roofline, ctx.peak, (t_portable, t_unfused), err));
        }
    }
    rows
}

/// Calls `row(offset, factor_offset)` for every (batch, KV head, key) row of a K or V tensor at
/// strides `st` (`width` elements) whose factor lies at strides `fst`.
fn for_each_row(s: &AttentionShape, st: Strides, fst: Strides, width: usize, mut row: impl FnMut(usize, usize)) {
    let _ = width;
    for b in 0..s.batch {
        for hk in 0..s.kv_heads {
            for j in 0..s.seq_kv {
                let at = |t: Strides| b * t.batch + hk * t.head + j * t.seq;
                row(at(st), at(fst));
            }
        }
    }
}

/// Symmetric int8 factors per (token, KV head): each row's largest magnitude over 127.
fn token_factors(s: &AttentionShape, x: &[f32], st: Strides, width: usize, fst: Strides) -> Vec<f32> {
    let mut f = vec![0.0f32; s.batch * s.kv_heads * s.seq_kv];
    for_each_row(s, st, fst, width, |o, fo| {
        let m = x[o..o + width].iter().fold(0.0f32, |a, v| a.max(v.abs()));
        f[fo] = if m > 0.0 { m / 127.0 } else { 1.0 };
    });
    f
}

/// One result row: a timed (median, best, spread) path and thread count of case `c`, with the
/// ratios to the roofline and the baselines (portable, unfused) measured in the same run.
#[allow(clippy::too_many_arguments)]
fn row_of(c: &Case, isa: Isa, threads: usize, (t, best, spread): (f64, f64, f64), flops: f64, kv_bytes: f64, bw: f64, roofline: f64, peak: f64, (t_portable, t_unfused): (f64, f64), err: f64) -> Row {
    let s = c.shape;
    let gflops = flops / t / 1e9;
    Row {
        case: c.name.clone(),
        batch: s.batch,
        q_heads: s.q_heads,
        kv_heads: s.kv_heads,
        seq_q: s.seq_q,
        seq_kv: s.seq_kv,
        head_dim: s.head_dim,
        causal: c.causal,
        dtype: c.dtype.name().into(),
        isa: isa.name().into(),
        threads,
        ms: t * 1e3,
        best_ms: best * 1e3,
        spread,
        gflops,
        gflops_best: flops / best / 1e9,
        pct_peak: 100.0 * gflops / (peak * threads as f64),
        gbs: kv_bytes / t / 1e9,
        bw_gbs: bw,
        pct_bw: 100.0 * kv_bytes / t / 1e9 / bw,
        x_roofline: t / roofline,
        x_portable: t_portable / t,
        x_unfused: t_unfused / t,
        max_err: err,
        // Visible pairs x attention dim: attention_flops counts 4 D per pair.
        gpair_dims: if c.score == BenchScore::Additive { flops / 4.0 / t / 1e9 } else { f64::NAN },
    }
}

/// A packed variable-length batch (`Case::varlen`): the sequences' tokens as `[T, H, D]`,
/// run either as one call with `cu_seqlens_q` / `cu_seqlens_k` or (`separate`) as one
/// contiguous call per sequence on the same buffers, the way an engine without varlen runs
/// them. Both rows count the same flops.
fn bench_varlen<TQ: FloatElement, TKV: Element, TO: FloatElement>(c: &Case, lens: &[usize], separate: bool, ctx: &Ctx) -> Vec<Row> {
    let s = c.shape;
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    let total = cu[lens.len()] as usize;
    let (qs, ks) = (Strides::bshd(s.q_heads, 0, s.head_dim), Strides::bshd(s.kv_heads, 0, s.head_dim));
    let q: Vec<TQ> = convert(&random(total * s.q_heads * s.head_dim, 1));
    let k: Vec<TKV> = convert(&random(total * s.kv_heads * s.head_dim, 2));
    let v: Vec<TKV> = convert(&random(total * s.kv_heads * s.head_dim, 3));
    let params = AttentionParams::new().causal(c.causal).cu_seqlens_q(&cu).cu_seqlens_k(&cu);
    let flops = attention_flops(&s, &params);
    let kv_bytes = (2 * total * s.kv_heads * s.head_dim * size_of::<TKV>()) as f64;
    let mut out = vec![TO::from_f32(0.0); total * s.q_heads * s.head_dim];
    let run = |isa: Isa, threads: usize, out: &mut Vec<TO>, reps: usize, min_time: f64| {
        let config = ctx.config(isa, threads);
        time(reps, min_time, || {
            if !separate {
                let kv = (TensorRef::new(&k[..], ks), TensorRef::new(&v[..], ks));
                simd_attn::run(&config, Request::new(s, TensorRef::new(&q, qs), kv, TensorMut::new(out, qs), params)).expect("valid problem");
                return;
            }
            for (b, &n) in lens.iter().enumerate() {
                let one = AttentionShape::new(1, s.q_heads, s.kv_heads, n, n, s.head_dim);
                let (t0, tq, tk) = (cu[b] as usize, s.q_heads * s.head_dim, s.kv_heads * s.head_dim);
                let (q1, k1, v1) = (&q[t0 * tq..], &k[t0 * tk..], &v[t0 * tk..]);
                let (qs1, ks1) = (Strides::bshd(s.q_heads, n, s.head_dim), Strides::bshd(s.kv_heads, n, s.head_dim));
                let o1 = &mut out[t0 * tq..(t0 + n) * tq];
                let p1 = AttentionParams::new().causal(c.causal);
                simd_attn::attention_with(&config, &one, TensorRef::new(q1, qs1), TensorRef::new(k1, ks1), TensorRef::new(v1, ks1), TensorMut::new(o1, qs1), None, &p1).expect("valid problem");
            }
        })
    };
    let t_portable = if ctx.baselines { run(Isa::Portable, 1, &mut out, 1, 0.0).0 } else { f64::NAN };
    let reference = ctx.check.then(|| Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, ks), &params).unwrap());
    let mut rows = Vec::new();
    for &isa in &ctx.isas {
        for &threads in &ctx.thread_counts {
            let timing = run(isa, threads, &mut out, ctx.reps, ctx.min_time);
            // Sampled rows of each sequence (row i of sequence b is token cu[b] + i).
            let err = reference.as_ref().map_or(f64::NAN, |r| {
                let mut err = 0.0f64;
                for (b, &n) in lens.iter().enumerate() {
                    for i in (0..n).step_by(n.div_ceil(6).max(1)) {
                        let h = (b + i) % s.q_heads;
                        let want = r.row(b, h, i).unwrap();
                        let o = (cu[b] as usize + i) * qs.seq + h * qs.head;
                        for (g, w) in out[o..o + s.head_dim].iter().zip(&want.out) {
                            err = err.max((g.to_f64() - w).abs());
                        }
                    }
                }
                err
            });
            let bw = ctx.bw(threads);
            let roofline = (kv_bytes / (bw * 1e9)).max(flops / (ctx.peak * 1e9 * threads as f64));
            rows.push(row_of(c, isa, threads, timing, flops, kv_bytes, bw, roofline, ctx.peak, (t_portable, f64::NAN), err));
        }
    }
    rows
}

/// A decode step that appends its token (K rotated, V copied) to a cache of `seq_kv - 1`
/// tokens and attends with Q rotated (`attention_with_kvcache`), rotating over as many cache
/// copies as the plain decode row. Compare with that row (`decode`, same shape).
fn bench_append<TQ: FloatElement, TKV: FloatElement, TO: FloatElement>(c: &Case, ctx: &Ctx) -> Vec<Row> {
    let s = c.shape;
    let [qs, mut ks, _, os] = s.bhsd_strides();
    if c.token_major {
        ks = Strides::bshd(s.kv_heads, s.seq_kv, s.head_dim);
    }
    let [nq, nk, _, no] = s.bhsd_lens();
    let q: Vec<TQ> = convert(&random(nq, 1));
    let kv_bytes = (s.batch * s.kv_heads * s.seq_kv * 2 * s.head_dim * size_of::<TKV>()) as f64;
    let copies = ((2 * ctx.llc) as f64 / kv_bytes).ceil().clamp(1.0, 64.0) as usize;
    let mut kvs: Vec<(Vec<TKV>, Vec<TKV>)> = (0..copies).map(|_| (convert(&random(nk, 2)), convert(&random(nk, 3)))).collect();
    let ns = Strides::bshd(s.kv_heads, 1, s.head_dim);
    let (kn, vn): (Vec<TKV>, Vec<TKV>) = (convert(&random(s.batch * s.kv_heads * s.head_dim, 4)), convert(&random(s.batch * s.kv_heads * s.head_dim, 5)));
    let (cos, sin) = Rope::tables(10000.0, s.head_dim, s.seq_kv);
    let rope = Rope { cos: &cos, sin: &sin, rotary_dim: s.head_dim, interleaved: false };
    let params = AttentionParams::new().causal(c.causal).rope(rope);
    let fill = vec![s.seq_kv - 1; s.batch];
    let flops = attention_flops(&s, &params);
    let mut out = vec![TO::from_f32(0.0); no];
    let mut next = 0usize;
    let mut rows = Vec::new();
    for &isa in &ctx.isas {
        for &threads in &ctx.thread_counts {
            let config = ctx.config(isa, threads);
            let timing = time(ctx.reps, ctx.min_time, || {
                let (k, v) = &mut kvs[next % copies];
                next += 1;
                let cache = KvCacheMut::Tensors { k: TensorMut::new(k, ks), v: TensorMut::new(v, ks) };
                let new = NewKv::padded(TensorRef::new(&kn, ns), TensorRef::new(&vn, ns), 1);
                attention_with_kvcache(&config, &s, TensorRef::new(&q, qs), cache, Some(new), &fill, TensorMut::new(&mut out, os), None, &params).expect("valid problem");
            });
            let bw = ctx.bandwidth.gbs(threads);
            let roofline = (kv_bytes / (bw * 1e9)).max(flops / (ctx.peak * 1e9 * threads as f64));
            rows.push(row_of(c, isa, threads, timing, flops, kv_bytes, bw, roofline, ctx.peak, (f64::NAN, f64::NAN), f64::NAN));
        }
    }
    rows
}

/// Max |out - reference| over up to 48 rows spread across the problem (the f64 reference is
/// too slow to run on every row of the large shapes).
fn max_error<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(s: &AttentionShape, r: &Reference<'_, TQ, TK, TV>, out: &[TO]) -> f64 {
    let rows = s.batch * s.q_heads * s.seq_q;
    let samples = rows.min(48);
    let mut err = 0.0f64;
    for n in 0..samples {
        let row = n * rows / samples + (rows / samples) / 2;
        let (b, h, i) = (row / (s.q_heads * s.seq_q), (row / s.seq_q) % s.q_heads, row % s.seq_q);
        let want = r.row(b, h, i).unwrap();
        let got = &out[row * s.v_head_dim..(row + 1) * s.v_head_dim];
        for (g, w) in got.iter().zip(&want.out) {
            err = err.max((g.to_f64() - w).abs());
        }
    }
    err
}

/// A paged copy of a contiguous K/V: head-major pages (`[pages, Hkv, page_size, D]`, as
/// vLLM's CPU backend keeps them) or token-major ones (`[pages, page_size, Hkv, D]`, as
/// vLLM's GPU backends and FlashAttention do), in shuffled order.
struct Pool<T, V = T> {
    k: Vec<T>,
    v: Vec<V>,
    strides: (PageStrides, PageStrides),
    table: Vec<i32>,
    pages_per_seq: usize,
    page_size: usize,
}

impl<T: Element, V: Element> Pool<T, V> {
    fn new(s: &AttentionShape, k: (&[T], Strides), v: (&[V], Strides), page_size: usize, token_major: bool, seed: u64) -> Self {
        let pages_per_seq = s.seq_kv.div_ceil(page_size);
        let pages = s.batch * pages_per_seq;
        // A fixed shuffle (xorshift Fisher-Yates): pages scattered as a long-running engine's are.
        let mut order: Vec<usize> = (0..pages).collect();
        let mut x = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in (1..pages).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let table: Vec<i32> = order.iter().map(|&p| p as i32).collect();
        // K and V alike, each at its own storage type.
        #[allow(clippy::too_many_arguments)]
        fn scatter<T: Element>(s: &AttentionShape, table: &[i32], pages: usize, pages_per_seq: usize, page_size: usize, token_major: bool, (src, from_st): (&[T], Strides), d: usize) -> (Vec<T>, PageStrides) {
            let st = if token_major { PageStrides::token_major(page_size, s.kv_heads, d) } else { PageStrides::head_major(page_size, s.kv_heads, d) };
            let mut pool = vec![T::from_f32(0.0); pages * st.page];
            for b in 0..s.batch {
                for hk in 0..s.kv_heads {
                    for j in 0..s.seq_kv {
                        let page = table[b * pages_per_seq + j / page_size] as usize;
                        let from = b * from_st.batch + hk * from_st.head + j * from_st.seq;
                        let to = page * st.page + hk * st.head + (j % page_size) * st.slot;
                        pool[to..to + d].copy_from_slice(&src[from..from + d]);
                    }
                }
            }
            (pool, st)
        }
        let at = (&table[..], pages, pages_per_seq, page_size, token_major);
        let ((k, ks), (v, vs)) = (scatter(s, at.0, at.1, at.2, at.3, at.4, k, s.head_dim), scatter(s, at.0, at.1, at.2, at.3, at.4, v, s.v_head_dim));
        Self { k, v, strides: (ks, vs), table, pages_per_seq, page_size }
    }

    fn kv(&self) -> PagedKv<'_, T, V> {
        let pages = PageTable { block_table: &self.table, pages_per_seq: self.pages_per_seq, page_size: self.page_size, num_pages: self.table.len() };
        PagedKv { k: &self.k, v: &self.v, k_strides: self.strides.0, v_strides: self.strides.1, pages }
    }
}

/// For every paged row (`NAME-pageN`), its median time over that of its contiguous twin (the
/// row `NAME` with the same shape, dtype, path and threads) measured in the same run.
fn print_twin_ratios(rows: &[Row]) {
    let mut lines = Vec::new();
    for r in rows {
        let base = match r.case.rsplit_once("-page").filter(|(_, n)| n.parse::<usize>().is_ok()) {
            Some((base, _)) => base.to_string(),
            None if r.case.starts_with("varlen") && !r.case.ends_with("-separate") => format!("{}-separate", r.case),
            None if r.case.ends_with("-append") => r.case.trim_end_matches("-append").to_string(),
            None => continue,
        };
        let twin = rows.iter().find(|t| {
            t.case == base && (t.batch, t.q_heads, t.kv_heads, t.seq_q, t.seq_kv, t.head_dim, t.causal) == (r.batch, r.q_heads, r.kv_heads, r.seq_q, r.seq_kv, r.head_dim, r.causal)
                && t.dtype == r.dtype && t.isa == r.isa && t.threads == r.threads
        });
        if let Some(t) = twin {
            lines.push(format!("#   {:<22} {:<6} {}t  {:.3}x the time of {base}", r.case, r.isa, r.threads, r.ms / t.ms));
        }
    }
    if !lines.is_empty() {
        println!("# paged and varlen rows against their contiguous twins (median time ratio, same run):");
        lines.iter().for_each(|l| println!("{l}"));
    }
}


/// The prefill kernel's phases timed alone (`selftest::flash_phase`: one row tile against one
/// key block, the data in L1/L2), per path and head dim: ns per (row, key) pair, and for the
/// two register microkernels GFLOP/s as a fraction of the path's own FMA peak (256-bit for
/// AVX2). Returns `(isa, head dim, ns per pair of all phases)` for [`print_phase_sums`].
fn phase_table(isas: &[Isa], peak: f64, peak256: Option<f64>, min_time: f64) -> Vec<(Isa, usize, f64)> {
    use simd_attn::selftest::{flash_phase, Phase};
    let phases = [(Phase::QkTile, "qk_tile"), (Phase::OnlineSoftmax, "online_softmax"), (Phase::PvTile, "pv_tile")];
    println!("# prefill phases alone (L1/L2-resident data, one row tile x one key block, median of 5):");
    println!("#   {:<7} {:>4} {:<15} {:>10} {:>9} {:>7}", "isa", "D", "phase", "ns/pair", "GFLOP/s", "%peak");
    let mut sums = Vec::new();
    for &isa in isas {
        let isa_peak = if isa == Isa::Avx2 { peak256.unwrap_or(peak) } else { peak };
        for d in [64, 128] {
            let mut total = 0.0;
            for (phase, name) in phases {
                let Some((pairs, _)) = flash_phase(isa, phase, d, 1) else { continue };
                // Enough reps for `min_time / 5` seconds a sample (at least 20 ms).
                let (_, t1) = flash_phase(isa, phase, d, 1000).unwrap_or((pairs, 1.0));
                let reps = (((min_time / 5.0).max(0.02) / (t1 / 1000.0)) as usize).max(1);
                let mut ns: Vec<f64> = (0..5).map(|_| flash_phase(isa, phase, d, reps).map_or(f64::NAN, |(p, t)| t * 1e9 / (p * reps) as f64)).collect();
                ns.sort_by(f64::total_cmp);
                let ns = ns[2];
                total += ns;
                if phase == Phase::OnlineSoftmax {
                    println!("#   {:<7} {d:>4} {name:<15} {ns:>10.3} {:>9} {:>7}", isa.name(), "-", "-");
                } else {
                    let gflops = 2.0 * d as f64 / ns;
                    println!("#   {:<7} {d:>4} {name:<15} {ns:>10.3} {gflops:>9.1} {:>6.1}%", isa.name(), 100.0 * gflops / isa_peak);
                }
            }
            if total > 0.0 {
                let gflops = 4.0 * d as f64 / total;
                println!("#   {:<7} {d:>4} {:<15} {total:>10.3} {gflops:>9.1} {:>6.1}%", isa.name(), "sum of phases", 100.0 * gflops / isa_peak);
                sums.push((isa, d, total));
            }
        }
    }
    sums
}

/// The whole kernel's ns per (row, key) pair (1 thread) next to the sum of its phases timed
/// alone: the difference is what the phases do not cover (K/V packing, Q packing, cache misses
/// between phases, loop overhead).
fn print_phase_sums(sums: &[(Isa, usize, f64)], rows: &[Row]) {
    for &(isa, d, phases) in sums {
        let whole = rows.iter().find(|r| r.isa == isa.name() && r.head_dim == d && r.threads == 1 && !r.causal);
        if let Some(r) = whole {
            let pairs = (r.batch * r.q_heads * r.seq_q * r.seq_kv) as f64;
            let ns = r.ms * 1e6 / pairs;
            println!("# {:<7} D{d:<4} whole kernel {ns:.3} ns/pair, phases alone {phases:.3} ({:.0}% of the whole; the rest is packing, misses, overhead)", isa.name(), 100.0 * phases / ns);
        }
    }
}
