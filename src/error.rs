//! The one error type every public entry returns.
//!
//! Engines log these messages, so each variant names the argument and the values that were
//! wrong; nothing here is a panic, and nothing a caller passes reaches a kernel unchecked.

use core::fmt;

/// Which tensor an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorName {
    Q,
    K,
    V,
    Out,
    Bias,
    Lse,
    /// A partial result given to `merge_partials`.
    Partial,
    /// The attention-probability output `[B, Hq, Sq, Skv]`.
    Alignment,
    /// The coverage output `[B, Hq, Skv]`.
    Coverage,
    /// The block table of a paged K/V pool.
    BlockTable,
    /// The new K rows of a KV cache append.
    KNew,
    /// The new V rows of a KV cache append.
    VNew,
    /// The dequantization factors of a quantized K (`kv_scales.k`).
    KScale,
    /// The dequantization factors of a quantized V (`kv_scales.v`).
    VScale,
}

impl fmt::Display for TensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorName::Q => "q",
            TensorName::K => "k",
            TensorName::V => "v",
            TensorName::Out => "out",
            TensorName::Bias => "bias",
            TensorName::Lse => "lse",
            TensorName::Partial => "partial result",
            TensorName::Alignment => "alignment",
            TensorName::Coverage => "coverage",
            TensorName::BlockTable => "block_table",
            TensorName::KNew => "k_new",
            TensorName::VNew => "v_new",
            TensorName::KScale => "kv_scales.k",
            TensorName::VScale => "kv_scales.v",
        })
    }
}

/// Why a call was rejected. Every variant is a caller error that was detected before any
/// kernel ran; the output buffers are untouched when one is returned.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AttnError {
    /// A dimension that must be at least 1 was 0 (`head_dim`, `v_head_dim`, head counts).
    ZeroDim { dim: &'static str },
    /// `q_heads` is not a multiple of `kv_heads`.
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    /// A slice's length does not cover the highest element its shape and strides reach.
    BufferTooSmall { tensor: TensorName, needed: usize, len: usize },
    /// Shape × stride arithmetic overflows `usize`.
    SizeOverflow { tensor: TensorName },
    /// An output's strides make two different elements share memory.
    OverlappingOutput { tensor: TensorName, detail: String },
    /// A per-batch or per-head slice has the wrong number of entries.
    WrongLength { arg: &'static str, expected: usize, got: usize },
    /// `kv_lens[batch]` is larger than the key sequence length.
    KvLenOutOfRange { batch: usize, kv_len: usize, seq_kv: usize },
    /// A block-table entry that a visible key reaches names no page of the pool.
    InvalidPage { batch: usize, slot: usize, page: i32, num_pages: usize },
    /// `scale` is NaN or infinite.
    NonFiniteScale { scale: f32 },
    /// `softcap` is not a finite positive number.
    InvalidSoftcap { softcap: f32 },
    /// A window bound is out of range (only reachable from the C ABI's signed bounds).
    InvalidWindow { left: i64, right: i64 },
    /// A host-driven share number is not below the share count.
    ShareOutOfRange { ith: usize, nth: usize },
    /// A host-driven share was run twice.
    ShareAlreadyRun { ith: usize },
    /// A host-driven merge was called before every share had finished.
    SharesNotFinished { finished: usize, nth: usize },
    /// A caller-provided workspace is smaller than the call needs.
    WorkspaceTooSmall { needed: usize, len: usize },
    /// A buffer the call needs (scratch, decode partials, share flags) could not be allocated.
    /// Outputs may be partly written when this comes from a worker of a running call.
    OutOfMemory { bytes: usize },
    /// The requested instruction-set path cannot run on this machine.
    IsaUnavailable { isa: crate::isa::Isa },
    /// `SIMD_ATTN_ISA` names no path.
    UnknownIsaName { name: String },
    /// A per-head parameter (ALiBi slope or sink) has a value the contract does not allow.
    InvalidValue { arg: &'static str, index: usize, value: f32, allowed: &'static str },
    /// The score function's arguments do not fit the call (see [`crate::Score`]).
    InvalidScore { detail: String },
    /// The operation does not support this score function.
    UnsupportedScore { score: &'static str, operation: &'static str },
    /// A combination of options the call cannot take (named in `what`).
    Unsupported { what: &'static str },
    /// A `cu_seqlens` array is not `batch + 1` non-negative, non-decreasing offsets whose
    /// segments fit the shape.
    InvalidSeqlens { arg: &'static str, index: usize, detail: String },
    /// Rotary tables that do not fit the call (dims, lengths, positions past the tables).
    InvalidRope { detail: String },
}

impl fmt::Display for AttnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use AttnError::*;
        match self {
            ZeroDim { dim } => write!(f, "{dim} must be at least 1, got 0"),
            HeadsNotDivisible { q_heads, kv_heads } => write!(
                f,
                "q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})"
            ),
            BufferTooSmall { tensor, needed, len } => write!(
                f,
                "{tensor}: shape and strides reach {needed} elements but the slice holds {len}"
            ),
            SizeOverflow { tensor } => {
                write!(f, "{tensor}: shape x strides overflows the address space")
            }
            OverlappingOutput { tensor, detail } => {
                write!(f, "{tensor}: strides make distinct elements overlap ({detail})")
            }
            WrongLength { arg, expected, got } => {
                write!(f, "{arg}: expected {expected} entries, got {got}")
            }
            KvLenOutOfRange { batch, kv_len, seq_kv } => write!(
                f,
                "kv_lens[{batch}] = {kv_len} exceeds the key sequence length {seq_kv}"
            ),
            InvalidPage { batch, slot, page, num_pages } => write!(
                f,
                "block_table[{batch}][{slot}] = {page}: a key of sequence {batch} lies there, so it must name a page in 0..{num_pages}"
            ),
            NonFiniteScale { scale } => write!(f, "scale must be finite, got {scale}"),
            InvalidSoftcap { softcap } => {
                write!(f, "softcap must be finite and > 0, got {softcap}")
            }
            InvalidWindow { left, right } => write!(
                f,
                "window ({left}, {right}): each bound must be >= 0, or -1 for unbounded"
            ),
            ShareOutOfRange { ith, nth } => write!(f, "share {ith} does not exist: there are {nth} (0..{nth})"),
            ShareAlreadyRun { ith } => write!(f, "share {ith} has already run; each share runs once"),
            SharesNotFinished { finished, nth } => write!(
                f,
                "merge called after {finished} of {nth} shares finished; call it after every share's run"
            ),
            WorkspaceTooSmall { needed, len } => {
                write!(f, "workspace holds {len} f32 elements but the call needs {needed}")
            }
            OutOfMemory { bytes } => write!(f, "could not allocate {bytes} bytes of working memory"),
            IsaUnavailable { isa } => write!(f, "the {isa} path cannot run on this machine"),
            UnknownIsaName { name } => write!(
                f,
                "SIMD_ATTN_ISA={name:?} names no path (portable, scalar, avx2, avx512, avx512bf16, neon, auto)"
            ),
            InvalidValue { arg, index, value, allowed } => {
                write!(f, "{arg}[{index}] = {value}: must be {allowed}")
            }
            InvalidScore { detail } => write!(f, "score function: {detail}"),
            UnsupportedScore { score, operation } => {
                write!(f, "{operation} does not support the {score} score; use the fused call")
            }
            Unsupported { what } => write!(f, "not supported: {what}"),
            InvalidSeqlens { arg, index, detail } => write!(f, "{arg}[{index}]: {detail}"),
            InvalidRope { detail } => write!(f, "rope: {detail}"),
        }
    }
}

impl std::error::Error for AttnError {}

/// The error for `n` items of `T` that could not be allocated.
pub(crate) fn out_of_memory<T>(n: usize) -> AttnError {
    AttnError::OutOfMemory { bytes: n.saturating_mul(size_of::<T>()) }
}

/// A vector of the iterator's items, or `OutOfMemory` instead of an abort (a huge shape must
/// come back as an error, never abort the engine).
pub(crate) fn try_vec<T>(items: impl ExactSizeIterator<Item = T>) -> Result<Vec<T>, AttnError> {
    let mut v = Vec::new();
    v.try_reserve_exact(items.len()).map_err(|_| out_of_memory::<T>(items.len()))?;
    v.extend(items);
    Ok(v)
}
