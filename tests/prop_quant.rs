//! Quantized K/V caches: int8 codes with dequantization factors per tensor, per KV head or per
//! (token, KV head), strided, packed or paged, on every ISA, against the f64 reference.
//!
//! The quantizer below is this test's own: symmetric, `code = round(x / f)` clamped to
//! `-127..=127`, with `f` rounded to 16 significant bits so that every `f * code` (8 bits
//! times 16) is exact in f32. The case's f32 buffers then hold exactly the dequantized values,
//! so the reference on them is the literal dequantization, and the tolerance stays the f32
//! arithmetic bound: a quantization error never enters the comparison. Adversarial rows get a
//! factor of 0 (random codes that must not count), a tiny one (2^-60) or a huge one (2^30).

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use common::Rng;
use simd_attn::*;

/// Which factors a quantized tensor carries.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Tensor,
    Head,
    /// Per (token, KV head), `[B, Hkv, S]` (`token_major`: `[B, S, Hkv]`).
    Token { token_major: bool },
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        1 => Just(Mode::Tensor),
        1 => Just(Mode::Head),
        3 => any::<bool>().prop_map(|token_major| Mode::Token { token_major }),
    ]
}

/// `x` rounded toward zero to 16 significant bits.
fn sig16(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & !0xff)
}

/// One quantized tensor of a case: the codes (laid out like the case's f32 buffer) and the
/// factors.
struct Quantized {
    codes: Vec<i8>,
    /// One per tensor, per KV head, or per (b, hk, j) at `strides`.
    factors: Vec<f32>,
    strides: Strides,
    mode: Mode,
}

impl Quantized {
    fn dequant(&self) -> Dequant<'_> {
        match self.mode {
            Mode::Tensor => Dequant::Tensor(self.factors[0]),
            Mode::Head => Dequant::Head(&self.factors),
            Mode::Token { .. } => Dequant::Token(&self.factors, self.strides),
        }
    }
}

/// Quantizes tensor `which` (1 = K, 2 = V) of `case` in place: its f32 rows become the
/// dequantized values, and the codes and factors are returned; a huge factor is about
/// `2^huge`. Rows of one tensor that share
/// memory (a batch stride of 0) get the same codes and factors.
fn quantize(case: &mut Case, which: usize, mode: Mode, seed: u64, huge: i32) -> Quantized {
    let s = case.shape;
    let (bi, off, st) = case.views[which];
    let width = if which == 1 { s.head_dim } else { s.v_head_dim };
    let (b_n, hkv, skv) = (s.batch, s.kv_heads, s.seq_kv);
    let row_at = |b: usize, hk: usize, j: usize| off + b * st.batch + hk * st.head + j * st.seq;
    let amax = |rows: &mut dyn Iterator<Item = usize>, buf: &[f32]| rows.fold(0.0f32, |a, o| buf[o..o + width].iter().fold(a, |a, x| a.max(x.abs())));
    let fit = |m: f32| if m > 0.0 { sig16(m / 127.0) } else { 1.0 };
    // Factor strides: batch stride 0 where K/V are shared by every batch entry.
    let bstride = |n: usize| if st.batch == 0 { 0 } else { n };
    let strides = match mode {
        Mode::Token { token_major: false } => Strides::new(bstride(hkv * skv), skv, 1),
        Mode::Token { token_major: true } => Strides::new(bstride(hkv * skv), 1, hkv),
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
    let mut codes = vec![0i8; case.bufs[bi].len()];
    for b in 0..b_n {
        for hk in 0..hkv {
            for j in 0..skv {
                let o = row_at(b, hk, j);
                // Adversarial rows, chosen by address so shared rows choose alike.
                let mut rng = Rng::new(seed ^ (o as u64).wrapping_mul(0x9E37_79B9) ^ which as u64);
                let f = match mode {
                    Mode::Tensor => factors[0],
                    Mode::Head => factors[hk],
                    Mode::Token { .. } => {
                        let f = match rng.below(20) {
                            0 => 0.0,
                            1 => sig16(2f32.powi(-60) * (1.0 + rng.uniform().abs())),
                            2 => sig16(2f32.powi(huge) * (1.0 + rng.uniform().abs())),
                            _ => fit(amax(&mut core::iter::once(o), &case.bufs[bi])),
                        };
                        factors[b * strides.batch + hk * strides.head + j * strides.seq] = f;
                        f
                    }
                };
                let adversarial = matches!(mode, Mode::Token { .. }) && (f == 0.0 || f < 1e-10 || f > 1e8);
                for t in 0..width {
                    let x = case.bufs[bi][o + t];
                    let c = if adversarial { (rng.below(255) as i32 - 127) as i8 } else { (x / f).round().clamp(-127.0, 127.0) as i8 };
                    codes[o + t] = c;
                    case.bufs[bi][o + t] = f * c as f32;
                }
            }
        }
    }
    Quantized { codes, factors, strides, mode }
}

/// A case with K and V quantized; `round` runs first (rounding Q and out's values to their
/// storage). Huge V factors stay small enough (2^8 x 127) for an f16 output when `f16_out`.
fn quantized_case(spec: &Spec, k_mode: Mode, v_mode: Mode, seed: u64, f16_out: bool, round: impl Fn(&mut Case)) -> (Case, Quantized, Quantized) {
    let mut case = Case::build(spec);
    round(&mut case);
    let k = quantize(&mut case, 1, k_mode, seed, 30);
    let v = quantize(&mut case, 2, v_mode, seed.wrapping_add(1), if f16_out { 8 } else { 30 });
    (case, k, v)
}

/// Runs the int8 call of a quantized case with Q and out stored as `TQ` / `TO`.
fn run_i8<TQ: FloatElement, TO: FloatElement>(config: &RunConfig, case: &Case, k: &Quantized, v: &Quantized) -> Outcome {
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

fn every_isa<TQ: FloatElement, TO: FloatElement>(spec: &Spec, k_mode: Mode, v_mode: Mode, seed: u64, store_eps: f64) -> Result<(), TestCaseError> {
    let (case, k, v) = quantized_case(spec, k_mode, v_mode, seed, TO::DTYPE == DType::F16, |c| c.round_for::<TQ, f32, TO>());
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(1) };
        let got = run_i8::<TQ, TO>(&config, &case, &k, &v);
        check(&case, &got, store_eps).map_err(|e| TestCaseError::fail(format!("[{isa}] K {k_mode:?} V {v_mode:?}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 2 + 1, ..ProptestConfig::default() })]

    #[test]
    fn int8_kv_every_isa(spec in spec_strategy(Options::Any), k_mode in mode(), v_mode in mode(), seed in any::<u64>()) {
        every_isa::<f32, f32>(&spec, k_mode, v_mode, seed, 0.0)?;
    }

    #[test]
    fn int8_kv_adversarial(spec in spec_strategy(Options::Adversarial), seed in any::<u64>()) {
        let token = Mode::Token { token_major: seed % 2 == 0 };
        every_isa::<f32, f32>(&spec, token, token, seed, 0.0)?;
    }

    #[test]
    fn int8_kv_16_bit_q_and_out(spec in spec_strategy(Options::One), k_mode in mode(), v_mode in mode(), seed in any::<u64>()) {
        every_isa::<bf16, f16>(&spec, k_mode, v_mode, seed, 1.0 / 2048.0)?;
        every_isa::<f16, bf16>(&spec, k_mode, v_mode, seed, 1.0 / 256.0)?;
    }

    /// Decode shapes (one to a few new tokens per sequence, GQA): the few-rows and row-tile
    /// decode kernels, with several threads so the key partitions merge.
    #[test]
    fn int8_kv_decode(b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4), Just(8)], sq in 1..=4usize,
                      skv in prop_oneof![1..=40usize, 200..=3000usize], d in prop_oneof![Just(64usize), Just(128), 1..=96usize],
                      k_mode in mode(), v_mode in mode(), seed in any::<u64>(), threads in 1..=3usize) {
        let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, d);
        spec.causal = seed % 3 == 0;
        spec.seed = seed;
        spec.layout = if seed % 2 == 0 { Layout::Bshd } else { Layout::Bhsd };
        let (case, k, v) = quantized_case(&spec, k_mode, v_mode, seed, false, |_| {});
        for isa in Isa::available() {
            let got = run_i8::<f32, f32>(&RunConfig { isa: Some(isa), threads: Some(threads) }, &case, &k, &v);
            check(&case, &got, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] {threads} threads: {e}")))?;
        }
    }

    /// Packed variable-length keys (`cu_seqlens_k`): per-token factors found through the same
    /// token offsets as K and V.
    #[test]
    fn int8_kv_packed(lens in proptest::collection::vec(0..=60usize, 1..=3), hkv in 1..=2usize, g in 1..=3usize,
                      d in prop_oneof![Just(64usize), 1..=40usize], seed in any::<u64>()) {
        packed(&lens, hkv, g, d, seed)?;
    }

    /// A paged int8 cache with paged per-token factors, read in place, and the same cache as
    /// strided tensors: each within the bound of the reference.
    #[test]
    fn int8_kv_paged(b in 1..=3usize, hkv in 1..=2usize, g in prop_oneof![Just(1usize), Just(4)], sq in 1..=3usize,
                     skv in 1..=300usize, d in prop_oneof![Just(64usize), Just(128), 1..=40usize],
                     page_size in prop_oneof![Just(1usize), Just(16), 1..=70usize], seed in any::<u64>()) {
        paged(b, hkv, g, sq, skv, d, page_size, seed)?;
    }
}

/// Packed keys: `lens[b]` keys per sequence, tokens `[T, Hkv, D]`, factors `[T, Hkv]`.
fn packed(lens: &[usize], hkv: usize, g: usize, d: usize, seed: u64) -> Result<(), TestCaseError> {
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
    let (k_codes, v_codes): (Vec<i8>, Vec<i8>) = ((0..n).map(|_| (rng.below(255) as i32 - 127) as i8).collect(), (0..n).map(|_| (rng.below(255) as i32 - 127) as i8).collect());
    let factor = |rng: &mut Rng| if rng.below(10) == 0 { 0.0 } else { sig16(0.01 * (1.0 + rng.uniform().abs())) };
    let (kf, vf): (Vec<f32>, Vec<f32>) = ((0..tokens * hkv).map(|_| factor(&mut rng)).collect(), (0..tokens * hkv).map(|_| factor(&mut rng)).collect());
    let tok = Strides::new(0, d, hkv * d);
    let ftok = Strides::new(0, 1, hkv);
    let [qs, _, _, os] = shape.bhsd_strides();
    let params = AttentionParams::new().cu_seqlens_k(&cu).causal(seed % 2 == 0).kv_scales(Dequant::Token(&kf, ftok), Dequant::Token(&vf, ftok));
    let want = Reference::new(&shape, TensorRef::new(&q, qs), TensorRef::new(&k_codes, tok), TensorRef::new(&v_codes, tok), &params).unwrap().compute();
    // The same call on dequantized f32 tensors: the reference's literal factors agree.
    let deq = |codes: &[i8], f: &[f32]| -> Vec<f32> { codes.iter().enumerate().map(|(i, &c)| f[i / d] * c as f32).collect() };
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
            // |v| <= 127 * 0.02; a wrong factor or token moves a row by about that much.
            let tol = 1e-4 * 127.0 * 0.02;
            for (&x, &y) in g.iter().zip(w) {
                prop_assert!((x as f64 - y).abs() <= tol, "[{isa}] row {r}: {x} vs reference {y}");
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn paged(b: usize, hkv: usize, g: usize, sq: usize, skv: usize, d: usize, page_size: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut spec = Spec::plain(b, hkv * g, hkv, sq, skv, d);
    spec.seed = seed;
    spec.causal = seed % 2 == 1;
    spec.kv_lens = Some((0..b).map(|i| if i == 0 { skv } else { (seed as usize >> (4 * i)) % (skv + 1) }).collect());
    let tm = Mode::Token { token_major: false };
    let (case, k, v) = quantized_case(&spec, tm, tm, seed, false, |_| {});
    // Pool: token-major pages [num_pages, page_size, Hkv, D], factors [num_pages, page_size, Hkv],
    // pages in a shuffled order, one spare page filled with garbage.
    let pages_per_seq = skv.div_ceil(page_size);
    let num_pages = b * pages_per_seq + 1;
    let mut order: Vec<usize> = (0..num_pages).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let ps = PageStrides { page: page_size * hkv * d, head: d, slot: hkv * d };
    let fs = PageStrides { page: page_size * hkv, head: 1, slot: hkv };
    let (mut kp, mut vp) = (vec![127i8; num_pages * ps.page], vec![-128i8; num_pages * ps.page]);
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
        let strided = run_i8::<f32, f32>(&config, &case, &k, &v);
        check(&case, &strided, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] strided: {e}")))?;
        let q = case.tensor(&case.bufs, 0);
        let mut out = vec![SENTINEL; case.out_len];
        let mut lse = vec![SENTINEL; b * hkv * g * sq];
        let params = case.params().kv_scales(Dequant::PagedToken(&kfp, fs), Dequant::PagedToken(&vfp, fs));
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
    let pst = PageStrides { page: 4, head: 1, slot: 2 };
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::PagedToken(&ok, pst), Dequant::Tensor(1.0))), Err(AttnError::Unsupported { .. })));
    assert!(matches!(call(&mut out, AttentionParams::new().kv_scales(Dequant::Token(&ok, bhs), Dequant::Token(&ok, bhs)).score(Score::Cosine { temperature: 1.0 })), Err(AttnError::UnsupportedScore { .. })));
    assert!(matches!(call(&mut out, AttentionParams::new().score(Score::Cosine { temperature: 1.0 })), Err(AttnError::UnsupportedScore { .. })));
    assert!(out.iter().all(|&x| x == SENTINEL), "an error left the output untouched");
    call(&mut out, AttentionParams::new().kv_scales(Dequant::Token(&ok, bhs), Dequant::Head(&[0.5, 2.0]))).unwrap();
    assert!(out.iter().all(|&x| x != SENTINEL));
}
