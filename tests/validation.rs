//! Every validation error, from the safe API: each bad input returns its typed error, names
//! the argument, and leaves the output untouched.

use simd_attn::*;

struct Bufs {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
}

fn bufs(shape: AttentionShape) -> Bufs {
    let [nq, nk, nv, no] = shape.bhsd_lens();
    Bufs { shape, q: vec![0.5; nq], k: vec![0.5; nk], v: vec![1.0; nv], out: vec![9.0; no] }
}

fn call(b: &mut Bufs, params: &AttentionParams<'_>) -> Result<RunInfo, AttnError> {
    let [qs, ks, vs, os] = b.shape.bhsd_strides();
    attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, ks), TensorRef::new(&b.v, vs), TensorMut::new(&mut b.out, os), None, params)
}

fn shape() -> AttentionShape {
    AttentionShape::new(2, 4, 2, 3, 5, 8)
}

fn expect_err(b: &mut Bufs, params: &AttentionParams<'_>, want: AttnError, words: &[&str]) {
    let err = call(b, params).unwrap_err();
    assert_eq!(err, want);
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "message {msg:?} does not mention {w:?}");
    }
    assert!(b.out.iter().all(|&x| x == 9.0), "output written on error");
}

#[test]
fn valid_call_runs() {
    let mut b = bufs(shape());
    let info = call(&mut b, &AttentionParams::new()).unwrap();
    assert_eq!(info.isa, info.isa);
    assert!(b.out.iter().all(|&x| (x - 1.0).abs() < 1e-6));
}

#[test]
fn zero_dims() {
    for (dim, s) in [
        ("head_dim", AttentionShape::new(1, 1, 1, 1, 1, 0).with_v_head_dim(4)),
        ("v_head_dim", AttentionShape::new(1, 1, 1, 1, 1, 4).with_v_head_dim(0)),
        ("q_heads", AttentionShape::new(1, 0, 1, 1, 1, 4)),
        ("kv_heads", AttentionShape::new(1, 1, 0, 1, 1, 4)),
    ] {
        expect_err(&mut bufs(s), &AttentionParams::new(), AttnError::ZeroDim { dim }, &[dim]);
    }
}

#[test]
fn heads_not_divisible() {
    let mut b = bufs(AttentionShape::new(1, 3, 2, 1, 1, 4));
    expect_err(&mut b, &AttentionParams::new(), AttnError::HeadsNotDivisible { q_heads: 3, kv_heads: 2 }, &["3", "2"]);
}

#[test]
fn buffers_too_small() {
    for (which, tensor) in [(0, TensorName::Q), (1, TensorName::K), (2, TensorName::V), (3, TensorName::Out)] {
        let mut b = bufs(shape());
        let len = match which {
            0 => { b.q.pop(); b.q.len() }
            1 => { b.k.pop(); b.k.len() }
            2 => { b.v.pop(); b.v.len() }
            _ => { b.out.pop(); b.out.len() }
        };
        let name = tensor.to_string();
        expect_err(&mut b, &AttentionParams::new(), AttnError::BufferTooSmall { tensor, needed: len + 1, len }, &[&name]);
    }
}

#[test]
fn strides_reaching_past_the_slice() {
    let mut b = bufs(shape());
    let [qs, ks, vs, os] = b.shape.bhsd_strides();
    let bad = Strides { seq: qs.seq + 1, ..qs };
    let err = attention(&b.shape, TensorRef::new(&b.q, bad), TensorRef::new(&b.k, ks), TensorRef::new(&b.v, vs), TensorMut::new(&mut b.out, os), None, &AttentionParams::new())
        .unwrap_err();
    assert!(matches!(err, AttnError::BufferTooSmall { tensor: TensorName::Q, .. }), "{err}");
}

#[test]
fn overflowing_strides() {
    let mut b = bufs(shape());
    let [qs, ks, vs, os] = b.shape.bhsd_strides();
    let huge = Strides { batch: usize::MAX - 3, ..ks };
    let err = attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, huge), TensorRef::new(&b.v, vs), TensorMut::new(&mut b.out, os), None, &AttentionParams::new())
        .unwrap_err();
    assert_eq!(err, AttnError::SizeOverflow { tensor: TensorName::K });
}

#[test]
fn overlapping_output() {
    let mut b = bufs(shape());
    let [qs, ks, vs, os] = b.shape.bhsd_strides();
    for bad in [Strides { head: 0, ..os }, Strides { seq: 4, ..os }, Strides { batch: os.head, ..os }] {
        let err = attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, ks), TensorRef::new(&b.v, vs), TensorMut::new(&mut b.out, bad), None, &AttentionParams::new())
            .unwrap_err();
        assert!(matches!(err, AttnError::OverlappingOutput { tensor: TensorName::Out, .. }), "{bad:?}: {err}");
        assert!(err.to_string().contains("stride"));
    }
    // Zero strides on inputs are broadcasts, not errors.
    let shared = Strides { batch: 0, ..ks };
    let shared_v = Strides { batch: 0, ..vs };
    attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, shared), TensorRef::new(&b.v, shared_v), TensorMut::new(&mut b.out, os), None, &AttentionParams::new())
        .unwrap();
}

#[test]
fn lse_too_small() {
    let mut b = bufs(shape());
    let [qs, ks, vs, os] = b.shape.bhsd_strides();
    let mut lse = vec![0.0f32; 2 * 4 * 3 - 1];
    let err = attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, ks), TensorRef::new(&b.v, vs), TensorMut::new(&mut b.out, os), Some(&mut lse), &AttentionParams::new())
        .unwrap_err();
    assert_eq!(err, AttnError::BufferTooSmall { tensor: TensorName::Lse, needed: 24, len: 23 });
}

#[test]
fn kv_lens_checked() {
    let mut b = bufs(shape());
    expect_err(&mut b, &AttentionParams::new().kv_lens(&[5]), AttnError::WrongLength { arg: "kv_lens", expected: 2, got: 1 }, &["kv_lens", "2", "1"]);
    expect_err(&mut b, &AttentionParams::new().kv_lens(&[5, 6]), AttnError::KvLenOutOfRange { batch: 1, kv_len: 6, seq_kv: 5 }, &["kv_lens[1]", "6", "5"]);
}

#[test]
fn scale_and_softcap_checked() {
    let mut b = bufs(shape());
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = call(&mut b, &AttentionParams::new().scale(s)).unwrap_err();
        assert!(matches!(err, AttnError::NonFiniteScale { .. }), "{err}");
    }
    for c in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let err = call(&mut b, &AttentionParams::new().softcap(c)).unwrap_err();
        assert!(matches!(err, AttnError::InvalidSoftcap { .. }), "{err}");
        assert!(err.to_string().contains("softcap"));
    }
}

#[test]
fn per_head_arrays_checked() {
    let mut b = bufs(shape());
    expect_err(&mut b, &AttentionParams::new().alibi_slopes(&[1.0; 3]), AttnError::WrongLength { arg: "alibi_slopes", expected: 4, got: 3 }, &["alibi_slopes"]);
    expect_err(&mut b, &AttentionParams::new().sinks(&[1.0; 5]), AttnError::WrongLength { arg: "sinks", expected: 4, got: 5 }, &["sinks"]);
    let err = call(&mut b, &AttentionParams::new().alibi_slopes(&[1.0, f32::NAN, 1.0, 1.0])).unwrap_err();
    assert!(matches!(err, AttnError::InvalidValue { arg: "alibi_slopes", index: 1, .. }), "{err}");
    let err = call(&mut b, &AttentionParams::new().sinks(&[1.0, 1.0, f32::INFINITY, 1.0])).unwrap_err();
    assert!(matches!(err, AttnError::InvalidValue { arg: "sinks", index: 2, .. }), "{err}");
    // -inf sinks mean "no sink" and are allowed.
    call(&mut b, &AttentionParams::new().sinks(&[f32::NEG_INFINITY; 4])).unwrap();
}

#[test]
fn bias_checked() {
    let mut b = bufs(shape());
    let data = vec![0.0f32; 2 * 4 * 3 * 5];
    let full = BiasStrides { batch: 60, head: 15, row: 5 };
    call(&mut b, &AttentionParams::new().bias(BiasRef::new(&data, full))).unwrap();
    let err = call(&mut b, &AttentionParams::new().bias(BiasRef::new(&data[1..], full))).unwrap_err();
    assert_eq!(err, AttnError::BufferTooSmall { tensor: TensorName::Bias, needed: 120, len: 119 });
    // Broadcast key-padding mask [B, 1, 1, Skv].
    call(&mut b, &AttentionParams::new().bias(BiasRef::new(&data[..10], BiasStrides { batch: 5, head: 0, row: 0 }))).unwrap();
}

#[test]
fn the_reference_validates_too() {
    let b = bufs(AttentionShape::new(1, 3, 2, 1, 1, 4));
    let [qs, ks, vs, _] = b.shape.bhsd_strides();
    let err = reference_attention(&b.shape, TensorRef::new(&b.q, qs), TensorRef::new(&b.k, ks), TensorRef::new(&b.v, vs), &AttentionParams::new())
        .unwrap_err();
    assert_eq!(err, AttnError::HeadsNotDivisible { q_heads: 3, kv_heads: 2 });
}

#[test]
fn empty_problems_are_no_ops() {
    for s in [AttentionShape::new(0, 2, 1, 3, 4, 8), AttentionShape::new(2, 2, 1, 0, 4, 8)] {
        let mut b = bufs(s);
        call(&mut b, &AttentionParams::new()).unwrap();
    }
    // No keys at all: every row is fully masked.
    let mut b = bufs(AttentionShape::new(1, 2, 1, 3, 0, 8));
    call(&mut b, &AttentionParams::new().causal(true)).unwrap();
    assert!(b.out.iter().all(|&x| x == 0.0));
}

#[test]
fn sizes_beyond_memory_are_errors_not_aborts() {
    // Zero sequence strides make any seq_kv valid input; the decode plan's partials for 2^60
    // keys cannot be allocated, and for usize::MAX keys cannot even be sized.
    let (q, k, v) = (vec![0.1f32; 32], vec![0.2f32; 8], vec![0.3f32; 1024]);
    let zero = Strides::new(0, 0, 0);
    for (seq_kv, too_big) in [(1usize << 60, false), (usize::MAX, true)] {
        let shape = AttentionShape::new(1, 4, 1, 1, seq_kv, 8).with_v_head_dim(1024);
        let mut out = vec![0.0f32; 4 * 1024];
        let err = attention_with(
            &RunConfig { isa: Some(Isa::best()), threads: Some(1) },
            &shape,
            TensorRef::new(&q, Strides::bhsd(4, 1, 8)),
            TensorRef::new(&k, zero),
            TensorRef::new(&v, zero),
            TensorMut::new(&mut out, Strides::bhsd(4, 1, 1024)),
            None,
            &AttentionParams::new(),
        )
        .unwrap_err();
        if too_big {
            assert_eq!(err, AttnError::SizeOverflow { tensor: TensorName::K });
        } else {
            assert!(matches!(err, AttnError::OutOfMemory { .. } | AttnError::SizeOverflow { .. }), "{err}");
        }
        assert!(out.iter().all(|&x| x == 0.0), "nothing written");
    }

    // An absurd share count is refused, not allocated.
    let s = AttentionShape::new(1, 1, 1, 2, 2, 4);
    let [qs, ks, vs, os] = s.bhsd_strides();
    let mut out = vec![0.0f32; 8];
    let err = HostPlan::new(
        &RunConfig::default(),
        &s,
        TensorRef::new(&q[..8], qs),
        TensorRef::new(&k[..8], ks),
        TensorRef::new(&v[..8], vs),
        TensorMut::new(&mut out, os),
        None,
        &AttentionParams::new(),
        usize::MAX,
    )
    .err()
    .unwrap();
    assert!(matches!(err, AttnError::OutOfMemory { .. }), "{err}");
}
