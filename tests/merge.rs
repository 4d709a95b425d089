//! Merging partial results: attention over random contiguous shards of the keys, merged,
//! equals attention over all keys (the f64 reference, same tolerance).

mod common;

use common::*;
use proptest::prelude::*;
use simd_attn::*;

fn shard_spec() -> impl Strategy<Value = (Spec, Vec<usize>)> {
    (spec_strategy(Options::Any), proptest::collection::vec(0.0f64..1.0, 0..4)).prop_map(|(mut s, cuts)| {
        // Options whose meaning depends on a key's absolute position or the cache length
        // cannot be sharded by slicing K/V alone.
        s.causal = false;
        s.window = None;
        s.kv_lens = None;
        s.alibi = false;
        s.lse = true;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| (c * s.seq_kv as f64) as usize).collect();
        cuts.push(0);
        cuts.push(s.seq_kv);
        cuts.sort_unstable();
        (s, cuts)
    })
}

proptest! {
    #[test]
    fn merged_shards_equal_full_attention((spec, cuts) in shard_spec()) {
        let case = Case::build(&spec);
        let s = case.shape;
        let rows = s.batch * s.q_heads * s.seq_q;
        let os = Strides::bhsd(s.q_heads, s.seq_q, s.v_head_dim);
        let mut shards: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
        for (n, w) in cuts.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            let shape = AttentionShape { seq_kv: b - a, ..s };
            let k = case.tensor(&case.bufs, 1);
            let v = case.tensor(&case.bufs, 2);
            let k = TensorRef::new(&k.data[a * k.strides.seq..], k.strides);
            let v = TensorRef::new(&v.data[a * v.strides.seq..], v.strides);
            let mut params = case.params();
            params.bias = params.bias.map(|bb| BiasRef::new(&bb.data[a..], bb.strides));
            if n > 0 {
                params.sinks = None; // the sink belongs to one shard
            }
            let mut out = vec![0.0f32; rows * s.v_head_dim];
            let mut lse = vec![0.0f32; rows];
            attention(&shape, case.tensor(&case.bufs, 0), k, v, TensorMut::new(&mut out, os), Some(&mut lse), &params).unwrap();
            shards.push((out, lse));
        }
        let parts: Vec<PartialResult<'_, f32>> =
            shards.iter().map(|(o, l)| PartialResult { out: TensorRef::new(o, os), lse: l }).collect();
        let mut out = vec![SENTINEL; case.out_len];
        let mut lse = vec![SENTINEL; rows];
        merge_partials(&s, &parts, TensorMut::new(&mut out, case.out_strides), Some(&mut lse)).unwrap();
        check(&case, &Outcome { out, lse }, 0.0)?;
    }
}

#[test]
fn merge_validates_its_inputs() {
    let s = AttentionShape::new(1, 2, 1, 3, 0, 4);
    let os = Strides::bhsd(2, 3, 4);
    let (o, l) = (vec![0.0f32; 24], vec![0.0f32; 6]);
    let mut out = vec![0.0f32; 24];
    let short = PartialResult { out: TensorRef::new(&o[..23], os), lse: &l };
    assert!(matches!(
        merge_partials(&s, &[short], TensorMut::new(&mut out, os), None),
        Err(AttnError::BufferTooSmall { tensor: TensorName::Partial, .. })
    ));
    let short_lse = PartialResult { out: TensorRef::new(&o, os), lse: &l[..5] };
    assert!(matches!(merge_partials(&s, &[short_lse], TensorMut::new(&mut out, os), None), Err(AttnError::BufferTooSmall { tensor: TensorName::Lse, .. })));
    // No parts at all: every row is empty.
    let mut lse = vec![0.0f32; 6];
    merge_partials::<f32, f32>(&s, &[], TensorMut::new(&mut out, os), Some(&mut lse)).unwrap();
    assert!(out.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
}
