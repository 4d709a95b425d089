//! One call as a value: what every entry (the generic Rust functions, host plans, the C ABI)
//! turns its arguments into, and what flows through validate → score → plan → kernel → store.
//!
//! Its tensors carry their element types as enums (`dtypes`), so the path down to the kernels
//! is compiled once, in this crate. Only K and V are recovered as types, at one match
//! ([`Call::with_kv`]): the kernels' inner loops read them. Q is widened as it is packed and
//! the output rounded as it is stored, each once per row, so neither multiplies the kernels.

use crate::api::Inspect;
use crate::dtypes::{AnyKv, AnyMut, AnyRef};
use crate::element::Element;
use crate::layout::{AttentionShape, TensorRef};
use crate::params::AttentionParams;

/// Everything one call reads and writes. `'a` borrows the inputs, `'o` the outputs.
pub(crate) struct Call<'a, 'o> {
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
    fn run<TKV: Element>(self, call: Call<'a, 'o>, k: TensorRef<'a, TKV>, v: TensorRef<'a, TKV>) -> Self::Output;
}

impl<'a, 'o> Call<'a, 'o> {
    /// Runs `op` on this call with K and V at their storage type: the one place the K/V types
    /// are listed for the kernels.
    pub fn with_kv<Op: KvOp<'a, 'o>>(self, op: Op) -> Op::Output {
        match self.kv {
            AnyKv::F32(k, v) => op.run(self, k, v),
            AnyKv::F16(k, v) => op.run(self, k, v),
        }
    }
}
