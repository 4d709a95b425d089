//! Kernels: each computes the final (normalised) output rows and LSE of one query block.
//! They never write to the caller's output; `store` does.

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
