//! Writing finished rows into the caller's output: the only place that touches it.

use crate::element::Element;
use crate::layout::{AttentionShape, TensorMut};

/// Rounds `n` rows of `rows` (`pitch` apart, for query rows `i0..`) into `out` and their LSE
/// into `lse` (`[B, Hq, Sq]`). Offsets were validated against the slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_rows<TO: Element>(
    shape: &AttentionShape,
    out: &mut TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    b: usize,
    h: usize,
    i0: usize,
    rows: &[f32],
    pitch: usize,
    n: usize,
    row_lse: &[f32],
) {
    let dv = shape.v_head_dim;
    for r in 0..n {
        let src = &rows[r * pitch..r * pitch + dv];
        let o = out.strides.offset(b, h, i0 + r);
        for (dst, &x) in out.data[o..o + dv].iter_mut().zip(src) {
            *dst = TO::from_f32(x);
        }
    }
    if let Some(lse) = lse {
        let at = (b * shape.q_heads + h) * shape.seq_q + i0;
        lse[at..at + row_lse.len()].copy_from_slice(row_lse);
    }
}
