//! One call as a value: what every entry (the generic Rust functions, host plans, the C ABI)
//! turns its arguments into, and what flows through validate → score → plan → kernel → store.
//!
//! Its tensors carry their element types as enums (`dtypes`), so the path down to the kernels
//! is compiled once, in this crate. Only K and V are recovered as types, at one match
//! ([`Request::with_kv`]): the kernels' inner loops read them. Q is widened as it is packed and
//! the output rounded as it is stored, each once per row, so neither multiplies the kernels.

use crate::api::Inspect;
use crate::dtypes::{AnyKv, AnyMut, AnyRef, KvOf};
use crate::element::{BlockQ8_0, KvPair, F8E4M3, F8E5M2};
use half::{bf16, f16};
use crate::layout::{AttentionShape, TensorRef};
use crate::params::{AttentionParams, Score};

/// One attention call as a value: everything it reads and writes (`'a` borrows the inputs, `'o`
/// the outputs). [`crate::run`] runs it; [`crate::HostPlan::from_request`] plans it for the
/// engine's own workers. The generic entries ([`crate::attention`] and the rest) build one too.
///
/// ```
/// use simd_attn::{AttentionParams, AttentionShape, PageStrides, PageTable, PagedKv, Request, RunConfig, TensorMut, TensorRef};
/// // Two sequences of 5 and 3 keys in a pool of 4 pages of 2 tokens ([pages, page_size, Hkv, D]).
/// let shape = AttentionShape::new(2, 4, 2, 1, 6, 8); // B, Hq, Hkv, Sq (decode), Skv (max), D
/// let ps = PageStrides::token_major(2, 2, 8);
/// let (k, v) = (vec![0.5f32; 4 * 2 * 2 * 8], vec![0.25f32; 4 * 2 * 2 * 8]);
/// let block_table = [3, 0, 1, /* sequence 1: */ 2, 1, -1];
/// let pages = PageTable { block_table: &block_table, pages_per_seq: 3, page_size: 2, num_pages: 4 };
/// let kv_lens = [5, 3];
/// let [qs, _, _, os] = shape.bhsd_strides();
/// let q = vec![0.1f32; 2 * 4 * 8];
/// let mut out = vec![0.0f32; 2 * 4 * 8];
/// let request = Request::new(
///     shape,
///     TensorRef::new(&q, qs),
///     PagedKv { k: &k, v: &v, k_strides: ps, v_strides: ps, pages },
///     TensorMut::new(&mut out, os),
///     AttentionParams::new().kv_lens(&kv_lens),
/// );
/// simd_attn::run(&RunConfig::default(), request)?;
/// assert!((out[0] - 0.25).abs() < 1e-6);
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
#[derive(Debug)]
pub struct Request<'a, 'o> {
    pub shape: AttentionShape,
    pub q: AnyRef<'a>,
    pub kv: AnyKv<'a>,
    pub out: AnyMut<'o>,
    /// `[B, Hq, Sq]` natural-log sums of exponentials, if asked for.
    pub lse: Option<&'o mut [f32]>,
    pub params: AttentionParams<'a>,
    pub inspect: Inspect<'o>,
}

/// The part of an entry's body that needs K and V at their storage type.
pub(crate) trait KvOp<'a, 'o> {
    type Output;
    fn run<P: KvPair>(self, call: Request<'a, 'o>, kv: KvOf<'a, P>) -> Self::Output;
}

impl<'a, 'o> Request<'a, 'o> {
    /// A call without LSE or inspection outputs; `q`, `kv` and `out` take the crate's tensor
    /// types of any element type (`kv` a `(k, v)` pair or a [`crate::PagedKv`]).
    pub fn new(shape: AttentionShape, q: impl Into<AnyRef<'a>>, kv: impl Into<AnyKv<'a>>, out: impl Into<AnyMut<'o>>, params: AttentionParams<'a>) -> Self {
        Self { shape, q: q.into(), kv: kv.into(), out: out.into(), lse: None, params, inspect: Inspect::default() }
    }

    /// Also write each row's LSE (`[B, Hq, Sq]`, contiguous).
    pub fn lse(self, lse: &'o mut [f32]) -> Self {
        Self { lse: Some(lse), ..self }
    }

    /// Also write the alignment matrix and/or coverage (see [`Inspect`]).
    pub fn inspect(self, inspect: Inspect<'o>) -> Self {
        Self { inspect, ..self }
    }

    /// This call with the dot score on `q` (`[B, Hq, Sq, head_dim]`, contiguous f32): how
    /// `Score::General` runs once Q is projected.
    pub(crate) fn with_dot_q<'q>(self, q: &'q [f32]) -> Request<'q, 'o>
    where
        'a: 'q,
    {
        let [qs, ..] = self.shape.bhsd_strides();
        Request { q: AnyRef::F32(TensorRef::new(q, qs)), params: self.params.score(Score::Dot), ..self }
    }

    /// Runs `op` on this call with K and V at their storage type: the one place the K/V types
    /// are listed for the kernels.
    pub(crate) fn with_kv<Op: KvOp<'a, 'o>>(self, op: Op) -> Op::Output {
        match self.kv {
            AnyKv::F32(kv) => op.run::<(f32, f32)>(self, kv),
            AnyKv::F16(kv) => op.run::<(f16, f16)>(self, kv),
            AnyKv::Bf16(kv) => op.run::<(bf16, bf16)>(self, kv),
            AnyKv::I8(kv) => op.run::<(i8, i8)>(self, kv),
            AnyKv::F8E4M3(kv) => op.run::<(F8E4M3, F8E4M3)>(self, kv),
            AnyKv::F8E5M2(kv) => op.run::<(F8E5M2, F8E5M2)>(self, kv),
            AnyKv::Q8_0(kv) => op.run::<(BlockQ8_0, BlockQ8_0)>(self, kv),
            AnyKv::Q8_0F16(kv) => op.run::<(BlockQ8_0, f16)>(self, kv),
            AnyKv::F16Q8_0(kv) => op.run::<(f16, BlockQ8_0)>(self, kv),
        }
    }
}
