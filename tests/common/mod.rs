//! Shared test machinery: random attention problems (shapes, layouts, options, adversarial
//! values), the tolerance against the f64 reference, and the checker every kernel goes
//! through.
#![allow(dead_code)]

use proptest::prelude::*;
use simd_attn::{
    AttentionParams, AttentionShape, BiasRef, BiasStrides, Element, FloatElement, Reference, Strides, TensorMut, TensorRef, Window,
};

/// How Q/K/V/out sit in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// Contiguous `[B, H, S, D]`.
    Bhsd,
    /// Contiguous `[B, S, H, D]`.
    Bshd,
    /// One `[B, S, Hq + 2 Hkv, D]` buffer holding Q, K and V per token (needs `Sq == Skv`, `Dv == D`).
    PackedQkv,
    /// Axes in a random order with padding between them; K/V may be shared by every batch entry
    /// (batch stride 0).
    Padded { order: [u8; 3], pad: [usize; 4], shared_kv: bool },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BiasKind {
    /// `[B, Hq, Sq, Skv]`, every stride non-zero.
    Full,
    /// `[B, 1, 1, Skv]`: a key-padding mask (head and row strides 0).
    KeyPadding,
    /// `[1, 1, Sq, Skv]`: one mask for everything.
    Shared,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Values {
    /// Uniform in [-1, 1).
    Normal,
    /// Q scaled so the logits reach about +-1e4: the softmax is almost one-hot and any
    /// missing max subtraction overflows.
    HugeLogits,
    /// Values spanning several orders of magnitude per element.
    WideRange,
}

/// A generated problem, before its buffers exist. Small and `Debug`, so proptest shrinks it.
#[derive(Clone, Debug)]
pub struct Spec {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub layout: Layout,
    pub scale: Option<f32>,
    pub causal: bool,
    pub window: Option<(Option<usize>, Option<usize>)>,
    pub kv_lens: Option<Vec<usize>>,
    pub softcap: Option<f32>,
    pub bias: Option<BiasKind>,
    pub alibi: bool,
    pub sinks: bool,
    pub lse: bool,
    pub values: Values,
    pub seed: u64,
}

impl Spec {
    pub fn shape(&self) -> AttentionShape {
        AttentionShape::new(
            self.batch,
            self.kv_heads * self.group,
            self.kv_heads,
            self.seq_q,
            self.seq_kv,
            self.head_dim,
        )
        .with_v_head_dim(self.v_head_dim)
    }

    /// A plain problem with no options: the starting point of hand-written cases.
    pub fn plain(batch: usize, q_heads: usize, kv_heads: usize, seq_q: usize, seq_kv: usize, head_dim: usize) -> Spec {
        Spec {
            batch,
            kv_heads,
            group: q_heads / kv_heads,
            seq_q,
            seq_kv,
            head_dim,
            v_head_dim: head_dim,
            layout: Layout::Bhsd,
            scale: None,
            causal: false,
            window: None,
            kv_lens: None,
            softcap: None,
            bias: None,
            alibi: false,
            sinks: false,
            lse: true,
            values: Values::Normal,
            seed: 7,
        }
    }
}

/// Deterministic xorshift generator: cases are reproducible from their seed.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// (buffer index, start offset, strides) of one tensor of a [`Case`].
pub type View = (usize, usize, Strides);

/// A built problem: owned buffers (as f32, rounded to the storage type where one is used) and
/// where each tensor lives in them.
pub struct Case {
    pub spec: Spec,
    pub shape: AttentionShape,
    /// Q, K, V live in `qkv[0..3]` (the same buffer three times for packed QKV).
    pub bufs: [Vec<f32>; 3],
    /// Where Q, K, V live.
    pub views: [View; 3],
    pub out_len: usize,
    pub out_strides: Strides,
    pub kv_lens: Option<Vec<usize>>,
    pub bias: Option<(Vec<f32>, BiasStrides)>,
    pub alibi: Option<Vec<f32>>,
    pub sinks: Option<Vec<f32>>,
}

/// Strides of a `[B, H, S, D]` tensor with its axes in `order` (outermost first) and `pad`
/// extra elements after each level; returns the strides and the element count.
fn padded_strides(b: usize, h: usize, s: usize, d: usize, order: [u8; 3], pad: [usize; 4]) -> (Strides, usize) {
    let sizes = [b, h, s];
    let mut st = [0usize; 3];
    let mut span = d + pad[0];
    for (lvl, &axis) in order.iter().rev().enumerate() {
        st[axis as usize] = span;
        span = span * sizes[axis as usize].max(1) + pad[lvl + 1];
    }
    (Strides::new(st[0], st[1], st[2]), span)
}

impl Case {
    pub fn build(spec: &Spec) -> Case {
        let shape = spec.shape();
        let (b, hq, hkv, sq, skv, d, dv) =
            (shape.batch, shape.q_heads, shape.kv_heads, shape.seq_q, shape.seq_kv, shape.head_dim, shape.v_head_dim);
        let mut rng = Rng::new(spec.seed);

        let (bufs_len, views, out_strides, out_len): ([usize; 3], [View; 3], Strides, usize) =
            match spec.layout {
                Layout::Bhsd => {
                    let [qs, ks, vs, os] = shape.bhsd_strides();
                    let [nq, nk, nv, no] = shape.bhsd_lens();
                    ([nq, nk, nv], [(0, 0, qs), (1, 0, ks), (2, 0, vs)], os, no)
                }
                Layout::Bshd | Layout::PackedQkv if spec.layout == Layout::Bshd || sq != skv || d != dv => {
                    let n = |h: usize, s: usize, dd: usize| b * h * s * dd;
                    (
                        [n(hq, sq, d), n(hkv, skv, d), n(hkv, skv, dv)],
                        [(0, 0, Strides::bshd(hq, sq, d)), (1, 0, Strides::bshd(hkv, skv, d)), (2, 0, Strides::bshd(hkv, skv, dv))],
                        Strides::bshd(hq, sq, dv),
                        n(hq, sq, dv),
                    )
                }
                Layout::PackedQkv => {
                    let heads = hq + 2 * hkv;
                    let st = Strides::new(sq * heads * d, d, heads * d);
                    let n = b * sq * heads * d;
                    ([n, 0, 0], [(0, 0, st), (0, hq * d, st), (0, (hq + hkv) * d, st)], Strides::bshd(hq, sq, dv), b * sq * hq * dv)
                }
                Layout::Bshd => unreachable!(),
                Layout::Padded { order, pad, shared_kv } => {
                    let (qs, nq) = padded_strides(b, hq, sq, d, order, pad);
                    let kb = if shared_kv { 1 } else { b };
                    let (mut ks, nk) = padded_strides(kb, hkv, skv, d, order, pad);
                    let (mut vs, nv) = padded_strides(kb, hkv, skv, dv, order, [pad[1], pad[2], pad[3], pad[0]]);
                    if shared_kv {
                        ks.batch = 0;
                        vs.batch = 0;
                    }
                    let (os, no) = padded_strides(b, hq, sq, dv, order, [pad[2], pad[0], pad[3], pad[1]]);
                    ([nq, nk, nv], [(0, 0, qs), (1, 0, ks), (2, 0, vs)], os, no)
                }
            };

        let mut bufs: [Vec<f32>; 3] = Default::default();
        for (buf, &n) in bufs.iter_mut().zip(&bufs_len) {
            *buf = (0..n).map(|_| rng.uniform()).collect();
        }
        match spec.values {
            Values::Normal => {}
            Values::HugeLogits => {
                // |q.k| of uniform vectors is about sqrt(D)/3; scale Q so scale*|q.k| ~ 1e4.
                let sc = spec.scale.unwrap_or(1.0 / (d as f32).sqrt()).abs().max(1e-3);
                // Capped so Q stays finite in every storage type (f16 tops out at 65504).
                let boost = (1e4 / (sc * (d as f32).sqrt() / 3.0).max(1e-6)).min(3e4);
                let (qb, qo, qs) = views[0];
                for bi in 0..b {
                    for h in 0..hq {
                        for i in 0..sq {
                            let o = qo + bi * qs.batch + h * qs.head + i * qs.seq;
                            bufs[qb][o..o + d].iter_mut().for_each(|x| *x *= boost);
                        }
                    }
                }
            }
            Values::WideRange => {
                for buf in bufs.iter_mut() {
                    for x in buf.iter_mut() {
                        *x *= 10f32.powi(rng.below(7) as i32 - 3);
                    }
                }
            }
        }

        let kv_lens = spec.kv_lens.clone();
        let bias = spec.bias.map(|kind| {
            let (st, n) = match kind {
                BiasKind::Full => (BiasStrides { batch: hq * sq * skv, head: sq * skv, row: skv }, b * hq * sq * skv),
                BiasKind::KeyPadding => (BiasStrides { batch: skv, head: 0, row: 0 }, b * skv),
                BiasKind::Shared => (BiasStrides { batch: 0, head: 0, row: skv }, sq * skv),
            };
            // Mostly small values, some -inf (masked) entries.
            let data = (0..n)
                .map(|_| if rng.below(7) == 0 { f32::NEG_INFINITY } else { 2.0 * rng.uniform() })
                .collect();
            (data, st)
        });
        let alibi = spec.alibi.then(|| (0..hq).map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / hq as f32)).collect());
        let sinks = spec.sinks.then(|| {
            (0..hq).map(|h| if h % 3 == 2 { f32::NEG_INFINITY } else { 3.0 * rng.uniform() }).collect()
        });
        Case { spec: spec.clone(), shape, bufs, views, out_len, out_strides, kv_lens, bias, alibi, sinks }
    }

    /// Round every input to the storage type `T` (identity for f32), so the reference sees
    /// exactly the values the kernel reads.
    pub fn round_to<T: Element>(&mut self) {
        for buf in &mut self.bufs {
            buf.iter_mut().for_each(|x| *x = T::from_f32(*x).to_f32());
        }
    }

    /// Rounds every input to the values the narrowest of a call's storage types holds
    /// exactly: f16 when one of them is f16, bf16 when one is bf16 (f32 keeps them as drawn),
    /// so the reference sees exactly what the kernels read.
    pub fn round_for<TQ: FloatElement, TKV: Element, TO: FloatElement>(&mut self) {
        let types = [TQ::DTYPE, TKV::DTYPE, TO::DTYPE];
        if types.contains(&simd_attn::DType::F16) {
            self.round_to::<half::f16>();
        }
        if types.contains(&simd_attn::DType::Bf16) {
            self.round_to::<half::bf16>();
        }
    }

    pub fn tensor<'a, T>(&self, bufs: &'a [Vec<T>; 3], which: usize) -> TensorRef<'a, T> {
        let (bi, off, st) = self.views[which];
        TensorRef::new(&bufs[bi][off..], st)
    }

    pub fn params(&self) -> AttentionParams<'_> {
        let s = &self.spec;
        AttentionParams {
            scale: s.scale,
            causal: s.causal,
            window: s.window.map(|(left, right)| Window { left, right }),
            kv_lens: self.kv_lens.as_deref(),
            softcap: s.softcap,
            bias: self.bias.as_ref().map(|(d, st)| BiasRef::new(d, *st)),
            alibi_slopes: self.alibi.as_deref(),
            sinks: self.sinks.as_deref(),
            ..AttentionParams::default()
        }
    }

    pub fn reference(&self) -> Reference<'_, f32, f32> {
        Reference::new(&self.shape, self.tensor(&self.bufs, 0), self.tensor(&self.bufs, 1), self.tensor(&self.bufs, 2), &self.params())
            .expect("generated problems are valid")
    }
}

/// What a kernel returned for a case: the whole output buffer (as f32) and the LSE.
pub struct Outcome {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Value written into the output buffer before the call: elements outside the output rows
/// must still hold it afterwards (exact in f32, f16 and bf16, so a 16-bit output keeps it).
pub const SENTINEL: f32 = 776.0;

/// Run `attention` with storage types `TQ`/`TKV`/`TO` on a case (already rounded to them).
pub fn run_typed<TQ: FloatElement, TKV: Element, TO: FloatElement>(
    case: &Case,
    call: impl FnOnce(
        &AttentionShape,
        TensorRef<'_, TQ>,
        TensorRef<'_, TKV>,
        TensorRef<'_, TKV>,
        TensorMut<'_, TO>,
        Option<&mut [f32]>,
        &AttentionParams<'_>,
    ) -> Result<simd_attn::RunInfo, simd_attn::AttnError>,
) -> Outcome {
    let conv = |v: &Vec<f32>| -> Vec<TKV> { v.iter().map(|&x| TKV::from_f32(x)).collect() };
    let kv_bufs: [Vec<TKV>; 3] = [conv(&case.bufs[0]), conv(&case.bufs[1]), conv(&case.bufs[2])];
    let q_bufs: [Vec<TQ>; 3] = [
        case.bufs[0].iter().map(|&x| TQ::from_f32(x)).collect(),
        case.bufs[1].iter().map(|&x| TQ::from_f32(x)).collect(),
        case.bufs[2].iter().map(|&x| TQ::from_f32(x)).collect(),
    ];
    let mut out = vec![TO::from_f32(SENTINEL); case.out_len];
    let rows = case.shape.batch * case.shape.q_heads * case.shape.seq_q;
    let mut lse = vec![SENTINEL; rows];
    let params = case.params();
    call(
        &case.shape,
        case.tensor(&q_bufs, 0),
        case.tensor(&kv_bufs, 1),
        case.tensor(&kv_bufs, 2),
        TensorMut::new(&mut out, case.out_strides),
        case.spec.lse.then_some(&mut lse[..]),
        &params,
    )
    .expect("generated problems are valid");
    Outcome { out: out.iter().map(|x| x.to_f32()).collect(), lse }
}

/// Smallest normal f16 (2^-14): below it, rounding to f16 is absolute (see the tolerance).
pub const STORE_FLOOR: f64 = 1.0 / 16384.0;

/// The relative rounding of a softmax weight to bf16, which the AVX512_BF16 kernel applies
/// before P.V: round to nearest with 8 significant bits, half a spacing of at most 2^-7 |x|.
pub const WEIGHT_EPS_BF16: f64 = 1.0 / 256.0;

/// The weight rounding a call on `isa` with these storage types gets: the bf16 dot-product
/// kernel's for bf16 Q and K/V on the AVX512_BF16 path (it runs every such prefill), none
/// otherwise.
pub fn weight_eps<TQ: FloatElement, TKV: Element>(isa: simd_attn::Isa) -> f64 {
    let bf16 = TQ::DTYPE == simd_attn::DType::Bf16 && TKV::DTYPE == simd_attn::DType::Bf16;
    if isa == simd_attn::Isa::Avx512Bf16 && bf16 { WEIGHT_EPS_BF16 } else { 0.0 }
}

/// f32 unit roundoff.
pub const EPS: f64 = f32::EPSILON as f64 / 2.0;

/// THE TOLERANCE, stated once for every kernel.
///
/// The kernels compute in f32; the reference in f64 from the same (storage-rounded) inputs.
/// For one query row, with `n` visible keys and `D` the head dim:
/// - each logit `s_j = scale * q.k_j (+ softcap, bias, ALiBi)` is off by at most
///   `delta = eps * ((D + 4) * |scale| * max_j sum_d |q_d k_jd| + 8 * max_j |s_j|)`
///   (a length-D f32 dot product, then a few rounded operations);
/// - a softmax whose logits move by at most `delta` moves its weights by at most `2.5 * delta`
///   in L1 norm (first-order `2 * delta`; 2.5 covers `e^delta - 1` up to delta = 0.4), so the
///   output moves by at most `2.5 * delta * max_j |v_j|`;
/// - summing `n` weighted rows, the rescales, the exp polynomial (<= 2e-7 relative, ~4 eps)
///   and the final division add at most `(n + 32) * eps * max_j |v_j|`;
/// - an output stored as f16 is rounded once more: `2^-11 * max(|o|, 2^-14)` (below 2^-14,
///   f16's smallest normal, its spacing is a fixed 2^-24: the rounding error is absolute).
///
/// LSE: `delta + (n + 32) * eps * (1 + |lse|)`.
///
/// These are worst-case bounds, yet tight enough that a wrong mask, stride or rescale (errors
/// of order `max |v|`) always fails: for `D = 128`, uniform inputs and `n = 300` the output
/// bound is about `4e-5 * max |v|`.
pub struct RowTolerance {
    pub out_abs: f64,
    /// `max_j |v_j|` over the row's visible keys (what a weight rounding scales with).
    pub v_max: f64,
    pub out_rel_store: f64,
    pub lse: f64,
}

pub fn row_tolerance(case: &Case, b: usize, h: usize, i: usize, lse_ref: f64, store_eps: f64) -> RowTolerance {
    let s = &case.shape;
    let p = case.params();
    let r = case.reference();
    let hk = h / s.group_size();
    let scale = p.effective_scale(s.head_dim) as f64;
    let q = case.tensor(&case.bufs, 0);
    let k = case.tensor(&case.bufs, 1);
    let v = case.tensor(&case.bufs, 2);
    let qo = b * q.strides.batch + h * q.strides.head + i * q.strides.seq;
    let kv_len = case.kv_lens.as_ref().map_or(s.seq_kv, |l| l[b]);
    let (mut dot_abs, mut v_max, mut n) = (0.0f64, 0.0f64, 0usize);
    for j in 0..s.seq_kv {
        if !r.visible(b, i, j) {
            continue;
        }
        n += 1;
        let ko = b * k.strides.batch + hk * k.strides.head + j * k.strides.seq;
        let vo = b * v.strides.batch + hk * v.strides.head + j * v.strides.seq;
        let sum: f64 = (0..s.head_dim).map(|t| (q.data[qo + t] as f64 * k.data[ko + t] as f64).abs()).sum();
        dot_abs = dot_abs.max(sum);
        for t in 0..s.v_head_dim {
            v_max = v_max.max((v.data[vo + t] as f64).abs());
        }
    }
    let _ = kv_len;
    // Largest final logit magnitude: the dot part, plus whatever bias/ALiBi/softcap can add.
    let mut s_max = scale.abs() * dot_abs;
    if let Some(c) = p.softcap {
        s_max = s_max.min(c as f64);
    }
    if let Some((bias, st)) = &case.bias {
        let o = b * st.batch + h * st.head + i * st.row;
        s_max += bias[o..o + s.seq_kv].iter().filter(|x| x.is_finite()).fold(0.0f64, |a, &x| a.max((x as f64).abs()));
    }
    if let Some(sl) = &case.alibi {
        s_max += (sl[h] as f64).abs() * (s.seq_kv + s.seq_q) as f64;
    }
    if let Some(sk) = &case.sinks {
        if sk[h].is_finite() {
            s_max = s_max.max((sk[h] as f64).abs());
        }
    }
    let delta = EPS * ((s.head_dim as f64 + 4.0) * scale.abs() * dot_abs + 8.0 * s_max);
    let acc = (n as f64 + 32.0) * EPS;
    RowTolerance {
        out_abs: v_max * (2.5 * delta + acc) + 1e-30,
        v_max,
        out_rel_store: store_eps,
        lse: delta + acc * (1.0 + lse_ref.abs()),
    }
}

/// Compare a kernel's outcome with the reference, row by row. Fully masked rows must be exact
/// zeros with `lse = -inf`; nothing may be NaN; elements outside the output rows untouched.
pub fn check(case: &Case, got: &Outcome, store_eps: f64) -> Result<(), TestCaseError> {
    check_rounded_weights(case, got, store_eps, 0.0)
}

/// [`check`] for a kernel that rounds each softmax weight once (relative error at most
/// `weight_eps`) before P.V: the output may move by `weight_eps * max_j |v_j|` more (the
/// normaliser being the sum of the unrounded weights).
pub fn check_rounded_weights(case: &Case, got: &Outcome, store_eps: f64, weight_eps: f64) -> Result<(), TestCaseError> {
    let s = &case.shape;
    let r = case.reference();
    let st = case.out_strides;
    let mut touched = vec![false; got.out.len()];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq_q {
                let want = r.row(b, h, i).unwrap();
                let o = b * st.batch + h * st.head + i * st.seq;
                let row = &got.out[o..o + s.v_head_dim];
                touched[o..o + s.v_head_dim].iter_mut().for_each(|t| *t = true);
                let lse_got = got.lse[(b * s.q_heads + h) * s.seq_q + i];
                let at = format!("row (b={b}, h={h}, i={i}) of {:?}", case.spec);
                prop_assert!(row.iter().all(|x| !x.is_nan()), "NaN in output {at}: {row:?}");
                if want.lse == f64::NEG_INFINITY {
                    prop_assert!(row.iter().all(|&x| x == 0.0), "fully masked row not zero at {at}: {row:?}");
                    if case.spec.lse {
                        prop_assert!(lse_got == f32::NEG_INFINITY, "fully masked row lse {lse_got} at {at}");
                    }
                    continue;
                }
                let tol = row_tolerance(case, b, h, i, want.lse, store_eps);
                for (t, (&g, &w)) in row.iter().zip(&want.out).enumerate() {
                    let err = (g as f64 - w).abs();
                    let allowed = tol.out_abs + weight_eps * tol.v_max + tol.out_rel_store * w.abs().max(STORE_FLOOR);
                    prop_assert!(
                        err <= allowed,
                        "out[{t}] = {g}, reference {w}, error {err:.3e} > {allowed:.3e} at {at}"
                    );
                }
                if case.spec.lse {
                    let err = (lse_got as f64 - want.lse).abs();
                    prop_assert!(err <= tol.lse, "lse {lse_got}, reference {}, error {err:.3e} > {:.3e} at {at}", want.lse, tol.lse);
                }
            }
        }
    }
    if !case.spec.lse {
        prop_assert!(got.lse.iter().all(|&x| x == SENTINEL), "lse written though not requested");
    }
    for (n, (&t, &x)) in touched.iter().zip(&got.out).enumerate() {
        if !t {
            prop_assert!(x == SENTINEL, "element {n} outside every output row was overwritten with {x}");
        }
    }
    Ok(())
}

/// Which options a generated problem may turn on.
#[derive(Clone, Copy, Debug)]
pub enum Options {
    /// None: plain attention over random shapes and layouts.
    Plain,
    /// Exactly one option (the property then covers every option alone).
    One,
    /// Any combination.
    Any,
    /// Any combination, and values and masks chosen to hurt: huge logits, single visible keys,
    /// empty KV lengths, more queries than keys.
    Adversarial,
}

fn shape_strategy() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, usize)> {
    let heads = prop_oneof![
        (1..=2usize, Just(1usize)),         // MHA
        (1..=2usize, Just(2usize)),         // GQA 2
        (1..=2usize, Just(4usize)),         // GQA 4
        (Just(1usize), 2..=6usize),         // MQA
    ];
    let head_dim = prop_oneof![Just(1usize), Just(3), Just(64), Just(128), 1..=160usize];
    (
        1..=3usize,
        heads,
        prop_oneof![1..=8usize, 1..=70usize],
        prop_oneof![1..=16usize, 1..=300usize],
        head_dim,
        prop_oneof![3 => Just(0usize), 1 => 1..=96usize],
    )
        .prop_map(|(b, (hkv, g), sq, skv, d, dv)| (b, hkv, g, sq, skv, d, if dv == 0 { d } else { dv }))
}

fn layout_strategy() -> impl Strategy<Value = Layout> {
    let order = Just([0u8, 1, 2]).prop_shuffle().prop_map(|v| [v[0], v[1], v[2]]);
    prop_oneof![
        Just(Layout::Bhsd),
        Just(Layout::Bshd),
        Just(Layout::PackedQkv),
        (order, [0..=5usize, 0..=5usize, 0..=5usize, 0..=5usize], any::<bool>())
            .prop_map(|(order, pad, shared_kv)| Layout::Padded { order, pad, shared_kv }),
    ]
}

/// Random problems with the given option mix.
pub fn spec_strategy(mix: Options) -> impl Strategy<Value = Spec> {
    (shape_strategy(), layout_strategy(), any::<u64>(), 0..9usize).prop_flat_map(move |(shp, layout, seed, which)| {
        let (b, hkv, g, sq, skv, d, dv) = shp;
        let adversarial = matches!(mix, Options::Adversarial);
        // Each option is on with probability 1/2 (Any), or exactly option `which` (One).
        let on = move |k: usize| -> BoxedStrategy<bool> {
            match mix {
                Options::Plain => Just(false).boxed(),
                Options::One => Just(k == which).boxed(),
                Options::Any | Options::Adversarial => any::<bool>().boxed(),
            }
        };
        let side = if adversarial {
            prop_oneof![Just(None), Just(Some(0usize)), (0..=3usize).prop_map(Some)].boxed()
        } else {
            prop_oneof![Just(None), (0..=40usize).prop_map(Some)].boxed()
        };
        let kv_len = if adversarial {
            prop_oneof![Just(0usize), Just(1), Just(skv), 0..=skv].boxed()
        } else {
            (0..=skv).boxed()
        };
        let values = if adversarial {
            prop_oneof![Just(Values::HugeLogits), Just(Values::WideRange), Just(Values::Normal)].boxed()
        } else {
            prop_oneof![4 => Just(Values::Normal), 1 => Just(Values::HugeLogits), 1 => Just(Values::WideRange)].boxed()
        };
        (
            (on(0), on(1), on(2), on(3), on(4), on(5), on(6), on(7), on(8)),
            (side.clone(), side),
            proptest::collection::vec(kv_len, b),
            prop_oneof![Just(5.0f32), Just(30.0), 0.5f32..50.0],
            prop_oneof![Just(BiasKind::Full), Just(BiasKind::KeyPadding), Just(BiasKind::Shared)],
            prop_oneof![Just(0.0f32), -2.0f32..2.0],
            any::<bool>(),
            values,
        )
            .prop_map(move |(flags, (left, right), lens, softcap, bias, scale, lse, values)| {
                let (f_scale, f_causal, f_window, f_lens, f_softcap, f_bias, f_alibi, f_sinks, f_lse) = flags;
                Spec {
                    batch: b,
                    kv_heads: hkv,
                    group: g,
                    seq_q: sq,
                    seq_kv: skv,
                    head_dim: d,
                    v_head_dim: dv,
                    layout,
                    scale: f_scale.then_some(scale),
                    causal: f_causal,
                    window: f_window.then_some((left, right)),
                    kv_lens: f_lens.then_some(lens),
                    softcap: f_softcap.then_some(softcap),
                    bias: f_bias.then_some(bias),
                    alibi: f_alibi,
                    sinks: f_sinks,
                    lse: f_lse || lse,
                    values,
                    seed,
                }
            })
    })
}
