//! The contract on hand-computed cases: these check the reference itself (the oracle of every
//! other test) and the kernels on the corners the docs promise.

mod common;

use common::*;
use simd_attn::*;

/// One head, D = 1, given q, keys and values.
fn tiny(q: f32, keys: &[f32], values: &[f32], params: &AttentionParams<'_>) -> (Vec<f64>, f64, Vec<f32>, f32) {
    let shape = AttentionShape::new(1, 1, 1, 1, keys.len(), 1);
    let [qs, ks, vs, os] = shape.bhsd_strides();
    let qv = [q];
    let r = reference_attention(&shape, TensorRef::new(&qv, qs), TensorRef::new(keys, ks), TensorRef::new(values, vs), params).unwrap();
    let mut out = vec![0.0f32; 1];
    let mut lse = vec![0.0f32; 1];
    attention(&shape, TensorRef::new(&qv, qs), TensorRef::new(keys, ks), TensorRef::new(values, vs), TensorMut::new(&mut out, os), Some(&mut lse), params).unwrap();
    (r.out, r.lse[0], out, lse[0])
}

#[test]
fn softmax_by_hand() {
    // scores 1*[0, ln 2, ln 3] with scale 1: weights 1/6, 2/6, 3/6.
    let (ro, rl, o, l) = tiny(1.0, &[0.0, 2f32.ln(), 3f32.ln()], &[6.0, 12.0, 18.0], &AttentionParams::new().scale(1.0));
    let want = (6.0 + 24.0 + 54.0) / 6.0;
    assert!((ro[0] - want).abs() < 1e-6, "{ro:?}");
    assert!((rl - 6f64.ln()).abs() < 1e-6);
    assert!((o[0] as f64 - want).abs() < 1e-4 && (l as f64 - 6f64.ln()).abs() < 1e-6);
}

#[test]
fn default_scale_is_inverse_sqrt_d() {
    assert_eq!(AttentionParams::new().effective_scale(64), 0.125);
}

#[test]
fn sink_joins_the_denominator_only() {
    // One key with score 0, a sink with logit 0: weight 1/2, lse = ln 2.
    let sinks = [0.0f32];
    let (ro, rl, o, l) = tiny(1.0, &[0.0], &[4.0], &AttentionParams::new().sinks(&sinks));
    assert!((ro[0] - 2.0).abs() < 1e-12 && (rl - 2f64.ln()).abs() < 1e-12);
    assert!((o[0] - 2.0).abs() < 1e-6 && (l - 2f32.ln()).abs() < 1e-6);
}

#[test]
fn softcap_applies_before_bias() {
    // score 10 capped at c = 1: tanh(10) ~ 1; bias -1 on the first key.
    let bias = [-1.0f32, 0.0];
    let p = AttentionParams::new().scale(1.0).softcap(1.0).bias(BiasRef::new(&bias, BiasStrides::default()));
    let (ro, _, o, _) = tiny(1.0, &[10.0, 0.0], &[1.0, 0.0], &p);
    let (s0, s1) = (10f64.tanh() - 1.0, 0.0f64);
    let want = s0.exp() / (s0.exp() + s1.exp());
    assert!((ro[0] - want).abs() < 1e-12, "{} vs {want}", ro[0]);
    assert!((o[0] as f64 - want).abs() < 1e-6);
}

#[test]
fn alibi_distance_is_relative_to_the_aligned_position() {
    // Sq = 1 against 3 keys: off = 2, the query sits at position 2; slopes * (j - 2).
    let slopes = [1.0f32];
    let (ro, _, _, _) = tiny(0.0, &[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0], &AttentionParams::new().alibi_slopes(&slopes));
    let w: Vec<f64> = [-2.0f64, -1.0, 0.0].iter().map(|x| x.exp()).collect();
    let want = (w[0] + 2.0 * w[1] + 3.0 * w[2]) / w.iter().sum::<f64>();
    assert!((ro[0] - want).abs() < 1e-12);
}

#[test]
fn causal_is_bottom_right_aligned() {
    let s = AttentionShape::new(1, 1, 1, 2, 5, 4);
    let [qs, ks, vs, _] = s.bhsd_strides();
    let (q, k, v) = (vec![0.1f32; 8], vec![0.1f32; 20], vec![0.1f32; 20]);
    let p = AttentionParams::new().causal(true);
    let r = Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), &p).unwrap();
    // off = 5 - 2 = 3: row 0 sees keys 0..=3, row 1 sees all five.
    assert!((0..4).all(|j| r.visible(0, 0, j)) && !r.visible(0, 0, 4));
    assert!((0..5).all(|j| r.visible(0, 1, j)));
    // With a window (1, 0) row 1 sees keys 3 and 4 only; with kv_len 2 row 1 sees 0..=1.
    let pw = p.window(Some(1), Some(0));
    let rw = Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), &pw).unwrap();
    assert_eq!((0..5).filter(|&j| rw.visible(0, 1, j)).collect::<Vec<_>>(), vec![3, 4]);
    let lens = [2usize];
    let pl = p.kv_lens(&lens);
    let rl = Reference::new(&s, TensorRef::new(&q, qs), TensorRef::new(&k, ks), TensorRef::new(&v, vs), &pl).unwrap();
    assert_eq!((0..5).filter(|&j| rl.visible(0, 1, j)).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!((0..5).filter(|&j| rl.visible(0, 0, j)).collect::<Vec<_>>(), vec![0]);
}

#[test]
fn fully_masked_rows_are_zero_with_lse_minus_inf() {
    // More queries than keys under a causal mask: the first rows see nothing.
    let mut spec = Spec::plain(1, 2, 1, 6, 3, 8);
    spec.causal = true;
    let case = Case::build(&spec);
    let got = run_typed::<f32, f32, f32>(&case, attention);
    check(&case, &got, 0.0).unwrap();
    for h in 0..2 {
        for i in 0..3 {
            let row = (h * 6 + i) * 8;
            assert!(got.out[row..row + 8].iter().all(|&x| x == 0.0));
            assert_eq!(got.lse[h * 6 + i], f32::NEG_INFINITY);
        }
        assert!(got.lse[h * 6 + 3].is_finite());
    }
}

#[test]
fn bias_of_minus_inf_everywhere_masks_the_row() {
    let mut spec = Spec::plain(1, 1, 1, 1, 4, 8);
    spec.bias = Some(BiasKind::Shared);
    let mut case = Case::build(&spec);
    case.bias.as_mut().unwrap().0.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    let got = run_typed::<f32, f32, f32>(&case, attention);
    assert!(got.out.iter().all(|&x| x == 0.0));
    assert_eq!(got.lse[0], f32::NEG_INFINITY);
}

#[test]
fn huge_logits_do_not_overflow() {
    let mut spec = Spec::plain(1, 2, 2, 17, 130, 64);
    spec.values = Values::HugeLogits;
    let case = Case::build(&spec);
    let got = run_typed::<f32, f32, f32>(&case, attention);
    check(&case, &got, 0.0).unwrap();
}

#[test]
fn length_one_sequences() {
    for (sq, skv) in [(1, 1), (1, 7), (7, 1)] {
        for causal in [false, true] {
            let mut spec = Spec::plain(2, 4, 2, sq, skv, 3);
            spec.causal = causal;
            let case = Case::build(&spec);
            check(&case, &run_typed::<f32, f32, f32>(&case, attention), 0.0).unwrap();
        }
    }
}

#[test]
fn flops_count_visible_pairs_only() {
    let s = AttentionShape::new(1, 2, 1, 4, 4, 8);
    assert_eq!(attention_flops(&s, &AttentionParams::new()), (16 * 2 * 4 * 8) as f64);
    assert_eq!(attention_flops(&s, &AttentionParams::new().causal(true)), (10 * 2 * 4 * 8) as f64);
}

#[test]
fn tile_rule_survives_degenerate_sizes() {
    for f in simd_attn::plan::FAMILIES {
        for (d, dv) in [(0, 0), (1, 0), (0, 1), (100_000, 3)] {
            let t = f.tiles(d, dv);
            assert!(t.br >= 1 && t.bc >= 1, "{f:?} {d} {dv}: {t:?}");
        }
    }
}
