//! A validated call: what every kernel reads.

use crate::element::Element;
use crate::error::AttnError;
use crate::layout::{AttentionShape, TensorRef};
use crate::mask::RowMasker;
use crate::params::AttentionParams;
use crate::validate::validate_inputs;

/// The inputs of one call after validation: every index reachable from the shape and strides is
/// inside the slices, and every option has been checked against the contract.
#[derive(Clone, Copy)]
pub(crate) struct Problem<'a, TQ, TKV> {
    pub shape: AttentionShape,
    pub q: TensorRef<'a, TQ>,
    pub k: TensorRef<'a, TKV>,
    pub v: TensorRef<'a, TKV>,
    pub params: AttentionParams<'a>,
    pub scale: f32,
    pub masker: RowMasker,
}

impl<'a, TQ: Element, TKV: Element> Problem<'a, TQ, TKV> {
    pub fn new(
        shape: &AttentionShape,
        q: TensorRef<'a, TQ>,
        k: TensorRef<'a, TKV>,
        v: TensorRef<'a, TKV>,
        params: &AttentionParams<'a>,
    ) -> Result<Self, AttnError> {
        let scale = validate_inputs(shape, &q, &k, &v, params)?;
        Ok(Self {
            shape: *shape,
            q,
            k,
            v,
            params: *params,
            scale,
            masker: RowMasker::new(shape, params),
        })
    }
}

impl<TQ, TKV> Problem<'_, TQ, TKV> {
    #[inline]
    pub fn kv_len(&self, b: usize) -> usize {
        self.params.kv_lens.map_or(self.shape.seq_kv, |l| l[b])
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
