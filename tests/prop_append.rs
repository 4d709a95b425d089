//! Appending new K/V to a cache and attending in one call (`attention_with_kvcache`), with
//! RoPE on the new keys as they are written and on Q as it is packed.
//!
//! Each case: a cache (tensors, token- or head-major, or a shuffled paged pool) filled to
//! random lengths, NaN everywhere past them; new rows for every sequence; RoPE off, or on in
//! either convention with a full or partial rotary dim. Checked on every ISA: the cache's old
//! rows and everything past the new rows untouched (bit for bit), new V rows copied exactly,
//! new K rows the literal rotation (in f64) within one rounding; the output against the f64
//! reference on the appended cache (which rotates Q literally), and bit for bit equal to a
//! plain call on that cache; invalid calls write nothing.

mod common;

use common::Rng;
use half::{bf16, f16};
use proptest::prelude::*;
use simd_attn::*;

#[derive(Clone, Debug)]
struct Spec {
    batch: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    capacity: usize,
    seq_new: usize,
    fill: Vec<usize>,
    /// None: tensors; Some(page size).
    page_size: Option<usize>,
    head_major: bool,
    /// (rotary_dim, interleaved)
    rope: Option<(usize, bool)>,
    /// Packed new rows and queries (chunked prefill): each sequence's own count, `0..=seq_new`.
    packed: Option<Vec<usize>>,
    causal: bool,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (1..=3usize, 1..=2usize, prop_oneof![Just(1usize), Just(4)], prop_oneof![Just(8usize), Just(64), Just(128), 2..=130usize], 1..=4usize, 5..=300usize)
        .prop_flat_map(|(batch, kv_heads, group, head_dim, seq_new, capacity)| {
            let capacity = capacity.max(seq_new + 1);
            let rot = (2..=head_dim).prop_map(|r| r & !1);
            (
                Just((batch, kv_heads, group, head_dim, seq_new, capacity)),
                proptest::collection::vec(prop_oneof![Just(0usize), Just(capacity - seq_new), 0..=capacity - seq_new], batch),
                prop_oneof![Just(None), prop_oneof![Just(1usize), Just(16), 1..=64usize].prop_map(Some)],
                any::<bool>(),
                prop_oneof![Just(None), (prop_oneof![Just(head_dim & !1), rot], any::<bool>()).prop_map(Some)],
                any::<bool>(),
                prop_oneof![Just(None), proptest::collection::vec(prop_oneof![Just(0usize), Just(seq_new), 0..=seq_new], batch).prop_map(Some)],
                any::<u64>(),
            )
        })
        .prop_map(|((batch, kv_heads, group, head_dim, seq_new, capacity), fill, page_size, head_major, rope, causal, packed, seed)| Spec {
            batch,
            kv_heads,
            group,
            head_dim: if rope.is_some() { head_dim.max(2) } else { head_dim },
            capacity,
            seq_new,
            fill,
            page_size,
            head_major,
            rope: rope.filter(|&(r, _)| r >= 2),
            causal,
            packed,
            seed,
        })
}

/// Where row `j` of KV head `hk`, sequence `b` lives in a cache buffer.
struct Layout {
    strides: Strides,
    /// Paged: page strides, block table, pages per sequence, pages, page size.
    pages: Option<(PageStrides, Vec<i32>, usize, usize, usize)>,
    len: usize,
}

impl Layout {
    fn new(sp: &Spec, dim: usize) -> Layout {
        let (b, h, s) = (sp.batch, sp.kv_heads, sp.capacity);
        match sp.page_size {
            None => {
                let strides = if sp.head_major { Strides::bhsd(h, s, dim) } else { Strides::bshd(h, s, dim) };
                Layout { strides, pages: None, len: b * h * s * dim }
            }
            Some(ps) => {
                let pps = s.div_ceil(ps);
                let num = b * pps + 1;
                let mut order: Vec<usize> = (0..num).collect();
                let mut rng = Rng::new(sp.seed ^ 3);
                for i in (1..num).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let table: Vec<i32> = (0..b * pps).map(|n| order[n] as i32).collect();
                let st = if sp.head_major { PageStrides::head_major(ps, h, dim) } else { PageStrides::token_major(ps, h, dim) };
                Layout { strides: Strides::default(), pages: Some((st, table, pps, num, ps)), len: num * st.page }
            }
        }
    }

    fn offset(&self, b: usize, hk: usize, j: usize) -> usize {
        match &self.pages {
            None => b * self.strides.batch + hk * self.strides.head + j * self.strides.seq,
            Some((st, table, pps, _, ps)) => table[b * pps + j / ps] as usize * st.page + hk * st.head + (j % ps) * st.slot,
        }
    }

    fn cache<'c, T>(&'c self, k: &'c mut [T], v: &'c mut [T], v_layout: &Layout) -> KvCacheMut<'c, T> {
        match (&self.pages, &v_layout.pages) {
            (None, None) => KvCacheMut::Tensors { k: TensorMut::new(k, self.strides), v: TensorMut::new(v, v_layout.strides) },
            (Some((ks, table, pps, num, ps)), Some((vs, ..))) => {
                KvCacheMut::Paged { k, v, k_strides: *ks, v_strides: *vs, pages: PageTable { block_table: table, pages_per_seq: *pps, page_size: *ps, num_pages: *num } }
            }
            _ => unreachable!("K and V share the paging"),
        }
    }
}

/// The literal rotation of one row at `pos` (f64), as the model definitions write it.
fn rotate(x: &[f64], pos: usize, rot: usize, interleaved: bool, cos: &[f32], sin: &[f32]) -> Vec<f64> {
    let mut y = x.to_vec();
    let half = rot / 2;
    for t in 0..half {
        let (a, b) = if interleaved { (2 * t, 2 * t + 1) } else { (t, t + half) };
        let (c, s) = (cos[pos * half + t] as f64, sin[pos * half + t] as f64);
        y[a] = x[a] * c - x[b] * s;
        y[b] = x[b] * c + x[a] * s;
    }
    y
}

fn check_append<T: FloatElement>(sp: &Spec) -> Result<(), TestCaseError> {
    let (b, hkv, d) = (sp.batch, sp.kv_heads, sp.head_dim);
    let hq = hkv * sp.group;
    let sn = sp.seq_new;
    let shape = AttentionShape::new(b, hq, hkv, sn, sp.capacity, d);
    let mut rng = Rng::new(sp.seed);
    let (kl, vl) = (Layout::new(sp, d), Layout::new(sp, d));
    // The cache: random rows below each fill, NaN everywhere else.
    let mut k0 = vec![T::from_f32(f32::NAN); kl.len];
    let mut v0 = vec![T::from_f32(f32::NAN); vl.len];
    for bi in 0..b {
        for hk in 0..hkv {
            for j in 0..sp.fill[bi] {
                for t in 0..d {
                    k0[kl.offset(bi, hk, j) + t] = T::from_f32(rng.uniform());
                    v0[vl.offset(bi, hk, j) + t] = T::from_f32(rng.uniform());
                }
            }
        }
    }
    // New rows and queries: padded `[B, sn]`, or packed tokens (`cu` the same for both).
    let rows: Vec<usize> = sp.packed.clone().unwrap_or_else(|| vec![sn; b]);
    let cu: Vec<i32> = std::iter::once(0).chain(rows.iter().scan(0, |a, &r| {
        *a += r as i32;
        Some(*a)
    })).collect();
    let tokens = cu[b] as usize;
    let (ns, qs, os, new_len, q_len) = match sp.packed {
        None => {
            let [qs, _, _, os] = shape.bhsd_strides();
            (Strides::bshd(hkv, sn, d), qs, os, b * sn * hkv * d, b * hq * sn * d)
        }
        Some(_) => (Strides { batch: 0, head: d, seq: hkv * d }, Strides { batch: 0, head: d, seq: hq * d }, Strides { batch: 0, head: d, seq: hq * d }, tokens * hkv * d, tokens * hq * d),
    };
    let new_at = |bi: usize, hk: usize, t: usize| match sp.packed {
        None => ns.batch * bi + ns.head * hk + ns.seq * t,
        Some(_) => ns.head * hk + ns.seq * (cu[bi] as usize + t),
    };
    let kn: Vec<T> = (0..new_len).map(|_| T::from_f32(rng.uniform())).collect();
    let vn: Vec<T> = (0..new_len).map(|_| T::from_f32(rng.uniform())).collect();
    let q: Vec<f32> = (0..q_len).map(|_| rng.uniform()).collect();
    let rot = sp.rope.map_or(2, |r| r.0);
    let (cos, sin) = Rope::tables(10000.0, rot, sp.capacity);
    let rope = sp.rope.map(|(rotary_dim, interleaved)| Rope { cos: &cos, sin: &sin, rotary_dim, interleaved });
    let mut params = AttentionParams::new().causal(sp.causal);
    if sp.packed.is_some() {
        params = params.cu_seqlens_q(&cu);
    }
    if let Some(r) = rope {
        params = params.rope(r);
    }
    let lens: Vec<usize> = sp.fill.iter().zip(&rows).map(|(&f, &r)| f + r).collect();
    let lse_len = b * hq * sn;
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(2) };
        let (mut kc, mut vc) = (k0.clone(), v0.clone());
        let mut out = vec![0.0f32; q_len];
        let mut lse = vec![0.0f32; if sp.packed.is_some() { hq * tokens } else { lse_len }];
        let (kr, vr) = (TensorRef::new(&kn[..], ns), TensorRef::new(&vn[..], ns));
        let new = match sp.packed {
            None => NewKv::padded(kr, vr, sn),
            Some(_) => NewKv::packed(kr, vr, &cu),
        };
        attention_with_kvcache(&config, &shape, TensorRef::new(&q[..], qs), kl.cache(&mut kc, &mut vc, &vl), Some(new), &sp.fill, TensorMut::new(&mut out, os), Some(&mut lse), &params)
            .map_err(|e| TestCaseError::fail(format!("[{isa}] {e}")))?;
        // The cache: old rows and everything past the new ones untouched; new rows written.
        let mut written = vec![false; kl.len];
        for bi in 0..b {
            for hk in 0..hkv {
                for t in 0..rows[bi] {
                    let (ko, vo, no) = (kl.offset(bi, hk, sp.fill[bi] + t), vl.offset(bi, hk, sp.fill[bi] + t), new_at(bi, hk, t));
                    written[ko..ko + d].iter_mut().for_each(|w| *w = true);
                    prop_assert!(vc[vo..vo + d].iter().zip(&vn[no..no + d]).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()), "[{isa}] new V row (b={bi}, hk={hk}, t={t}) not copied");
                    let x: Vec<f64> = kn[no..no + d].iter().map(|v| v.to_f64()).collect();
                    let want = match sp.rope {
                        Some((r, il)) => rotate(&x, sp.fill[bi] + t, r, il, &cos, &sin),
                        None => x.clone(),
                    };
                    for c in 0..d {
                        let got = kc[ko + c].to_f64();
                        // The f32 rotation (two products and a sum) and one rounding to T.
                        let store = match T::DTYPE {
                            DType::F16 => 1.0 / 2048.0,
                            DType::Bf16 => 1.0 / 256.0,
                            _ => 0.0,
                        };
                        let bound = 4.0 * f32::EPSILON as f64 * x.iter().fold(0.0f64, |a, v| a.max(v.abs())) + store * want[c].abs().max(1.0 / 16384.0);
                        prop_assert!((got - want[c]).abs() <= bound, "[{isa}] new K row (b={bi}, hk={hk}, t={t})[{c}] = {got}, rotated {}", want[c]);
                    }
                }
            }
        }
        for (n, (a, z)) in kc.iter().zip(&k0).enumerate() {
            prop_assert!(written[n] || a.to_f32().to_bits() == z.to_f32().to_bits(), "[{isa}] K cache element {n} changed");
        }
        // Against a plain call on the appended cache: the same bits.
        let mut out2 = vec![0.0f32; out.len()];
        let p2 = params.kv_lens(&lens);
        let kv: AnyKv<'_> = match (&kl.pages, &vl.pages) {
            (Some((ks, table, pps, num, ps)), Some((vs, ..))) => {
                PagedKv { k: &kc, v: &vc, k_strides: *ks, v_strides: *vs, pages: PageTable { block_table: table, pages_per_seq: *pps, page_size: *ps, num_pages: *num } }.into()
            }
            _ => (TensorRef::new(&kc[..], kl.strides), TensorRef::new(&vc[..], vl.strides)).into(),
        };
        simd_attn::run(&config, Request::new(shape, TensorRef::new(&q[..], qs), kv, TensorMut::new(&mut out2, os), p2)).unwrap();
        prop_assert!(out.iter().zip(&out2).all(|(a, b)| a.to_bits() == b.to_bits()), "[{isa}] differs from a plain call on the appended cache");
        // Against the reference on the appended cache, gathered.
        let gathered: Vec<(Vec<f32>, Vec<f32>)> = vec![{
            let (mut kg, mut vg) = (vec![0.0f32; b * hkv * sp.capacity * d], vec![0.0f32; b * hkv * sp.capacity * d]);
            for bi in 0..b {
                for hk in 0..hkv {
                    for j in 0..lens[bi] {
                        let to = ((bi * hkv + hk) * sp.capacity + j) * d;
                        for c in 0..d {
                            kg[to + c] = kc[kl.offset(bi, hk, j) + c].to_f32();
                            vg[to + c] = vc[vl.offset(bi, hk, j) + c].to_f32();
                        }
                    }
                }
            }
            (kg, vg)
        }];
        let [_, ks, vs, _] = shape.bhsd_strides();
        let r = Reference::new(&shape, TensorRef::new(&q[..], qs), TensorRef::new(&gathered[0].0[..], ks), TensorRef::new(&gathered[0].1[..], vs), &p2).unwrap().compute();
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..rows[bi] {
                    let (o, l) = match sp.packed {
                        None => (os.batch * bi + os.head * h + os.seq * i, (bi * hq + h) * sn + i),
                        Some(_) => (os.head * h + os.seq * (cu[bi] as usize + i), h * tokens + cu[bi] as usize + i),
                    };
                    for (c, &w) in r.out_row(bi, h, i).unwrap().iter().enumerate() {
                        let g = out[o + c];
                        let bound = 2e-5 * (d as f64 + 8.0);
                        prop_assert!((g as f64 - w).abs() <= bound, "[{isa}] out (b={bi}, h={h}, i={i})[{c}] = {g}, reference {w}");
                    }
                    let (g, w) = (lse[l], r.lse_at(bi, h, i).unwrap());
                    prop_assert!(if w.is_infinite() { g as f64 == w } else { (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()) }, "[{isa}] lse (b={bi}, h={h}, i={i}) = {g}, reference {w}");
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 4 + 1, ..ProptestConfig::default() })]

    #[test]
    fn append_f32(sp in spec()) {
        check_append::<f32>(&sp)?;
    }

    #[test]
    fn append_f16(sp in spec()) {
        check_append::<f16>(&sp)?;
    }

    #[test]
    fn append_bf16(sp in spec()) {
        check_append::<bf16>(&sp)?;
    }
}

/// RoPE on Q in a plain prefill call (causal, a cache longer than the chunk: positions start
/// past 0) against the reference, both conventions, partial rotary.
#[test]
fn rope_on_q_matches_the_reference() {
    let shape = AttentionShape::new(2, 4, 2, 37, 100, 64);
    let mut rng = Rng::new(5);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let [nq, nk, nv, no] = shape.bhsd_lens();
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = ((0..nq).map(|_| rng.uniform()).collect(), (0..nk).map(|_| rng.uniform()).collect(), (0..nv).map(|_| rng.uniform()).collect());
    let (cos, sin) = Rope::tables(500.0, 48, 100);
    for interleaved in [false, true] {
        let rope = Rope { cos: &cos, sin: &sin, rotary_dim: 48, interleaved };
        let lens = [100usize, 61];
        let params = AttentionParams::new().causal(true).kv_lens(&lens).rope(rope);
        let r = reference_attention(&shape, TensorRef::new(&q[..], qs), TensorRef::new(&k[..], ks), TensorRef::new(&v[..], vs), &params).unwrap();
        // Literally: rotate Q by hand, then the reference without rope.
        let mut qr = q.clone();
        for b in 0..2 {
            for h in 0..4 {
                for i in 0..37 {
                    let o = b * qs.batch + h * qs.head + i * qs.seq;
                    let x: Vec<f64> = q[o..o + 64].iter().map(|&v| v as f64).collect();
                    let y = rotate(&x, i + lens[b] - 37, 48, interleaved, &cos, &sin);
                    qr[o..o + 64].iter_mut().zip(&y).for_each(|(d, &s)| *d = s as f32);
                }
            }
        }
        let plain = AttentionParams::new().causal(true).kv_lens(&lens);
        let r2 = reference_attention(&shape, TensorRef::new(&qr[..], qs), TensorRef::new(&k[..], ks), TensorRef::new(&v[..], vs), &plain).unwrap();
        let worst = r.out.iter().zip(&r2.out).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "reference rope vs hand-rotated Q: {worst}");
        for isa in Isa::available() {
            let mut out = vec![0.0f32; no];
            attention_with(&RunConfig { isa: Some(isa), threads: Some(2) }, &shape, TensorRef::new(&q[..], qs), TensorRef::new(&k[..], ks), TensorRef::new(&v[..], vs), TensorMut::new(&mut out, os), None, &params).unwrap();
            let worst = out.iter().zip(&r.out).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst <= 2e-5 * 72.0, "[{isa}] interleaved {interleaved}: {worst}");
        }
    }
}

/// Invalid calls write nothing: neither the cache nor the output.
#[test]
fn a_rejected_append_writes_nothing() {
    let shape = AttentionShape::new(2, 2, 1, 1, 8, 4);
    let cs = Strides::bshd(1, 8, 4);
    let ns = Strides::bshd(1, 1, 4);
    let (kn, vn) = (vec![1.0f32; 8], vec![2.0f32; 8]);
    let q = vec![0.5f32; 16];
    let [qs, _, _, os] = shape.bhsd_strides();
    let (cos, sin) = Rope::tables(10000.0, 4, 6);
    let rope = Rope { cos: &cos, sin: &sin, rotary_dim: 4, interleaved: false };
    let call = |lens: &[usize], params: AttentionParams<'_>, table: Option<&[i32]>| {
        let (mut k, mut v) = (vec![9.0f32; 64], vec![9.0f32; 64]);
        let mut out = vec![7.0f32; 16];
        let cache = match table {
            None => KvCacheMut::Tensors { k: TensorMut::new(&mut k, cs), v: TensorMut::new(&mut v, cs) },
            Some(t) => KvCacheMut::Paged { k: &mut k, v: &mut v, k_strides: PageStrides::token_major(4, 1, 4), v_strides: PageStrides::token_major(4, 1, 4), pages: PageTable { block_table: t, pages_per_seq: 2, page_size: 4, num_pages: 4 } },
        };
        let new = NewKv::padded(TensorRef::new(&kn[..], ns), TensorRef::new(&vn[..], ns), 1);
        let r = attention_with_kvcache(&RunConfig::default(), &shape, TensorRef::new(&q[..], qs), cache, Some(new), lens, TensorMut::new(&mut out, os), None, &params);
        let untouched = k.iter().chain(&v).all(|&x| x == 9.0) && out.iter().all(|&x| x == 7.0);
        (r, untouched)
    };
    let (r, _) = call(&[3, 5], AttentionParams::new().rope(rope), None);
    assert!(r.is_ok(), "{r:?}");
    // Table entries are checked where the call reads them: NaN at position 0 is never read
    // (the rows sit at 3 and 5), at position 3 it is.
    let mut bad_cos = cos.clone();
    bad_cos[0] = f32::NAN;
    let (r, _) = call(&[3, 5], AttentionParams::new().rope(Rope { cos: &bad_cos, ..rope }), None);
    assert!(r.is_ok(), "{r:?}");
    bad_cos[3 * 2 + 1] = f32::NAN;
    let (r, untouched) = call(&[3, 5], AttentionParams::new().rope(Rope { cos: &bad_cos, ..rope }), None);
    assert!(matches!(r, Err(AttnError::InvalidValue { arg: "rope cos", index: 7, .. })) && untouched, "{r:?}");
    for (lens, params, table, what) in [
        (&[3usize, 8][..], AttentionParams::new(), None, "past the capacity"),
        (&[3, 6][..], AttentionParams::new().rope(rope), None, "past the rope tables"),
        (&[3, 5][..], AttentionParams::new().kv_lens(&[1, 1]), None, "kv_lens set"),
        (&[3][..], AttentionParams::new(), None, "cache_lens too short"),
        (&[3, 4][..], AttentionParams::new(), Some(&[0, 1, 2, -1][..]), "the new row's page is -1"),
    ] {
        let (r, untouched) = call(lens, params, table);
        assert!(r.is_err(), "{what}: accepted");
        assert!(untouched, "{what}: wrote before failing ({r:?})");
    }
}
