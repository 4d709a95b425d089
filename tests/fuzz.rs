//! A structured random fuzzer over the C descriptor and the Rust API, on the stable toolchain.
//!
//! Each case is a whole call drawn at random: dims from 0 and 1 up to values near the integer
//! limits, strides contiguous, broadcast (0), random, negative or huge, every dtype, every
//! option with valid and invalid values, inputs with adversarial values, buffers exactly as
//! long as the descriptor claims (or one short, or NULL) between guard regions. Every case runs
//! through `simd_attn_forward`, and as it allows through `simd_attn_reference`, the host-plan
//! entries, `attention_in` and `simd_attn_merge_partials`, on each forced ISA in turn.
//! Asserted: no crash, hang, abort or internal error; guard regions intact; outputs bitwise
//! untouched on every error; on small valid cases with moderate values, forward equal to the
//! reference within rounding, and host plans and `attention_in` bitwise equal to forward.
//!
//! `SIMD_ATTN_FUZZ_SECS` (seconds per ISA, default 2), `SIMD_ATTN_FUZZ_ISA` (one path
//! only), `SIMD_ATTN_FUZZ_SEED`; a failure prints the seed and case number that reproduce it
//! (`SIMD_ATTN_FUZZ_CASE` runs that case alone).
//!
//! `SIMD_ATTN_FUZZ_SECS=600 cargo test --release --test fuzz -- --nocapture` fuzzes each path
//! for ten minutes.

use half::{bf16, f16};
use simd_attn::capi::*;
use simd_attn::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const OK: i32 = 0;
const INTERNAL: i32 = 27;
/// Largest buffer a case allocates (elements); larger reaches get a short buffer instead.
const CAP: usize = 1 << 16;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

const EDGES: [usize; 9] = [0, 1, (1 << 31) - 1, 1 << 32, 1 << 40, (1 << 61) - 1, 1 << 62, i64::MAX as usize, usize::MAX];

fn dim(rng: &mut Rng, small: u64) -> usize {
    match rng.below(100) {
        0..=74 => rng.below(small + 1) as usize,
        75..=89 => 5 + rng.below(36) as usize,
        90..=94 => rng.pick(&[16, 64, 96, 128, 130]),
        _ => rng.pick(&EDGES),
    }
}

/// A buffer between guard regions, 8-byte aligned (or deliberately misaligned by one byte).
struct Buf {
    raw: Vec<u64>,
    start: usize,
    bytes: usize,
}

const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xa5;

impl Buf {
    fn new(bytes: usize, misalign: bool) -> Buf {
        let words = (GUARD * 2 + bytes + 16).div_ceil(8);
        let mut b = Buf { raw: vec![0; words], start: GUARD + usize::from(misalign), bytes };
        b.all_mut().fill(GUARD_BYTE);
        b
    }
    fn all(&self) -> &[u8] {
        // SAFETY: plain bytes of an owned Vec<u64>.
        unsafe { core::slice::from_raw_parts(self.raw.as_ptr().cast::<u8>(), self.raw.len() * 8) }
    }
    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { core::slice::from_raw_parts_mut(self.raw.as_mut_ptr().cast::<u8>(), self.raw.len() * 8) }
    }
    fn ptr(&mut self) -> *mut u8 {
        let s = self.start;
        self.all_mut()[s..].as_mut_ptr()
    }
    fn data(&self) -> &[u8] {
        &self.all()[self.start..self.start + self.bytes]
    }
    fn guards_ok(&self) -> bool {
        let a = self.all();
        a[..self.start].iter().chain(&a[self.start + self.bytes..]).all(|&b| b == GUARD_BYTE)
    }
}

/// How a tensor's elements are filled.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
    /// Values in [-1, 1].
    Moderate,
    /// Moderate values with a sprinkling of 0, -0, huge, tiny, NaN and infinities.
    Adversarial,
}

fn value(rng: &mut Rng, fill: Fill) -> f32 {
    if fill == Fill::Adversarial && rng.chance(8) {
        return rng.pick(&[0.0, -0.0, 1e30, -1e30, 1e-40, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 65504.0, 7e4]);
    }
    rng.unit()
}

/// Elements `len` of `dtype` (0 f32, 1 f16, 2 bf16, 3 int8 codes, 4 / 5 fp8 E4M3 / E5M2
/// codes, 6 ggml q8_0 blocks of 34 bytes), filled.
fn tensor_buf(rng: &mut Rng, dtype: i32, len: usize, fill: Fill, misalign: bool) -> Buf {
    let size = match dtype {
        1 | 2 => 2,
        3..=5 => 1,
        6 => 34,
        _ => 4,
    };
    let mut b = Buf::new(len * size, misalign);
    let s = b.start;
    let data = &mut b.all_mut()[s..s + len * size];
    for e in data.chunks_exact_mut(size) {
        let x = value(rng, fill);
        if dtype == 6 {
            // A block: the scale from the fill (adversarial ones reach inf, NaN, subnormals),
            // then 32 random codes.
            e[..2].copy_from_slice(&f16::from_f32(x * 0.05).to_bits().to_ne_bytes());
            for c in &mut e[2..] {
                *c = rng.below(256) as u8;
            }
        } else if dtype == 3 {
            e[0] = (x * 8.0).round().clamp(-128.0, 127.0) as i8 as u8;
        } else if dtype == 4 {
            // Adversarial fills reach the NaN codes (0x7f, 0xff) through NaN and infinity.
            e[0] = simd_attn::F8E4M3::from_f32(x).0;
        } else if dtype == 5 {
            e[0] = simd_attn::F8E5M2::from_f32(x).0;
        } else if dtype == 2 {
            e.copy_from_slice(&bf16::from_f32(x).to_bits().to_ne_bytes());
        } else if size == 2 {
            e.copy_from_slice(&f16::from_f32(x).to_bits().to_ne_bytes());
        } else {
            e.copy_from_slice(&x.to_ne_bytes());
        }
    }
    b
}

/// One past the highest index `dims` (size, stride) reach with `inner` contiguous elements,
/// `None` on overflow, 0 when any size is 0.
fn reach(dims: &[(usize, usize)], inner: usize) -> Option<usize> {
    if inner == 0 || dims.iter().any(|&(n, _)| n == 0) {
        return Some(0);
    }
    dims.iter().try_fold(inner, |acc, &(n, s)| acc.checked_add((n - 1).checked_mul(s)?))
}

/// Strides for a `[b, h, s, inner]` tensor: contiguous BHSD or BSHD, broadcast axes, random,
/// negative or huge. Returns the strides and the elements they reach (None: beyond CAP).
fn strides(rng: &mut Rng, (b, h, s): (usize, usize, usize), inner: usize, allow_zero: bool) -> ([i64; 3], Option<usize>) {
    let sat = |x: usize| x.min(i64::MAX as usize) as i64;
    let st: [i64; 3] = match rng.below(20) {
        0..=8 => {
            let seq = inner;
            let head = s.saturating_mul(inner);
            [sat(h.saturating_mul(head)), sat(head), sat(seq)]
        }
        9..=12 => {
            let head = inner;
            let seq = h.saturating_mul(inner);
            [sat(s.saturating_mul(seq)), sat(head), sat(seq)]
        }
        13..=15 if allow_zero => {
            let head = s.saturating_mul(inner);
            let mut st = [sat(h.saturating_mul(head)), sat(head), sat(inner)];
            st[rng.below(3) as usize] = 0;
            if rng.chance(30) {
                st = [0, 0, 0];
            }
            st
        }
        16..=17 => [rng.below(200) as i64, rng.below(100) as i64, rng.below(50) as i64],
        18 => [-1, 0, inner as i64],
        _ => [i64::MAX, rng.below(3) as i64, 1],
    };
    if st.iter().any(|&x| x < 0) {
        return (st, Some(1));
    }
    let dims = [(b, st[0] as usize), (h, st[1] as usize), (s, st[2] as usize)];
    (st, reach(&dims, inner).filter(|&n| n <= CAP))
}

/// The length a buffer gets for a reach: exactly it, or one short, or a small one when the
/// reach is beyond what a case allocates.
fn length(rng: &mut Rng, reach: Option<usize>) -> usize {
    match reach {
        Some(n) if rng.chance(95) => n,
        Some(n) => n.saturating_sub(1),
        None => rng.below(64) as usize,
    }
}

/// A drawn call: the descriptor and the buffers it points into.
struct Case {
    d: SimdAttnDesc,
    inputs: Vec<Buf>,
    outputs: Vec<Buf>,
    /// Small and valid-looking with moderate values: forward must match the reference.
    comparable: bool,
    /// Whether the call could be one with legitimately huge work (K/V broadcast over a huge
    /// sequence), which the fuzzer does not run.
    huge: bool,
    kv_lens: Vec<i64>,
    f32_only: bool,
}

fn draw_case(rng: &mut Rng) -> Case {
    let mut d = SimdAttnDesc::default_for_fuzz();
    let hkv = dim(rng, 3).max(usize::from(rng.chance(97)));
    let group = if rng.chance(90) { 1 + rng.below(4) as usize } else { dim(rng, 4) };
    d.batch = dim(rng, 3);
    d.kv_heads = hkv;
    d.q_heads = hkv.saturating_mul(group);
    if rng.chance(5) {
        d.q_heads = dim(rng, 8);
    }
    d.seq_q = dim(rng, 9);
    d.seq_kv = dim(rng, 40);
    d.head_dim = if rng.chance(85) { rng.pick(&[1, 2, 3, 4, 7, 8, 15, 16, 32, 33, 48, 64, 64, 96, 128, 128]) } else { dim(rng, 20) };
    d.v_head_dim = if rng.chance(80) { 0 } else if rng.chance(90) { rng.pick(&[1, 8, 16, 32, 64, 128]) } else { dim(rng, 20) };
    let dv = if d.v_head_dim == 0 { d.head_dim } else { d.v_head_dim };
    let dtype = |rng: &mut Rng| if rng.chance(98) { rng.below(3) as i32 } else { rng.pick(&[3, 4, 5, 6, -1, 7]) };
    let (qt, mut kt, ot) = (dtype(rng), dtype(rng), dtype(rng));
    // A quantized cache (3 int8, 4 / 5 fp8, 6 q8_0 are K/V dtypes only: for Q and out they
    // stay an unknown value). q8_0 rows are whole blocks: its head dims must be multiples of 32
    // (others are drawn too, to be rejected).
    if rng.chance(12) {
        kt = rng.pick(&[3, 3, 4, 5, 6, 6]);
    }
    // V as K, but now and then the mixed pairs (q8_0 K with f16 V, f16 K with q8_0 V) and
    // any other pair, to be refused.
    let vt = match kt {
        6 if rng.chance(30) => 1,
        1 if rng.chance(3) => 6,
        _ if rng.chance(95) => kt,
        _ => dtype(rng),
    };
    let fill = if rng.chance(70) { Fill::Moderate } else { Fill::Adversarial };
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let misalign = rng.chance(2);

    // The score first: it decides Q's width.
    let score = if rng.chance(80) { 0 } else { rng.pick(&[1, 2, 3, 4, 4, 5, -1]) };
    d.score = score;
    let q_dim = if score == 3 || (score == 4 && rng.chance(50)) { rng.pick(&[0, 1, 8, 16, 24]) } else { 0 };
    d.q_dim = q_dim;
    let q_cols = if (score == 3 || score == 4) && q_dim != 0 { q_dim } else { d.head_dim };

    let tensor = |rng: &mut Rng, dims: (usize, usize, usize), inner: usize, dt: i32, zero: bool| -> (SimdAttnTensor, Buf, Option<usize>) {
        let (st, r) = strides(rng, dims, inner, zero);
        let len = length(rng, r);
        let mut b = tensor_buf(rng, dt, len, fill, misalign);
        let null = len == 0 && rng.chance(50);
        let t = SimdAttnTensor { data: if null { core::ptr::null() } else { b.ptr() as *const _ }, len, dtype: dt, reserved: i32::from(rng.chance(1)), stride_batch: st[0], stride_head: st[1], stride_seq: st[2] };
        (t, b, r)
    };
    let (q, qb, qr) = tensor(rng, (d.batch, d.q_heads, d.seq_q), q_cols, qt, true);
    // A q8_0 row of whole blocks is `dim / 32` elements of 34 bytes; strides count blocks.
    let units = |dt: i32, dim: usize| if dt == 6 && dim % 32 == 0 { dim / 32 } else { dim };
    let (k, kb, kr) = tensor(rng, (d.batch, d.kv_heads, d.seq_kv), units(kt, d.head_dim), kt, true);
    let (v, vb, vr) = tensor(rng, (d.batch, d.kv_heads, d.seq_kv), units(vt, dv), vt, true);
    (d.q, d.k, d.v) = (q, k, v);
    inputs.extend([qb, kb, vb]);
    // Outputs: no broadcast (they would overlap), filled with a sentinel pattern.
    let (o, ob, or) = tensor(rng, (d.batch, d.q_heads, d.seq_q), dv, ot, false);
    d.out = SimdAttnOutput { data: o.data as *mut _, len: o.len, dtype: o.dtype, reserved: o.reserved, stride_batch: o.stride_batch, stride_head: o.stride_head, stride_seq: o.stride_seq };
    outputs.push(ob);
    let rows = d.batch.checked_mul(d.q_heads).and_then(|x| x.checked_mul(d.seq_q));

    let f32_buf = |rng: &mut Rng, len: usize, f: &dyn Fn(&mut Rng) -> f32| -> Buf {
        let mut b = Buf::new(len * 4, false);
        let s = b.start;
        for e in b.all_mut()[s..s + len * 4].chunks_exact_mut(4) {
            e.copy_from_slice(&f(rng).to_ne_bytes());
        }
        b
    };
    let per_row_len = |rng: &mut Rng, n: Option<usize>| -> usize {
        match n.filter(|&n| n <= CAP) {
            Some(n) if rng.chance(95) => n,
            Some(n) => n + 1 - 2 * usize::from(n > 0 && rng.chance(50)),
            None => rng.below(8) as usize,
        }
    };
    if rng.chance(50) {
        let len = per_row_len(rng, rows);
        let mut b = f32_buf(rng, len, &|_| 0.0);
        d.lse = b.ptr().cast();
        d.lse_len = len;
        outputs.push(b);
    }
    // Options.
    d.causal = i32::from(rng.chance(50));
    if rng.chance(30) {
        let bound = |rng: &mut Rng| rng.pick(&[-1i64, -1, 0, 1, 3, 17, 1 << 40, i64::MAX, -2, i64::MIN]);
        (d.window_left, d.window_right) = (bound(rng), bound(rng));
    }
    let mut kv_lens = Vec::new();
    if rng.chance(30) {
        let n = if rng.chance(90) { d.batch.min(64) } else { rng.below(4) as usize };
        let skv = d.seq_kv.min(i64::MAX as usize) as i64;
        kv_lens = (0..n).map(|_| if rng.chance(95) { rng.below(skv.min(100) as u64 + 1) as i64 } else { rng.pick(&[-1, skv.saturating_add(1), i64::MAX]) }).collect();
        d.kv_lens = kv_lens.as_ptr();
        d.kv_lens_len = kv_lens.len();
    }
    if rng.chance(20) {
        d.softcap = rng.pick(&[0.5, 5.0, 30.0, 0.0, f32::NAN, -1.0, f32::INFINITY]);
    }
    if rng.chance(20) {
        d.use_scale = 1;
        d.scale = rng.pick(&[0.1, 1.0, -0.5, 0.0, 1e30, f32::NAN, f32::INFINITY]);
    }
    if rng.chance(20) {
        let (st, r) = strides(rng, (d.batch, d.q_heads, d.seq_q), d.seq_kv, true);
        let len = length(rng, r);
        let bad = rng.chance(10);
        let b = f32_buf(rng, len, &|rng| if rng.chance(10) { f32::NEG_INFINITY } else if bad && rng.chance(5) { rng.pick(&[f32::NAN, f32::INFINITY]) } else { rng.unit() });
        d.bias = b.data().as_ptr().cast();
        d.bias_len = len;
        (d.bias_stride_batch, d.bias_stride_head, d.bias_stride_row) = (st[0], st[1], st[2]);
        inputs.push(b);
    }
    let q_heads = d.q_heads;
    let per_head = |rng: &mut Rng, special: &[f32]| -> (usize, Buf) {
        let len = per_row_len(rng, Some(q_heads));
        let special = special.to_vec();
        let b = f32_buf(rng, len, &move |rng| if rng.chance(10) { rng.pick(&special) } else { rng.unit() });
        (len, b)
    };
    if rng.chance(15) {
        let (len, b) = per_head(rng, &[f32::NAN, 0.0, 1e30]);
        (d.alibi_slopes, d.alibi_slopes_len) = (b.data().as_ptr().cast(), len);
        inputs.push(b);
    }
    if rng.chance(15) {
        let (len, b) = per_head(rng, &[f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NAN, f32::INFINITY, 50.0]);
        (d.sinks, d.sinks_len) = (b.data().as_ptr().cast(), len);
        inputs.push(b);
    }
    // Dequantization factors: any kind (and unknown ones), factors in [0.01, 2] (a V factor
    // sometimes 0), per-token arrays through random strides.
    if rng.chance(if (3..=5).contains(&kt) { 70 } else { 10 }) {
        let (batch, kv_heads, seq_kv) = (d.batch, d.kv_heads, d.seq_kv);
        // Per-token factors are f32 or (one time in three) binary16; now and then both arrays
        // are set, which must be refused.
        type Factors = (i32, f32, *const f32, usize, [i64; 3], *const f16);
        let mut factors = |rng: &mut Rng, v: bool| -> Factors {
            let kind = rng.pick(&[0, 1, 2, 3, 3, 3, 7]);
            let f = |rng: &mut Rng| if v && rng.chance(10) { 0.0 } else { 0.01 + 2.0 * rng.unit().abs().min(1.0) };
            match kind {
                1 => (kind, f(rng), core::ptr::null(), 0, [0; 3], core::ptr::null()),
                2 | 3 => {
                    let (st, len) = if kind == 2 {
                        ([0; 3], per_row_len(rng, Some(kv_heads)))
                    } else {
                        let (st, r) = strides(rng, (batch, kv_heads, seq_kv), 1, true);
                        (st, length(rng, r))
                    };
                    let b = f32_buf(rng, len, &f);
                    let p = b.data().as_ptr().cast::<f32>();
                    inputs.push(b);
                    if kind == 3 && rng.chance(3) {
                        let mut h = Buf::new(len * 2, false);
                        let s = h.start;
                        for e in h.all_mut()[s..s + len * 2].chunks_exact_mut(2) {
                            e.copy_from_slice(&f16::from_f32(f(rng)).to_bits().to_ne_bytes());
                        }
                        let ph = h.data().as_ptr().cast::<f16>();
                        inputs.push(h);
                        let both = rng.chance(8);
                        return (kind, 0.0, if both { p } else { core::ptr::null() }, len, st, ph);
                    }
                    (kind, 0.0, p, len, st, core::ptr::null())
                }
                _ => (kind, 0.0, core::ptr::null(), 0, [0; 3], core::ptr::null()),
            }
        };
        let k = factors(rng, false);
        let v = factors(rng, true);
        (d.k_scale_kind, d.k_scale, d.k_scales, d.k_scales_len, d.k_scales_f16) = (k.0, k.1, k.2, k.3, k.5);
        (d.k_scale_stride_batch, d.k_scale_stride_head, d.k_scale_stride_seq) = (k.4[0], k.4[1], k.4[2]);
        (d.v_scale_kind, d.v_scale, d.v_scales, d.v_scales_len, d.v_scales_f16) = (v.0, v.1, v.2, v.3, v.5);
        (d.v_scale_stride_batch, d.v_scale_stride_head, d.v_scale_stride_seq) = (v.4[0], v.4[1], v.4[2]);
    }
    // The score's weights.
    let mut weights = |rng: &mut Rng, n: usize| -> (*const f32, usize) {
        let len = if rng.chance(90) { n } else { n + 1 - 2 * usize::from(n > 0) };
        let b = f32_buf(rng, len, &|rng| if rng.chance(2) { f32::NAN } else { rng.unit() });
        let p = b.data().as_ptr().cast();
        inputs.push(b);
        (p, len)
    };
    match score {
        2 => d.temperature = rng.pick(&[1.0, 5.0, -2.0, 0.0, f32::NAN]),
        3 => (d.score_w, d.score_w_len) = weights(rng, q_cols.saturating_mul(d.head_dim).min(CAP)),
        4 => {
            let a = if rng.chance(60) { d.head_dim } else { rng.pick(&[1, 4, 16, 33]) };
            (d.additive_v, d.additive_v_len) = weights(rng, a.min(CAP));
            if q_dim != 0 || rng.chance(30) {
                (d.additive_w_q, d.additive_w_q_len) = weights(rng, a.saturating_mul(q_cols).min(CAP));
                (d.additive_w_k, d.additive_w_k_len) = weights(rng, a.saturating_mul(d.head_dim).min(CAP));
            }
        }
        _ => {}
    }
    if rng.chance(12) {
        let len = per_row_len(rng, rows.and_then(|r| r.checked_mul(d.seq_kv)));
        let mut b = f32_buf(rng, len, &|_| 0.0);
        (d.alignment, d.alignment_len) = (b.ptr().cast(), len);
        outputs.push(b);
    }
    if rng.chance(12) {
        let len = per_row_len(rng, d.batch.checked_mul(d.q_heads).and_then(|r| r.checked_mul(d.seq_kv)));
        let mut b = f32_buf(rng, len, &|_| 0.0);
        (d.coverage, d.coverage_len) = (b.ptr().cast(), len);
        outputs.push(b);
    }
    if rng.chance(1) {
        d.struct_size = rng.pick(&[0, 8, 200, 4096]);
    }
    if rng.chance(1) {
        d.abi_version = 2;
    }
    // Sentinel pattern in every output, so "untouched" is checkable bitwise.
    for b in outputs.iter_mut() {
        let s = b.start;
        let n = b.bytes;
        b.all_mut()[s..s + n].iter_mut().enumerate().for_each(|(i, x)| *x = 0x3c ^ (i as u8));
    }
    let small = rows.is_some_and(|r| r <= 64) && d.seq_kv <= 300 && d.head_dim <= 130 && dv <= 130;
    let comparable = small && fill == Fill::Moderate && [qr, kr, vr, or].iter().all(Option::is_some);
    // Work a valid call could have (keys past every kv_lens entry are free): the fuzzer skips
    // calls that could legitimately run for seconds (K/V broadcast over a huge sequence).
    let keys = kv_lens.iter().copied().max().filter(|_| !kv_lens.is_empty()).map_or(d.seq_kv, |m| d.seq_kv.min(m.max(0) as usize));
    let work = rows.unwrap_or(usize::MAX).saturating_mul(keys).saturating_mul(d.head_dim.saturating_add(dv));
    let huge = rows.is_some_and(|r| r > 0 && r <= CAP) && work > 50_000_000;
    let f32_only = qt == 0 && kt == 0 && vt == 0 && ot == 0;
    Case { d, inputs, outputs, comparable, huge, kv_lens, f32_only }
}

trait FuzzDefault {
    fn default_for_fuzz() -> Self;
}

impl FuzzDefault for SimdAttnDesc {
    fn default_for_fuzz() -> Self {
        let mut d = core::mem::MaybeUninit::<SimdAttnDesc>::zeroed();
        // SAFETY: writes a valid descriptor into the zeroed storage.
        assert_eq!(unsafe { simd_attn_desc_init(d.as_mut_ptr()) }, OK);
        // SAFETY: initialised just above.
        unsafe { d.assume_init() }
    }
}

/// The outputs of a case as bytes (a snapshot to compare with).
fn snapshot(c: &Case) -> Vec<Vec<u8>> {
    c.outputs.iter().map(|b| b.data().to_vec()).collect()
}

/// Points the descriptor's outputs at fresh copies (same sentinel) and returns them.
fn with_fresh_outputs(c: &Case) -> (SimdAttnDesc, Vec<Buf>) {
    let mut d = c.d;
    let mut fresh: Vec<Buf> = c.outputs.iter().map(|b| {
        let mut n = Buf::new(b.bytes, b.start != GUARD);
        let s = n.start;
        n.all_mut()[s..s + b.bytes].copy_from_slice(b.data());
        n
    }).collect();
    // The outputs in the order `draw_case` pushed them: out (always, even when its pointer is
    // NULL), then lse, alignment and coverage when present (never NULL then).
    let mut it = fresh.iter_mut();
    let mut next = |p: *mut u8| {
        let b = it.next().expect("a buffer per output");
        if p.is_null() { p } else { b.ptr() }
    };
    d.out.data = next(d.out.data.cast()).cast();
    if !d.lse.is_null() {
        d.lse = next(d.lse.cast()).cast();
    }
    if !d.alignment.is_null() {
        d.alignment = next(d.alignment.cast()).cast();
    }
    if !d.coverage.is_null() {
        d.coverage = next(d.coverage.cast()).cast();
    }
    (d, fresh)
}

struct Stats {
    calls: u64,
    statuses: BTreeMap<&'static str, u64>,
    compared: u64,
}

fn name(status: i32) -> &'static str {
    let p = simd_attn_status_name(status);
    if p.is_null() {
        return "unknown";
    }
    // SAFETY: static, NUL-terminated.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_str().unwrap_or("?")
}

fn last_error() -> String {
    // SAFETY: valid until the next call on this thread.
    unsafe { std::ffi::CStr::from_ptr(simd_attn_last_error()) }.to_string_lossy().into_owned()
}

/// Reads output `i` of `bufs` as f32 values (f16 and bf16 widened).
fn floats(b: &Buf, dtype: i32) -> Vec<f32> {
    if dtype == 6 {
        b.data().chunks_exact(34).flat_map(|c| {
            let d = f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32();
            c[2..].iter().map(move |&q| d * q as i8 as f32)
        }).collect()
    } else if dtype == 3 {
        b.data().iter().map(|&c| c as i8 as f32).collect()
    } else if dtype == 4 {
        b.data().iter().map(|&c| simd_attn::F8E4M3(c).to_f32()).collect()
    } else if dtype == 5 {
        b.data().iter().map(|&c| simd_attn::F8E5M2(c).to_f32()).collect()
    } else if dtype == 2 {
        b.data().chunks_exact(2).map(|c| bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect()
    } else if dtype == 1 {
        b.data().chunks_exact(2).map(|c| f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect()
    } else {
        b.data().chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// Runs one case on `isa`; panics with a description on any finding.
fn run_case(c: &mut Case, isa: i32, rng: &mut Rng, stats: &mut Stats) {
    let check_guards = |c: &Case, what: &str| {
        for (n, b) in c.inputs.iter().chain(&c.outputs).enumerate() {
            assert!(b.guards_ok(), "{what}: guard region of buffer {n} written");
        }
    };
    let count = |s: i32, stats: &mut Stats| {
        stats.calls += 1;
        *stats.statuses.entry(name(s)).or_default() += 1;
        assert_ne!(s, INTERNAL, "internal error: {}", last_error());
    };
    if c.huge {
        return;
    }
    if let Ok(mut w) = CALL_WHAT.lock() {
        *w = format!("isa {isa}, {:?}, kv_lens {:?}", c.d, c.kv_lens);
    }
    let before = snapshot(c);
    let threads = rng.below(4) as usize;
    let mut info = SimdAttnRunInfo::default();
    // SAFETY: every pointer in the descriptor points into the case's live buffers, with the
    // lengths it states.
    let s = unsafe { simd_attn_forward(&c.d, threads, isa, &mut info) };
    count(s, stats);
    check_guards(c, "forward");
    if s != OK {
        assert!(snapshot(c) == before, "forward returned {} ({}) but wrote an output", name(s), last_error());
        return;
    }
    assert_eq!(info.reserved, 0);
    let forward = snapshot(c);

    // The reference on the same descriptor, into fresh outputs.
    let rows = c.d.batch.saturating_mul(c.d.q_heads).saturating_mul(c.d.seq_q);
    if rows.saturating_mul(c.d.seq_kv.max(1)) <= 1 << 16 || rows == 0 {
        let (rd, fresh) = with_fresh_outputs(c);
        // SAFETY: as above, with the fresh outputs.
        let r = unsafe { simd_attn_reference(&rd) };
        count(r, stats);
        assert!(fresh.iter().all(Buf::guards_ok), "reference wrote past a buffer");
        assert!(r == OK || r == 24, "reference of a call forward accepted: {} ({})", name(r), last_error());
        if r == OK && c.comparable {
            stats.compared += 1;
            let has = |t: i32| c.d.out.dtype == t || c.d.q.dtype == t || c.d.k.dtype == t;
            let got = floats(&c.outputs[0], c.d.out.dtype);
            let want = floats(&fresh[0], c.d.out.dtype);
            // V factors (if any) are at most 2.01.
            let vmax = floats(&c.inputs[2], c.d.v.dtype).iter().fold(1.0f32, |a, x| a.max(x.abs())) * if c.d.v_scale_kind != 0 { 2.01 } else { 1.0 };
            // Forward and reference each round a 16-bit output once: up to an ulp apart.
            let tol = if has(2) { 1.6e-2 } else if has(1) { 4e-3 } else { 2e-4 } * vmax * if c.d.score == 4 { 4.0 } else { 1.0 };
            for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= tol || (g.is_nan() && w.is_nan()), "forward differs from the reference at {n}: {g} vs {w} (tol {tol})");
            }
        }
    }

    // Host plans (dot scores, no inspection): bitwise equal to forward.
    let nth = 1 + rng.below(3) as usize;
    let (pd, mut fresh) = with_fresh_outputs(c);
    let fresh_before: Vec<Vec<u8>> = fresh.iter().map(|b| b.data().to_vec()).collect();
    let mut plan: *mut SimdAttnPlan = core::ptr::null_mut();
    // SAFETY: as above; `plan` is writable.
    let p = unsafe { simd_attn_plan_create(&pd, nth, isa, &mut plan) };
    count(p, stats);
    if p == OK {
        // SAFETY: a live plan.
        let ws_len = unsafe { simd_attn_plan_workspace_len(plan) };
        assert!(ws_len < 1 << 28, "workspace of {ws_len} floats for a call forward ran");
        let mut ws = vec![0.0f32; ws_len];
        if rng.chance(10) {
            // A merge before the runs: a no-op without a merge, an error with one.
            // SAFETY: a live plan and a workspace of the stated length.
            let m = unsafe { simd_attn_plan_merge(plan, 0, ws.as_mut_ptr(), ws.len()) };
            count(m, stats);
            // SAFETY: a live plan.
            assert_eq!(m == OK, unsafe { simd_attn_plan_needs_merge(plan) } == 0, "early merge: {}", name(m));
        }
        for ith in 0..nth {
            // SAFETY: as above.
            let r = unsafe { simd_attn_plan_run(plan, ith, ws.as_mut_ptr(), ws.len(), core::ptr::null_mut()) };
            count(r, stats);
            assert_eq!(r, OK, "plan run {ith}/{nth}: {}", last_error());
        }
        for ith in 0..nth {
            // SAFETY: as above.
            let r = unsafe { simd_attn_plan_merge(plan, ith, ws.as_mut_ptr(), ws.len()) };
            count(r, stats);
            assert_eq!(r, OK, "plan merge {ith}/{nth}: {}", last_error());
        }
        // SAFETY: created above, destroyed once.
        unsafe { simd_attn_plan_destroy(plan) };
        assert!(fresh.iter().all(Buf::guards_ok), "a plan wrote past a buffer");
        let got: Vec<Vec<u8>> = fresh.iter().map(|b| b.data().to_vec()).collect();
        assert!(got == forward, "host plan ({nth} shares) differs from forward");
    } else {
        assert!(plan.is_null());
        assert!(fresh.iter().map(|b| b.data().to_vec()).collect::<Vec<_>>() == fresh_before, "plan_create failed ({}) but wrote an output", name(p));
    }
    fresh.clear();

    // The Rust API with a caller's workspace, on f32 calls with the dot scores: bitwise equal.
    if c.f32_only && c.d.score <= 1 && c.d.alignment.is_null() && c.d.coverage.is_null() && c.d.q.reserved == 0 && !c.d.q.data.is_null() {
        rust_attention_in(c, isa, &forward);
        stats.calls += 1;
    }
}

/// `attention_in` on the case as Rust slices (the descriptor's f32 tensors), compared bitwise
/// with what forward wrote.
fn rust_attention_in(c: &Case, isa: i32, forward: &[Vec<u8>]) {
    let d = &c.d;
    let f = |t: &SimdAttnTensor| -> Option<(&[f32], Strides)> {
        if t.len > 0 && t.data.is_null() || !(t.data as usize).is_multiple_of(4) || t.stride_batch < 0 || t.stride_head < 0 || t.stride_seq < 0 {
            return None;
        }
        let data: &[f32] = if t.len == 0 { &[] } else { unsafe { core::slice::from_raw_parts(t.data.cast(), t.len) } };
        Some((data, Strides::new(t.stride_batch as usize, t.stride_head as usize, t.stride_seq as usize)))
    };
    let (Some(q), Some(k), Some(v)) = (f(&d.q), f(&d.k), f(&d.v)) else { return };
    let o = SimdAttnTensor { data: d.out.data, len: d.out.len, dtype: 0, reserved: 0, stride_batch: d.out.stride_batch, stride_head: d.out.stride_head, stride_seq: d.out.stride_seq };
    let Some((_, os)) = f(&o) else { return };
    let mut out = vec![f32::NAN; d.out.len];
    let mut lse = vec![f32::NAN; d.lse_len];
    let kv_lens: Vec<usize> = c.kv_lens.iter().map(|&x| x as usize).collect();
    let slice = |p: *const f32, n: usize| -> Option<&[f32]> { (!p.is_null()).then(|| unsafe { core::slice::from_raw_parts(p, n) }) };
    let bound = |x: i64| (x >= 0).then_some(x as usize);
    let mut params = AttentionParams::new().causal(d.causal != 0).score(if d.score == 1 { Score::Dot } else { Score::ScaledDot });
    if d.window_left != -1 || d.window_right != -1 {
        params = params.window(bound(d.window_left), bound(d.window_right));
    }
    if !c.kv_lens.is_empty() {
        params = params.kv_lens(&kv_lens);
    }
    if d.softcap != 0.0 {
        params = params.softcap(d.softcap);
    }
    if d.use_scale != 0 {
        params = params.scale(d.scale);
    }
    if let Some(b) = slice(d.bias, d.bias_len) {
        params = params.bias(BiasRef::new(b, BiasStrides { batch: d.bias_stride_batch as usize, head: d.bias_stride_head as usize, row: d.bias_stride_row as usize }));
    }
    if let Some(a) = slice(d.alibi_slopes, d.alibi_slopes_len) {
        params = params.alibi_slopes(a);
    }
    if let Some(s) = slice(d.sinks, d.sinks_len) {
        params = params.sinks(s);
    }
    // The dequantization factors as the descriptor gives them (forward accepted them).
    let dequant = |kind: i32, one: f32, p: *const f32, n: usize, st: [i64; 3], p16: *const f16| -> Option<Dequant<'_>> {
        let st = Strides::new(st[0] as usize, st[1] as usize, st[2] as usize);
        match kind {
            1 => Some(Dequant::Tensor(one)),
            2 => Some(Dequant::Head(slice(p, n).unwrap_or(&[]))),
            // (The fuzzer's calls are never paged.)
            // SAFETY: forward read the same `n` elements.
            3 if !p16.is_null() => Some(Dequant::TokenF16(unsafe { core::slice::from_raw_parts(p16, n) }, st)),
            3 => Some(Dequant::Token(slice(p, n).unwrap_or(&[]), st)),
            _ => None,
        }
    };
    let k_f = dequant(d.k_scale_kind, d.k_scale, d.k_scales, d.k_scales_len, [d.k_scale_stride_batch, d.k_scale_stride_head, d.k_scale_stride_seq], d.k_scales_f16);
    let v_f = dequant(d.v_scale_kind, d.v_scale, d.v_scales, d.v_scales_len, [d.v_scale_stride_batch, d.v_scale_stride_head, d.v_scale_stride_seq], d.v_scales_f16);
    if k_f.is_some() || v_f.is_some() {
        params = params.kv_scales(k_f.unwrap_or(Dequant::Tensor(1.0)), v_f.unwrap_or(Dequant::Tensor(1.0)));
    }
    let dv = if d.v_head_dim == 0 { d.head_dim } else { d.v_head_dim };
    let shape = AttentionShape::new(d.batch, d.q_heads, d.kv_heads, d.seq_q, d.seq_kv, d.head_dim).with_v_head_dim(dv);
    let isa = Isa::ALL[isa as usize];
    let mut ws = Workspace::new();
    let lse_opt = (!d.lse.is_null()).then_some(&mut lse[..]);
    let r = attention_in(&mut ws, &RunConfig { isa: Some(isa), threads: Some(1) }, &shape, TensorRef::new(q.0, q.1), TensorRef::new(k.0, k.1), TensorRef::new(v.0, v.1), TensorMut::new(&mut out, os), lse_opt, &params);
    let r = r.unwrap_or_else(|e| panic!("attention_in rejected a call forward accepted: {e}"));
    let _ = r;
    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_ne_bytes()).collect();
    // Forward's output elements that the call wrote are those attention_in wrote (the rest kept
    // forward's sentinel and attention_in's NaN).
    for (n, (a, b)) in bytes.chunks_exact(4).zip(forward[0].chunks_exact(4)).enumerate() {
        let x = f32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        if !x.is_nan() || a == b {
            assert_eq!(a, b, "attention_in differs from forward at element {n}");
        }
    }
}

/// A random `simd_attn_merge_partials` call.
fn run_merge(rng: &mut Rng, stats: &mut Stats) {
    let (batch, heads, seq, dv) = (dim(rng, 2), dim(rng, 3), dim(rng, 3), dim(rng, 16));
    let rows = batch.checked_mul(heads).and_then(|x| x.checked_mul(seq));
    let n_parts = rng.below(4) as usize;
    let mut bufs = Vec::new();
    let mut parts = Vec::new();
    let dt = rng.below(3) as i32;
    for _ in 0..n_parts {
        let (st, r) = strides(rng, (batch, heads, seq), dv, true);
        let len = length(rng, r);
        let part_dt = if rng.chance(95) { dt } else { (dt + 1) % 3 };
        let mut b = tensor_buf(rng, part_dt, len, Fill::Moderate, false);
        let lse_len = match rows { Some(r) if r <= CAP => r, _ => rng.below(8) as usize };
        let mut l = Buf::new(lse_len * 4, false);
        let s = l.start;
        for e in l.all_mut()[s..s + lse_len * 4].chunks_exact_mut(4) {
            e.copy_from_slice(&rng.pick(&[0.0f32, -1.0, 3.0, f32::NEG_INFINITY]).to_ne_bytes());
        }
        parts.push(SimdAttnPartial {
            out: SimdAttnTensor { data: b.ptr() as *const _, len, dtype: part_dt, reserved: 0, stride_batch: st[0], stride_head: st[1], stride_seq: st[2] },
            lse: l.ptr().cast(),
            lse_len,
        });
        bufs.push(b);
        bufs.push(l);
    }
    let (st, r) = strides(rng, (batch, heads, seq), dv, false);
    let len = length(rng, r);
    let mut ob = tensor_buf(rng, dt, len, Fill::Moderate, false);
    let before = ob.data().to_vec();
    let out = SimdAttnOutput { data: ob.ptr().cast(), len, dtype: dt, reserved: 0, stride_batch: st[0], stride_head: st[1], stride_seq: st[2] };
    let parts_ptr = if parts.is_empty() && rng.chance(50) { core::ptr::null() } else { parts.as_ptr() };
    // SAFETY: every pointer points into live buffers of the stated lengths.
    let s = unsafe { simd_attn_merge_partials(batch, heads, seq, dv, parts_ptr, n_parts, &out, core::ptr::null_mut(), 0) };
    stats.calls += 1;
    *stats.statuses.entry(name(s)).or_default() += 1;
    assert_ne!(s, INTERNAL, "merge_partials: internal error: {}", last_error());
    assert!(ob.guards_ok() && bufs.iter().all(Buf::guards_ok), "merge_partials wrote past a buffer");
    if s != OK {
        assert!(ob.data() == before.as_slice(), "merge_partials failed ({}) but wrote its output", name(s));
    }
}

/// Milliseconds since the fuzzer started at which the current call began (0: none running).
static CALL_START_MS: AtomicU64 = AtomicU64::new(0);
static CALL_CASE: AtomicU64 = AtomicU64::new(0);
/// What the current case is (ISA and descriptor), for the watchdog's report.
static CALL_WHAT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[test]
fn fuzz_the_descriptor_and_the_api_on_every_isa() {
    let secs: f64 = std::env::var("SIMD_ATTN_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let seed: u64 = std::env::var("SIMD_ATTN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let only_case: Option<u64> = std::env::var("SIMD_ATTN_FUZZ_CASE").ok().and_then(|s| s.parse().ok());
    let isas: Vec<Isa> = match std::env::var("SIMD_ATTN_FUZZ_ISA") {
        Ok(n) => vec![Isa::from_name(&n).expect("SIMD_ATTN_FUZZ_ISA names a path")],
        Err(_) => Isa::available(),
    };
    let t0 = Instant::now();
    // The watchdog: a call that runs for a minute is a hang (the largest valid case a draw
    // allows takes milliseconds).
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let start = CALL_START_MS.load(Ordering::Acquire);
        if start != 0 && (t0.elapsed().as_millis() as u64).saturating_sub(start) > 60_000 {
            let what = CALL_WHAT.lock().map(|w| w.clone()).unwrap_or_default();
            eprintln!("fuzz: HANG: case {} (SIMD_ATTN_FUZZ_SEED={seed}) has run for over 60 s: {what}", CALL_CASE.load(Ordering::Relaxed));
            std::process::abort();
        }
    });
    println!("fuzz: seed {seed}, {secs} s per path, paths {isas:?}");
    let mut case_no = 0u64;
    for isa in isas {
        let mut stats = Stats { calls: 0, statuses: BTreeMap::new(), compared: 0 };
        let start = Instant::now();
        let mut cases = 0u64;
        while start.elapsed().as_secs_f64() < secs || only_case.is_some() {
            let this = only_case.unwrap_or(case_no);
            case_no += 1;
            let mut rng = Rng(seed ^ this.wrapping_mul(0x2545_f491_4f6c_dd1d));
            CALL_CASE.store(this, Ordering::Relaxed);
            CALL_START_MS.store((t0.elapsed().as_millis() as u64).max(1), Ordering::Release);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if rng.chance(10) {
                    run_merge(&mut rng, &mut stats);
                } else {
                    let mut c = draw_case(&mut rng);
                    run_case(&mut c, isa as i32, &mut rng, &mut stats);
                }
            }));
            CALL_START_MS.store(0, Ordering::Release);
            if let Err(e) = result {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                panic!("fuzz finding on {isa}: {msg}\nreproduce: SIMD_ATTN_FUZZ_ISA={} SIMD_ATTN_FUZZ_SEED={seed} SIMD_ATTN_FUZZ_CASE={this} cargo test --release --test fuzz -- --nocapture", isa.name());
            }
            cases += 1;
            if only_case.is_some() {
                break;
            }
        }
        println!("fuzz {isa}: {cases} cases, {} calls ({} compared with the reference) in {:.1} s; statuses {:?}", stats.calls, stats.compared, start.elapsed().as_secs_f64(), stats.statuses);
        if only_case.is_some() {
            break;
        }
    }
}
