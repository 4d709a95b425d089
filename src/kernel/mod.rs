//! Kernels: each computes the final (normalised) output rows and LSE of one query block.
//! They never write to the caller's output; `store` does.

pub(crate) mod flash;
pub(crate) mod microkernel;
pub(crate) mod portable;
pub(crate) mod softmax;
pub(crate) mod terms;
