//! The public entry points: validate, plan, run the kernel per query block, store.

use crate::element::{DType, Element};
use crate::error::AttnError;
use crate::isa::Isa;
use crate::kernel::portable;
use crate::layout::{AttentionShape, TensorMut, TensorRef};
use crate::params::AttentionParams;
use crate::plan::{Family, Tiles};
use crate::problem::Problem;
use crate::store::store_rows;
use crate::validate::validate_outputs;

/// What a call ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInfo {
    pub isa: Isa,
    pub tiles: Tiles,
}

/// Fused attention: `out = softmax(scale * Q K^T + bias, masked) V` for every batch entry and
/// query head, without storing the score matrix. The semantics of every option are those of
/// [`AttentionParams`]. `lse`, when given, receives the natural-log sum of exponentials of each
/// row as a contiguous `[batch, q_heads, seq_q]` array.
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
/// attention(
///     &shape,
///     TensorRef::new(&q, qs),
///     TensorRef::new(&k, ks),
///     TensorRef::new(&v, vs),
///     TensorMut::new(&mut out, os),
///     None,
///     &AttentionParams::new().causal(true),
/// )?;
/// assert!((out[0] - 0.3).abs() < 1e-6);
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
pub fn attention<TQ: Element, TKV: Element, TO: Element>(
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TKV>,
    v: TensorRef<'_, TKV>,
    mut out: TensorMut<'_, TO>,
    mut lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError> {
    let p = Problem::new(shape, q, k, v, params)?;
    validate_outputs(shape, &out, lse.as_deref())?;
    let family = Family::find(Isa::Portable, DType::F32).expect("kernels/ declares the portable f32 family");
    let tiles = family.tiles(shape.head_dim, shape.v_head_dim);
    let mut scratch = portable::Scratch::new(&tiles, shape.head_dim, shape.v_head_dim);
    let dv = shape.v_head_dim;
    for b in 0..shape.batch {
        for h in 0..shape.q_heads {
            for i0 in (0..shape.seq_q).step_by(tiles.br) {
                let i1 = (i0 + tiles.br).min(shape.seq_q);
                portable::query_block(&p, &tiles, b, h, i0, i1, &mut scratch);
                let rows = i1 - i0;
                store_rows(
                    shape,
                    &mut out,
                    lse.as_deref_mut(),
                    b,
                    h,
                    i0,
                    &scratch.acc[..rows * dv],
                    &scratch.lse[..rows],
                );
            }
        }
    }
    Ok(RunInfo { isa: Isa::Portable, tiles })
}
