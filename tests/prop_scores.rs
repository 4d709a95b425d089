//! Property tests of the classic score functions (dot, cosine, general, additive) against the
//! f64 reference: every score with every mask and term, every ISA, f32 and f16 storage, the
//! prefill and decode paths, the additive specialisations from `kernels/`, and the alignment
//! matrix and coverage of the second pass.

use proptest::prelude::*;
use simd_attn::plan::work::PlanKind;
use simd_attn::plan::FAMILIES;
use simd_attn::{
    attention_inspect, AdditiveProjection, AttentionParams, AttentionShape, AttnError, BiasRef, BiasStrides, Element, FloatElement, HostPlan, Inspect,
    Isa, Reference, RunConfig, RunInfo, Score, TensorMut, TensorRef, ADDITIVE_TANH_MAX_ABS_ERROR, COSINE_EPS,
};

const EPS: f64 = f32::EPSILON as f64 / 2.0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    ScaledDot,
    Dot,
    Cosine,
    General,
    Additive,
    AdditiveProjected,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    F32,
    F16Kv,
    F16All,
    Bf16Kv,
    Bf16All,
}

/// A generated problem (contiguous `[B, H, S, D]` tensors: strides and layouts are covered by
/// the dot kernels' own tests and are shared code).
#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    storage: Storage,
    batch: usize,
    kv_heads: usize,
    group: usize,
    seq_q: usize,
    seq_kv: usize,
    head_dim: usize,
    v_head_dim: usize,
    /// Q's columns (general, projected additive) and the attention dim (additive).
    q_dim: usize,
    att_dim: usize,
    causal: bool,
    window: Option<(Option<usize>, Option<usize>)>,
    kv_lens: bool,
    softcap: bool,
    bias: bool,
    alibi: bool,
    sinks: bool,
    /// Q scaled so logits are huge, and some all-zero Q and K rows.
    adversarial: bool,
    inspect: bool,
    threads: usize,
    seed: u64,
}

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

struct Case {
    spec: Spec,
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
    w_q: Vec<f32>,
    w_k: Vec<f32>,
    att_v: Vec<f32>,
    kv_lens: Vec<usize>,
    bias: Vec<f32>,
    alibi: Vec<f32>,
    sinks: Vec<f32>,
}

fn round<T: Element>(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = T::from_f32(*v).to_f32());
}

impl Case {
    fn build(spec: &Spec) -> Case {
        let s = spec;
        let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let shape = AttentionShape::new(s.batch, s.kv_heads * s.group, s.kv_heads, s.seq_q, s.seq_kv, s.head_dim).with_v_head_dim(s.v_head_dim);
        let q_cols = Score::q_dim(&score_shell(s.kind, s.q_dim), s.head_dim);
        let mut vec = |n: usize, scale: f32| (0..n).map(|_| rng.uniform() * scale).collect::<Vec<f32>>();
        let mut q = vec(shape.batch * shape.q_heads * s.seq_q * q_cols, 1.0);
        let mut k = vec(shape.batch * s.kv_heads * s.seq_kv * s.head_dim, 1.0);
        let mut v = vec(shape.batch * s.kv_heads * s.seq_kv * s.v_head_dim, 1.0);
        let w = vec(q_cols * s.head_dim, 1.0 / (q_cols as f32).sqrt());
        let w_q = vec(s.att_dim * q_cols, 1.0 / (q_cols as f32).sqrt());
        let w_k = vec(s.att_dim * s.head_dim, 1.0 / (s.head_dim as f32).sqrt());
        let att_v = vec(s.att_dim, 1.0);
        if s.adversarial {
            // Huge logits for the unbounded scores (capped to stay finite in f16), and zero
            // rows, which cosine must score 0, not NaN.
            let boost = match s.kind {
                Kind::ScaledDot | Kind::Dot | Kind::General => 3e3,
                _ => 50.0,
            };
            q.iter_mut().for_each(|x| *x *= boost);
            q[..q_cols].fill(0.0);
            k[..s.head_dim].fill(0.0);
        }
        match s.storage {
            Storage::F32 => {}
            Storage::F16Kv => {
                round::<half::f16>(&mut k);
                round::<half::f16>(&mut v);
            }
            Storage::F16All => {
                round::<half::f16>(&mut q);
                round::<half::f16>(&mut k);
                round::<half::f16>(&mut v);
            }
            Storage::Bf16Kv => {
                round::<half::bf16>(&mut k);
                round::<half::bf16>(&mut v);
            }
            Storage::Bf16All => {
                round::<half::bf16>(&mut q);
                round::<half::bf16>(&mut k);
                round::<half::bf16>(&mut v);
            }
        }
        let kv_lens = (0..s.batch).map(|b| if b == 0 { 0 } else { s.seq_kv - (b * 7) % s.seq_kv.max(1) }).collect();
        let bias = (0..s.batch * s.seq_kv)
            .map(|x| if x % 5 == 3 { f32::NEG_INFINITY } else { rng_value(x) })
            .collect();
        let hq = shape.q_heads;
        let alibi = (0..hq).map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / hq as f32)).collect();
        let sinks = (0..hq).map(|h| if h % 3 == 2 { f32::NEG_INFINITY } else { h as f32 * 0.5 - 1.0 }).collect();
        Case { spec: spec.clone(), shape, q, k, v, w, w_q, w_k, att_v, kv_lens, bias, alibi, sinks }
    }

    fn score(&self) -> Score<'_> {
        match self.spec.kind {
            Kind::ScaledDot => Score::ScaledDot,
            Kind::Dot => Score::Dot,
            Kind::Cosine => Score::Cosine { temperature: 4.5 },
            Kind::General => Score::General { w: &self.w, q_dim: self.spec.q_dim },
            Kind::Additive => Score::Additive { v: &self.att_v, projection: None },
            Kind::AdditiveProjected => Score::Additive {
                v: &self.att_v,
                projection: Some(AdditiveProjection { w_q: &self.w_q, w_k: &self.w_k, q_dim: self.spec.q_dim }),
            },
        }
    }

    fn params(&self) -> AttentionParams<'_> {
        let s = &self.spec;
        let mut p = AttentionParams::new().causal(s.causal).score(self.score());
        if let Some((l, r)) = s.window {
            p = p.window(l, r);
        }
        if s.kv_lens {
            p = p.kv_lens(&self.kv_lens);
        }
        if s.softcap {
            p = p.softcap(7.0);
        }
        if s.bias {
            p = p.bias(BiasRef::new(&self.bias, BiasStrides { batch: self.shape.seq_kv, head: 0, row: 0 }));
        }
        if s.alibi {
            p = p.alibi_slopes(&self.alibi);
        }
        if s.sinks {
            p = p.sinks(&self.sinks);
        }
        p
    }

    fn q_cols(&self) -> usize {
        self.score().q_dim(self.shape.head_dim)
    }

    fn reference(&self) -> Reference<'_, f32, f32> {
        let s = &self.shape;
        let [_, ks, vs, _] = s.bhsd_strides();
        let qs = simd_attn::Strides::bhsd(s.q_heads, s.seq_q, self.q_cols());
        Reference::new(s, TensorRef::new(&self.q, qs), TensorRef::new(&self.k, ks), TensorRef::new(&self.v, vs), &self.params()).unwrap()
    }

    /// The bound on one row's logit error, in units of f32 rounding (`eps`), over its visible
    /// keys: an f32 sum of `n` products is off by at most `n * eps * sum |products|`, so
    /// - dot: `(D + 4) |scale| sum |q k|` (the dot product, then the scale);
    /// - cosine: the same with Q and K normalised, plus the two norm factors' roundings;
    /// - general: `q' = W^T q` adds `q_dim` roundings to each `q'_c`, weighted by `|k_c|`;
    /// - additive: per attention unit, the tanh approximation (`ADDITIVE_TANH_MAX_ABS_ERROR`)
    ///   and the rounding of its argument (tanh is 1-Lipschitz), weighted by `|v_a|`, plus the
    ///   sum over `A` units;
    ///
    /// plus `8 eps` times the largest term (softcap, bias, ALiBi) for their roundings.
    fn logit_error(&self, b: usize, h: usize, i: usize, r: &Reference<'_, f32, f32>) -> (f64, f64) {
        let s = &self.shape;
        let (d, qd) = (s.head_dim, self.q_cols());
        let hk = h / s.group_size();
        let qrow: Vec<f64> = self.q[((b * s.q_heads + h) * s.seq_q + i) * qd..][..qd].iter().map(|&x| x as f64).collect();
        let mut worst: f64 = 0.0;
        let mut v_max: f64 = 0.0;
        for j in (0..s.seq_kv).filter(|&j| r.visible(b, i, j)) {
            let kr: Vec<f64> = self.k[((b * s.kv_heads + hk) * s.seq_kv + j) * d..][..d].iter().map(|&x| x as f64).collect();
            let vr = &self.v[((b * s.kv_heads + hk) * s.seq_kv + j) * s.v_head_dim..][..s.v_head_dim];
            v_max = vr.iter().fold(v_max, |m, &x| m.max((x as f64).abs()));
            let dot_abs: f64 = qrow.iter().zip(&kr).map(|(a, b)| (a * b).abs()).sum();
            let e = match self.spec.kind {
                Kind::ScaledDot => (d as f64 + 4.0) / (d as f64).sqrt() * dot_abs,
                Kind::Dot => (d as f64 + 4.0) * dot_abs,
                Kind::Cosine => {
                    let n = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt().max(COSINE_EPS);
                    (d as f64 + 8.0) * 4.5 * dot_abs / (n(&qrow) * n(&kr))
                }
                Kind::General => {
                    // q' = W^T q rounded (q_dim terms), then q'.k (D terms).
                    let proj: f64 = (0..d).map(|c| kr[c].abs() * (0..qd).map(|t| (qrow[t] * self.w[t * d + c] as f64).abs()).sum::<f64>()).sum();
                    (qd + d + 4) as f64 * proj
                }
                Kind::Additive | Kind::AdditiveProjected => {
                    let a_dim = self.att_v.len();
                    let (mut total, mut v_abs) = (0.0, 0.0);
                    for a in 0..a_dim {
                        let (qa, ka, n) = match self.spec.kind {
                            Kind::Additive => (qrow[a].abs(), kr[a].abs(), 1.0),
                            _ => (
                                (0..qd).map(|t| (self.w_q[a * qd + t] as f64 * qrow[t]).abs()).sum::<f64>(),
                                (0..d).map(|t| (self.w_k[a * d + t] as f64 * kr[t]).abs()).sum::<f64>(),
                                (qd.max(d) + 2) as f64,
                            ),
                        };
                        let va = (self.att_v[a] as f64).abs();
                        total += va * (ADDITIVE_TANH_MAX_ABS_ERROR / EPS + n * (qa + ka) + 4.0);
                        v_abs += va;
                    }
                    total + (a_dim as f64 + 4.0) * v_abs
                }
            };
            worst = worst.max(e);
        }
        // Terms: softcap, bias and ALiBi each round the logit a few times.
        let s_max = 64.0 + if self.spec.alibi { 2.0 * (s.seq_kv + s.seq_q) as f64 } else { 0.0 };
        (EPS * (9.0 * worst + 8.0 * s_max), v_max)
    }
}

fn rng_value(x: usize) -> f32 {
    ((x * 2654435761) % 1000) as f32 / 500.0 - 1.0
}

/// A score of the right variant for `q_dim`, for asking it the Q width.
fn score_shell(kind: Kind, q_dim: usize) -> Score<'static> {
    static EMPTY: [f32; 0] = [];
    match kind {
        Kind::General => Score::General { w: &EMPTY, q_dim },
        Kind::AdditiveProjected => Score::Additive { v: &EMPTY, projection: Some(AdditiveProjection { w_q: &EMPTY, w_k: &EMPTY, q_dim }) },
        _ => Score::Dot,
    }
}

/// Output (as f32), LSE, alignment and coverage of one call, and what it ran on.
struct Got {
    out: Vec<f32>,
    lse: Vec<f32>,
    alignment: Vec<f32>,
    coverage: Vec<f32>,
    info: RunInfo,
}

fn run<TQ: FloatElement, TKV: Element, TO: FloatElement>(case: &Case, isa: Isa) -> Got {
    let s = &case.shape;
    let [_, ks, vs, os] = s.bhsd_strides();
    let qs = simd_attn::Strides::bhsd(s.q_heads, s.seq_q, case.q_cols());
    let q: Vec<TQ> = case.q.iter().map(|&x| TQ::from_f32(x)).collect();
    let k: Vec<TKV> = case.k.iter().map(|&x| TKV::from_f32(x)).collect();
    let v: Vec<TKV> = case.v.iter().map(|&x| TKV::from_f32(x)).collect();
    let rows = s.batch * s.q_heads * s.seq_q;
    let mut out = vec![TO::from_f32(777.0); rows * s.v_head_dim];
    let mut lse = vec![777.0; rows];
    let mut alignment = vec![777.0; if case.spec.inspect { rows * s.seq_kv } else { 0 }];
    let mut coverage = vec![777.0; if case.spec.inspect { s.batch * s.q_heads * s.seq_kv } else { 0 }];
    let inspect = if case.spec.inspect {
        Inspect { alignment: Some(&mut alignment), coverage: Some(&mut coverage) }
    } else {
        Inspect::default()
    };
    let config = RunConfig { isa: Some(isa), threads: Some(case.spec.threads) };
    let info = attention_inspect(
        &config,
        s,
        TensorRef::new(&q, qs),
        TensorRef::new(&k, ks),
        TensorRef::new(&v, vs),
        TensorMut::new(&mut out, os),
        Some(&mut lse),
        &case.params(),
        inspect,
    )
    .expect("generated problems are valid");
    Got { out: out.iter().map(|x| x.to_f32()).collect(), lse, alignment, coverage, info }
}

/// The relative rounding of a weight to bf16 in the AVX512_BF16 kernel (as `common`'s).
const WEIGHT_EPS_BF16: f64 = 1.0 / 256.0;

fn check(case: &Case, got: &Got) -> Result<(), String> {
    let s = &case.shape;
    let r = case.reference();
    let store = match case.spec.storage {
        Storage::F16All => 1.0 / 2048.0,
        Storage::Bf16All => 1.0 / 256.0,
        _ => 0.0,
    };
    // The bf16 dot-product kernel rounds each weight to bf16 before P.V (see the README).
    let weight = if got.info.isa == Isa::Avx512Bf16 && matches!(case.spec.storage, Storage::Bf16All) { WEIGHT_EPS_BF16 } else { 0.0 };
    let mut coverage = vec![0.0f64; s.batch * s.q_heads * s.seq_kv];
    let mut cov_tol = vec![0.0f64; coverage.len()];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq_q {
                let row = r.row(b, h, i).unwrap();
                let at = (b * s.q_heads + h) * s.seq_q + i;
                let (delta, v_max) = case.logit_error(b, h, i, &r);
                let n = row.visible as f64;
                let acc = (n + 32.0) * EPS;
                let out_tol = v_max * (2.5 * delta + acc + weight) + 1e-30;
                let lse_tol = delta + acc * (1.0 + row.lse.abs());
                for (c, &want) in row.out.iter().enumerate() {
                    let g = got.out[at * s.v_head_dim + c] as f64;
                    let tol = out_tol + store * want.abs().max(1.0 / 16384.0);
                    if !(g - want).abs().le(&tol) {
                        return Err(format!("out[{b},{h},{i},{c}] = {g}, reference {want} (tol {tol:e})"));
                    }
                }
                let gl = got.lse[at] as f64;
                if row.lse == f64::NEG_INFINITY {
                    if gl != f64::NEG_INFINITY {
                        return Err(format!("lse[{b},{h},{i}] = {gl}, reference -inf"));
                    }
                } else if !(gl - row.lse).abs().le(&lse_tol) {
                    return Err(format!("lse[{b},{h},{i}] = {gl}, reference {} (tol {lse_tol:e})", row.lse));
                }
                if !case.spec.inspect {
                    continue;
                }
                let probs = r.probabilities(b, h, i).unwrap();
                for (j, &want) in probs.iter().enumerate() {
                    let g = got.alignment[at * s.seq_kv + j] as f64;
                    // p = exp(s - lse): the logit's and the LSE's errors, relative, plus the
                    // exp polynomial.
                    let tol = if row.lse == f64::NEG_INFINITY { 0.0 } else { want * (2.5 * (delta + lse_tol) + 4e-7) + 1e-37 };
                    if want == 0.0 && g != 0.0 || !(g - want).abs().le(&tol) {
                        return Err(format!("alignment[{b},{h},{i},{j}] = {g:e}, reference {want:e} (tol {tol:e})"));
                    }
                    let c = (b * s.q_heads + h) * s.seq_kv + j;
                    coverage[c] += want;
                    cov_tol[c] += tol + 2.0 * EPS * want * s.seq_q as f64;
                }
            }
        }
    }
    if case.spec.inspect {
        for (c, (&want, &tol)) in coverage.iter().zip(&cov_tol).enumerate() {
            let g = got.coverage[c] as f64;
            if !(g - want).abs().le(&(tol + 1e-30)) {
                return Err(format!("coverage[{c}] = {g:e}, reference {want:e} (tol {tol:e})"));
            }
        }
    }
    Ok(())
}

fn run_and_check(spec: &Spec) -> Result<(), TestCaseError> {
    let case = Case::build(spec);
    for isa in Isa::available() {
        let got = match spec.storage {
            Storage::F32 => run::<f32, f32, f32>(&case, isa),
            Storage::F16Kv => run::<f32, half::f16, f32>(&case, isa),
            Storage::F16All => run::<half::f16, half::f16, half::f16>(&case, isa),
            Storage::Bf16Kv => run::<f32, half::bf16, f32>(&case, isa),
            Storage::Bf16All => run::<half::bf16, half::bf16, half::bf16>(&case, isa),
        };
        prop_assert_eq!(got.info.isa, isa);
        check(&case, &got).map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
    }
    Ok(())
}

fn kinds() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::ScaledDot),
        Just(Kind::Dot),
        Just(Kind::Cosine),
        Just(Kind::General),
        Just(Kind::Additive),
        Just(Kind::AdditiveProjected),
    ]
}

fn storages() -> impl Strategy<Value = Storage> {
    prop_oneof![Just(Storage::F32), Just(Storage::F16Kv), Just(Storage::F16All), Just(Storage::Bf16Kv), Just(Storage::Bf16All)]
}

prop_compose! {
    fn specs(max_seq_q: usize, min_seq_kv: usize, max_seq_kv: usize)(
        kind in kinds(),
        storage in storages(),
        batch in 1usize..=2,
        kv_heads in 1usize..=2,
        group in prop_oneof![Just(1usize), Just(2), Just(4)],
        seq_q in 1..=max_seq_q,
        seq_kv in min_seq_kv..=max_seq_kv,
        head_dim in prop_oneof![1usize..=40, Just(64), Just(128)],
        v_head_dim in prop_oneof![Just(0usize), 1usize..=24],
        q_dim in 1usize..=48,
        att_dim in prop_oneof![1usize..=40, Just(64), Just(128)],
        causal in any::<bool>(),
        window in prop_oneof![3 => Just(None), 1 => (0usize..8, 0usize..4).prop_map(|(l, r)| Some((Some(l), Some(r))))],
        (kv_lens, softcap, bias, alibi, sinks) in (any::<bool>(), prop::bool::weighted(0.2), any::<bool>(), prop::bool::weighted(0.3), prop::bool::weighted(0.3)),
        adversarial in prop::bool::weighted(0.2),
        inspect in prop::bool::weighted(0.6),
        threads in 1usize..=2,
        seed in any::<u64>(),
    ) -> Spec {
        // Unprojected additive scores q' and k' directly: the head dim is the attention dim.
        let head_dim = if kind == Kind::Additive { att_dim } else { head_dim };
        let v_head_dim = if v_head_dim == 0 { head_dim } else { v_head_dim };
        Spec {
            kind, storage, batch, kv_heads, group, seq_q, seq_kv, head_dim, v_head_dim, q_dim, att_dim, causal, window,
            kv_lens, softcap, bias, alibi, sinks, adversarial, inspect, threads, seed,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Prefill shapes: every score, every option, every ISA and storage type.
    #[test]
    fn every_score_matches_the_reference(spec in specs(40, 1, 80)) {
        run_and_check(&spec)?;
    }

    /// Decode shapes (a few rows, a long cache): on the SIMD paths the dot scores take the
    /// decode path (GQA grouping, split keys), the additive score the prefill kernel; the
    /// portable path has only its flash kernel and plans every call as prefill.
    #[test]
    fn every_score_matches_the_reference_in_decode(spec in specs(4, 128, 600)) {
        let case = Case::build(&spec);
        let isa = simd_attn::resolve_isa(None).unwrap();
        let got = run::<f32, f32, f32>(&case, isa);
        let decode = matches!(got.info.plan.kind, PlanKind::Decode { .. });
        let additive = matches!(spec.kind, Kind::Additive | Kind::AdditiveProjected);
        prop_assert_eq!(decode, !additive && isa != Isa::Portable, "plan {:?} for {:?} on {}", got.info.plan.kind, spec.kind, isa);
        run_and_check(&spec)?;
    }

    /// Every additive attention dim `kernels/` specialises, on every SIMD family here.
    #[test]
    fn every_additive_specialisation(spec in specs(20, 1, 60)) {
        let mut ran = 0;
        for f in FAMILIES.iter().filter(|f| f.isa != Isa::Portable && f.isa.is_available()) {
            for &a in f.additive_dims {
                let mut spec = spec.clone();
                spec.kind = Kind::AdditiveProjected;
                spec.att_dim = a;
                let case = Case::build(&spec);
                let got = run::<f32, f32, f32>(&case, f.isa);
                prop_assert_eq!(got.info.specialised_additive_dim, Some(a), "{:?} A={} did not run its specialisation", f.isa, a);
                check(&case, &got).map_err(|e| TestCaseError::fail(format!("[{:?} A={a}] {e}", f.isa)))?;
                ran += 1;
            }
        }
        prop_assert!(ran > 0);
    }
}

#[test]
fn alignment_rows_sum_to_one_and_masked_keys_get_nothing() {
    let spec = Spec {
        kind: Kind::AdditiveProjected,
        storage: Storage::F32,
        batch: 2,
        kv_heads: 1,
        group: 2,
        seq_q: 9,
        seq_kv: 13,
        head_dim: 10,
        v_head_dim: 6,
        q_dim: 7,
        att_dim: 12,
        causal: true,
        window: None,
        kv_lens: true,
        softcap: false,
        bias: false,
        alibi: false,
        sinks: false,
        adversarial: false,
        inspect: true,
        threads: 2,
        seed: 3,
    };
    let case = Case::build(&spec);
    let got = run::<f32, f32, f32>(&case, simd_attn::resolve_isa(None).unwrap());
    let s = &case.shape;
    let r = case.reference();
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq_q {
                let row = &got.alignment[((b * s.q_heads + h) * s.seq_q + i) * s.seq_kv..][..s.seq_kv];
                let sum: f32 = row.iter().sum();
                // Batch 0 has kv_len 0, and the first rows of batch 1 see nothing under the
                // bottom-right causal mask: fully masked rows give zeros, never NaN.
                let expect = if r.row(b, h, i).unwrap().visible == 0 { 0.0 } else { 1.0 };
                assert!((sum - expect).abs() < 1e-5, "row ({b},{h},{i}) sums to {sum}");
                for (j, &p) in row.iter().enumerate() {
                    assert!(r.visible(b, i, j) || p == 0.0, "invisible key {j} of row ({b},{h},{i}) has {p}");
                }
            }
        }
    }
    assert!(got.out[..s.q_heads * s.seq_q * s.v_head_dim].iter().all(|&x| x == 0.0));
    check(&case, &got).unwrap();
}

#[test]
fn score_arguments_are_validated() {
    let shape = AttentionShape::new(1, 2, 1, 3, 5, 8);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let (q, k, v) = (vec![0.5f32; 48], vec![0.25f32; 40], vec![1.0f32; 40]);
    let mut out = vec![0.0f32; 48];
    let call = |params: &AttentionParams<'_>, out: &mut [f32], qd: usize, inspect: Inspect<'_>| {
        let qs = if qd == 8 { qs } else { simd_attn::Strides::bhsd(2, 3, qd) };
        attention_inspect(&RunConfig::default(), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(out, os), None, params, inspect)
    };
    let err = |p: AttentionParams<'_>, qd: usize| call(&p, &mut out.clone(), qd, Inspect::default()).unwrap_err();
    let w = vec![0.1f32; 8 * 8];
    assert!(matches!(err(AttentionParams::new().score(Score::Dot).scale(2.0), 8), AttnError::InvalidScore { .. }));
    assert!(matches!(err(AttentionParams::new().score(Score::Cosine { temperature: f32::NAN }), 8), AttnError::InvalidScore { .. }));
    assert!(matches!(err(AttentionParams::new().score(Score::General { w: &w[..63], q_dim: 8 }), 8), AttnError::WrongLength { .. }));
    let mut bad = w.clone();
    bad[5] = f32::INFINITY;
    assert!(matches!(err(AttentionParams::new().score(Score::General { w: &bad, q_dim: 8 }), 8), AttnError::InvalidValue { index: 5, .. }));
    assert!(matches!(err(AttentionParams::new().score(Score::Additive { v: &w[..6], projection: None }), 8), AttnError::InvalidScore { .. }));
    assert!(matches!(err(AttentionParams::new().score(Score::General { w: &w, q_dim: 0 }), 8), AttnError::ZeroDim { .. }));
    // Q narrower than q_dim says it needs more.
    let w6 = vec![0.1f32; 16 * 8];
    assert!(matches!(err(AttentionParams::new().score(Score::General { w: &w6, q_dim: 16 }), 8), AttnError::BufferTooSmall { .. }));
    // Inspection outputs too short; nothing written.
    let mut short = vec![5.0f32; 29];
    let e = call(&AttentionParams::new(), &mut out, 8, Inspect { alignment: Some(&mut short), coverage: None }).unwrap_err();
    assert!(matches!(e, AttnError::BufferTooSmall { tensor: simd_attn::TensorName::Alignment, needed: 30, .. }), "{e:?}");
    assert!(short.iter().all(|&x| x == 5.0) && out.iter().all(|&x| x == 0.0));
    // Host-driven plans take the dot scores only.
    let params = AttentionParams::new().score(Score::Cosine { temperature: 1.0 });
    let e = HostPlan::new(&RunConfig::default(), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params, 2)
        .err()
        .unwrap();
    assert!(matches!(e, AttnError::UnsupportedScore { .. }), "{e:?}");
}
