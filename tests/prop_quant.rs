//! Quantized K/V caches: int8 and fp8 (E4M3, E5M2) codes with dequantization factors per
//! tensor, per KV head or per (token, KV head), strided, packed or paged, on every ISA, against
//! the f64 reference. Each property draws the code type, so the three share its cases.
//!
//! The quantizer below is this test's own: symmetric, `code = round(x / f)` (int8 clamped to
//! `-127..=127`; fp8 rounded to nearest even and saturated), with `f` rounded to 16 significant
//! bits so that every `f * value(code)` (at most 8 bits times 16) is exact in f32; per-token
//! factors stored as f16 are f16 values (11 bits). The case's f32 buffers then hold exactly the
//! dequantized values, so the reference on them is the literal dequantization, and the
//! tolerance stays the f32 arithmetic bound: a quantization error never enters the comparison.
//! Adversarial rows get a factor of 0 (random codes that must not count), a tiny one (2^-60;
//! f16: a subnormal) or a huge one (2^30; f16: near its largest).

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use common::Rng;
use simd_attn::*;

/// A code type of a quantized cache, as this test quantizes it.
trait Code: Element {
    /// The largest finite magnitude a code holds.
    const MAX: f32;
    /// A random finite code.
    fn random(rng: &mut Rng) -> Self;
    /// `x` (already divided by the factor) as the nearest code.
    fn quantize(x: f32) -> Self;
    /// The code's value, exactly.
    fn value(self) -> f32;
}

impl Code for i8 {
    const MAX: f32 = 127.0;
    fn random(rng: &mut Rng) -> Self {
        (rng.below(255) as i32 - 127) as i8
    }
    fn quantize(x: f32) -> Self {
        x.round().clamp(-127.0, 127.0) as i8
    }
    fn value(self) -> f32 {
        self as f32
    }
}

impl Code for F8E4M3 {
    const MAX: f32 = F8E4M3::MAX;
    fn random(rng: &mut Rng) -> Self {
        // Any code but the two NaNs.
        let c = rng.below(254) as u8;
        F8E4M3(if c >= 0x7f { c + 1 } else { c })
    }
    fn quantize(x: f32) -> Self {
        F8E4M3::from_f32(x)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

impl Code for F8E5M2 {
    const MAX: f32 = F8E5M2::MAX;
    fn random(rng: &mut Rng) -> Self {
        // Exponent 31 (infinities, NaNs) left out: codes 0..=0x7b and 0x80..=0xfb.
        let c = rng.below(248) as u8;
        F8E5M2(if c >= 0x7c { c + 4 } else { c })
    }
    fn quantize(x: f32) -> Self {
        F8E5M2::from_f32(x)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

/// Which code type a property case runs.
#[derive(Clone, Copy, Debug)]
enum CodeType {
    I8,
    E4m3,
    E5m2,
}

fn code_type() -> impl Strategy<Value = CodeType> {
    prop_oneof![Just(CodeType::I8), Just(CodeType::E4m3), Just(CodeType::E5m2)]
}

/// Runs `$f::<C, ..>($args)` with the case's code type `C`.
macro_rules! with_code {
    ($ct:expr, $f:ident $(::<$($t:ty),*>)? ($($arg:expr),* $(,)?)) => {
        match $ct {
            CodeType::I8 => $f::<i8 $($(, $t)*)?>($($arg),*),
            CodeType::E4m3 => $f::<F8E4M3 $($(, $t)*)?>($($arg),*),
            CodeType::E5m2 => $f::<F8E5M2 $($(, $t)*)?>($($arg),*),
        }
    };
}

/// Which factors a quantized tensor carries.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Tensor,
    Head,
    /// Per (token, KV head), `[B, Hkv, S]` (`token_major`: `[B, S, Hkv]`), stored as f32 or
    /// (`f16`) as f16.
    Token { token_major: bool, f16: bool },
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        1 => Just(Mode::Tensor),
        1 => Just(Mode::Head),
        3 => any::<(bool, bool)>().prop_map(|(token_major, f16)| Mode::Token { token_major, f16 }),
    ]
}

/// `x` rounded toward zero to 16 significant bits.
fn sig16(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & !0xff)
}

/// `x` as the nearest f16 value that is neither 0 nor infinite (clamped to f16's range).
fn f16_fit(x: f32) -> f32 {
    f16::from_f32(x).to_f32().clamp(f16::from_bits(1).to_f32(), f16::MAX.to_f32())
}

/// One quantized tensor of a case: the codes (laid out like the case's f32 buffer) and the
/// factors.
struct Quantized<C> {
    codes: Vec<C>,
    /// One per tensor, per KV head, or per (b, hk, j) at `strides`.
    factors: Vec<f32>,
    /// The same factors as f16 (each exactly), for `Mode::Token { f16: true, .. }`.
    factors_f16: Vec<f16>,
    strides: Strides,
    mode: Mode,
}

impl<C> Quantized<C> {
    fn dequant(&self) -> Dequant<'_> {
        match self.mode {
            Mode::Tensor => Dequant::Tensor(self.factors[0]),
            Mode::Head => Dequant::Head(&self.factors),
            Mode::Token { f16: false, .. } => Dequant::Token(&self.factors, self.strides),
            Mode::Token { f16: true, .. } => Dequant::TokenF16(&self.factors_f16, self.strides),
        }
    }
}

/// Quantizes tensor `which` (1 = K, 2 = V) of `case` in place: its f32 rows become the
/// dequantized values, and the codes and factors are returned; a huge factor is about
/// `2^huge`. Rows of one tensor that share
/// memory (a batch stride of 0) get the same codes and factors.
fn quantize<C: Code>(case: &mut Case, which: usize, mode: Mode, seed: u64, huge: i32) -> Quantized<C> {
    let s = case.shape;
    let (bi, off, st) = case.views[which];
    let width = if which == 1 { s.head_dim } else { s.v_head_dim };
    let (b_n, hkv, skv) = (s.batch, s.kv_heads, s.seq_kv);
    let row_at = |b: usize, hk: usize, j: usize| off + b * st.batch + hk * st.head + j * st.seq;
    let amax = |rows: &mut dyn Iterator<Item = usize>, buf: &[f32]| rows.fold(0.0f32, |a, o| buf[o..o + width].iter().fold(a, |a, x| a.max(x.abs())));
    // f16 factors have 11 significant bits: products with a code stay exact as well.
    let token_f16 = matches!(mode, Mode::Token { f16: true, .. });
    let fit = |m: f32| if m > 0.0 && token_f16 { f16_fit(m / C::MAX) } else if m > 0.0 { sig16(m / C::MAX) } else { 1.0 };
    // Factor strides: batch stride 0 where K/V are shared by every batch entry.
    let bstride = |n: usize| if st.batch == 0 { 0 } else { n };
    let strides = match mode {
        Mode::Token { token_major: false, .. } => Strides::new(bstride(hkv * skv), skv, 1),
        Mode::Token { token_major: true, .. } => Strides::new(bstride(hkv * skv), 1, hkv),
        _ => Strides::default(),
    };
    let mut factors = match mode {
        Mode::Tensor => {
            let mut all = (0..b_n).flat_map(|b| (0..hkv).flat_map(move |hk| (0..skv).map(move |j| (b, hk, j)))).map(|(b, hk, j)| row_at(b, hk, j));
            vec![fit(amax(&mut all, &case.bufs[bi]))]
        }
        Mode::Head => (0..hkv)
            .map(|hk| {
                let mut rows = (0..b_n).flat_map(|b| (0..skv).map(move |j| (b, j))).map(|(b, j)| row_at(b, hk, j));
                fit(amax(&mut rows, &case.bufs[bi]))
            })
            .collect(),
        Mode::Token { .. } => vec![0.0; if st.batch == 0 { 1 } else { b_n } * hkv * skv],
    };
    let mut codes = vec![C::default(); case.bufs[bi].len()];
    for b in 0..b_n {
        for hk in 0..hkv {
            for j in 0..skv {
                let o = row_at(b, hk, j);
                // Adversarial rows, chosen by address so shared rows choose alike.
                let mut rng = Rng::new(seed ^ (o as u64).wrapping_mul(0x9E37_79B9) ^ which as u64);
                let (f, adversarial) = match mode {
                    Mode::Tensor => (factors[0], false),
                    Mode::Head => (factors[hk], false),
                    Mode::Token { .. } => {
                        // f16 factors: a subnormal tiny one, a huge one near f16's largest.
                        let (f, odd) = match rng.below(20) {
                            0 => (0.0, true),
                            1 if token_f16 => (f16_fit(2f32.powi(-20) * (1.0 + rng.uniform().abs())), true),
                            1 => (sig16(2f32.powi(-60) * (1.0 + rng.uniform().abs())), true),
                            2 if token_f16 => (f16_fit(2f32.powi(huge.min(15)) * (1.0 + 0.99 * rng.uniform().abs())), true),
                            2 => (sig16(2f32.powi(huge) * (1.0 + rng.uniform().abs())), true),
                            _ => (fit(amax(&mut core::iter::once(o), &case.bufs[bi])), false),
                        };
                        factors[b * strides.batch + hk * strides.head + j * strides.seq] = f;
                        // Rows with an odd factor get random codes.
                        (f, odd && (token_f16 || f == 0.0 || f < 1e-10 || f > 1e8))
                    }
                };
                for t in 0..width {
                    let x = case.bufs[bi][o + t];
                    let c = if adversarial { C::random(&mut rng) } else { C::quantize(x / f) };
                    codes[o + t] = c;
                    case.bufs[bi][o + t] = f * c.value();
                }
            }
        }
    }
    let factors_f16: Vec<f16> = if token_f16 { factors.iter().map(|&f| f16::from_f32(f)).collect() } else { Vec::new() };
    assert!(factors_f16.iter().zip(&factors).all(|(h, &f)| h.to_f32() == f), "f16 factors are exact");
    Quantized { codes, factors, factors_f16, strides, mode }
}

/// A case with K and V quantized; `round` runs first (rounding Q and out's values to their
/// storage). Huge V factors stay small enough (2^15 / MAX, times at most 2, times MAX) for an
/// f16 output when `f16_out`.
fn quantized_case<C: Code>(spec: &Spec, k_mode: Mode, v_mode: Mode, seed: u64, f16_out: bool, round: impl Fn(&mut Case)) -> (Case, Quantized<C>, Quantized<C>) {
    let mut case = Case::build(spec);
    round(&mut case);
    let k = quantize(&mut case, 1, k_mode, seed, 30);
    let v_huge = if f16_out { 15 - C::MAX.log2().ceil() as i32 } else { 30 };
    let v = quantize(&mut case, 2, v_mode, seed.wrapping_add(1), v_huge);
    (case, k, v)
}

/// Runs the quantized call of a case with Q and out stored as `TQ` / `TO`.
fn run_codes<C: Code, TQ: FloatElement, TO: FloatElement>(config: &RunConfig, case: &Case, k: &Quantized<C>, v: &Quantized<C>) -> Outcome {
    let q_buf: Vec<TQ> = case.bufs[case.views[0].0].iter().map(|&x| TQ::from_f32(x)).collect();
    let (_, q_off, q_st) = case.views[0];
    let (_, k_off, k_st) = case.views[1];
    let (_, v_off, v_st) = case.views[2];
    let mut out = vec![TO::from_f32(SENTINEL); case.out_len];
    let rows = case.shape.batch * case.shape.q_heads * case.shape.seq_q;
    let mut lse = vec![SENTINEL; rows];
    let params = case.params().kv_scales(k.dequant(), v.dequant());
    attention_with(
        config,
        &case.shape,
        TensorRef::new(&q_buf[q_off..], q_st),
        TensorRef::new(&k.codes[k_off..], k_st),
        TensorRef::new(&v.codes[v_off..], v_st),
        TensorMut::new(&mut out, case.out_strides),
        case.spec.lse.then_some(&mut lse[..]),
        &params,
    )
    .expect("generated problems are valid");
    Outcome { out: out.iter().map(|x| x.to_f32()).collect(), lse }
}

fn every_isa<C: Code, TQ: FloatElement, TO: FloatElement>(spec: &Spec, k_mode: Mode, v_mode: Mode, seed: u64, store_eps: f64) -> Result<(), TestCaseError> {
    let (case, k, v) = quantized_case::<C>(spec, k_mode, v_mode, seed, TO::DTYPE == DType::F16, |c| c.round_for::<TQ, f32, TO>());
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(1) };
        let got = run_codes::<C, TQ, TO>(&config, &case, &k, &v);
        check(&case, &got, store_eps).map_err(|e| TestCaseError::fail(format!("[{isa}] {:?} K {k_mode:?} V {v_mode:?}: {e}", C::DTYPE)))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 2 + 1, ..ProptestConfig::default() })]

    #[test]
    fn quantized_kv_every_isa(spec in spec_strategy(Options::Any), ct in code_type(), k_mode in mode(), v_mode in mode(), seed in any::<u64>()) {
        with_code!(ct, every_isa::<f32, f32>(&spec, k_mode, v_mode, seed, 0.0))?;
    }

    #[test]
    fn quantized_kv_adversarial(spec in spec_strategy(Options::Adversarial), ct in code_type(), seed in any::<u64>()) {
        let token = Mode::Token { token_major: seed % 2 == 0, f16: seed % 3 == 0 };
        with_code!(ct, every_isa::<f32, f32>(&spec, token, token, seed, 0.0))?;
    }

    #[test]
    fn quantized_kv_16_bit_q_and_out(spec in spec_strategy(Options::One), ct in code_type(), k_mode in mode(), v_mode in mode(), seed in any::<u64>()) {
        with_code!(ct, every_isa::<bf16, f16>(&spec, k_mode, v_mode, seed, 1.0 / 2048.0))?;
        with_code!(ct, every_isa::<f16, bf16>(&spec, k_mode, v_mode, seed, 1.0 / 256.0))?;
    }

    /// Decode shapes (one to a few new tokens per sequence, GQA): the few-rows and row-tile
    /// decode kernels, with several threads so the key partitions merge.
    #[test]
    fn quantized_kv_decode(ct in code_type(), b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4), Just(8)], sq in 1..=4usize,
                      skv in prop_oneof![1..=40usize, 200..=3000usize], d in prop_oneof![Just(64usize), Just(128), 1..=96usize],
                      k_mode in mode(), v_mode in mode(), seed in any::<u64>(), threads in 1..=3usize) {
        let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, d);
        spec.causal = seed % 3 == 0;
        spec.seed = seed;
        spec.layout = if seed % 2 == 0 { Layout::Bshd } else { Layout::Bhsd };
        with_code!(ct, decode(&spec, k_mode, v_mode, seed, threads))?;
    }

    /// Packed variable-length keys (`cu_seqlens_k`): per-token factors found through the same
    /// token offsets as K and V.
    #[test]
    fn quantized_kv_packed(ct in code_type(), lens in proptest::collection::vec(0..=60usize, 1..=3), hkv in 1..=2usize, g in 1..=3usize,
                      d in prop_oneof![Just(64usize), 1..=40usize], seed in any::<u64>()) {
        with_code!(ct, packed(&lens, hkv, g, d, seed))?;
    }

    /// A paged int8 cache with paged per-token factors, read in place, and the same cache as
    /// strided tensors: each within the bound of the reference.
    #[test]
    fn quantized_kv_paged(ct in code_type(), b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4)], sq in 1..=3usize,
                     skv in 1..=300usize, d in prop_oneof![Just(64usize), Just(128), 1..=40usize],
                     page_size in prop_oneof![Just(1usize), Just(16), 1..=70usize], seed in any::<u64>()) {
        with_code!(ct, paged(b, hkv, g, sq, skv, d, page_size, seed))?;
    }
}

fn decode<C: Code>(spec: &Spec, k_mode: Mode, v_mode: Mode, seed: u64, threads: usize) -> Result<(), TestCaseError> {
    let (case, k, v) = quantized_case::<C>(spec, k_mode, v_mode, seed, false, |_| {});
    for isa in Isa::available() {
        let got = run_codes::<C, f32, f32>(&RunConfig { isa: Some(isa), threads: Some(threads) }, &case, &k, &v);
        check(&case, &got, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] {:?} {threads} threads: {e}", C::DTYPE)))?;
    }
    Ok(())
}

/// Packed keys: `lens[b]` keys per sequence, tokens `[T, Hkv, D]`, factors `[T, Hkv]`.
fn packed<C: Code>(lens: &[usize], hkv: usize, g: usize, d: usize, seed: u64) -> Result<(), TestCaseError> {
    let (batch, hq, sq) = (lens.len(), hkv * g, 2usize);
    let skv = lens.iter().copied().max().unwrap_or(0).max(1);
    let tokens: usize = lens.iter().sum();
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let mut rng = Rng::new(seed);
    let shape = AttentionShape::new(batch, hq, hkv, sq, skv, d);
    let q: Vec<f32> = (0..batch * hq * sq * d).map(|_| rng.uniform()).collect();
    let n = tokens * hkv * d;
    let (k_codes, v_codes): (Vec<C>, Vec<C>) = ((0..n).map(|_| C::random(&mut rng)).collect(), (0..n).map(|_| C::random(&mut rng)).collect());
    // Values up to about 2.5 whatever the code type.
    let unit = 1.27 / C::MAX;
    // f16-exact factors, given as f16 or as f32 by the seed.
    let factor = |rng: &mut Rng| if rng.below(10) == 0 { 0.0 } else { f16_fit(unit * (1.0 + rng.uniform().abs())) };
    let (kf, vf): (Vec<f32>, Vec<f32>) = ((0..tokens * hkv).map(|_| factor(&mut rng)).collect(), (0..tokens * hkv).map(|_| factor(&mut rng)).collect());
    let tok = Strides::new(0, d, hkv * d);
    let ftok = Strides::new(0, 1, hkv);
    let [qs, _, _, os] = shape.bhsd_strides();
    let (kh, vh): (Vec<f16>, Vec<f16>) = (kf.iter().map(|&f| f16::from_f32(f)).collect(), vf.iter().map(|&f| f16::from_f32(f)).collect());
    let scales = if seed % 4 == 1 { (Dequant::TokenF16(&kh, ftok), Dequant::TokenF16(&vh, ftok)) } else { (Dequant::Token(&kf, ftok), Dequant::Token(&vf, ftok)) };
    let params = AttentionParams::new().cu_seqlens_k(&cu).causal(seed % 2 == 0).kv_scales(scales.0, scales.1);
    let want = Reference::new(&shape, TensorRef::new(&q, qs), TensorRef::new(&k_codes, tok), TensorRef::new(&v_codes, tok), &params).unwrap().compute();
    // The same call on dequantized f32 tensors: the reference's literal factors agree.
    let deq = |codes: &[C], f: &[f32]| -> Vec<f32> { codes.iter().enumerate().map(|(i, &c)| f[i / d] * c.value()).collect() };
    let (kd, vd) = (deq(&k_codes, &kf), deq(&v_codes, &vf));
    let plain = AttentionParams::new().cu_seqlens_k(&cu).causal(seed % 2 == 0);
    let want_f32 = Reference::new(&shape, TensorRef::new(&q, qs), TensorRef::new(&kd, tok), TensorRef::new(&vd, tok), &plain).unwrap().compute();
    for (a, b) in want.out.iter().zip(&want_f32.out) {
        prop_assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "reference with factors {a} vs on dequantized values {b}");
    }
    for isa in Isa::available() {
        let mut out = vec![0.0f32; batch * hq * sq * d];
        attention_with(&RunConfig { isa: Some(isa), threads: Some(1) }, &shape, TensorRef::new(&q, qs), TensorRef::new(&k_codes, tok), TensorRef::new(&v_codes, tok), TensorMut::new(&mut out, os), None, &params).unwrap();
        for (r, (g, w)) in out.chunks(d).zip(want.out.chunks(d)).enumerate() {
            // |v| <= MAX * 2 unit = 2.54; a wrong factor or token moves a row by about that much.
            let tol = 1e-4 * 2.54;
            for (&x, &y) in g.iter().zip(w) {
                prop_assert!((x as f64 - y).abs() <= tol, "[{isa}] row {r}: {x} vs reference {y}");
            }
        }
    }
    Ok(())
}

/// The spec every paged property starts from: batch 0 at full length, the others at lengths
/// drawn from the seed (0 included), causal for odd seeds.
fn paged_spec(b: usize, hkv: usize, g: usize, sq: usize, skv: usize, d: usize, seed: u64) -> Spec {
    let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, d);
    spec.seed = seed;
    spec.causal = seed % 2 == 1;
    spec.kv_lens = Some((0..b).map(|i| if i == 0 { skv } else { (seed as usize >> (4 * i)) % (skv + 1) }).collect());
    spec
}

/// Page ids `0..n` in a seeded shuffled order (Fisher-Yates), so a table is never the identity.
fn shuffled_pages(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

#[allow(clippy::too_many_arguments)]
fn paged<C: Code>(b: usize, hkv: usize, g: usize, sq: usize, skv: usize, d: usize, page_size: usize, seed: u64) -> Result<(), TestCaseError> {
    let spec = paged_spec(b, hkv, g, sq, skv, d, seed);
    let f16_factors = seed % 3 == 0;
    let tm = Mode::Token { token_major: false, f16: f16_factors };
    let (case, k, v) = quantized_case::<C>(&spec, tm, tm, seed, false, |_| {});
    // Pool: token-major pages [num_pages, page_size, Hkv, D], factors [num_pages, page_size, Hkv],
    // pages in a shuffled order, one spare page filled with garbage.
    let pages_per_seq = skv.div_ceil(page_size);
    let num_pages = b * pages_per_seq + 1;
    let order = shuffled_pages(num_pages, seed);
    let ps = PageStrides { page: page_size * hkv * d, head: d, slot: hkv * d };
    let fs = PageStrides { page: page_size * hkv, head: 1, slot: hkv };
    let (mut kp, mut vp) = (vec![C::from_f32(C::MAX); num_pages * ps.page], vec![C::from_f32(-C::MAX); num_pages * ps.page]);
    let (mut kfp, mut vfp) = (vec![f32::NAN; num_pages * fs.page], vec![f32::NAN; num_pages * fs.page]);
    let mut table = vec![-1i32; b * pages_per_seq];
    let lens = case.kv_lens.clone().unwrap();
    let (_, _, kst) = case.views[1];
    let (_, _, vst) = case.views[2];
    for bi in 0..b {
        for p in 0..lens[bi].div_ceil(page_size) {
            table[bi * pages_per_seq + p] = order[bi * pages_per_seq + p] as i32;
        }
        for j in 0..lens[bi] {
            let page = table[bi * pages_per_seq + j / page_size] as usize;
            for hk in 0..hkv {
                let at = page * ps.page + hk * ps.head + (j % page_size) * ps.slot;
                let (ko, vo) = (bi * kst.batch + hk * kst.head + j * kst.seq, bi * vst.batch + hk * vst.head + j * vst.seq);
                kp[at..at + d].copy_from_slice(&k.codes[ko..ko + d]);
                vp[at..at + d].copy_from_slice(&v.codes[vo..vo + d]);
                let fat = page * fs.page + hk * fs.head + (j % page_size) * fs.slot;
                let fo = bi * k.strides.batch + hk * k.strides.head + j * k.strides.seq;
                kfp[fat] = k.factors[fo];
                vfp[fat] = v.factors[fo];
            }
        }
    }
    let pages = PageTable { block_table: &table, pages_per_seq, page_size, num_pages };
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(2) };
        let strided = run_codes::<C, f32, f32>(&config, &case, &k, &v);
        check(&case, &strided, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] strided: {e}")))?;
        let q = case.tensor(&case.bufs, 0);
        let mut out = vec![SENTINEL; case.out_len];
        let mut lse = vec![SENTINEL; b * hkv * g * sq];
        let (kh, vh): (Vec<f16>, Vec<f16>) = (kfp.iter().map(|&f| f16::from_f32(f)).collect(), vfp.iter().map(|&f| f16::from_f32(f)).collect());
        let scales = if f16_factors { (Dequant::PagedTokenF16(&kh, fs), Dequant::PagedTokenF16(&vh, fs)) } else { (Dequant::PagedToken(&kfp, fs), Dequant::PagedToken(&vfp, fs)) };
        let params = case.params().kv_scales(scales.0, scales.1);
        let request = Request::new(case.shape, q, PagedKv { k: &kp, v: &vp, k_strides: ps, v_strides: ps, pages }, TensorMut::new(&mut out, case.out_strides), params).lse(&mut lse);
        run(&config, request).unwrap();
        // Token-major pages put a token's heads side by side, which the decode plan runs in
        // lockstep chunks of another length than the strided heads: rounding may differ, so
        // the paged call is checked against the reference on its own.
        check(&case, &Outcome { out, lse }, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] paged: {e}")))?;
    }
    Ok(())
}

/// The int8 widening of every ISA against the scalar conversion, all 256 codes.
#[test]
fn int8_widening_is_exact_on_every_isa() {
    let all: Vec<i8> = (0..=255u8).map(|c| c as i8).collect();
    for isa in Isa::available() {
        let Some((one, pair)) = simd_attn::selftest::widen_i8(isa, &all) else { continue };
        for (i, &c) in all.iter().enumerate() {
            assert_eq!(one[i], c as f32, "[{isa}] load_i8s of {c}");
            assert_eq!(pair[i], c as f32, "[{isa}] load_i8s_pair of {c}");
        }
    }
}

/// Factors that do not fit the call are rejected before anything is written.
#[test]
fn bad_factors_are_rejected() {
    let shape = AttentionShape::new(1, 2, 2, 1, 4, 8);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let (q, k) = (vec![0.5f32; 16], vec![1i8; 64]);
    let mut out = vec![SENTINEL; 16];
    let call = |out: &mut [f32], params: AttentionParams<'_>| {
        attention(&shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&k, vs), TensorMut::new(out, os), None, &params).map(|_| ())
    };
    let heads = [1.0f32];
    let short = [1.0f32; 7];
    let ok = [1.0f32; 8];
    let bhs = Strides::new(8, 4, 1);
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::Head(&heads), Dequant::Tensor(1.0))), Err(AttnError::WrongLength { .. })));
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::Tensor(1.0), Dequant::Token(&short, bhs))), Err(AttnError::BufferTooSmall { tensor: TensorName::VScale, .. })));
    let short_f16 = [f16::ONE; 7];
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::TokenF16(&short_f16, bhs), Dequant::Tensor(1.0))), Err(AttnError::BufferTooSmall { tensor: TensorName::KScale, .. })));
    let pst = PageStrides { page: 4, head: 1, slot: 2 };
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::PagedToken(&ok, pst), Dequant::Tensor(1.0))), Err(AttnError::Unsupported { .. })));
    let ok_f16 = [f16::ONE; 8];
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::Tensor(1.0), Dequant::PagedTokenF16(&ok_f16, pst))), Err(AttnError::Unsupported { .. })));
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::Token(&ok, bhs), Dequant::Token(&ok, bhs)).score(Score::Cosine { temperature: 1.0 })), Err(AttnError::UnsupportedScore { .. })));
    assert!(matches!(call(&mut out, AttentionParams::new().score(Score::Cosine { temperature: 1.0 })), Err(AttnError::UnsupportedScore { .. })));
    assert!(out.iter().all(|&x| x == SENTINEL), "an error left the output untouched");
    call(&mut out, AttentionParams::new().kv_scales(Dequant::Token(&ok, bhs), Dequant::Head(&[0.5, 2.0]))).unwrap();
    assert!(out.iter().all(|&x| x != SENTINEL));
    // f16 factors read as the same f32 factors: the same output, bit for bit.
    let varied = [0.5f32, 1.25, 3.0, 0.125, 2.0, 0.75, 1.5, 6.103515625e-5];
    let varied_f16 = varied.map(f16::from_f32);
    let (mut out_f32, mut out_f16) = (vec![SENTINEL; 16], vec![SENTINEL; 16]);
    call(&mut out_f32, AttentionParams::new().kv_scales(Dequant::Token(&varied, bhs), Dequant::Token(&varied, bhs))).unwrap();
    call(&mut out_f16, AttentionParams::new().kv_scales(Dequant::TokenF16(&varied_f16, bhs), Dequant::TokenF16(&varied_f16, bhs))).unwrap();
    assert!(varied_f16.iter().zip(&varied).all(|(h, &f)| h.to_f32() == f));
    assert_eq!(out_f32, out_f16);
}

/// An fp8 code's value from the OCP definition, in f64: sign, `e` exponent bits of bias
/// `bias`, `m` mantissa bits; exponent 0 subnormal. `special` decides the codes the format
/// reserves (E4M3: only S.1111.111 is NaN; E5M2: exponent all ones is inf or NaN).
fn fp8_definition(code: u8, e_bits: u32, m_bits: u32, bias: i32, special: impl Fn(u32, u32) -> Option<f64>) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = (code as u32 >> m_bits) & ((1 << e_bits) - 1);
    let m = code as u32 & ((1 << m_bits) - 1);
    if let Some(x) = special(e, m) {
        return sign * x;
    }
    let frac = m as f64 / (1u32 << m_bits) as f64;
    sign * if e == 0 { frac * 2f64.powi(1 - bias) } else { (1.0 + frac) * 2f64.powi(e as i32 - bias) }
}

fn e4m3_table() -> Vec<f64> {
    (0..=255u8).map(|c| fp8_definition(c, 4, 3, 7, |e, m| (e == 15 && m == 7).then_some(f64::NAN))).collect()
}

fn e5m2_table() -> Vec<f64> {
    (0..=255u8).map(|c| fp8_definition(c, 5, 2, 15, |e, m| (e == 31).then_some(if m == 0 { f64::INFINITY } else { f64::NAN }))).collect()
}

fn same_value(got: f32, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got as f64 == want && got.is_sign_negative() == want.is_sign_negative())
}

/// Every E4M3 and E5M2 code decoded by the element type and by every ISA's loads (one vector
/// and two) against the table computed from the format definition; the table's landmarks
/// (448 and 57344 largest, 2^-9 and 2^-16 smallest subnormals, the NaN and inf codes) checked
/// by hand.
#[test]
fn fp8_codes_decode_as_the_format_defines_on_every_isa() {
    let (t4, t5) = (e4m3_table(), e5m2_table());
    assert_eq!((t4[0x7e], t4[0x01], t4[0x08], t4[0xfe]), (448.0, 2f64.powi(-9), 2f64.powi(-6), -448.0));
    assert!(t4[0x7f].is_nan() && t4[0xff].is_nan() && t4.iter().filter(|x| x.is_nan()).count() == 2);
    assert_eq!((t5[0x7b], t5[0x01], t5[0x7c], t5[0xfc]), (57344.0, 2f64.powi(-16), f64::INFINITY, f64::NEG_INFINITY));
    assert!(t5.iter().filter(|x| x.is_nan()).count() == 6);
    let e4: Vec<F8E4M3> = (0..=255u8).map(F8E4M3).collect();
    let e5: Vec<F8E5M2> = (0..=255u8).map(F8E5M2).collect();
    for c in 0..256 {
        assert!(same_value(e4[c].to_f32(), t4[c]), "E4M3 {c:#04x}: {} vs {}", e4[c].to_f32(), t4[c]);
        assert!(same_value(Element::to_f32(e4[c]), t4[c]));
        assert!(same_value(e5[c].to_f32(), t5[c]), "E5M2 {c:#04x}: {} vs {}", e5[c].to_f32(), t5[c]);
        assert!(same_value(Element::to_f32(e5[c]), t5[c]));
    }
    let mut checked = 0;
    for isa in Isa::available() {
        if let Some((one, pair)) = simd_attn::selftest::widen_e4m3(isa, &e4) {
            for c in 0..256 {
                assert!(same_value(one[c], t4[c]), "[{isa}] load_e4m3s of {c:#04x}: {} vs {}", one[c], t4[c]);
                assert!(same_value(pair[c], t4[c]), "[{isa}] load_e4m3s_pair of {c:#04x}: {} vs {}", pair[c], t4[c]);
            }
            checked += 1;
        }
        if let Some((one, pair)) = simd_attn::selftest::widen_e5m2(isa, &e5) {
            for c in 0..256 {
                assert!(same_value(one[c], t5[c]), "[{isa}] load_e5m2s of {c:#04x}: {} vs {}", one[c], t5[c]);
                assert!(same_value(pair[c], t5[c]), "[{isa}] load_e5m2s_pair of {c:#04x}: {} vs {}", pair[c], t5[c]);
            }
        }
    }
    assert!(checked >= 1, "no ISA ran the fp8 loads");
}

/// The nearest finite code of `x`'s sign, by exhaustive search over the table; ties to the even
/// code. This is `from_f32`'s contract for finite `x` (beyond the largest value: the largest).
fn nearest_code(table: &[f64], x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let mut best: Option<(f64, u8)> = None;
    for m in 0..0x80u8 {
        let c = sign | m;
        let v = table[c as usize];
        if !v.is_finite() {
            continue;
        }
        let d = (v - x as f64).abs();
        best = match best {
            Some((bd, bc)) if bd < d || (bd == d && bc % 2 == 0) => Some((bd, bc)),
            _ => Some((d, c)),
        };
    }
    best.unwrap().1
}

proptest! {
    /// fp8 encoding rounds to nearest even and saturates, on random values across the whole
    /// range, on the exact midpoints between neighbouring codes, and on the specials.
    #[test]
    fn fp8_encoding_rounds_to_nearest_even(bits in any::<u32>(), exp in -20i32..20, c in 0..0x7fu8) {
        let (t4, t5) = (e4m3_table(), e5m2_table());
        let x = f32::from_bits((bits & 0x807f_ffff) | (((exp + 127) as u32) << 23));
        prop_assert_eq!(F8E4M3::from_f32(x).0, nearest_code(&t4, x), "E4M3 of {}", x);
        prop_assert_eq!(F8E5M2::from_f32(x).0, nearest_code(&t5, x), "E5M2 of {}", x);
        // Midpoints between code c and c + 1 (exact in f32), both signs.
        for (table, max) in [(&t4, 0x7eu8), (&t5, 0x7b)] {
            if c < max {
                let mid = ((table[c as usize] + table[c as usize + 1]) / 2.0) as f32;
                let want = if c % 2 == 0 { c } else { c + 1 };
                let got = if max == 0x7e { F8E4M3::from_f32(mid).0 } else { F8E5M2::from_f32(mid).0 };
                let got_neg = if max == 0x7e { F8E4M3::from_f32(-mid).0 } else { F8E5M2::from_f32(-mid).0 };
                prop_assert_eq!(got, want, "midpoint {} of codes {} and {}", mid, c, c + 1);
                prop_assert_eq!(got_neg, 0x80 | want);
            }
        }
    }
}

#[test]
fn fp8_encoding_specials() {
    assert_eq!(F8E4M3::from_f32(1e9).0, 0x7e);
    assert_eq!(F8E4M3::from_f32(-1e9).0, 0xfe);
    assert!(F8E4M3::from_f32(f32::INFINITY).to_f32().is_nan() && F8E4M3::from_f32(f32::NAN).to_f32().is_nan());
    assert_eq!(F8E4M3::from_f32(-0.0).0, 0x80);
    assert_eq!(F8E5M2::from_f32(1e9).0, 0x7b);
    assert_eq!(F8E5M2::from_f32(f32::NEG_INFINITY).0, 0xfc);
    assert!(F8E5M2::from_f32(f32::NAN).to_f32().is_nan());
    for c in 0..=255u8 {
        // Every finite code survives a round trip.
        if F8E4M3(c).to_f32().is_finite() {
            assert_eq!(F8E4M3::from_f32(F8E4M3(c).to_f32()).0, c);
        }
        if !F8E5M2(c).to_f32().is_nan() {
            assert_eq!(F8E5M2::from_f32(F8E5M2(c).to_f32()).0, c);
        }
    }
}

/// An fp8 cache with no `kv_scales` (factor 1, as SGLang keeps an unscaled fp8 cache), NaN codes
/// included in K rows that no query sees: the result is the reference's on the decoded values,
/// and the invisible NaNs reach nothing.
#[test]
fn fp8_kv_without_scales_and_nan_codes_outside_the_window() {
    let shape = AttentionShape::new(1, 4, 2, 3, 40, 64);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let mut rng = Rng::new(7);
    let q: Vec<f32> = (0..4 * 3 * 64).map(|_| rng.uniform()).collect();
    for fmt in 0..2 {
        let (mut k4, mut v4): (Vec<F8E4M3>, Vec<F8E4M3>) = ((0..2 * 40 * 64).map(|_| F8E4M3::random(&mut rng)).collect(), (0..2 * 40 * 64).map(|_| F8E4M3::random(&mut rng)).collect());
        let (mut k5, mut v5): (Vec<F8E5M2>, Vec<F8E5M2>) = ((0..2 * 40 * 64).map(|_| F8E5M2::random(&mut rng)).collect(), (0..2 * 40 * 64).map(|_| F8E5M2::random(&mut rng)).collect());
        // Bottom-right causal with a left window of 8: row i sees keys 29 + i..=37 + i, so keys
        // 0..5 of KV head 1 (poisoned with NaN and inf codes) are outside every row's reach.
        for j in 0..5 {
            for t in 0..64 {
                let o = 40 * 64 + j * 64 + t;
                (k4[o], v4[o], k5[o], v5[o]) = (F8E4M3(0x7f), F8E4M3(0xff), F8E5M2(0x7e), F8E5M2(0x7c));
            }
        }
        let params = AttentionParams::new().causal(true).window(Some(8), Some(0));
        let mut out = vec![SENTINEL; 4 * 3 * 64];
        for isa in Isa::available() {
            let config = RunConfig { isa: Some(isa), threads: Some(1) };
            let want = if fmt == 0 {
                attention_with(&config, &shape, TensorRef::new(&q, qs), TensorRef::new(&k4, ks), TensorRef::new(&v4, vs), TensorMut::new(&mut out, os), None, &params).unwrap();
                Reference::new(&shape, TensorRef::new(&q, qs), TensorRef::new(&k4, ks), TensorRef::new(&v4, vs), &params).unwrap().compute()
            } else {
                attention_with(&config, &shape, TensorRef::new(&q, qs), TensorRef::new(&k5, ks), TensorRef::new(&v5, vs), TensorMut::new(&mut out, os), None, &params).unwrap();
                Reference::new(&shape, TensorRef::new(&q, qs), TensorRef::new(&k5, ks), TensorRef::new(&v5, vs), &params).unwrap().compute()
            };
            let vmax = want.out.iter().fold(0.0f64, |a, x| a.max(x.abs())).max(1.0);
            for (i, (&g, &w)) in out.iter().zip(&want.out).enumerate() {
                assert!(g.is_finite() && (g as f64 - w).abs() <= 1e-4 * vmax, "[{isa}] fmt {fmt} element {i}: {g} vs reference {w}");
            }
        }
    }
}

// ---- ggml q8_0 blocks ----

/// ggml's reference quantizer (`quantize_row_q8_0_ref`), written here from its definition and
/// independent of the library's: per 32 values, `d = amax / 127` (stored as f16), codes
/// `roundf(x / d)`. Where `amax / 127` passes f16's largest finite value the scale is that
/// value and the codes saturate at +-127 (ggml would store an infinite scale). `adversarial`
/// blocks (1 in 8, chosen by `rng`) get a zero scale over random codes, or a tiny (subnormal
/// f16) or huge scale over random codes instead. Returns the blocks and, laid out like `x`,
/// their exact values.
fn ggml_q8_0(x: &[f32], rng: &mut Rng, adversarial: bool) -> (Vec<BlockQ8_0>, Vec<f32>) {
    let mut blocks = Vec::with_capacity(x.len() / 32);
    for chunk in x.chunks_exact(32) {
        let mut qs = [0i8; 32];
        let d = match adversarial.then(|| rng.below(24)) {
            Some(k @ 0..=2) => {
                for q in qs.iter_mut() {
                    *q = (rng.below(255) as i32 - 127) as i8;
                }
                [f16::ZERO, f16::from_bits(1 + rng.below(1000) as u16), f16::from_f32(4096.0 * (1.0 + rng.uniform().abs()))][k]
            }
            _ => {
                let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let (stored, id) = if d > 65504.0 { (f16::MAX, 1.0 / 65504.0) } else { (f16::from_f32(d), if d != 0.0 { 1.0 / d } else { 0.0 }) };
                for (q, &v) in qs.iter_mut().zip(chunk) {
                    *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                }
                stored
            }
        };
        blocks.push(BlockQ8_0 { d, qs });
    }
    let values = blocks.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d.to_f32() * q as f32)).collect();
    (blocks, values)
}

/// A case with K and V as q8_0 blocks (`[B, H, S, D]` or `[B, S, H, D]`, rows block-aligned):
/// the case's f32 K and V become the blocks' exact values, and the block tensors' strides are
/// the value strides over 32.
fn q8_0_case(spec: &Spec, adversarial: bool) -> (Case, [(Vec<BlockQ8_0>, Strides); 2]) {
    let mut case = Case::build(spec);
    let mut rng = Rng::new(spec.seed ^ 0x5108);
    let mut tensor = |which: usize, case: &mut Case| {
        let (bi, off, st) = case.views[which];
        assert_eq!(off, 0);
        let (blocks, values) = ggml_q8_0(&case.bufs[bi], &mut rng, adversarial);
        case.bufs[bi] = values;
        (blocks, Strides::new(st.batch / 32, st.head / 32, st.seq / 32))
    };
    let k = tensor(1, &mut case);
    let v = tensor(2, &mut case);
    (case, [k, v])
}

/// The spec with block-sized head dims (one to eight blocks) and a layout q8_0 rows fit.
fn q8_0_spec(mut spec: Spec, d_blocks: usize, dv_blocks: usize) -> Spec {
    spec.head_dim = 32 * d_blocks;
    spec.v_head_dim = 32 * dv_blocks;
    spec.layout = if spec.seed % 2 == 0 { Layout::Bhsd } else { Layout::Bshd };
    spec
}

fn run_q8_0(config: &RunConfig, case: &Case, kv: &[(Vec<BlockQ8_0>, Strides); 2]) -> Outcome {
    let mut out = vec![SENTINEL; case.out_len];
    let mut lse = vec![SENTINEL; case.shape.batch * case.shape.q_heads * case.shape.seq_q];
    attention_with(
        config,
        &case.shape,
        case.tensor(&case.bufs, 0),
        TensorRef::new(&kv[0].0, kv[0].1),
        TensorRef::new(&kv[1].0, kv[1].1),
        TensorMut::new(&mut out, case.out_strides),
        case.spec.lse.then_some(&mut lse[..]),
        &case.params(),
    )
    .expect("generated problems are valid");
    Outcome { out, lse }
}

fn q8_0_every_isa(spec: &Spec, adversarial: bool, threads: usize) -> Result<(), TestCaseError> {
    let (case, kv) = q8_0_case(spec, adversarial);
    // The reference on the blocks dequantizes literally: it agrees with the reference on their
    // values as f32 tensors.
    let on_blocks = Reference::new(&case.shape, case.tensor(&case.bufs, 0), TensorRef::new(&kv[0].0, kv[0].1), TensorRef::new(&kv[1].0, kv[1].1), &case.params()).unwrap().compute();
    let on_values = case.reference().compute();
    for (a, b) in on_blocks.out.iter().zip(&on_values.out) {
        prop_assert!(a == b || (a - b).abs() <= 1e-12 * (1.0 + b.abs()), "reference on blocks {a} vs on their values {b}");
    }
    for isa in Isa::available() {
        let got = run_q8_0(&RunConfig { isa: Some(isa), threads: Some(threads) }, &case, &kv);
        check(&case, &got, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] q8_0, {threads} threads: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 2 + 1, ..ProptestConfig::default() })]

    /// Every option (masks, windows, softcap, bias, ALiBi, sinks, kv_lens) over q8_0 K and V.
    #[test]
    fn q8_0_kv_every_isa(spec in spec_strategy(Options::Any), d in 1..=5usize, dv in 1..=5usize, threads in 1..=2usize) {
        q8_0_every_isa(&q8_0_spec(spec, d, dv), false, threads)?;
    }

    /// Adversarial values and masks, and adversarial blocks (zero, subnormal and huge scales).
    #[test]
    fn q8_0_kv_adversarial(spec in spec_strategy(Options::Adversarial), d in prop_oneof![Just(2usize), Just(4), 1..=8usize]) {
        q8_0_every_isa(&q8_0_spec(spec, d, d), true, 1)?;
    }

    /// Decode shapes: the few-rows and row-tile decode kernels reading q8_0 rows in place, with
    /// several threads so the key partitions merge.
    #[test]
    fn q8_0_kv_decode(b in 1..=2usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4), Just(8)], sq in 1..=4usize,
                      skv in prop_oneof![1..=40usize, 200..=3000usize], d in prop_oneof![Just(2usize), Just(4), 1..=5usize],
                      seed in any::<u64>(), threads in 1..=3usize) {
        let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, 32);
        spec.causal = seed % 3 == 0;
        spec.seed = seed;
        q8_0_every_isa(&q8_0_spec(spec, d, d), seed % 5 == 0, threads)?;
    }

    /// A paged q8_0 pool (token-major pages in shuffled order, a garbage spare page), read in
    /// place, against the reference of the case.
    #[test]
    fn q8_0_kv_paged(b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4)], sq in 1..=3usize,
                     skv in 1..=300usize, d in 1..=4usize, page_size in prop_oneof![Just(1usize), Just(16), 1..=70usize], seed in any::<u64>()) {
        let spec = paged_spec(b, hkv, g, sq, skv, 32, seed);
        let spec = q8_0_spec(spec, d, d);
        let (case, kv) = q8_0_case(&spec, false);
        let nb = d; // blocks per row
        let pages_per_seq = skv.div_ceil(page_size);
        let num_pages = b * pages_per_seq + 1;
        let order = shuffled_pages(num_pages, seed);
        let ps = PageStrides { page: page_size * hkv * nb, head: nb, slot: hkv * nb };
        let garbage = BlockQ8_0 { d: f16::NAN, qs: [127; 32] };
        let (mut kp, mut vp) = (vec![garbage; num_pages * ps.page], vec![garbage; num_pages * ps.page]);
        let mut table = vec![-1i32; b * pages_per_seq];
        let lens = case.kv_lens.clone().unwrap();
        for bi in 0..b {
            for p in 0..lens[bi].div_ceil(page_size) {
                table[bi * pages_per_seq + p] = order[bi * pages_per_seq + p] as i32;
            }
            for j in 0..lens[bi] {
                let page = table[bi * pages_per_seq + j / page_size] as usize;
                for hk in 0..hkv {
                    let at = page * ps.page + hk * ps.head + (j % page_size) * ps.slot;
                    for (pool, (blocks, st)) in [(&mut kp, &kv[0]), (&mut vp, &kv[1])] {
                        let o = bi * st.batch + hk * st.head + j * st.seq;
                        pool[at..at + nb].copy_from_slice(&blocks[o..o + nb]);
                    }
                }
            }
        }
        let pages = PageTable { block_table: &table, pages_per_seq, page_size, num_pages };
        for isa in Isa::available() {
            let config = RunConfig { isa: Some(isa), threads: Some(2) };
            let mut out = vec![SENTINEL; case.out_len];
            let mut lse = vec![SENTINEL; b * hkv * g * sq];
            let request = Request::new(case.shape, case.tensor(&case.bufs, 0), PagedKv { k: &kp, v: &vp, k_strides: ps, v_strides: ps, pages }, TensorMut::new(&mut out, case.out_strides), case.params()).lse(&mut lse);
            run(&config, request).unwrap();
            check(&case, &Outcome { out, lse }, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] paged q8_0: {e}")))?;
        }
    }
}

/// A q8_0 tensor as ggml writes it, bytes in memory (a little-endian f16 scale, then 32 codes,
/// 34 bytes a block), is read in place: the library's block type is that layout, and every
/// ISA's block loads decode it exactly; the library's quantizer makes ggml's blocks.
#[test]
fn q8_0_ggml_bytes_are_read_in_place_on_every_isa() {
    assert_eq!((size_of::<BlockQ8_0>(), align_of::<BlockQ8_0>()), (34, 2));
    let mut rng = Rng::new(80);
    let n = 16;
    // Every code in every position over the blocks, scales from subnormal to f16's largest.
    let scales: Vec<f16> = (0..n).map(|i| [f16::from_bits(1), f16::from_f32(0.0123), f16::ONE, f16::MAX, f16::from_f32(-3.5), f16::ZERO][i % 6]).collect();
    let codes: Vec<[i8; 32]> = (0..n).map(|b| core::array::from_fn(|i| ((b * 32 + i) * 37 % 256) as u8 as i8)).collect();
    let mut bytes = Vec::new();
    for (d, qs) in scales.iter().zip(&codes) {
        bytes.extend_from_slice(&d.to_bits().to_le_bytes());
        bytes.extend(qs.iter().map(|&q| q as u8));
    }
    // A 2-byte aligned buffer holding those bytes, seen as blocks (ggml buffers are aligned).
    let mut backing = vec![0u16; bytes.len() / 2];
    for (w, pair) in backing.iter_mut().zip(bytes.chunks_exact(2)) {
        *w = u16::from_ne_bytes([pair[0], pair[1]]);
    }
    // SAFETY: BlockQ8_0 is repr(C) of an f16 and 32 i8 (34 bytes, align 2, every bit pattern
    // valid); the buffer holds `n` blocks' bytes at 2-byte alignment.
    let blocks: &[BlockQ8_0] = unsafe { core::slice::from_raw_parts(backing.as_ptr().cast::<BlockQ8_0>(), n) };
    let want: Vec<f32> = (0..n * 32).map(|i| scales[i / 32].to_f32() * codes[i / 32][i % 32] as f32).collect();
    for (i, &w) in want.iter().enumerate() {
        assert_eq!(Element::value(blocks, i).to_bits(), w.to_bits(), "value {i}");
    }
    let mut checked = 0;
    for isa in Isa::available() {
        let Some(got) = simd_attn::selftest::widen_q8_0(isa, blocks) else { continue };
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "[{isa}] load_q8_0s value {i}: {g} vs {w}");
        }
        checked += 1;
    }
    assert!(checked >= 1, "no ISA ran the q8_0 loads");
    for _ in 0..50 {
        let x: [f32; 32] = core::array::from_fn(|_| rng.uniform() * 10f32.powi(rng.below(7) as i32 - 3));
        let (ours, _) = ggml_q8_0(&x, &mut rng, false);
        assert_eq!(BlockQ8_0::quantize(&x), ours[0], "library quantizer vs ggml's definition on {x:?}");
    }
}

/// q8_0 calls that do not fit are rejected before anything is written: head dims that are not
/// whole blocks, a tensor short of a block, other scores than the dot family.
#[test]
fn q8_0_bad_calls_are_rejected() {
    let shape = AttentionShape::new(1, 2, 2, 1, 4, 64);
    let [qs, _, _, os] = shape.bhsd_strides();
    let bs = Strides::new(2 * 4 * 2, 4 * 2, 2);
    let q = vec![0.5f32; 2 * 64];
    let blocks = vec![BlockQ8_0 { d: f16::ONE, qs: [1; 32] }; 16];
    let mut out = vec![SENTINEL; 2 * 64];
    let call = |shape: &AttentionShape, kv: &[BlockQ8_0], params: AttentionParams<'_>, out: &mut [f32]| {
        attention(shape, TensorRef::new(&q, qs), TensorRef::new(kv, bs), TensorRef::new(kv, bs), TensorMut::new(out, os), None, &params).map(|_| ())
    };
    let odd = AttentionShape::new(1, 2, 2, 1, 4, 48);
    assert!(matches!(call(&odd, &blocks, AttentionParams::new(), &mut out), Err(AttnError::Unsupported { .. })));
    assert!(matches!(call(&shape, &blocks[..15], AttentionParams::new(), &mut out), Err(AttnError::BufferTooSmall { tensor: TensorName::K, needed: 16, len: 15 })));
    assert!(matches!(call(&shape, &blocks, AttentionParams::new().score(Score::Cosine { temperature: 1.0 }), &mut out), Err(AttnError::UnsupportedScore { .. })));
    assert!(out.iter().all(|&x| x == SENTINEL), "an error left the output untouched");
    call(&shape, &blocks, AttentionParams::new(), &mut out).unwrap();
    // Every value is 1: the output is the mean of V's rows, 1.
    assert!(out.iter().all(|&x| x == 1.0), "{out:?}");
}

// ---- K and V of different storage types: q8_0 with f16, both ways ----

/// One side of a mixed cache: its storage, strides and offset of row 0.
struct Side<T> {
    data: Vec<T>,
    strides: Strides,
    off: usize,
}

impl<T> Side<T> {
    fn tensor(&self) -> TensorRef<'_, T> {
        TensorRef::new(&self.data[self.off..], self.strides)
    }
}

/// A case whose K (`q8_k`) or V is ggml q8_0 blocks and the other f16: the case's f32 buffers
/// become exactly the stored values (blocks' values; f16-rounded values), so the reference on
/// the case is the literal dequantization. With `factors` both sides also carry a per-tensor
/// factor (powers of two, so `factor * value` stays exact) which the case's values include.
fn mixed_case(spec: &Spec, q8_k: bool, adversarial: bool, factors: Option<(f32, f32)>) -> (Case, Side<BlockQ8_0>, Side<f16>) {
    let mut case = Case::build(spec);
    case.round_to::<f16>();
    let mut rng = Rng::new(spec.seed ^ 0x3a7f);
    let (qw, hw) = if q8_k { (1, 2) } else { (2, 1) };
    let (bi, off, st) = case.views[qw];
    assert_eq!(off, 0);
    let (blocks, values) = ggml_q8_0(&case.bufs[bi], &mut rng, adversarial);
    case.bufs[bi] = values;
    let q8 = Side { data: blocks, strides: Strides::new(st.batch / 32, st.head / 32, st.seq / 32), off: 0 };
    let (bh, hoff, hst) = case.views[hw];
    let half = Side { data: case.bufs[bh].iter().map(|&x| f16::from_f32(x)).collect(), strides: hst, off: hoff };
    if let Some((fk, fv)) = factors {
        let (fq, fh) = if q8_k { (fk, fv) } else { (fv, fk) };
        case.bufs[bi].iter_mut().for_each(|x| *x *= fq);
        case.bufs[bh].iter_mut().for_each(|x| *x *= fh);
    }
    (case, q8, half)
}

/// The spec with the q8_0 side's head dim whole blocks (`blocks`) and the f16 side's any
/// (`other`), in a layout whose q8_0 strides are whole blocks.
fn mixed_spec(mut spec: Spec, q8_k: bool, blocks: usize, other: usize) -> Spec {
    (spec.head_dim, spec.v_head_dim) = if q8_k { (32 * blocks, other) } else { (other, 32 * blocks) };
    spec.layout = if spec.seed % 2 == 0 { Layout::Bhsd } else { Layout::Bshd };
    spec
}

fn mixed_params<'a>(case: &'a Case, factors: Option<(f32, f32)>) -> AttentionParams<'a> {
    match factors {
        Some((fk, fv)) => case.params().kv_scales(Dequant::Tensor(fk), Dequant::Tensor(fv)),
        None => case.params(),
    }
}

/// Runs a mixed case through `attention`'s request on every ISA, strided.
fn mixed_every_isa(spec: &Spec, q8_k: bool, adversarial: bool, threads: usize, factors: Option<(f32, f32)>) -> Result<(), TestCaseError> {
    let (case, q8, half) = mixed_case(spec, q8_k, adversarial, factors);
    let params = mixed_params(&case, factors);
    // The reference on the stored types dequantizes literally: it agrees with the reference on
    // their values as f32 tensors.
    let on_storage = if q8_k {
        Reference::new(&case.shape, case.tensor(&case.bufs, 0), q8.tensor(), half.tensor(), &params).unwrap().compute()
    } else {
        Reference::new(&case.shape, case.tensor(&case.bufs, 0), half.tensor(), q8.tensor(), &params).unwrap().compute()
    };
    let on_values = case.reference().compute();
    for (a, b) in on_storage.out.iter().zip(&on_values.out) {
        prop_assert!(a == b || (a - b).abs() <= 1e-12 * (1.0 + b.abs()), "reference on storage {a} vs on its values {b}");
    }
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(threads) };
        let mut out = vec![SENTINEL; case.out_len];
        let mut lse = vec![SENTINEL; case.shape.batch * case.shape.q_heads * case.shape.seq_q];
        let (q, o) = (case.tensor(&case.bufs, 0), TensorMut::new(&mut out, case.out_strides));
        let request = if q8_k { Request::new(case.shape, q, (q8.tensor(), half.tensor()), o, params) } else { Request::new(case.shape, q, (half.tensor(), q8.tensor()), o, params) };
        let request = if case.spec.lse { request.lse(&mut lse) } else { request };
        let info = run(&config, request).expect("generated problems are valid");
        prop_assert_eq!(info.isa, isa);
        let which = if q8_k { "q8_0 K, f16 V" } else { "f16 K, q8_0 V" };
        check(&case, &Outcome { out, lse }, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] {which}, {threads} threads, factors {factors:?}: {e}")))?;
    }
    Ok(())
}

fn factors_of(seed: u64) -> Option<(f32, f32)> {
    (seed % 3 == 0).then_some((0.5, 2.0))
}

/// The mixed pairs these properties cover are the library's whole list: a new pair needs its
/// tests here.
#[test]
fn mixed_kv_pairs_are_the_tested_ones() {
    assert_eq!(simd_attn::element::MIXED_KV_PAIRS, &[(DType::Q8_0, DType::F16), (DType::F16, DType::Q8_0)]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 2 + 1, ..ProptestConfig::default() })]

    /// Every option over q8_0 K with f16 V and the reverse, both head dims drawn.
    #[test]
    fn mixed_kv_every_isa(spec in spec_strategy(Options::Any), q8_k in any::<bool>(), blocks in 1..=5usize, other in 1..=160usize, threads in 1..=2usize) {
        let factors = factors_of(spec.seed);
        mixed_every_isa(&mixed_spec(spec, q8_k, blocks, other), q8_k, false, threads, factors)?;
    }

    /// Adversarial values and masks, and adversarial q8_0 blocks.
    #[test]
    fn mixed_kv_adversarial(spec in spec_strategy(Options::Adversarial), q8_k in any::<bool>(), blocks in prop_oneof![Just(2usize), Just(4), 1..=8usize]) {
        mixed_every_isa(&mixed_spec(spec, q8_k, blocks, 32 * blocks), q8_k, true, 1, None)?;
    }

    /// Decode shapes (the few-rows and row-tile decode kernels, key partitions merged across
    /// threads), at the specialised head dims too.
    #[test]
    fn mixed_kv_decode(b in 1..=2usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4), Just(8)], sq in 1..=4usize,
                       skv in prop_oneof![1..=40usize, 200..=3000usize], blocks in prop_oneof![Just(2usize), Just(4), 1..=5usize],
                       q8_k in any::<bool>(), seed in any::<u64>(), threads in 1..=3usize) {
        let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, 32);
        spec.causal = seed % 3 == 1;
        spec.seed = seed;
        mixed_every_isa(&mixed_spec(spec, q8_k, blocks, 32 * blocks), q8_k, seed % 5 == 0, threads, factors_of(seed))?;
    }

    /// A paged pool of q8_0 K and f16 V pages (or the reverse), token-major pages in shuffled
    /// order with a garbage spare page, read in place.
    #[test]
    fn mixed_kv_paged(b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4)], sq in 1..=3usize,
                      skv in 1..=300usize, blocks in 1..=4usize, other in 1..=130usize, q8_k in any::<bool>(),
                      page_size in prop_oneof![Just(1usize), Just(16), 1..=70usize], seed in any::<u64>()) {
        let spec = paged_spec(b, hkv, g, sq, skv, 32, seed);
        let spec = mixed_spec(spec, q8_k, blocks, other);
        let (case, q8, half) = mixed_case(&spec, q8_k, false, None);
        let pages_per_seq = skv.div_ceil(page_size);
        let num_pages = b * pages_per_seq + 1;
        let order = shuffled_pages(num_pages, seed);
        let lens = case.kv_lens.clone().unwrap();
        let mut table = vec![-1i32; b * pages_per_seq];
        for bi in 0..b {
            for p in 0..lens[bi].div_ceil(page_size) {
                table[bi * pages_per_seq + p] = order[bi * pages_per_seq + p] as i32;
            }
        }
        // Each side's rows copied into its own pool (`width` storage units a row).
        let pool = |width: usize| PageStrides { page: page_size * hkv * width, head: width, slot: hkv * width };
        fn paged<T: Copy>(side: &Side<T>, width: usize, ps: PageStrides, garbage: T, num_pages: usize, table: &[i32], pages_per_seq: usize, page_size: usize, lens: &[usize], hkv: usize) -> Vec<T> {
            let mut pool = vec![garbage; num_pages * ps.page];
            for (bi, &len) in lens.iter().enumerate() {
                for j in 0..len {
                    let page = table[bi * pages_per_seq + j / page_size] as usize;
                    for hk in 0..hkv {
                        let at = page * ps.page + hk * ps.head + (j % page_size) * ps.slot;
                        let o = side.off + bi * side.strides.batch + hk * side.strides.head + j * side.strides.seq;
                        pool[at..at + width].copy_from_slice(&side.data[o..o + width]);
                    }
                }
            }
            pool
        }
        let (qd, hd) = if q8_k { (spec.head_dim / 32, spec.v_head_dim) } else { (spec.v_head_dim / 32, spec.head_dim) };
        let (qps, hps) = (pool(qd), pool(hd));
        let qpool = paged(&q8, qd, qps, BlockQ8_0 { d: f16::NAN, qs: [127; 32] }, num_pages, &table, pages_per_seq, page_size, &lens, hkv);
        let hpool = paged(&half, hd, hps, f16::NAN, num_pages, &table, pages_per_seq, page_size, &lens, hkv);
        let pages = PageTable { block_table: &table, pages_per_seq, page_size, num_pages };
        for isa in Isa::available() {
            let config = RunConfig { isa: Some(isa), threads: Some(2) };
            let mut out = vec![SENTINEL; case.out_len];
            let mut lse = vec![SENTINEL; b * hkv * g * sq];
            let (q, o) = (case.tensor(&case.bufs, 0), TensorMut::new(&mut out, case.out_strides));
            let request = if q8_k {
                Request::new(case.shape, q, PagedKv { k: &qpool, v: &hpool, k_strides: qps, v_strides: hps, pages }, o, case.params())
            } else {
                Request::new(case.shape, q, PagedKv { k: &hpool, v: &qpool, k_strides: hps, v_strides: qps, pages }, o, case.params())
            };
            run(&config, request.lse(&mut lse)).unwrap();
            check(&case, &Outcome { out, lse }, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] paged mixed (q8_0 K: {q8_k}): {e}")))?;
        }
    }
}

/// Mixed pairs through every other entry: the workspace and host-plan entries take a request
/// too, and a q8_0 side whose head dim is not whole blocks is refused naming that side.
#[test]
fn mixed_kv_entries_and_errors() {
    let mut spec = Spec::plain(1, 4, 2, 3, 70, 64);
    spec.v_head_dim = 40;
    spec.seed = 11;
    spec.lse = false;
    let (case, q8, half) = mixed_case(&spec, true, false, None);
    let want = {
        let mut out = vec![SENTINEL; case.out_len];
        run(&RunConfig::default(), Request::new(case.shape, case.tensor(&case.bufs, 0), (q8.tensor(), half.tensor()), TensorMut::new(&mut out, case.out_strides), case.params())).unwrap();
        // No lse asked for (the spec says so): `check` sees every one still the sentinel.
        let lse = vec![SENTINEL; case.shape.batch * case.shape.q_heads * case.shape.seq_q];
        check(&case, &Outcome { out: out.clone(), lse }, 0.0).unwrap();
        out
    };
    let mut ws = Workspace::new();
    let mut out = vec![SENTINEL; case.out_len];
    attention_in(&mut ws, &RunConfig::default(), &case.shape, case.tensor(&case.bufs, 0), q8.tensor(), half.tensor(), TensorMut::new(&mut out, case.out_strides), None, &case.params()).unwrap();
    assert_eq!(out, want, "workspace entry");
    let mut out = vec![SENTINEL; case.out_len];
    let plan = HostPlan::from_request(&RunConfig::default(), Request::new(case.shape, case.tensor(&case.bufs, 0), (q8.tensor(), half.tensor()), TensorMut::new(&mut out, case.out_strides), case.params()), 2).unwrap();
    let mut workspaces = vec![vec![0.0f32; plan.workspace_len()]; 2];
    std::thread::scope(|s| {
        for (ith, w) in workspaces.iter_mut().enumerate() {
            let plan = &plan;
            s.spawn(move || plan.run(ith, w).unwrap());
        }
    });
    if plan.needs_merge() {
        for (ith, w) in workspaces.iter_mut().enumerate() {
            plan.merge(ith, w).unwrap();
        }
    }
    drop(plan);
    assert_eq!(out, want, "host plan");
    // V as q8_0 with a v_head_dim of 40: not whole blocks.
    let bad_shape = AttentionShape { v_head_dim: 40, head_dim: 40, ..case.shape };
    let v_blocks = vec![BlockQ8_0::default(); 1 << 12];
    let k_half = vec![f16::ZERO; 1 << 14];
    let mut out = vec![SENTINEL; 1 << 12];
    let [qs, ks, _, os] = bad_shape.bhsd_strides();
    let err = run(&RunConfig::default(), Request::new(bad_shape, TensorRef::new(&case.bufs[0], qs), (TensorRef::new(&k_half, ks), TensorRef::new(&v_blocks, Strides::new(0, 0, 1))), TensorMut::new(&mut out, os), AttentionParams::new())).unwrap_err();
    assert!(err.to_string().contains("q8_0 V cache"), "{err}");
    assert!(out.iter().all(|&x| x == SENTINEL));
}
