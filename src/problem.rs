//! A validated call: what every kernel reads.

use crate::dtypes::{AnyRef, Kv, KvOf};
use crate::element::{Element, KvPair};
use crate::error::{AttnError, TensorName};
use crate::kv::{validate_packed, validate_paged, KvSource};
use crate::layout::AttentionShape;
use crate::mask::RowMasker;
use crate::params::{AttentionParams, Score};
use crate::quant::{self, Factors, KvLayout};
use crate::rope::Rope;
use crate::rows::QRows;
use crate::score::ScoreData;
use crate::validate::{validate_inputs, validate_kv_tensors};

/// The inputs of one call after validation: every index reachable from the shape and strides is
/// inside the slices, and every option has been checked against the contract.
#[derive(Clone, Copy)]
pub(crate) struct Problem<'a, TKV: KvPair> {
    pub shape: AttentionShape,
    /// Q in its own storage type: kernels read it through [`Problem::q_row`] as they pack
    /// it, so they are compiled per K/V type only.
    pub q: AnyRef<'a>,
    pub k: KvSource<'a, TKV::K>,
    pub v: KvSource<'a, TKV::V>,
    pub params: AttentionParams<'a>,
    pub scale: f32,
    pub masker: RowMasker,
    /// Where the query (and output) rows are: padded, or packed sequences.
    pub rows: QRows<'a>,
    /// `params.rope` with every byte set (`rotary_dim` 0: none). Kernels branch on this, not on
    /// the `Option`: LLVM may hoist a read of a `None`'s payload into a branch (valgrind then
    /// reports a jump on uninitialised bytes, as it did for the additive payload before).
    pub rope: Rope<'a>,
    /// Each sequence's key count, from `kv_lens`, `cu_seqlens_k` or `seq_kv`, with every byte
    /// set (the same reason as `rope`).
    kv_lens: KvLens<'a>,
    /// The score function's per-call data (see `score`).
    pub score: ScoreData<'a>,
    /// Dequantization factors of K and V (see `quant`): `Factors::One` for a float cache
    /// given no scales.
    pub k_factors: Factors<'a>,
    pub v_factors: Factors<'a>,
}

impl<'a, TKV: KvPair> Problem<'a, TKV> {
    pub fn new(shape: &AttentionShape, q: AnyRef<'a>, kv: KvOf<'a, TKV>, params: &AttentionParams<'a>) -> Result<Self, AttnError> {
        let s = shape;
        let scale = validate_inputs(s, (q.len(), q.strides()), params)?;
        if TKV::K::DTYPE.is_quantized() || TKV::V::DTYPE.is_quantized() || params.kv_scales.is_some() {
            if !matches!(params.score, Score::ScaledDot | Score::Dot | Score::General { .. }) {
                // Cosine's key norms and additive's key projection read K before any factor.
                return Err(AttnError::UnsupportedScore { score: params.score.name(), operation: "a quantized K/V cache (int8, fp8 or q8_0 K/V, or kv_scales)" });
            }
        }
        let lens = |b: usize| params.kv_len(b, s.seq_kv);
        let (layout, pages) = match kv {
            Kv::Tensors(..) => (KvLayout::Tensors(params.cu_seqlens_k), None),
            Kv::Paged(pk) => (KvLayout::Tensors(None), Some(pk.pages)),
        };
        let layout = match &pages {
            Some(t) => KvLayout::Paged(t, &lens),
            None => layout,
        };
        let (k_factors, v_factors) = match params.kv_scales {
            None => (Factors::One, Factors::One),
            Some(sc) => (quant::validate(TensorName::KScale, sc.k, s, &layout)?, quant::validate(TensorName::VScale, sc.v, s, &layout)?),
        };
        // K/V rows in the caller's storage units (a block format's blocks), as its strides count.
        let units = crate::validate::kv_units::<TKV::K, TKV::V>(s)?;
        let (k, v) = match kv {
            Kv::Tensors(k, v) => match params.cu_seqlens_k {
                // Validated above: `cu_seqlens_k` has `batch + 1` non-decreasing entries.
                Some(cu) => (
                    validate_packed(TensorName::K, k.data, k.strides, cu, s.kv_heads, units.head_dim)?,
                    validate_packed(TensorName::V, v.data, v.strides, cu, s.kv_heads, units.v_head_dim)?,
                ),
                None => {
                    validate_kv_tensors(&units, (k.data.len(), k.strides), (v.data.len(), v.strides))?;
                    (KvSource::strided(k.data, k.strides), KvSource::strided(v.data, v.strides))
                }
            },
            Kv::Paged(_) if params.cu_seqlens_k.is_some() => {
                return Err(AttnError::Unsupported { what: "cu_seqlens_k with a paged K/V pool (its block table and kv_lens say where each sequence's keys are)" });
            }
            Kv::Paged(pk) => {
                // Validated above: `kv_lens` has `batch` entries, each at most `seq_kv`.
                let lens = || (0..s.batch).map(|b| params.kv_len(b, s.seq_kv));
                let k = validate_paged(TensorName::K, pk.k, pk.k_strides, &pk.pages, s.batch, s.kv_heads, units.head_dim, lens())?;
                let v = validate_paged(TensorName::V, pk.v, pk.v_strides, &pk.pages, s.batch, s.kv_heads, units.v_head_dim, lens())?;
                (k, v)
            }
        };
        Ok(Self { shape: *shape, q, k, v, params: *params, scale, masker: RowMasker::new(shape, params), rows: QRows::new(shape, params), rope: params.rope.unwrap_or(Rope { cos: &[], sin: &[], rotary_dim: 0, interleaved: false }), kv_lens: KvLens::new(params), score: ScoreData::Dot, k_factors, v_factors })
    }
}

impl<'a, TKV: KvPair> Problem<'a, TKV> {
    /// The same problem with its score function's prepared data (borrowed for `'b`).
    pub fn with_score<'b>(self, score: ScoreData<'b>) -> Problem<'b, TKV>
    where
        'a: 'b,
    {
        Problem { score, ..self }
    }

    /// Passes `(t, x)` for the `d` elements of Q row `(b, h, i)` (`i` virtual, see `rows`),
    /// widened to f32: the one place a kernel reads Q.
    #[inline(always)]
    pub fn q_row(&self, b: usize, h: usize, i: usize, d: usize, put: impl FnMut(usize, f32)) {
        let o = self.rows.offset(&self.q.strides(), b, h, i);
        if self.rope.rotary_dim == 0 {
            self.q.row_at(o, d, put)
        } else {
            // The row's aligned position `i + kv_len - seq_q` (virtual `i`): validated >= 0.
            self.q.row_rotated(o, d, &self.rope, i + self.kv_len(b) - self.shape.seq_q, put)
        }
    }

    /// The factor Q row `(b, h, i)` is multiplied by as it is packed.
    #[inline(always)]
    pub fn q_scale(&self, b: usize, h: usize, i: usize) -> f32 {
        match self.score {
            ScoreData::Cosine { q_scale, .. } => q_scale[(b * self.shape.q_heads + h) * self.shape.seq_q + i],
            _ => self.scale,
        }
    }

    /// Per-key factors on the scores of keys `j0..j0 + n` of KV head `hk` (cosine only).
    #[inline(always)]
    pub fn key_scales(&self, b: usize, hk: usize, j0: usize, n: usize) -> Option<&'a [f32]> {
        match self.score {
            ScoreData::Cosine { k_scale, .. } => {
                let o = (b * self.shape.kv_heads + hk) * self.shape.seq_kv + j0;
                Some(&k_scale[o..o + n])
            }
            _ => None,
        }
    }
}

impl<TKV: KvPair> Problem<'_, TKV> {
    #[inline]
    pub fn kv_len(&self, b: usize) -> usize {
        match self.kv_lens.from {
            LensFrom::KvLens => self.kv_lens.lens[b],
            LensFrom::CuSeqlens => (self.kv_lens.cu[b + 1] - self.kv_lens.cu[b]) as usize,
            LensFrom::SeqKv => self.shape.seq_kv,
        }
    }

    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.shape.group_size()
    }

    /// The sink logit of head `h`, `-inf` when there is none.
    #[inline]
    pub fn sink(&self, h: usize) -> f32 {
        self.params.sinks.map_or(f32::NEG_INFINITY, |s| s[h])
    }
}

/// Where a validated call's key counts come from (see `Problem::kv_len`): plain slices, empty
/// when unused, and a tag.
#[derive(Clone, Copy)]
struct KvLens<'a> {
    lens: &'a [usize],
    cu: &'a [i32],
    from: LensFrom,
}

#[derive(Clone, Copy)]
enum LensFrom {
    KvLens,
    CuSeqlens,
    SeqKv,
}

impl<'a> KvLens<'a> {
    fn new(params: &AttentionParams<'a>) -> Self {
        let (lens, cu) = (params.kv_lens.unwrap_or(&[]), params.cu_seqlens_k.unwrap_or(&[]));
        let from = match (params.kv_lens.is_some(), params.cu_seqlens_k.is_some()) {
            (true, _) => LensFrom::KvLens,
            (false, true) => LensFrom::CuSeqlens,
            (false, false) => LensFrom::SeqKv,
        };
        Self { lens, cu, from }
    }
}
