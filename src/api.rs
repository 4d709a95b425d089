//! The public entry points: validate, plan (tiles, units, threads), run the kernel per unit,
//! store.

use crate::request::{KvOp, Request};
use crate::dtypes::{AnyKv, AnyMut, AnyRef, KvOf};
use crate::element::{Element, FloatElement, KvPair};
use crate::error::{AttnError, TensorName};
use crate::exec::{alignment_plan, merge_all, merge_group, merge_row_len, plan_for, run_units, with_thread_partials, with_thread_scratch, AlignPass, Job, Partials, Units, Workspace};
use crate::isa::{resolve_isa, resolve_isa_choice, Isa};
use crate::layout::{AttentionShape, TensorMut, TensorRef};
use crate::params::{AttentionParams, Score};
use crate::plan::work::WorkPlan;
use crate::plan::Tiles;
use crate::problem::Problem;
use crate::score::{project_general, ScoreBuffers, ScoreData};
use crate::store::{InspectRows, OutRows};
use crate::validate::validate_outputs;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What a call ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInfo {
    pub isa: Isa,
    /// The compile-time specialised head dim that ran, or `None` for the generic path (and
    /// for the portable path, the additive score and empty calls).
    pub specialised_head_dim: Option<usize>,
    /// The additive score's compile-time specialised attention dim (padded), or `None`.
    pub specialised_additive_dim: Option<usize>,
    pub tiles: Tiles,
    /// Workers that ran (1 when the work was too small to split).
    pub threads: usize,
    /// How the call was split (prefill blocks, or decode partitions with a merge).
    pub plan: WorkPlan,
}

/// How a call runs (not what it computes: results are bitwise identical for every setting
/// but the ISA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// Force an instruction-set path for this call; `None` follows [`crate::set_isa_override`],
    /// then `SIMD_ATTN_ISA`, then the best path the CPU has.
    pub isa: Option<Isa>,
    /// Workers on the crate's pool for this call; `None` uses [`default_threads`]. Work too
    /// small to pay for a second thread runs on fewer.
    pub threads: Option<usize>,
}

/// 0: not set, i.e. every available core.
static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the thread count of calls whose [`RunConfig`] names none (0 restores the default: every
/// core the OS reports).
pub fn set_default_threads(threads: usize) {
    DEFAULT_THREADS.store(threads, Ordering::Relaxed);
}

/// The thread count of calls whose [`RunConfig`] names none.
pub fn default_threads() -> usize {
    match DEFAULT_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Below this many flops per extra worker, waking one costs more than it saves.
const MIN_FLOPS_PER_THREAD: f64 = 4e6;

/// Fused attention: `out = softmax(scale * Q K^T + bias, masked) V` for every batch entry and
/// query head, without storing the score matrix. The semantics of every option are those of
/// [`AttentionParams`]. `lse`, when given, receives the natural-log sum of exponentials of each
/// row as a contiguous `[batch, q_heads, seq_q]` array.
///
/// K and V share one storage type, or are one of the mixed pairs of
/// [`crate::element::MIXED_KV_PAIRS`] (q8_0 K with f16 V, f16 K with q8_0 V): `(TK, TV)` is then
/// a [`KvPair`], and any other pair does not compile.
///
/// Every argument is validated first; on error nothing is written.
///
/// ```
/// use simd_attn::{attention, AttentionParams, AttentionShape, TensorMut, TensorRef};
/// let shape = AttentionShape::new(1, 4, 2, 3, 5, 8); // B, Hq, Hkv, Sq, Skv, D
/// let [qs, ks, vs, os] = shape.bhsd_strides();
/// let [nq, nk, nv, no] = shape.bhsd_lens();
/// let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
/// let mut out = vec![0.0f32; no];
/// let info = attention(
///     &shape,
///     TensorRef::new(&q, qs),
///     TensorRef::new(&k, ks),
///     TensorRef::new(&v, vs),
///     TensorMut::new(&mut out, os),
///     None,
///     &AttentionParams::new().causal(true),
/// )?;
/// assert!((out[0] - 0.3).abs() < 1e-6);
/// println!("ran on {}", info.isa);
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
#[inline]
pub fn attention<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TK>,
    v: TensorRef<'_, TV>,
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError>
where
    (TK, TV): KvPair,
{
    attention_with(&RunConfig::default(), shape, q, k, v, out, lse, params)
}

/// [`attention`] with a [`RunConfig`]: a forced ISA path, a thread count. Scratch comes from a
/// per-thread workspace that the crate keeps, so repeated calls do not allocate (the classic
/// scores other than dot allocate their per-call projections and norms, see [`Score`]).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attention_with<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(
    config: &RunConfig,
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TK>,
    v: TensorRef<'_, TV>,
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError>
where
    (TK, TV): KvPair,
{
    attention_inspect(config, shape, q, k, v, out, lse, params, Inspect::default())
}

/// The optional inspection outputs of [`attention_inspect`], both f32 and contiguous.
#[derive(Debug, Default)]
pub struct Inspect<'o> {
    /// The alignment matrix: attention probabilities `[B, Hq, Sq, Skv]`, exactly the weights the
    /// output was computed with (0 for invisible keys; a row sums to 1 unless a sink took a
    /// share, or nothing was visible and the row is all 0).
    pub alignment: Option<&'o mut [f32]>,
    /// Coverage `[B, Hq, Skv]`: each key's attention summed over the query rows, as coverage
    /// models use to penalise attending to a position again.
    pub coverage: Option<&'o mut [f32]>,
}

/// [`attention_with`], plus the alignment matrix and/or coverage for people who visualise or
/// supervise attention. The fused pass runs as usual (the score matrix is never stored); a
/// second tiled pass then recomputes each visible score and writes `exp(s - lse)` from the
/// rows' final LSE, so the probabilities are exact without materialising them during the
/// softmax. Costs about one more Q.K^T (or additive score) pass; with neither output it is
/// [`attention_with`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attention_inspect<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(
    config: &RunConfig,
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TK>,
    v: TensorRef<'_, TV>,
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
    inspect: Inspect<'_>,
) -> Result<RunInfo, AttnError>
where
    (TK, TV): KvPair,
{
    let call = Request { shape: *shape, q: AnyRef::of(q), kv: AnyKv::of(k, v), out: AnyMut::of(out), lse, params: *params, inspect };
    run_call(config, call)
}

/// Runs a [`Request`]: [`attention_inspect`] for any K/V layout (a paged pool too) and any
/// element types, on the crate's pool. Every argument is validated first; on error nothing is
/// written.
pub fn run(config: &RunConfig, request: Request<'_, '_>) -> Result<RunInfo, AttnError> {
    run_call(config, request)
}

/// [`attention_inspect`] on a [`Request`]: compiled once, here, whatever the caller's element
/// types (see `request`). The C ABI's forward call lands here too.
#[inline(never)]
pub(crate) fn run_call(config: &RunConfig, call: Request<'_, '_>) -> Result<RunInfo, AttnError> {
    struct Op<'c> {
        config: &'c RunConfig,
    }
    impl<'a, 'o> KvOp<'a, 'o> for Op<'_> {
        type Output = Result<RunInfo, AttnError>;
        fn run<P: KvPair>(self, call: Request<'a, 'o>, kv: KvOf<'a, P>) -> Self::Output {
            run_typed::<P>(self.config, call, kv)
        }
    }
    call.with_kv(Op { config })
}

/// [`run_call`] with K and V at their storage type.
fn run_typed<TKV: KvPair>(config: &RunConfig, mut call: Request<'_, '_>, kv: KvOf<'_, TKV>) -> Result<RunInfo, AttnError> {
    match start::<TKV>(config, &mut call, kv)? {
        Start::Done(info) => Ok(info),
        Start::Projected(q) => run_typed::<TKV>(config, call.with_dot_q(&q), kv),
        Start::Run(p) => scored_call(config, p, call),
    }
}

/// Where a call goes once its inputs are validated. (One value per call: the size of the
/// `Run` variant costs nothing worth boxing.)
#[allow(clippy::large_enum_variant)]
enum Start<'a, TKV: KvPair> {
    /// An empty call, finished.
    Done(RunInfo),
    /// `Score::General`: run the dot score on this projected Q instead.
    Projected(Vec<f32>),
    /// Everything else: the validated inputs.
    Run(Problem<'a, TKV>),
}

/// The common start of every fused entry: validate the inputs, finish an empty call, project
/// Q for `Score::General`.
fn start<'a, 'c: 'a, TKV: KvPair>(config: &RunConfig, call: &mut Request<'c, '_>, kv: KvOf<'a, TKV>) -> Result<Start<'a, TKV>, AttnError> {
    let p = Problem::new(&call.shape, call.q, kv, &call.params)?;
    if is_empty(&call.shape) {
        return empty_call(config, p, call).map(Start::Done);
    }
    // The outputs first: a projection for `Score::General` allocates and computes a row per
    // output row, and broadcast inputs (zero strides) let `seq_q` reach anything the integers
    // allow, which only the output's length bounds.
    validate_outputs(&call.shape, call.out.extent(), call.lse.as_deref(), call.params.cu_seqlens_q)?;
    validate_inspect(&call.shape, &call.inspect, &call.params)?;
    Ok(match general_as_dot(&p)? {
        Some(q) => Start::Projected(q),
        None => Start::Run(p),
    })
}

/// Whether a call has no output row (`batch`, `q_heads` or `seq_q` is 0).
fn is_empty(shape: &AttentionShape) -> bool {
    shape.batch == 0 || shape.q_heads == 0 || shape.seq_q == 0
}

/// A call with no output row (`p` is the call's validated inputs): the outputs are validated
/// like any other call's, then nothing runs and nothing is allocated (the other dims may be
/// anything that validates, up to the integer limits). The coverage output, `[B, Hq, Skv]`, is
/// all zeros: no row attended to anything.
fn empty_call<TKV: KvPair>(config: &RunConfig, p: Problem<'_, TKV>, call: &mut Request<'_, '_>) -> Result<RunInfo, AttnError> {
    let shape = &p.shape;
    validate_outputs(shape, call.out.extent(), call.lse.as_deref(), call.params.cu_seqlens_q)?;
    validate_inspect(shape, &call.inspect, &call.params)?;
    let isa = resolve_isa(config.isa)?;
    let (plan, tiles, _, _) = plan_for(isa, TKV::FAMILY, shape, shape.seq_kv, false, false)?;
    if let Some(c) = call.inspect.coverage.as_deref_mut() {
        // The length was validated, so the product fits.
        c[..shape.batch * shape.q_heads * shape.seq_kv].fill(0.0);
    }
    Ok(RunInfo { isa, specialised_head_dim: None, specialised_additive_dim: None, tiles, threads: 1, plan })
}

/// The compile-time specialisations a call runs (head dim, additive attention dim), `None`
/// for the generic path: the same choice `run_units` makes, read from the kernel table (not
/// from whichever worker reported).
pub(crate) fn specialisation(isa: Isa, kv_dtype: crate::element::DType, shape: &AttentionShape, score: &ScoreData<'_>) -> (Option<usize>, Option<usize>) {
    use crate::plan::Family;
    if isa == Isa::Portable || is_empty(shape) {
        return (None, None);
    }
    let family = Family::for_call(isa, kv_dtype);
    if let ScoreData::Additive(a) = score {
        return (None, family.additive_dims.contains(&a.a_pad).then_some(a.a_pad));
    }
    let d = shape.head_dim;
    ((d == shape.v_head_dim && family.head_dims.contains(&d)).then_some(d), None)
}

/// `Score::General` runs as the dot score on `q' = W^T q`: the projected Q of a validated call
/// (`[B, Hq, Sq, head_dim]`, contiguous); `None` for every other score.
fn general_as_dot<TKV: KvPair>(p: &Problem<'_, TKV>) -> Result<Option<Vec<f32>>, AttnError> {
    let Score::General { w, q_dim } = p.params.score else { return Ok(None) };
    Ok(Some(project_general(&p.shape, &p.q, w, q_dim)?))
}

/// [`run_call`] for every score but `General` (which arrives here projected); `p` is the
/// call's validated inputs.
fn scored_call<TKV: KvPair>(config: &RunConfig, p: Problem<'_, TKV>, call: Request<'_, '_>) -> Result<RunInfo, AttnError> {
    let Request { shape, out, lse, inspect, .. } = call;
    validate_outputs(&shape, out.extent(), lse.as_deref(), p.params.cu_seqlens_q)?;
    validate_inspect(&shape, &inspect, &p.params)?;
    let buffers = ScoreBuffers::prepare(&shape, &p.q, &p.k, &p.params)?;
    let p = p.with_score(buffers.data(&p.params.score));
    let inspecting = inspect.alignment.is_some() || inspect.coverage.is_some();
    let mut workers = WorkerBuffers::None;
    if !inspecting {
        return fused_pass(config, prepare(config, p, out, lse, true)?, 0, &mut workers);
    }
    // Everything the second pass needs is allocated before the first writes a row: the LSE
    // of every row (the first pass writes it here) and the second pass's scratch.
    let mut row_lse = crate::exec::try_zeroed(shape.batch * shape.q_heads * shape.seq_q)?;
    let (isa, plan, tiles, scratch_len) = alignment_plan(resolve_isa(config.isa)?, TKV::FAMILY, &shape);
    // The alignment is exactly the weights the output used: automatic choice keeps the f32
    // P of the widened kernel here (the bf16 dot kernel rounds P to bf16).
    let info = fused_pass(config, prepare(config, p, out, Some(&mut row_lse), false)?, scratch_len, &mut workers)?;
    let rows = InspectRows::new(&shape, inspect.alignment, inspect.coverage);
    let none = OutRows::none(&shape);
    let job = Job { p: &p, out: &none, plan, tiles, isa, partials: Partials::empty(), align: Some(AlignPass { out: &rows, lse: &row_lse }) };
    match &mut workers {
        #[cfg(feature = "rayon")]
        WorkerBuffers::Pool(ws) => {
            crate::exec::run_pool(job, ws)?;
        }
        _ => {
            with_thread_scratch(scratch_len, |sc| run_units(job, Units::Share { ith: 0, nth: 1 }, sc))?
                .map_err(|_| AttnError::IsaUnavailable { isa })?;
        }
    }
    if let Some(lse) = lse {
        lse[..row_lse.len()].copy_from_slice(&row_lse);
    }
    Ok(info)
}

/// Where a call's workers found their scratch, kept for a second pass: the calling thread's
/// workspace (grown before the first pass), or the pool workers' buffers.
enum WorkerBuffers {
    None,
    #[cfg(feature = "rayon")]
    Pool(crate::exec::WorkerScratch),
}

/// The inspection outputs are long enough (`[B, Hq, Sq, Skv]` and `[B, Hq, Skv]`), and the
/// call's rows are padded (packed queries have no alignment matrix).
pub(crate) fn validate_inspect(shape: &AttentionShape, inspect: &Inspect<'_>, params: &AttentionParams<'_>) -> Result<(), AttnError> {
    let s = shape;
    if params.cu_seqlens_q.is_some() && (inspect.alignment.is_some() || inspect.coverage.is_some()) {
        return Err(AttnError::Unsupported { what: "alignment or coverage outputs with packed variable-length queries (cu_seqlens_q)" });
    }
    let check = |tensor: TensorName, dims: &[usize], len: Option<usize>| -> Result<(), AttnError> {
        let Some(len) = len else { return Ok(()) };
        let needed = dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or(AttnError::SizeOverflow { tensor })?;
        if len < needed {
            return Err(AttnError::BufferTooSmall { tensor, needed, len });
        }
        Ok(())
    };
    check(TensorName::Alignment, &[s.batch, s.q_heads, s.seq_q, s.seq_kv], inspect.alignment.as_deref().map(<[f32]>::len))?;
    check(TensorName::Coverage, &[s.batch, s.q_heads, s.seq_kv], inspect.coverage.as_deref().map(<[f32]>::len))
}

/// The fused pass of a prepared call on the crate's pool (or the calling thread). The workers'
/// scratch holds at least `reserve` floats (what a second pass will need) and is left in
/// `workers`; all of it is allocated before the first row is written.
fn fused_pass<TKV: KvPair>(config: &RunConfig, prepared: Prepared<'_, '_, TKV>, reserve: usize, workers: &mut WorkerBuffers) -> Result<RunInfo, AttnError> {
    let Prepared { p, out, plan, tiles, isa, scratch_len, partials_len } = &prepared;
    let shape = &p.shape;
    let (specialised, additive) = specialisation(*isa, TKV::FAMILY, shape, &p.score);
    let scratch_len = (*scratch_len).max(reserve);
    let mut threads = config.threads.unwrap_or_else(default_threads).min(plan.units()).max(1);
    if threads > 1 {
        // Counting visible pairs walks every row: only worth it when a split is on the table.
        let flops = crate::attention_flops(shape, &p.params);
        threads = threads.min((flops / MIN_FLOPS_PER_THREAD) as usize + 1);
    }
    // Workers beyond the cores would only take turns (and spin against each other): every
    // count gives the same result, so cap it.
    #[cfg(feature = "rayon")]
    let threads = threads.min(crate::pool::cores());
    let unavailable = || AttnError::IsaUnavailable { isa: *isa };
    #[cfg(not(feature = "rayon"))]
    let _ = workers;
    #[cfg(feature = "rayon")]
    if threads > 1 {
        *workers = WorkerBuffers::Pool(crate::exec::WorkerScratch::take(threads, scratch_len)?);
    }
    with_thread_partials(*partials_len, |pbuf| {
        let partials = Partials::new(pbuf, plan, shape);
        let job = Job { p, out, plan: *plan, tiles: *tiles, isa: *isa, partials, align: None };
        #[cfg(feature = "rayon")]
        if let WorkerBuffers::Pool(ws) = workers {
            crate::exec::run_pool(job, ws)?;
            return Ok(RunInfo { isa: *isa, specialised_head_dim: specialised, specialised_additive_dim: additive, tiles: *tiles, threads, plan: *plan });
        }
        with_thread_scratch(scratch_len, |sc| {
            let r = run_units(job, Units::Share { ith: 0, nth: 1 }, sc);
            merge_all(&job, sc);
            r
        })?
        .map_err(|_| unavailable())?;
        Ok(RunInfo { isa: *isa, specialised_head_dim: specialised, specialised_additive_dim: additive, tiles: *tiles, threads: 1, plan: *plan })
    })?
}

/// [`attention_with`] on the calling thread only, with the caller's [`Workspace`] (which
/// covers every scratch need of the dot scores; the other classic scores still allocate their
/// per-call projections and norms).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attention_in<TQ: FloatElement, TK: Element, TV: Element, TO: FloatElement>(
    workspace: &mut Workspace,
    config: &RunConfig,
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TK>,
    v: TensorRef<'_, TV>,
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError>
where
    (TK, TV): KvPair,
{
    let call = Request { shape: *shape, q: AnyRef::of(q), kv: AnyKv::of(k, v), out: AnyMut::of(out), lse, params: *params, inspect: Inspect::default() };
    run_in_workspace(workspace, config, call)
}

/// [`attention_in`] on a [`Request`]: compiled once, here (see `request`).
#[inline(never)]
fn run_in_workspace(workspace: &mut Workspace, config: &RunConfig, call: Request<'_, '_>) -> Result<RunInfo, AttnError> {
    struct Op<'c, 'w> {
        workspace: &'w mut Workspace,
        config: &'c RunConfig,
    }
    impl<'a, 'o> KvOp<'a, 'o> for Op<'_, '_> {
        type Output = Result<RunInfo, AttnError>;
        fn run<P: KvPair>(self, call: Request<'a, 'o>, kv: KvOf<'a, P>) -> Self::Output {
            in_workspace_typed::<P>(self.workspace, self.config, call, kv)
        }
    }
    call.with_kv(Op { workspace, config })
}

/// [`run_in_workspace`] with K and V at their storage type.
fn in_workspace_typed<TKV: KvPair>(workspace: &mut Workspace, config: &RunConfig, mut call: Request<'_, '_>, kv: KvOf<'_, TKV>) -> Result<RunInfo, AttnError> {
    let p = match start::<TKV>(config, &mut call, kv)? {
        Start::Done(info) => return Ok(info),
        Start::Projected(q) => return in_workspace_typed::<TKV>(workspace, config, call.with_dot_q(&q), kv),
        Start::Run(p) => p,
    };
    let buffers = ScoreBuffers::prepare(&p.shape, &p.q, &p.k, &p.params)?;
    let p = p.with_score(buffers.data(&p.params.score));
    let prepared = prepare(config, p, call.out, call.lse, true)?;
    let Prepared { p, out, plan, tiles, isa, scratch_len, partials_len } = &prepared;
    let (scratch, pbuf) = workspace.get(*scratch_len + *partials_len)?.split_at_mut(*scratch_len);
    let job = Job { p, out, plan: *plan, tiles: *tiles, isa: *isa, partials: Partials::new(pbuf, plan, &p.shape), align: None };
    run_units(job, Units::Share { ith: 0, nth: 1 }, scratch).map_err(|_| AttnError::IsaUnavailable { isa: *isa })?;
    // The merge's row buffer: the start of the scratch, free again now.
    merge_all(&job, scratch);
    let (specialised, additive) = specialisation(*isa, TKV::FAMILY, &p.shape, &p.score);
    Ok(RunInfo { isa: *isa, specialised_head_dim: specialised, specialised_additive_dim: additive, tiles: *tiles, threads: 1, plan: *plan })
}

/// A validated call, planned.
struct Prepared<'a, 'o, TKV: KvPair> {
    p: Problem<'a, TKV>,
    out: OutRows<'o>,
    plan: WorkPlan,
    tiles: Tiles,
    isa: Isa,
    /// f32 of scratch per worker: the kernel's, or the merge's row if that is longer.
    scratch_len: usize,
    partials_len: usize,
}

/// Validates the outputs of a call whose inputs `p` are validated and scored, and plans it.
/// `bf16_dot_ok`: automatic choice may send the call to the bf16 dot-product kernel.
fn prepare<'a: 'o, 'o, TKV: KvPair>(config: &RunConfig, p: Problem<'a, TKV>, out: AnyMut<'o>, lse: Option<&'o mut [f32]>, bf16_dot_ok: bool) -> Result<Prepared<'a, 'o, TKV>, AttnError> {
    let shape = &p.shape;
    validate_outputs(shape, out.extent(), lse.as_deref(), p.params.cu_seqlens_q)?;
    let (isa, automatic) = resolve_isa_choice(config.isa)?;
    let decode = !matches!(p.score, ScoreData::Additive(_));
    // Keys past the longest `kv_lens` entry are invisible to every row: the plan stops there,
    // so a cache allocated far longer than it is filled costs no empty units.
    let keys = if p.params.kv_lens.is_some() || p.params.cu_seqlens_k.is_some() {
        (0..shape.batch).map(|b| p.params.kv_len(b, shape.seq_kv)).max().unwrap_or(0)
    } else {
        shape.seq_kv
    };
    let side_by_side = p.k.heads_side_by_side() || p.v.heads_side_by_side();
    let (mut plan, mut tiles, mut scratch_len, mut partials_len) = plan_for(isa, TKV::FAMILY, shape, keys, decode, side_by_side)?;
    // Automatic choice sends what the bf16 dot kernel takes (bf16 prefill) to it where the CPU
    // runs `vdpbf16ps` at its FMA rate; RunInfo then says avx512bf16 exactly when it ran.
    let mut isa = isa;
    if automatic && bf16_dot_ok && isa == Isa::Avx512 && matches!(plan.kind, crate::plan::work::PlanKind::Prefill { .. })
        && bf16_dot_takes(&p) && Isa::prefers_bf16_dot()
    {
        isa = Isa::Avx512Bf16;
        (plan, tiles, scratch_len, partials_len) = plan_for(isa, TKV::FAMILY, shape, keys, decode, side_by_side)?;
    }
    // The merge reuses the start of the same scratch for its row once the units are done.
    let scratch_len = scratch_len.max(merge_row_len(&plan, shape));
    Ok(Prepared { out: OutRows::new(shape, out, lse, p.rows), p, plan, tiles, isa, scratch_len, partials_len })
}

/// Whether the bf16 dot-product kernel would take the call (x86-64 only).
fn bf16_dot_takes<TKV: KvPair>(p: &Problem<'_, TKV>) -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::kernel::bf16dot::takes(p);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = p;
        false
    }
}

/// Host-driven execution: the engine's own workers run the call. Create it once per call (this
/// validates and plans), then worker `ith` of the `nth` given here calls [`HostPlan::run`]
/// with its share number and its own scratch buffer of [`HostPlan::workspace_len`] elements.
/// `run` neither allocates nor synchronises beyond claiming its share. When the decode path
/// split the keys into partitions ([`HostPlan::needs_merge`]), each worker then calls
/// [`HostPlan::merge`] after the engine's barrier. The output is complete when all have
/// returned, and bitwise identical to [`attention`]'s.
///
/// ```
/// use simd_attn::{AttentionParams, AttentionShape, HostPlan, RunConfig, TensorMut, TensorRef};
/// let shape = AttentionShape::new(1, 8, 2, 64, 64, 64);
/// let [qs, ks, vs, os] = shape.bhsd_strides();
/// let [nq, nk, nv, no] = shape.bhsd_lens();
/// let (q, k, v) = (vec![0.1f32; nq], vec![0.2f32; nk], vec![0.3f32; nv]);
/// let mut out = vec![0.0f32; no];
/// let params = AttentionParams::new().causal(true);
/// let plan = HostPlan::new(&RunConfig::default(), &shape, TensorRef::new(&q, qs), TensorRef::new(&k, ks),
///     TensorRef::new(&v, vs), TensorMut::new(&mut out, os), None, &params, 3)?;
/// std::thread::scope(|s| {
///     for ith in 0..3 {
///         let plan = &plan;
///         s.spawn(move || {
///             let mut scratch = vec![0.0f32; plan.workspace_len()]; // engines keep one per worker
///             plan.run(ith, &mut scratch).unwrap();
///         });
///     }
/// });
/// // Decode shapes split the keys; the merge runs after the barrier (here: the scope's end).
/// std::thread::scope(|s| {
///     for ith in 0..3 {
///         let plan = &plan;
///         s.spawn(move || plan.merge(ith, &mut vec![0.0f32; plan.workspace_len()]).unwrap());
///     }
/// });
/// drop(plan);
/// assert!((out[0] - 0.3).abs() < 1e-6);
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
///
/// The type parameters name the element types of [`HostPlan::new`]'s tensors; a plan made from a
/// [`Request`] ([`HostPlan::from_request`]) leaves them `()`.
pub struct HostPlan<'a: 'o, 'o, TQ = (), TKV = (), TO = ()> {
    /// The plan for the call's element types, compiled in this crate (see `dtypes`).
    shares: Box<dyn PlanShares + 'o>,
    _types: PhantomData<(TensorRef<'a, TQ>, TensorRef<'a, TKV>, TensorMut<'o, TO>)>,
}

impl<'a: 'o, 'o> HostPlan<'a, 'o> {
    /// Validates and plans a [`Request`] for `nth` workers (`config.threads` is ignored): any
    /// K/V layout (a paged pool too) and element types. Host plans run the dot scores and
    /// produce no inspection outputs.
    pub fn from_request(config: &RunConfig, request: Request<'a, 'o>, nth: usize) -> Result<Self, AttnError> {
        if request.inspect.alignment.is_some() || request.inspect.coverage.is_some() {
            return Err(AttnError::Unsupported { what: "alignment or coverage outputs with a host-driven plan" });
        }
        Ok(Self { shares: plan_call(config, request, nth)?, _types: PhantomData })
    }
}

impl<'a: 'o, 'o, TQ: FloatElement, TKV: Element, TO: FloatElement> HostPlan<'a, 'o, TQ, TKV, TO> {
    /// Validates and plans a call for `nth` workers (`config.threads` is ignored).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn new(
        config: &RunConfig,
        shape: &AttentionShape,
        q: TensorRef<'a, TQ>,
        k: TensorRef<'a, TKV>,
        v: TensorRef<'a, TKV>,
        out: TensorMut<'o, TO>,
        lse: Option<&'o mut [f32]>,
        params: &AttentionParams<'a>,
        nth: usize,
    ) -> Result<Self, AttnError> {
        let call = Request { shape: *shape, q: AnyRef::of(q), kv: AnyKv::of(k, v), out: AnyMut::of(out), lse, params: *params, inspect: Inspect::default() };
        let shares = plan_call(config, call, nth)?;
        Ok(Self { shares, _types: PhantomData })
    }

}

impl<'a: 'o, 'o, TQ, TKV, TO> HostPlan<'a, 'o, TQ, TKV, TO> {
    /// f32 elements of scratch each worker passes to [`HostPlan::run`] and
    /// [`HostPlan::merge`].
    pub fn workspace_len(&self) -> usize {
        self.shares.workspace_len()
    }

    /// The plan (units and shares), for inspection.
    pub fn plan(&self) -> &WorkPlan {
        self.shares.plan()
    }

    /// Whether [`HostPlan::merge`] has work: the decode path split the keys into partitions.
    pub fn needs_merge(&self) -> bool {
        self.shares.needs_merge()
    }

    /// Runs share `ith`. Each share runs at most once: a second call for the same `ith` is an
    /// error (two workers writing the same rows would race).
    pub fn run(&self, ith: usize, workspace: &mut [f32]) -> Result<RunInfo, AttnError> {
        self.shares.run(ith, workspace)
    }

    /// The merge step of the decode path, share `ith` of `nth` (the same `nth`): call it after
    /// every worker's `run` has returned (the engine's barrier). Returns an error, and touches
    /// nothing, if some share has not finished yet. A no-op when [`HostPlan::needs_merge`] is
    /// false.
    pub fn merge(&self, ith: usize, workspace: &mut [f32]) -> Result<(), AttnError> {
        self.shares.merge(ith, workspace)
    }
}

/// What a host plan does, whatever its element types (the C ABI holds its plans as this).
pub(crate) trait PlanShares: Send + Sync {
    fn workspace_len(&self) -> usize;
    fn plan(&self) -> &WorkPlan;
    fn needs_merge(&self) -> bool;
    fn run(&self, ith: usize, workspace: &mut [f32]) -> Result<RunInfo, AttnError>;
    fn merge(&self, ith: usize, workspace: &mut [f32]) -> Result<(), AttnError>;
}

impl<TKV: KvPair> PlanShares for TypedPlan<'_, '_, TKV> {
    fn workspace_len(&self) -> usize {
        TypedPlan::workspace_len(self)
    }
    fn plan(&self) -> &WorkPlan {
        &self.prepared.plan
    }
    fn needs_merge(&self) -> bool {
        TypedPlan::needs_merge(self)
    }
    fn run(&self, ith: usize, workspace: &mut [f32]) -> Result<RunInfo, AttnError> {
        TypedPlan::run(self, ith, workspace)
    }
    fn merge(&self, ith: usize, workspace: &mut [f32]) -> Result<(), AttnError> {
        TypedPlan::merge(self, ith, workspace)
    }
}

/// [`HostPlan::new`] on a [`Request`]: compiled once, here (see `request`).
#[inline(never)]
pub(crate) fn plan_call<'a: 'o, 'o>(config: &RunConfig, call: Request<'a, 'o>, nth: usize) -> Result<Box<dyn PlanShares + 'o>, AttnError> {
    struct Op<'c> {
        config: &'c RunConfig,
        nth: usize,
    }
    impl<'a: 'o, 'o> KvOp<'a, 'o> for Op<'_> {
        type Output = Result<Box<dyn PlanShares + 'o>, AttnError>;
        fn run<P: KvPair>(self, call: Request<'a, 'o>, kv: KvOf<'a, P>) -> Self::Output {
            Ok(Box::new(TypedPlan::<P>::new(self.config, call, kv, self.nth)?))
        }
    }
    call.with_kv(Op { config, nth })
}

/// [`HostPlan`] for one K/V storage type.
struct TypedPlan<'a, 'o, TKV: KvPair> {
    prepared: Prepared<'a, 'o, TKV>,
    nth: usize,
    claimed: Vec<AtomicBool>,
    merge_claimed: Vec<AtomicBool>,
    finished: AtomicUsize,
    /// Decode partials, written by `run` through raw pointers (hence not a `Vec` borrowed
    /// through `&self`); freed on drop.
    partials: *mut [f32],
}

// SAFETY: the raw partials buffer is owned; concurrent access follows `Partials`' rules
// (disjoint slots in `run`, reads in `merge` only after every share finished).
unsafe impl<TKV: KvPair> Sync for TypedPlan<'_, '_, TKV> {}
unsafe impl<TKV: KvPair> Send for TypedPlan<'_, '_, TKV> {}

impl<TKV: KvPair> Drop for TypedPlan<'_, '_, TKV> {
    fn drop(&mut self) {
        // SAFETY: created by Box::into_raw in `new`, freed once.
        drop(unsafe { Box::from_raw(self.partials) });
    }
}

impl<'a: 'o, 'o, TKV: KvPair> TypedPlan<'a, 'o, TKV> {
    fn new(config: &RunConfig, call: Request<'a, 'o>, kv: KvOf<'a, TKV>, nth: usize) -> Result<Self, AttnError> {
        if nth == 0 {
            return Err(AttnError::ZeroDim { dim: "nth" });
        }
        // Host plans borrow everything from the caller and own only flags and partials; the
        // scores that need per-call projections or norms run through the fused calls.
        if !matches!(call.params.score, Score::ScaledDot | Score::Dot) {
            return Err(AttnError::UnsupportedScore { score: call.params.score.name(), operation: "a host-driven plan" });
        }
        let p = Problem::new(&call.shape, call.q, kv, &call.params)?;
        let prepared = prepare(config, p, call.out, call.lse, true)?;
        // Fallible allocations: an absurd `nth` or partials size is an error, not an abort.
        let flags = |n: usize| -> Result<Vec<AtomicBool>, AttnError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| AttnError::OutOfMemory { bytes: n })?;
            v.extend((0..n).map(|_| AtomicBool::new(false)));
            Ok(v)
        };
        let (claimed, merge_claimed) = (flags(nth)?, flags(nth)?);
        let partials = crate::exec::try_zeroed(prepared.partials_len)?;
        Ok(Self {
            prepared,
            nth,
            claimed,
            merge_claimed,
            finished: AtomicUsize::new(0),
            partials: Box::into_raw(partials.into_boxed_slice()),
        })
    }

    fn workspace_len(&self) -> usize {
        self.prepared.scratch_len
    }

    fn needs_merge(&self) -> bool {
        self.prepared.plan.parts() > 1
    }

    fn job(&self) -> Job<'_, 'a, 'o, TKV> {
        let pr = &self.prepared;
        // SAFETY: the buffer lives as long as `self` and is reached only through `Partials`,
        // which hands writers disjoint slots and reads only after the barrier `merge` checks.
        let partials = unsafe { Partials::from_raw(self.partials as *mut f32, self.partials.len(), &pr.plan, &pr.p.shape) };
        Job { p: &pr.p, out: &pr.out, plan: pr.plan, tiles: pr.tiles, isa: pr.isa, partials, align: None }
    }

    fn run(&self, ith: usize, workspace: &mut [f32]) -> Result<RunInfo, AttnError> {
        let pr = &self.prepared;
        self.check_share(ith, workspace)?;
        if self.claimed[ith].swap(true, Ordering::AcqRel) {
            return Err(AttnError::ShareAlreadyRun { ith });
        }
        let result = run_units(self.job(), Units::Share { ith, nth: self.nth }, &mut workspace[..pr.scratch_len]);
        self.finished.fetch_add(1, Ordering::Release);
        result.map_err(|_| AttnError::IsaUnavailable { isa: pr.isa })?;
        let (specialised, additive) = specialisation(pr.isa, TKV::FAMILY, &pr.p.shape, &pr.p.score);
        Ok(RunInfo { isa: pr.isa, specialised_head_dim: specialised, specialised_additive_dim: additive, tiles: pr.tiles, threads: self.nth, plan: pr.plan })
    }

    fn merge(&self, ith: usize, workspace: &mut [f32]) -> Result<(), AttnError> {
        self.check_share(ith, workspace)?;
        if !self.needs_merge() {
            return Ok(());
        }
        let done = self.finished.load(Ordering::Acquire);
        if done < self.nth {
            return Err(AttnError::SharesNotFinished { finished: done, nth: self.nth });
        }
        if self.merge_claimed[ith].swap(true, Ordering::AcqRel) {
            return Err(AttnError::ShareAlreadyRun { ith });
        }
        let job = self.job();
        let row = &mut workspace[..self.prepared.p.shape.v_head_dim];
        for g in crate::plan::work::snake(self.prepared.plan.merge_groups(), ith, self.nth) {
            // SAFETY: every share finished (checked above, Acquire pairs with their Release);
            // merge share `ith` runs once and owns groups disjoint from the other shares'.
            unsafe { merge_group(&job, g, row) };
        }
        Ok(())
    }

    fn check_share(&self, ith: usize, workspace: &[f32]) -> Result<(), AttnError> {
        if ith >= self.nth {
            return Err(AttnError::ShareOutOfRange { ith, nth: self.nth });
        }
        if workspace.len() < self.workspace_len() {
            return Err(AttnError::WorkspaceTooSmall { needed: self.workspace_len(), len: workspace.len() });
        }
        Ok(())
    }
}
