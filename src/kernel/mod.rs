//! Kernels: each computes the final (normalised) output rows and LSE of one query block.
//! They never write to the caller's output; `store` does.

pub(crate) mod decode;
pub(crate) mod flash;
pub(crate) mod microkernel;
pub(crate) mod portable;
pub(crate) mod softmax;
pub(crate) mod terms;

/// Splits the first `n` elements off a workspace buffer.
pub(crate) fn carve<'w>(buf: &mut &'w mut [f32], n: usize) -> &'w mut [f32] {
    let (head, tail) = core::mem::take(buf).split_at_mut(n);
    *buf = tail;
    head
}

/// `dst[..src.len()] = src` as f32: f16 is widened in registers a vector at a time, f32 copied.
#[inline(always)]
pub(crate) fn convert_row<S: crate::simd::SimdExt, T: crate::element::Element>(simd: S, src: &[T], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    if let Some(h) = T::as_f16_slice(src) {
        let lanes = S::F32_LANES;
        let whole = src.len() / lanes * lanes;
        let (vecs, _) = S::as_mut_simd_f32s(&mut dst[..whole]);
        for (i, d) in vecs.iter_mut().enumerate() {
            *d = simd.load_f16s(&h[i * lanes..]);
        }
        for (d, x) in dst[whole..].iter_mut().zip(&h[whole..]) {
            *d = x.to_f32();
        }
    } else {
        for (d, x) in dst.iter_mut().zip(src) {
            *d = x.to_f32();
        }
    }
}
