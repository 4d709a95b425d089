//! Packed variable-length batches (`cu_seqlens_q`, `cu_seqlens_k`), as
//! `flash_attn_varlen_func` takes them, alone and against a paged cache.
//!
//! A packed sequence of `q_len` rows runs as the last `q_len` rows of a padded sequence of
//! `seq_q` rows (that is what bottom-right alignment means), so every generated case is run
//! twice on every ISA and thread count: once padded (the generator's tensors, sequence `b`'s
//! rows at the bottom of its `seq_q`, `kv_lens` its key counts), once packed: Q and out as
//! tokens with padding between them (token-major or head-major), K/V as packed tokens, packed
//! with `kv_lens` as `seqused_k`, or a shuffled paged pool. The present rows must agree bit
//! for bit, and nothing else of the packed output may be written. The padded run is checked
//! against the f64 reference, and the reference's own packed path must give the padded
//! reference's rows exactly.

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use simd_attn::*;

/// Where the packed call's K and V come from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum KvMode {
    /// The padded tensors, with `kv_lens`.
    Padded,
    /// Packed tokens with `cu_seqlens_k`.
    Packed,
    /// Packed tokens whose segments are longer than the keys used (`kv_lens` as `seqused_k`).
    PackedUsed,
    /// A shuffled paged pool of this page size, with `kv_lens`.
    Paged(usize),
}

#[derive(Clone, Debug)]
struct Split {
    q_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    kv: KvMode,
    /// Q/out head-major (`[H, T, D]`) instead of token-major (`[T, H, D]`).
    head_major: bool,
    /// Extra elements after each token (token-major) or head (head-major).
    pad: usize,
    /// Tokens before the first sequence (`cu_seqlens_q[0] > 0`).
    lead: usize,
}

fn split(batch: usize, seq_q: usize, seq_kv: usize) -> impl Strategy<Value = Split> {
    let q_len = prop_oneof![Just(0usize), Just(seq_q), 0..=seq_q];
    let kv_len = prop_oneof![Just(0usize), Just(seq_kv), 0..=seq_kv];
    (
        proptest::collection::vec(q_len, batch),
        proptest::collection::vec(kv_len, batch),
        prop_oneof![Just(KvMode::Padded), Just(KvMode::Packed), Just(KvMode::PackedUsed), prop_oneof![Just(1usize), Just(16), 1..=300usize].prop_map(KvMode::Paged)],
        any::<bool>(),
        prop_oneof![Just(0usize), 1..=9usize],
        prop_oneof![Just(0usize), 1..=3usize],
    )
        .prop_map(|(q_lens, kv_lens, kv, head_major, pad, lead)| Split { q_lens, kv_lens, kv, head_major, pad, lead })
}

fn cu(lens: &[usize], lead: usize) -> Vec<i32> {
    let mut cu = vec![lead as i32];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    cu
}

/// A packed copy of some rows: `tokens` tokens of `heads` heads of `dim`, and its strides.
struct Tokens {
    data: Vec<f32>,
    strides: Strides,
}

fn token_strides(tokens: usize, heads: usize, dim: usize, head_major: bool, pad: usize) -> (Strides, usize) {
    if head_major {
        (Strides::new(0, tokens * dim + pad, dim), heads * (tokens * dim + pad))
    } else {
        (Strides::new(0, dim, heads * dim + pad), tokens * (heads * dim + pad))
    }
}

/// Copies `rows(b)` of each sequence (row `r` of `b` from padded row `from(b, r)`) of the
/// case's tensor `which` into packed tokens starting at `cu[b]`.
fn pack(case: &Case, which: usize, heads: usize, dim: usize, cu: &[i32], from: impl Fn(usize, usize) -> usize, head_major: bool, pad: usize) -> Tokens {
    let tokens = cu[cu.len() - 1] as usize;
    let (strides, len) = token_strides(tokens, heads, dim, head_major, pad);
    let mut data = vec![f32::NAN; len];
    let (bi, off, vs) = case.views[which];
    for b in 0..cu.len() - 1 {
        for r in 0..(cu[b + 1] - cu[b]) as usize {
            for h in 0..heads {
                let src = off + b * vs.batch + h * vs.head + from(b, r) * vs.seq;
                let dst = (cu[b] as usize + r) * strides.seq + h * strides.head;
                data[dst..dst + dim].copy_from_slice(&case.bufs[bi][src..src + dim]);
            }
        }
    }
    Tokens { data, strides }
}

/// A shuffled token-major pool of pages holding packed K or V tokens (`cu`, `lens` keys each).
struct Pool {
    data: Vec<f32>,
    strides: PageStrides,
}

fn page_table(lens: &[usize], page_size: usize, pages_per_seq: usize, seed: u64) -> (Vec<i32>, usize) {
    let wanted: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum();
    let num_pages = wanted + 1;
    let mut physical: Vec<usize> = (0..num_pages).collect();
    let mut rng = common::Rng::new(seed ^ 0xbeef);
    for i in (1..physical.len()).rev() {
        physical.swap(i, rng.below(i + 1));
    }
    let mut table = vec![-1i32; lens.len() * pages_per_seq];
    let mut n = 0;
    for (b, l) in lens.iter().enumerate() {
        for p in 0..l.div_ceil(page_size) {
            table[b * pages_per_seq + p] = physical[n] as i32;
            n += 1;
        }
    }
    (table, num_pages)
}

fn paginate(t: &Tokens, cu: &[i32], lens: &[usize], heads: usize, dim: usize, page_size: usize, table: &[i32], pages_per_seq: usize, num_pages: usize) -> Pool {
    let strides = PageStrides::token_major(page_size, heads, dim);
    let mut data = vec![f32::NAN; num_pages * strides.page];
    for (b, &l) in lens.iter().enumerate() {
        for j in 0..l {
            let page = table[b * pages_per_seq + j / page_size] as usize;
            for h in 0..heads {
                let src = (cu[b] as usize + j) * t.strides.seq + h * t.strides.head;
                let dst = page * strides.page + h * strides.head + (j % page_size) * strides.slot;
                data[dst..dst + dim].copy_from_slice(&t.data[src..src + dim]);
            }
        }
    }
    Pool { data, strides }
}

fn conv<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// The padded run of a case (sequence `b`'s keys limited to `kv_lens[b]`): output and LSE.
fn run_padded<TKV: Element>(case: &Case, kv_lens: &[usize], config: &RunConfig) -> Outcome {
    run_typed::<f32, TKV, f32>(case, |s, q, k, v, o, l, p| {
        let p = p.kv_lens(kv_lens);
        let mut request = Request::new(*s, q, (k, v), o, p);
        if let Some(l) = l {
            request = request.lse(l);
        }
        simd_attn::run(config, request)
    })
}

/// The packed inputs of a case and split: everything a packed call borrows.
struct Packed {
    cu_q: Vec<i32>,
    cu_k: Vec<i32>,
    q: Tokens,
    k: Tokens,
    v: Tokens,
    /// Page table, pages per sequence, pool page count, K and V pools (paged mode).
    paged: Option<(Vec<i32>, usize, usize, Pool, Pool)>,
    out_strides: Strides,
    out_len: usize,
    total_q: usize,
}

fn packed_inputs(case: &Case, sp: &Split) -> Packed {
    let s = case.shape;
    let cu_q = cu(&sp.q_lens, sp.lead);
    let total_q = cu_q[s.batch] as usize;
    // Row `r` of packed sequence `b` is padded row `seq_q - q_len + r`.
    let q = pack(case, 0, s.q_heads, s.head_dim, &cu_q, |b, r| s.seq_q - sp.q_lens[b] + r, sp.head_major, sp.pad);
    // PackedUsed: segments 3 keys longer than used (never read; the padded tensor has them).
    let seg: Vec<usize> = match sp.kv {
        KvMode::PackedUsed => sp.kv_lens.iter().map(|&l| (l + 3).min(s.seq_kv)).collect(),
        _ => sp.kv_lens.clone(),
    };
    let cu_k = cu(&seg, sp.lead);
    let k = pack(case, 1, s.kv_heads, s.head_dim, &cu_k, |_, j| j, !sp.head_major, sp.pad);
    let v = pack(case, 2, s.kv_heads, s.v_head_dim, &cu_k, |_, j| j, false, 0);
    let paged = match sp.kv {
        KvMode::Paged(ps) => {
            let pages_per_seq = s.seq_kv.div_ceil(ps).max(1);
            let (table, num_pages) = page_table(&sp.kv_lens, ps, pages_per_seq, case.spec.seed);
            let kp = paginate(&k, &cu_k, &sp.kv_lens, s.kv_heads, s.head_dim, ps, &table, pages_per_seq, num_pages);
            let vp = paginate(&v, &cu_k, &sp.kv_lens, s.kv_heads, s.v_head_dim, ps, &table, pages_per_seq, num_pages);
            Some((table, pages_per_seq, num_pages, kp, vp))
        }
        _ => None,
    };
    let (out_strides, out_len) = token_strides(total_q, s.q_heads, s.v_head_dim, sp.head_major, sp.pad);
    Packed { cu_q, cu_k, q, k, v, paged, out_strides, out_len, total_q }
}

impl Packed {
    /// The packed call's params: the case's options, `cu_seqlens_q`, and the K/V mode's own.
    fn params<'p>(&'p self, case_params: AttentionParams<'p>, sp: &'p Split) -> AttentionParams<'p> {
        let p = AttentionParams { kv_lens: None, ..case_params }.cu_seqlens_q(&self.cu_q);
        match sp.kv {
            KvMode::Padded | KvMode::Paged(_) => p.kv_lens(&sp.kv_lens),
            KvMode::Packed => p.cu_seqlens_k(&self.cu_k),
            KvMode::PackedUsed => p.cu_seqlens_k(&self.cu_k).kv_lens(&sp.kv_lens),
        }
    }
}

/// Runs the packed call: the output buffer (sentinel-filled) and the `[Hq, tokens]` LSE.
fn run_packed<TKV: Element>(case: &Case, sp: &Split, pk: &Packed, config: &RunConfig) -> (Vec<f32>, Vec<f32>) {
    let s = case.shape;
    let q = &pk.q.data;
    let (kp, vp) = (conv::<TKV>(&pk.k.data), conv::<TKV>(&pk.v.data));
    let pooled = pk.paged.as_ref().map(|(_, _, _, k, v)| (conv::<TKV>(&k.data), conv::<TKV>(&v.data)));
    let padded_kv: [Vec<TKV>; 3] = [conv(&case.bufs[0]), conv(&case.bufs[1]), conv(&case.bufs[2])];
    let kv: AnyKv<'_> = match (sp.kv, &pk.paged, &pooled) {
        (KvMode::Paged(ps), Some((table, pps, np, k, v)), Some((kd, vd))) => PagedKv {
            k: kd,
            v: vd,
            k_strides: k.strides,
            v_strides: v.strides,
            pages: PageTable { block_table: table, pages_per_seq: *pps, page_size: ps, num_pages: *np },
        }
        .into(),
        (KvMode::Padded, ..) => (case.tensor(&padded_kv, 1), case.tensor(&padded_kv, 2)).into(),
        _ => (TensorRef::new(&kp[..], pk.k.strides), TensorRef::new(&vp[..], pk.v.strides)).into(),
    };
    let mut out = vec![SENTINEL; pk.out_len];
    let mut lse = vec![SENTINEL; s.q_heads * pk.total_q];
    let case_params = case.params();
    let params = pk.params(case_params, sp);
    let mut request = Request::new(s, TensorRef::new(&q[..], pk.q.strides), kv, TensorMut::new(&mut out, pk.out_strides), params);
    if case.spec.lse {
        request = request.lse(&mut lse);
    }
    simd_attn::run(config, request).expect("generated packed calls are valid");
    (out, lse)
}

/// Checks the packed run against the f64 reference: its present rows, put where the padded
/// layout keeps them (the rest from the padded run, itself checked), go through the suite's
/// checker. Every other element of the packed output must be untouched. (Not bit for bit
/// against the padded run: a unit of fewer rows may take another register tile.)
fn compare(case: &Case, sp: &Split, pk: &Packed, padded: &Outcome, out: &[f32], lse: &[f32]) -> Result<(), TestCaseError> {
    let s = case.shape;
    let mut touched = vec![false; out.len()];
    let mut merged = Outcome { out: padded.out.clone(), lse: padded.lse.clone() };
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for r in 0..sp.q_lens[b] {
                let i = s.seq_q - sp.q_lens[b] + r;
                let t = pk.cu_q[b] as usize + r;
                let po = b * case.out_strides.batch + h * case.out_strides.head + i * case.out_strides.seq;
                let o = t * pk.out_strides.seq + h * pk.out_strides.head;
                merged.out[po..po + s.v_head_dim].copy_from_slice(&out[o..o + s.v_head_dim]);
                touched[o..o + s.v_head_dim].iter_mut().for_each(|x| *x = true);
                merged.lse[(b * s.q_heads + h) * s.seq_q + i] = lse[h * pk.total_q + t];
            }
        }
    }
    if let Some(n) = touched.iter().zip(out).position(|(&t, &x)| !t && x != SENTINEL) {
        return Err(TestCaseError::fail(format!("element {n} outside every packed row was written: {}", out[n])));
    }
    if !case.spec.lse && lse.iter().any(|&x| x != SENTINEL) {
        return Err(TestCaseError::fail("lse written though not requested"));
    }
    check(case, &merged, 0.0)
}

/// The reference's packed path: row `r` of sequence `b` equals the padded reference's row
/// `seq_q - q_len + r`, exactly (the same f64 arithmetic on the same values).
fn check_reference(case: &Case, sp: &Split, pk: &Packed) -> Result<(), String> {
    if pk.paged.is_some() || sp.kv == KvMode::Padded {
        return Ok(()); // the reference takes tensors; the padded K/V is covered by `check`
    }
    let s = case.shape;
    let mut params = case.params();
    params.kv_lens = Some(&sp.kv_lens);
    let padded = Reference::new(&s, case.tensor(&case.bufs, 0), case.tensor(&case.bufs, 1), case.tensor(&case.bufs, 2), &params).map_err(|e| e.to_string())?;
    let pp = pk.params(case.params(), sp);
    let packed = Reference::new(&s, TensorRef::new(&pk.q.data[..], pk.q.strides), TensorRef::new(&pk.k.data[..], pk.k.strides), TensorRef::new(&pk.v.data[..], pk.v.strides), &pp).map_err(|e| e.to_string())?;
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for r in 0..s.seq_q {
                let got = packed.row(b, h, r);
                if r >= sp.q_lens[b] {
                    if got.is_some() {
                        return Err(format!("reference row (b={b}, h={h}, r={r}) past q_len {} exists", sp.q_lens[b]));
                    }
                    continue;
                }
                let want = padded.row(b, h, s.seq_q - sp.q_lens[b] + r);
                if got != want {
                    return Err(format!("reference row (b={b}, h={h}, r={r}): packed {got:?} != padded {want:?}"));
                }
            }
        }
    }
    Ok(())
}

fn check_varlen<TKV: Element>(spec: &Spec, sp: &Split) -> Result<(), TestCaseError> {
    let mut spec = spec.clone();
    spec.bias = None; // not taken with packed queries
    spec.kv_lens = Some(sp.kv_lens.clone());
    let mut case = Case::build(&spec);
    case.round_for::<f32, TKV, f32>();
    let pk = packed_inputs(&case, sp);
    check_reference(&case, sp, &pk).map_err(TestCaseError::fail)?;
    for isa in Isa::available() {
        let config = |threads| RunConfig { isa: Some(isa), threads: Some(threads) };
        let padded = run_padded::<TKV>(&case, &sp.kv_lens, &config(1));
        check(&case, &padded, 0.0).map_err(|e| TestCaseError::fail(format!("[{isa}] padded twin: {e}")))?;
        let (out, lse) = run_packed::<TKV>(&case, sp, &pk, &config(1));
        compare(&case, sp, &pk, &padded, &out, &lse).map_err(|e| TestCaseError::fail(format!("[{isa}, {sp:?}] {e}")))?;
        // Bitwise the same with two threads (and a merge where the decode path splits keys).
        let (out2, lse2) = run_packed::<TKV>(&case, sp, &pk, &config(2));
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same(&out, &out2) && same(&lse, &lse2), "[{isa}, {sp:?}] 1 and 2 threads differ");
    }
    Ok(())
}

/// Prefill-sized problems (the flash kernels) with any options but bias.
fn prefill_case() -> impl Strategy<Value = (Spec, Split)> {
    spec_strategy(Options::Any).prop_flat_map(|s| {
        let sp = split(s.batch, s.seq_q, s.seq_kv);
        (Just(s), sp)
    })
}

/// Decode shapes (a few rows against up to 2100 keys: the decode kernels, several partitions
/// merged), batches of up to 4 sequences.
fn decode_case() -> impl Strategy<Value = (Spec, Split)> {
    (spec_strategy(Options::Any), 1..=4usize, 1..=6usize, 16..=2100usize, prop_oneof![Just(1usize), Just(4), Just(8)], prop_oneof![Just(64usize), Just(128), 1..=130usize])
        .prop_map(|(mut s, batch, sq, skv, group, d)| {
            s.batch = batch;
            s.seq_q = sq;
            s.seq_kv = skv;
            s.group = group;
            s.head_dim = d;
            s.v_head_dim = d;
            if matches!(s.layout, Layout::PackedQkv) {
                s.layout = Layout::Bshd;
            }
            s
        })
        .prop_flat_map(|s| {
            let sp = split(s.batch, s.seq_q, s.seq_kv);
            (Just(s), sp)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 4 + 1, ..ProptestConfig::default() })]

    #[test]
    fn varlen_prefill_f32((spec, sp) in prefill_case()) {
        check_varlen::<f32>(&spec, &sp)?;
    }

    #[test]
    fn varlen_prefill_f16_kv((spec, sp) in prefill_case()) {
        check_varlen::<f16>(&spec, &sp)?;
    }

    #[test]
    fn varlen_decode_f16_kv((spec, sp) in decode_case()) {
        check_varlen::<f16>(&spec, &sp)?;
    }

    #[test]
    fn varlen_prefill_bf16_kv((spec, sp) in prefill_case()) {
        check_varlen::<bf16>(&spec, &sp)?;
    }

    #[test]
    fn varlen_decode_bf16_kv((spec, sp) in decode_case()) {
        check_varlen::<bf16>(&spec, &sp)?;
    }

    #[test]
    fn varlen_decode_f32((spec, sp) in decode_case()) {
        check_varlen::<f32>(&spec, &sp)?;
    }
}

/// A host-driven plan of a packed decode batch (partitions merged by the engine's workers)
/// writes the same bits as the pooled call.
#[test]
fn host_plan_of_a_packed_batch_matches_the_pooled_call() {
    let mut spec = Spec::plain(3, 8, 2, 4, 2500, 64);
    spec.causal = true;
    let sp = Split { q_lens: vec![4, 0, 2], kv_lens: vec![2500, 7, 1900], kv: KvMode::Packed, head_major: false, pad: 3, lead: 1 };
    spec.kv_lens = Some(sp.kv_lens.clone());
    let case = Case::build(&spec);
    let pk = packed_inputs(&case, &sp);
    let s = case.shape;
    for isa in Isa::available() {
        let config = RunConfig { isa: Some(isa), threads: Some(2) };
        let (want, want_lse) = run_packed::<f32>(&case, &sp, &pk, &config);
        let mut out = vec![SENTINEL; pk.out_len];
        let mut lse = vec![SENTINEL; s.q_heads * pk.total_q];
        let params = pk.params(case.params(), &sp);
        let kv = (TensorRef::new(&pk.k.data[..], pk.k.strides), TensorRef::new(&pk.v.data[..], pk.v.strides));
        let request = Request::new(s, TensorRef::new(&pk.q.data[..], pk.q.strides), kv, TensorMut::new(&mut out, pk.out_strides), params).lse(&mut lse);
        let plan = HostPlan::from_request(&config, request, 3).unwrap();
        assert_eq!(plan.needs_merge(), isa != Isa::Portable, "2500 keys split into partitions on the decode path");
        std::thread::scope(|sc| {
            for ith in 0..3 {
                let plan = &plan;
                sc.spawn(move || plan.run(ith, &mut vec![0.0; plan.workspace_len()]).unwrap());
            }
        });
        for ith in 0..3 {
            plan.merge(ith, &mut vec![0.0; plan.workspace_len()]).unwrap();
        }
        drop(plan);
        assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "[{isa}] host plan output differs");
        assert!(lse.iter().zip(&want_lse).all(|(a, b)| a.to_bits() == b.to_bits()), "[{isa}] host plan lse differs");
    }
}

/// `cu_seqlens` arrays are validated before anything runs, and packed queries refuse what
/// they cannot take; the output is untouched on every error.
#[test]
fn cu_seqlens_are_validated() {
    let shape = AttentionShape::new(2, 2, 1, 4, 6, 4);
    let q = vec![0.5f32; 16 * 2 * 4];
    let (k, v) = (vec![1.0f32; 16 * 4], vec![1.0f32; 16 * 4]);
    let ts = Strides::new(0, 4, 8);
    let ks = Strides::new(0, 4, 4);
    let call = |params: AttentionParams<'_>, kv_tensors: bool| {
        let mut out = vec![7.0f32; 16 * 2 * 4];
        let kv: AnyKv<'_> = if kv_tensors {
            (TensorRef::new(&k[..], ks), TensorRef::new(&v[..], ks)).into()
        } else {
            let pages = PageTable { block_table: &[0, 1], pages_per_seq: 1, page_size: 8, num_pages: 2 };
            PagedKv { k: &k, v: &v, k_strides: PageStrides::token_major(8, 1, 4), v_strides: PageStrides::token_major(8, 1, 4), pages }.into()
        };
        let r = simd_attn::run(&RunConfig::default(), Request::new(shape, TensorRef::new(&q[..], ts), kv, TensorMut::new(&mut out, ts), params));
        assert!(r.is_ok() || out.iter().all(|&x| x == 7.0), "output written on error {r:?}");
        r
    };
    fn seqlens(arg: &'static str, index: usize) -> impl Fn(Result<RunInfo, AttnError>) -> bool {
        move |r| matches!(r, Err(AttnError::InvalidSeqlens { arg: a, index: i, .. }) if a == arg && i == index)
    }
    assert!(call(AttentionParams::new().cu_seqlens_q(&[0, 4, 7]).cu_seqlens_k(&[0, 6, 12]), true).is_ok());
    assert!(matches!(call(AttentionParams::new().cu_seqlens_q(&[0, 4]), true), Err(AttnError::WrongLength { arg: "cu_seqlens_q", expected: 3, got: 2 })));
    assert!(seqlens("cu_seqlens_q", 0)(call(AttentionParams::new().cu_seqlens_q(&[-1, 2, 3]), true)));
    assert!(seqlens("cu_seqlens_q", 2)(call(AttentionParams::new().cu_seqlens_q(&[0, 3, 2]), true)));
    assert!(seqlens("cu_seqlens_q", 1)(call(AttentionParams::new().cu_seqlens_q(&[0, 5, 6]), true)), "a sequence longer than seq_q");
    assert!(seqlens("cu_seqlens_k", 2)(call(AttentionParams::new().cu_seqlens_k(&[0, 6, 13]), true)), "a sequence longer than seq_kv");
    // Tokens past the buffers.
    assert!(matches!(call(AttentionParams::new().cu_seqlens_q(&[12, 16, 20]), true), Err(AttnError::BufferTooSmall { tensor: TensorName::Q, .. })));
    assert!(matches!(call(AttentionParams::new().cu_seqlens_k(&[6, 12, 18]), true), Err(AttnError::BufferTooSmall { tensor: TensorName::K, .. })));
    // seqused_k within its segment only.
    assert!(matches!(call(AttentionParams::new().cu_seqlens_k(&[0, 6, 8]).kv_lens(&[6, 3]), true), Err(AttnError::KvLenOutOfRange { batch: 1, kv_len: 3, seq_kv: 2 })));
    // What packed queries do not take.
    let bias = vec![0.0f32; 6];
    let b = BiasRef::new(&bias, BiasStrides::default());
    assert!(matches!(call(AttentionParams::new().cu_seqlens_q(&[0, 1, 2]).bias(b), true), Err(AttnError::Unsupported { .. })));
    assert!(matches!(call(AttentionParams::new().cu_seqlens_q(&[0, 1, 2]).score(Score::Cosine { temperature: 1.0 }), true), Err(AttnError::UnsupportedScore { score: "cosine", .. })));
    assert!(matches!(call(AttentionParams::new().cu_seqlens_k(&[0, 1, 2]), false), Err(AttnError::Unsupported { .. })));
    // Packed queries against a paged pool are fine.
    assert!(call(AttentionParams::new().cu_seqlens_q(&[0, 1, 4]).kv_lens(&[6, 2]), false).is_ok());
    // LSE of packed queries is [Hq, tokens].
    let mut out = vec![0.0f32; 16 * 2 * 4];
    let mut lse = vec![0.0f32; 2 * 5 - 1];
    let r = simd_attn::run(
        &RunConfig::default(),
        Request::new(shape, TensorRef::new(&q[..], ts), (TensorRef::new(&k[..], ks), TensorRef::new(&v[..], ks)), TensorMut::new(&mut out, ts), AttentionParams::new().cu_seqlens_q(&[0, 4, 5])).lse(&mut lse),
    );
    assert_eq!(r.unwrap_err(), AttnError::BufferTooSmall { tensor: TensorName::Lse, needed: 10, len: 9 });
}

/// The README's varlen prefill: four causal sequences of 300, 1000, 2000 and 700 tokens, one
/// call, checked against four separate contiguous calls (f16 inputs; each row's arithmetic is
/// the same, only how rows share register tiles differs).
#[test]
fn varlen_prefill_matches_separate_calls() {
    let lens = [300usize, 1000, 2000, 700];
    let (hq, hkv, d) = (8, 2, 64);
    let cu = cu(&lens, 0);
    let total = cu[4] as usize;
    let mut rng = common::Rng::new(11);
    let qkv = |n: usize, rng: &mut common::Rng| (0..n).map(|_| f16::from_f32(rng.uniform())).collect::<Vec<_>>();
    let q = qkv(total * hq * d, &mut rng);
    let k = qkv(total * hkv * d, &mut rng);
    let v = qkv(total * hkv * d, &mut rng);
    let (qs, ks) = (Strides::bshd(hq, 0, d), Strides::bshd(hkv, 0, d));
    let shape = AttentionShape::new(4, hq, hkv, 2000, 2000, d);
    let mut out = vec![0.0f32; total * hq * d];
    let params = AttentionParams::new().causal(true).cu_seqlens_q(&cu).cu_seqlens_k(&cu);
    simd_attn::run(&RunConfig::default(), Request::new(shape, TensorRef::new(&q[..], qs), (TensorRef::new(&k[..], ks), TensorRef::new(&v[..], ks)), TensorMut::new(&mut out, qs), params)).unwrap();
    for (b, &n) in lens.iter().enumerate() {
        let at = |x: usize, h: usize| cu[b] as usize * h * d + x;
        let one = AttentionShape::new(1, hq, hkv, n, n, d);
        let (qs1, ks1) = (Strides::bshd(hq, n, d), Strides::bshd(hkv, n, d));
        let mut o1 = vec![0.0f32; n * hq * d];
        attention(&one, TensorRef::new(&q[at(0, hq)..], qs1), TensorRef::new(&k[at(0, hkv)..], ks1), TensorRef::new(&v[at(0, hkv)..], ks1), TensorMut::new(&mut o1, qs1), None, &AttentionParams::new().causal(true)).unwrap();
        let got = &out[at(0, hq)..at(0, hq) + n * hq * d];
        let err = got.iter().zip(&o1).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err <= 1e-6, "sequence {b}: max difference {err} from its own call");
    }
}
