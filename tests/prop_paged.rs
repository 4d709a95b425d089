//! Paged K/V: the cache as a pool of pages addressed through a block table, read in place.
//!
//! Each generated problem is run twice on every ISA: once with K and V as the strided tensors
//! the generator made, once with the same rows scattered into a paged pool (random page size
//! 1..=300, token-major or head-major pages with padding, a shuffled block table, a page shared
//! by two sequences, unused pages and the slots past each sequence's length filled with NaN,
//! block-table entries past each sequence's last page set to -1). The kernels compute the same
//! arithmetic whatever the layout, so the two outputs must agree bit for bit; the paged one is
//! also checked against the f64 reference (defined on the contiguous tensors, i.e. on the
//! gathered pages).

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use simd_attn::*;

/// A paged copy of a case's K and V.
struct Pool {
    k: Vec<f32>,
    v: Vec<f32>,
    k_strides: PageStrides,
    v_strides: PageStrides,
    table: Vec<i32>,
    pages_per_seq: usize,
    page_size: usize,
    num_pages: usize,
}

/// How to lay the pool out.
#[derive(Clone, Copy, Debug)]
struct Paging {
    page_size: usize,
    head_major: bool,
    /// Extra elements between pages.
    pad: usize,
    /// Pages nobody uses.
    spare: usize,
    /// Share sequence 0's first page with sequence 1.
    share: bool,
    /// Keep the pages in order (page `b * pages_per_seq + p`): the pool is then a plain
    /// `[B, S, H, D]` tensor when `pad` is 0 and the pages are token-major.
    in_order: bool,
}

fn paging() -> impl Strategy<Value = Paging> {
    (
        prop_oneof![Just(1usize), Just(16), Just(64), 1..=300usize],
        any::<bool>(),
        prop_oneof![Just(0usize), 1..=40usize],
        0..=3usize,
        any::<bool>(),
        prop_oneof![3 => Just(false), 1 => Just(true)],
    )
        .prop_map(|(page_size, head_major, pad, spare, share, in_order)| Paging { page_size, head_major, pad, spare, share, in_order })
}

/// The keys of sequence `b`.
fn seq_len(case: &Case, b: usize) -> usize {
    case.kv_lens.as_ref().map_or(case.shape.seq_kv, |l| l[b])
}

/// Copies sequence 0's first `rows` K and V rows over sequence 1's, so one page can hold both.
fn share_prefix(case: &mut Case, rows: usize) {
    let s = case.shape;
    for (which, width) in [(1, s.head_dim), (2, s.v_head_dim)] {
        let (bi, off, st) = case.views[which];
        for hk in 0..s.kv_heads {
            for j in 0..rows {
                let from = off + hk * st.head + j * st.seq;
                let to = from + st.batch;
                let row: Vec<f32> = case.bufs[bi][from..from + width].to_vec();
                case.bufs[bi][to..to + width].copy_from_slice(&row);
            }
        }
    }
}

fn build_pool(case: &Case, pg: &Paging, seed: u64) -> Pool {
    let s = case.shape;
    let ps = pg.page_size;
    let pages_per_seq = s.seq_kv.div_ceil(ps).max(1);
    let mut rng = common::Rng::new(seed ^ 0x5eed);
    // Which logical pages need a physical one.
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    for b in 0..s.batch {
        for p in 0..seq_len(case, b).div_ceil(ps) {
            wanted.push((b, p));
        }
    }
    let shared = pg.share && s.batch >= 2 && seq_len(case, 0) >= ps && seq_len(case, 1) >= ps;
    let num_pages = if pg.in_order { s.batch * pages_per_seq } else { wanted.len() + pg.spare };
    let mut physical: Vec<usize> = (0..num_pages).collect();
    if !pg.in_order {
        for i in (1..physical.len()).rev() {
            physical.swap(i, rng.below(i + 1));
        }
    }
    let mut table = vec![-1i32; s.batch * pages_per_seq];
    for (n, &(b, p)) in wanted.iter().enumerate() {
        table[b * pages_per_seq + p] = if pg.in_order { (b * pages_per_seq + p) as i32 } else { physical[n] as i32 };
    }
    if shared {
        table[pages_per_seq] = table[0];
    }
    let strides = |dim: usize| {
        let base = if pg.head_major { PageStrides::head_major(ps, s.kv_heads, dim) } else { PageStrides::token_major(ps, s.kv_heads, dim) };
        PageStrides { page: base.page + pg.pad, ..base }
    };
    let (k_strides, v_strides) = (strides(s.head_dim), strides(s.v_head_dim));
    let mut k = vec![f32::NAN; num_pages * k_strides.page];
    let mut v = vec![f32::NAN; num_pages * v_strides.page];
    for b in 0..s.batch {
        for j in 0..seq_len(case, b) {
            let page = table[b * pages_per_seq + j / ps] as usize;
            for hk in 0..s.kv_heads {
                for (which, width, pool, st) in [(1, s.head_dim, &mut k, k_strides), (2, s.v_head_dim, &mut v, v_strides)] {
                    let (bi, off, vs) = case.views[which];
                    let from = off + b * vs.batch + hk * vs.head + j * vs.seq;
                    let to = page * st.page + hk * st.head + (j % ps) * st.slot;
                    pool[to..to + width].copy_from_slice(&case.bufs[bi][from..from + width]);
                }
            }
        }
    }
    Pool { k, v, k_strides, v_strides, table, pages_per_seq, page_size: ps, num_pages }
}

/// Runs the case with its K/V taken from `pool` (or as tensors when `pool` is `None`).
fn run_kv<TQ: FloatElement, TKV: Element, TO: FloatElement>(case: &Case, pool: Option<&Pool>, config: &RunConfig, score: Score<'_>) -> Outcome {
    let paged = pool.map(|p| (p.k.iter().map(|&x| TKV::from_f32(x)).collect::<Vec<_>>(), p.v.iter().map(|&x| TKV::from_f32(x)).collect::<Vec<_>>()));
    run_typed::<TQ, TKV, TO>(case, |s, q, k, v, o, l, p| {
        let params = p.score(score);
        let kv: AnyKv<'_> = match (pool, &paged) {
            (Some(pool), Some((pk, pv))) => PagedKv {
                k: pk,
                v: pv,
                k_strides: pool.k_strides,
                v_strides: pool.v_strides,
                pages: PageTable { block_table: &pool.table, pages_per_seq: pool.pages_per_seq, page_size: pool.page_size, num_pages: pool.num_pages },
            }
            .into(),
            _ => (k, v).into(),
        };
        let mut request = Request::new(*s, q, kv, o, params);
        if let Some(l) = l {
            request = request.lse(l);
        }
        simd_attn::run(config, request)
    })
}

fn bits(o: &Outcome) -> Vec<u32> {
    o.out.iter().chain(&o.lse).map(|x| x.to_bits()).collect()
}

/// The case of `spec` (its sequences 0 and 1 sharing their first page's rows when `pg`
/// shares it) and its paged pool.
fn case_and_pool(spec: &Spec, pg: &Paging) -> (Case, Pool) {
    let mut case = Case::build(spec);
    // f16 and bf16 both hold these exactly (f16 first: its range is the narrower).
    case.round_to::<f16>();
    case.round_to::<bf16>();
    if pg.share && spec.batch >= 2 {
        let rows = pg.page_size.min(seq_len(&case, 0)).min(seq_len(&case, 1));
        share_prefix(&mut case, rows);
    }
    let pool = build_pool(&case, pg, spec.seed);
    (case, pool)
}

/// Whether the tensors' plan is the pages': both have a token's KV heads side by side, or
/// neither does (decode units then span every KV head, with shorter partitions, in both). The
/// results are then the same bits.
fn same_plan(case: &Case, spec: &Spec, pg: &Paging) -> bool {
    let side = |which: usize| case.views[which].2.head < case.views[which].2.seq;
    spec.kv_heads == 1 || (side(1) || side(2)) == !pg.head_major
}

fn check_paged<TQ: FloatElement, TKV: Element, TO: FloatElement>(spec: &Spec, pg: &Paging, store_eps: f64) -> Result<(), TestCaseError> {
    let (case, pool) = case_and_pool(spec, pg);
    let same_plan = same_plan(&case, spec, pg);
    for isa in Isa::available() {
        for threads in [1, 2] {
            let config = RunConfig { isa: Some(isa), threads: Some(threads) };
            let want = run_kv::<TQ, TKV, TO>(&case, None, &config, Score::ScaledDot);
            let got = run_kv::<TQ, TKV, TO>(&case, Some(&pool), &config, Score::ScaledDot);
            check_rounded_weights(&case, &got, store_eps, weight_eps::<TQ, TKV>(isa)).map_err(|e| TestCaseError::fail(format!("[{isa}, {threads} threads, {pg:?}] {e}")))?;
            if same_plan {
                prop_assert!(bits(&got) == bits(&want), "[{isa}, {threads} threads] paged and contiguous results differ ({pg:?})");
            }
        }
    }
    Ok(())
}

/// Decode shapes: a few query rows against a long cache (the decode kernels, several
/// partitions merged).
fn decode_spec() -> impl Strategy<Value = Spec> {
    (spec_strategy(Options::Any), 1..=4usize, 64..=2100usize, prop_oneof![Just(1usize), Just(4), Just(8)], prop_oneof![Just(64usize), Just(128), 1..=130usize])
        .prop_map(|(mut s, sq, skv, group, d)| {
            s.seq_q = sq;
            s.seq_kv = skv;
            s.group = group;
            s.head_dim = d;
            s.v_head_dim = d;
            s.batch = s.batch.min(2);
            if let Some(l) = s.kv_lens.as_mut() {
                l.truncate(s.batch);
                l.iter_mut().for_each(|x| *x = (*x * 977) % (skv + 1));
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases / 4 + 1, ..ProptestConfig::default() })]

    #[test]
    fn paged_prefill_f32(spec in spec_strategy(Options::Any), pg in paging()) {
        check_paged::<f32, f32, f32>(&spec, &pg, 0.0)?;
    }

    #[test]
    fn paged_prefill_f16(spec in spec_strategy(Options::Adversarial), pg in paging()) {
        check_paged::<f16, f16, f16>(&spec, &pg, 1.0 / 2048.0)?;
    }

    #[test]
    fn paged_decode_f16_kv(spec in decode_spec(), pg in paging()) {
        check_paged::<f32, f16, f32>(&spec, &pg, 0.0)?;
    }

    #[test]
    fn paged_decode_bf16_kv(spec in decode_spec(), pg in paging()) {
        check_paged::<f32, bf16, f32>(&spec, &pg, 0.0)?;
    }

    #[test]
    fn paged_prefill_bf16(spec in spec_strategy(Options::Plain), pg in paging()) {
        check_paged::<bf16, bf16, bf16>(&spec, &pg, 1.0 / 256.0)?;
    }

    #[test]
    fn paged_decode_f32(spec in decode_spec(), pg in paging()) {
        check_paged::<f32, f32, f32>(&spec, &pg, 0.0)?;
    }

    /// The scores that prepare per-key data (cosine's key norms, additive's projected keys)
    /// read the pages too: same bits as the contiguous call.
    #[test]
    fn paged_scores(spec in spec_strategy(Options::Plain), pg in paging(), which in 0..3usize) {
        let (case, pool) = case_and_pool(&spec, &pg);
        let (d, a) = (spec.head_dim, 24usize);
        let w: Vec<f32> = (0..a * d).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
        let vv: Vec<f32> = (0..a).map(|i| ((i * 13 % 7) as f32 / 7.0) - 0.4).collect();
        let score = match which {
            0 => Score::Cosine { temperature: 3.0 },
            1 => Score::Additive { v: &vv, projection: Some(AdditiveProjection { w_q: &w, q_dim: d, w_k: &w }) },
            _ => Score::Dot,
        };
        for isa in Isa::available() {
            let config = RunConfig { isa: Some(isa), threads: Some(1) };
            let want = run_kv::<f32, f16, f32>(&case, None, &config, score);
            let got = run_kv::<f32, f16, f32>(&case, Some(&pool), &config, score);
            if same_plan(&case, &spec, &pg) {
                prop_assert!(bits(&got) == bits(&want), "[{isa}] {score:?}: paged and contiguous results differ ({pg:?})");
            } else {
                // Other partitions of the same keys: the same result to within f32 rounding.
                for (i, (g, w)) in got.out.iter().chain(&got.lse).zip(want.out.iter().chain(&want.lse)).enumerate() {
                    prop_assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs() || (g.is_nan() && w.is_nan()) || g == w, "[{isa}] {score:?}: element {i}: paged {g}, contiguous {w} ({pg:?})");
                }
            }
        }
    }
}

/// Pages in order, token-major, unpadded: the pool is byte for byte a `[B, S, H, D]` tensor.
/// Same bits from the pages as from that tensor, with decode and prefill shapes.
#[test]
fn contiguous_pages_match_the_tensor() {
    for (sq, skv, ps) in [(1, 4096, 16), (3, 1000, 256), (70, 300, 1), (128, 512, 64)] {
        let mut spec = Spec::plain(2, 8, 2, sq, skv, 128);
        spec.layout = Layout::Bshd;
        spec.causal = sq > 1;
        let case = Case::build(&spec);
        let pg = Paging { page_size: ps, head_major: false, pad: 0, spare: 0, share: false, in_order: true };
        let pool = build_pool(&case, &pg, 1);
        assert_eq!(pool.k.len(), case.bufs[1].len().div_ceil(ps * 2 * 128) * ps * 2 * 128);
        for isa in Isa::available() {
            let config = RunConfig { isa: Some(isa), threads: Some(2) };
            let want = run_kv::<f32, f16, f32>(&case, None, &config, Score::ScaledDot);
            let got = run_kv::<f32, f16, f32>(&case, Some(&pool), &config, Score::ScaledDot);
            assert!(bits(&got) == bits(&want), "[{isa}] Sq {sq} Skv {skv} page {ps}");
        }
    }
}

/// Every page index a visible key reaches is checked before anything runs; entries past a
/// sequence's last page are never read.
#[test]
fn block_table_is_validated() {
    let shape = AttentionShape::new(2, 2, 1, 1, 8, 4);
    let ps = PageStrides::token_major(4, 1, 4);
    let (k, v) = (vec![1.0f32; 3 * 16], vec![1.0f32; 3 * 16]);
    let q = vec![0.5f32; 2 * 2 * 4];
    let [qs, _, _, os] = shape.bhsd_strides();
    let lens = [5usize, 4];
    let call = |table: &[i32], num_pages: usize, lens: &[usize]| {
        let mut out = vec![7.0f32; 16];
        let pages = PageTable { block_table: table, pages_per_seq: 2, page_size: 4, num_pages };
        let kv = PagedKv { k: &k, v: &v, k_strides: ps, v_strides: ps, pages };
        let r = simd_attn::run(&RunConfig::default(), Request::new(shape, TensorRef::new(&q, qs), kv, TensorMut::new(&mut out, os), AttentionParams::new().kv_lens(lens)));
        (r, out)
    };
    // Sequence 1 has 4 keys: one page; its second entry (-1) is never read.
    let (r, out) = call(&[0, 1, 2, -1], 3, &lens);
    assert!(r.is_ok(), "{r:?}");
    assert!(out.iter().all(|&x| x == 1.0));
    for (table, page, slot, batch) in [([0, 3, 2, -1], 3, 1, 0), ([0, 1, -2, 0], -2, 0, 1)] {
        let (r, out) = call(&table, 3, &lens);
        assert_eq!(r.unwrap_err(), AttnError::InvalidPage { batch, slot, page, num_pages: 3 });
        assert!(out.iter().all(|&x| x == 7.0), "output written on error");
    }
    // A pool too small for its page count, a table too short, a length past the table.
    assert!(matches!(call(&[0, 1, 2, -1], 4, &lens).0, Err(AttnError::BufferTooSmall { tensor: TensorName::K, .. })));
    assert!(matches!(call(&[0, 1, 2], 3, &lens).0, Err(AttnError::BufferTooSmall { tensor: TensorName::BlockTable, .. })));
    let shape9 = AttentionShape { seq_kv: 9, ..shape };
    let mut out = vec![0.0f32; 16];
    let pages = PageTable { block_table: &[0, 1, 2, 0], pages_per_seq: 2, page_size: 4, num_pages: 3 };
    let r = simd_attn::run(&RunConfig::default(), Request::new(shape9, TensorRef::new(&q, qs), PagedKv { k: &k, v: &v, k_strides: ps, v_strides: ps, pages }, TensorMut::new(&mut out, os), AttentionParams::new().kv_lens(&[9, 1])));
    assert_eq!(r.unwrap_err(), AttnError::KvLenOutOfRange { batch: 0, kv_len: 9, seq_kv: 8 });
    let pages = PageTable { page_size: 0, ..pages };
    let r = simd_attn::run(&RunConfig::default(), Request::new(shape, TensorRef::new(&q, qs), PagedKv { k: &k, v: &v, k_strides: ps, v_strides: ps, pages }, TensorMut::new(&mut out, os), AttentionParams::new()));
    assert_eq!(r.unwrap_err(), AttnError::ZeroDim { dim: "page_size" });
}
