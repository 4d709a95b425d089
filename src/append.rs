//! Appending this step's K/V to the cache, then attending, in one call (as FlashAttention's
//! `flash_attn_with_kvcache`): the new rows are written once, into the cache as the engine
//! keeps it (tensors or a paged pool), with RoPE applied to K as it is written and to Q as the
//! kernels pack it.
//!
//! Order: everything is validated first against the cache as it will be after the append (the
//! pages the new rows land in included), so an invalid call writes nothing; then the rows are
//! written; then the attention runs on the cache (read in place), with `kv_lens` the cache
//! lengths plus the new rows.

use crate::api::{run_call, validate_inspect, RunConfig, RunInfo};
use crate::dtypes::{same, same_mut, AnyKv, AnyMut, AnyRef, Kv};
use crate::element::{DType, Element, FloatElement};
use crate::error::{try_vec, AttnError, TensorName};
use crate::kv::KvIndex;
use crate::layout::{AttentionShape, PageStrides, PageTable, PagedKv, TensorMut, TensorRef};
use crate::params::{segment, AttentionParams};
use crate::problem::Problem;
use crate::request::Request;
use crate::validate::{validate_cu_seqlens, validate_kv_tensors, validate_outputs};
use half::{bf16, f16};

/// A KV cache the call writes its new rows into: `[B, Hkv, Skv, D]`-style tensors through
/// strides (`seq_kv` rows per sequence), or a paged pool (as [`PagedKv`]).
#[derive(Debug)]
pub enum KvCacheMut<'c, T> {
    Tensors { k: TensorMut<'c, T>, v: TensorMut<'c, T> },
    Paged { k: &'c mut [T], v: &'c mut [T], k_strides: PageStrides, v_strides: PageStrides, pages: PageTable<'c> },
}

/// This step's new K and V rows, in the cache's element type: `[B, seq_new, Hkv, D]` (and
/// `Dv`) through their strides (`batch`, `head`, `seq`), or packed tokens `[total, Hkv, D]`
/// with `cu_seqlens` (as `flash_attn_varlen_func`'s; the batch stride is then unused):
/// sequence `b` appends tokens `cu_seqlens[b]..cu_seqlens[b + 1]`, at most `seq_new` of them.
/// Packed rows are how chunked prefill appends: each sequence its own chunk.
#[derive(Clone, Copy, Debug)]
pub struct NewKv<'n, T> {
    pub k: TensorRef<'n, T>,
    pub v: TensorRef<'n, T>,
    pub seq_new: usize,
    pub cu_seqlens: Option<&'n [i32]>,
}

impl<'n, T> NewKv<'n, T> {
    /// `seq_new` rows for every sequence, `[B, seq_new, Hkv, D]` through the strides.
    pub fn padded(k: TensorRef<'n, T>, v: TensorRef<'n, T>, seq_new: usize) -> Self {
        Self { k, v, seq_new, cu_seqlens: None }
    }

    /// Packed rows: sequence `b` appends tokens `cu_seqlens[b]..cu_seqlens[b + 1]` of `k` and
    /// `v` (`seq_new` is the longest segment; a malformed array is rejected by the call).
    pub fn packed(k: TensorRef<'n, T>, v: TensorRef<'n, T>, cu_seqlens: &'n [i32]) -> Self {
        let seq_new = (0..cu_seqlens.len().saturating_sub(1)).map(|b| segment(cu_seqlens, b)).max().unwrap_or(0);
        Self { k, v, seq_new, cu_seqlens: Some(cu_seqlens) }
    }

    /// Rows sequence `b` appends (`cu_seqlens` validated).
    #[inline]
    fn rows(&self, b: usize) -> usize {
        self.cu_seqlens.map_or(self.seq_new, |cu| segment(cu, b))
    }

    /// Where row `t` of KV head `hk`, sequence `b` sits in `k` and in `v`.
    #[inline]
    fn offsets(&self, b: usize, hk: usize, t: usize) -> (usize, usize) {
        match self.cu_seqlens {
            None => (self.k.strides.offset(b, hk, t), self.v.strides.offset(b, hk, t)),
            Some(cu) => {
                let token = cu[b] as usize + t;
                (self.k.strides.offset(0, hk, token), self.v.strides.offset(0, hk, token))
            }
        }
    }
}

/// Appends `new` (if any) to every sequence of `cache` at its current length
/// (`cache_lens[b]`: new row `s` of sequence `b` becomes key `cache_lens[b] + s`), rotating
/// each new K row by `params.rope` at that position, then runs attention of `q` over the
/// cache with `kv_len = cache_lens[b] +` the rows sequence `b` appends (and, with
/// `params.rope`, Q rotated at its rows' positions: the last row at `kv_len - 1`). `shape.seq_kv` is the tensors' capacity
/// (for a paged cache, at most `pages_per_seq * page_size`); `params.kv_lens` and
/// `cu_seqlens_k` must be unset (the cache lengths say it).
///
/// Every argument is validated before anything is written; on error neither the cache nor
/// the outputs change. Past validation only an allocation failure can fail the call, with
/// the new rows already in the cache.
///
/// ```
/// use simd_attn::{attention_with_kvcache, AttentionParams, AttentionShape, KvCacheMut, NewKv, Rope, RunConfig, Strides, TensorMut, TensorRef};
/// // One decode step: B=2, Hq=4, Hkv=2, D=8, a cache of 16 tokens per sequence holding 5 and 9.
/// let shape = AttentionShape::new(2, 4, 2, 1, 16, 8);
/// let cs = Strides::bshd(2, 16, 8); // the cache as [B, S, Hkv, D]
/// let (mut kc, mut vc) = (vec![0.1f32; 2 * 16 * 2 * 8], vec![0.2f32; 2 * 16 * 2 * 8]);
/// let (kn, vn) = (vec![0.3f32; 2 * 2 * 8], vec![0.4f32; 2 * 2 * 8]);
/// let ns = Strides::bshd(2, 1, 8);
/// let (cos, sin) = Rope::tables(10000.0, 8, 16);
/// let rope = Rope { cos: &cos, sin: &sin, rotary_dim: 8, interleaved: false };
/// let q = vec![0.5f32; 2 * 4 * 8];
/// let mut out = vec![0.0f32; 2 * 4 * 8];
/// let [qs, _, _, os] = shape.bhsd_strides();
/// attention_with_kvcache(
///     &RunConfig::default(),
///     &shape,
///     TensorRef::new(&q, qs),
///     KvCacheMut::Tensors { k: TensorMut::new(&mut kc, cs), v: TensorMut::new(&mut vc, cs) },
///     Some(NewKv::padded(TensorRef::new(&kn, ns), TensorRef::new(&vn, ns), 1)),
///     &[5, 9],
///     TensorMut::new(&mut out, os),
///     None,
///     &AttentionParams::new().causal(true).rope(rope),
/// )?;
/// assert_eq!(vc[5 * 16], 0.4); // sequence 0's new V row is key 5
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attention_with_kvcache<TQ: FloatElement, TKV: FloatElement, TO: FloatElement>(
    config: &RunConfig,
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    cache: KvCacheMut<'_, TKV>,
    new: Option<NewKv<'_, TKV>>,
    cache_lens: &[usize],
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError> {
    kvcache_call(config, shape, AnyRef::of(q), AnyCache::of(cache, new), cache_lens, AnyMut::of(out), lse, params)
}

/// A cache and its new rows of one element type (see `dtypes`: the generic entry erases the
/// types, the body is compiled here once per K/V type).
pub(crate) enum AnyCache<'c, 'n> {
    F32(KvCacheMut<'c, f32>, Option<NewKv<'n, f32>>),
    F16(KvCacheMut<'c, f16>, Option<NewKv<'n, f16>>),
    Bf16(KvCacheMut<'c, bf16>, Option<NewKv<'n, bf16>>),
}

impl<'c, 'n> AnyCache<'c, 'n> {
    /// The cache and new rows as `U`, which is `T` (`DTYPE` is equal; checked by the caller).
    #[inline(always)]
    fn cast<T: Element, U: Element>(cache: KvCacheMut<'c, T>, new: Option<NewKv<'n, T>>) -> (KvCacheMut<'c, U>, Option<NewKv<'n, U>>) {
        let m = |s: &'c mut [T]| -> &'c mut [U] { same_mut::<T, U>(s).expect("same DTYPE, same type") };
        let r = |s: &'n [T]| -> &'n [U] { same::<T, U>(s).expect("same DTYPE, same type") };
        let cache = match cache {
            KvCacheMut::Tensors { k, v } => KvCacheMut::Tensors { k: TensorMut::new(m(k.data), k.strides), v: TensorMut::new(m(v.data), v.strides) },
            KvCacheMut::Paged { k, v, k_strides, v_strides, pages } => KvCacheMut::Paged { k: m(k), v: m(v), k_strides, v_strides, pages },
        };
        let new = new.map(|n| NewKv { k: TensorRef::new(r(n.k.data), n.k.strides), v: TensorRef::new(r(n.v.data), n.v.strides), seq_new: n.seq_new, cu_seqlens: n.cu_seqlens });
        (cache, new)
    }

    #[inline(always)]
    fn of<T: FloatElement>(cache: KvCacheMut<'c, T>, new: Option<NewKv<'n, T>>) -> Self {
        match T::DTYPE {
            DType::F32 => {
                let (c, n) = Self::cast::<T, f32>(cache, new);
                AnyCache::F32(c, n)
            }
            DType::F16 => {
                let (c, n) = Self::cast::<T, f16>(cache, new);
                AnyCache::F16(c, n)
            }
            DType::Bf16 => {
                let (c, n) = Self::cast::<T, bf16>(cache, new);
                AnyCache::Bf16(c, n)
            }
            DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0 => unreachable!("quantized codes are not a FloatElement"),
        }
    }
}

/// [`attention_with_kvcache`] with erased element types: compiled once, here.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub(crate) fn kvcache_call(config: &RunConfig, shape: &AttentionShape, q: AnyRef<'_>, cache: AnyCache<'_, '_>, cache_lens: &[usize], out: AnyMut<'_>, lse: Option<&mut [f32]>, params: &AttentionParams<'_>) -> Result<RunInfo, AttnError> {
    match cache {
        AnyCache::F32(c, n) => kvcache_typed(config, shape, q, c, n, cache_lens, out, lse, params),
        AnyCache::F16(c, n) => kvcache_typed(config, shape, q, c, n, cache_lens, out, lse, params),
        AnyCache::Bf16(c, n) => kvcache_typed(config, shape, q, c, n, cache_lens, out, lse, params),
    }
}

#[allow(clippy::too_many_arguments)]
fn kvcache_typed<T: Element>(
    config: &RunConfig,
    shape: &AttentionShape,
    q: AnyRef<'_>,
    mut cache: KvCacheMut<'_, T>,
    new: Option<NewKv<'_, T>>,
    cache_lens: &[usize],
    out: AnyMut<'_>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError> {
    let s = shape;
    if params.kv_lens.is_some() || params.cu_seqlens_k.is_some() {
        return Err(AttnError::Unsupported { what: "kv_lens or cu_seqlens_k with a KV cache append (cache_lens gives each sequence's keys)" });
    }
    if cache_lens.len() != s.batch {
        return Err(AttnError::WrongLength { arg: "cache_lens", expected: s.batch, got: cache_lens.len() });
    }
    if let Some(n) = &new {
        // Padded: `[B, seq_new]` rows; packed: tokens `0..cu[B]` (batch stride unused).
        let (rows, batch) = match n.cu_seqlens {
            None => (n.seq_new, s.batch),
            Some(cu) => {
                validate_cu_seqlens("cu_seqlens_new", cu, s.batch, n.seq_new, "seq_new")?;
                (cu[s.batch] as usize, 1)
            }
        };
        validate_kv_tensors(&AttentionShape { batch, seq_kv: rows, ..*s }, (n.k.data.len(), n.k.strides), (n.v.data.len(), n.v.strides))
            .map_err(|e| match e {
                AttnError::BufferTooSmall { tensor, needed, len } => AttnError::BufferTooSmall { tensor: if tensor == TensorName::K { TensorName::KNew } else { TensorName::VNew }, needed, len },
                e => e,
            })?;
    }
    let appended = |b: usize| new.as_ref().map_or(0, |n| n.rows(b));
    // Saturating: a length past the integer range fails validation against `seq_kv` below.
    let lens = try_vec(cache_lens.iter().enumerate().map(|(b, &l)| l.saturating_add(appended(b))))?;
    let params = AttentionParams { kv_lens: Some(&lens), ..*params };
    // The whole call against the cache as it will be: tensors and pages (those the new rows
    // land in too), options, outputs.
    {
        let kv = view(&cache);
        Problem::<(T, T)>::new(s, q, kv, &params)?;
        validate_outputs(s, out.extent(), lse.as_deref(), params.cu_seqlens_q)?;
        validate_inspect(s, &Default::default(), &params)?;
        // The new keys' rotation reads the tables at their positions (Q's rows were checked).
        if let Some(rope) = &params.rope {
            for (b, &at) in cache_lens.iter().enumerate().filter(|&(b, _)| appended(b) > 0) {
                if lens[b] > rope.positions() {
                    return Err(AttnError::InvalidRope { detail: format!("sequence {b}'s new keys reach position {} but the tables hold {}", lens[b] - 1, rope.positions()) });
                }
                rope.check_rows(at..lens[b])?;
            }
        }
    }
    if let Some(n) = new {
        let (k_index, v_index) = indices(&cache);
        let (kc, vc) = match &mut cache {
            KvCacheMut::Tensors { k, v } => (&mut *k.data, &mut *v.data),
            KvCacheMut::Paged { k, v, .. } => (&mut **k, &mut **v),
        };
        for (b, &at) in cache_lens.iter().enumerate() {
            for t in 0..n.rows(b) {
                let pos = at + t;
                for hk in 0..s.kv_heads {
                    let (src, v_src) = n.offsets(b, hk, t);
                    let dst = k_index.offset(b, hk, pos);
                    let (from, to) = (&n.k.data[src..src + s.head_dim], &mut kc[dst..dst + s.head_dim]);
                    match &params.rope {
                        // Rotated at the key's position, rounded once into the cache.
                        Some(rope) => to.iter_mut().enumerate().for_each(|(c, y)| *y = T::from_f32(rope.rotated(pos, c, |u| from[u].to_f32()))),
                        None => to.copy_from_slice(from),
                    }
                    let dst = v_index.offset(b, hk, pos);
                    vc[dst..dst + s.v_head_dim].copy_from_slice(&n.v.data[v_src..v_src + s.v_head_dim]);
                }
            }
        }
    }
    let kv = view(&cache);
    let kv = AnyKv::typed(kv);
    run_call(config, Request { shape: *s, q, kv, out, lse, params, inspect: Default::default() })
}

/// The cache as the attention reads it.
fn view<'v, T>(cache: &'v KvCacheMut<'_, T>) -> Kv<'v, T> {
    match cache {
        KvCacheMut::Tensors { k, v } => Kv::Tensors(TensorRef::new(&*k.data, k.strides), TensorRef::new(&*v.data, v.strides)),
        KvCacheMut::Paged { k, v, k_strides, v_strides, pages } => Kv::Paged(PagedKv { k, v, k_strides: *k_strides, v_strides: *v_strides, pages: *pages }),
    }
}

/// Where the cache's rows are, without its data (validated by `Problem::new` above).
fn indices<'t, T>(cache: &KvCacheMut<'t, T>) -> (KvIndex<'t>, KvIndex<'t>) {
    match cache {
        KvCacheMut::Tensors { k, v } => (KvIndex::tensor(k.strides), KvIndex::tensor(v.strides)),
        KvCacheMut::Paged { k_strides, v_strides, pages, .. } => (KvIndex::paged(pages, *k_strides), KvIndex::paged(pages, *v_strides)),
    }
}
