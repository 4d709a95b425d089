//! The C ABI (`include/simd_attn.h`): plain structs, status codes, no panics across the
//! boundary.
//!
//! Data flow: a C descriptor is read defensively (its `struct_size` first), every pointer is
//! turned into a slice only after its NULL-ness, alignment and byte size are checked, output
//! buffers are checked not to overlap any input, and then the safe Rust API runs, which
//! validates shapes, strides and lengths against those slices. Every entry catches panics;
//! errors leave a detailed message in a thread-local buffer ([`simd_attn_last_error`]).
//!
//! The module is public (hidden from the docs) so the repository's fuzzer can drive the
//! descriptor from Rust exactly as a C caller does.
//!
//! The header is written by hand; `simd_attn_abi_layout` reports the library's struct sizes
//! and field offsets so the C test can prove the header agrees with the library.

use crate::element::{DType, KvPair};
use crate::error::AttnError;
use crate::isa::Isa;
use crate::layout::{AttentionShape, BiasRef, BiasStrides, PageStrides, PageTable, PagedKv, Strides, TensorMut, TensorRef};
use crate::merge::PartialResult;
use crate::params::{AdditiveProjection, AttentionParams, Score, Window};
use crate::api::PlanShares;
use crate::dtypes::{dispatch, AnyKv, AnyMut, AnyRef, Kv, KvOf, TypedOp};
use crate::append::{kvcache_call, AnyCache};
use crate::rope::Rope;
use crate::{Element, Inspect, KvCacheMut, NewKv, RunConfig, RunInfo};
use core::ffi::{c_char, c_void};
use core::mem::{offset_of, size_of};
use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Bumped when the meaning of an existing field changes (never for appended fields).
pub const ABI_VERSION: u32 = 1;

/// An input tensor `[batch, head, seq, dim]` (dim contiguous).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SimdAttnTensor {
    pub data: *const c_void,
    pub len: usize,
    pub dtype: i32,
    pub reserved: i32,
    pub stride_batch: i64,
    pub stride_head: i64,
    pub stride_seq: i64,
}

/// An output tensor: the same fields as [`SimdAttnTensor`], writable.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SimdAttnOutput {
    pub data: *mut c_void,
    pub len: usize,
    pub dtype: i32,
    pub reserved: i32,
    pub stride_batch: i64,
    pub stride_head: i64,
    pub stride_seq: i64,
}

/// The whole problem of one call (see the header for every field).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SimdAttnDesc {
    pub struct_size: u32,
    pub abi_version: u32,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub q: SimdAttnTensor,
    pub k: SimdAttnTensor,
    pub v: SimdAttnTensor,
    pub out: SimdAttnOutput,
    pub lse: *mut f32,
    pub lse_len: usize,
    pub use_scale: i32,
    pub scale: f32,
    pub causal: i32,
    pub softcap: f32,
    pub window_left: i64,
    pub window_right: i64,
    pub kv_lens: *const i64,
    pub kv_lens_len: usize,
    pub bias: *const f32,
    pub bias_len: usize,
    pub bias_stride_batch: i64,
    pub bias_stride_head: i64,
    pub bias_stride_row: i64,
    pub alibi_slopes: *const f32,
    pub alibi_slopes_len: usize,
    pub sinks: *const f32,
    pub sinks_len: usize,
    // Appended after version 1's first layout (older, shorter descriptors read these as 0).
    pub score: i32,
    pub temperature: f32,
    pub q_dim: usize,
    pub score_w: *const f32,
    pub score_w_len: usize,
    pub additive_v: *const f32,
    pub additive_v_len: usize,
    pub additive_w_q: *const f32,
    pub additive_w_q_len: usize,
    pub additive_w_k: *const f32,
    pub additive_w_k_len: usize,
    pub alignment: *mut f32,
    pub alignment_len: usize,
    pub coverage: *mut f32,
    pub coverage_len: usize,
    // Appended for paged K/V (older descriptors read these as 0: K and V are tensors).
    pub block_table: *const i32,
    pub block_table_len: usize,
    pub pages_per_seq: usize,
    pub page_size: usize,
    pub num_pages: usize,
    // Appended for packed variable-length sequences (older descriptors read these as NULL:
    // padded batches).
    pub cu_seqlens_q: *const i32,
    pub cu_seqlens_q_len: usize,
    pub cu_seqlens_k: *const i32,
    pub cu_seqlens_k_len: usize,
    // Appended for RoPE and KV cache appends (older descriptors read these as NULL / 0: no
    // rotation, no append).
    pub rope_cos: *const f32,
    pub rope_sin: *const f32,
    pub rope_len: usize,
    pub rotary_dim: usize,
    pub rope_interleaved: i32,
    pub rope_reserved: i32,
    pub k_new: SimdAttnTensor,
    pub v_new: SimdAttnTensor,
    pub seq_new: usize,
    pub cu_seqlens_new: *const i32,
    pub cu_seqlens_new_len: usize,
    pub cache_lens: *const i64,
    pub cache_lens_len: usize,
    // Appended for quantized K/V (older descriptors read these as 0: no factors).
    pub k_scale_kind: i32,
    pub k_scale: f32,
    pub k_scales: *const f32,
    pub k_scales_len: usize,
    pub k_scale_stride_batch: i64,
    pub k_scale_stride_head: i64,
    pub k_scale_stride_seq: i64,
    pub v_scale_kind: i32,
    pub v_scale: f32,
    pub v_scales: *const f32,
    pub v_scales_len: usize,
    pub v_scale_stride_batch: i64,
    pub v_scale_stride_head: i64,
    pub v_scale_stride_seq: i64,
    // Appended for f16 per-token factors (older descriptors read these as NULL: f32 factors).
    pub k_scales_f16: *const half::f16,
    pub v_scales_f16: *const half::f16,
}

/// The descriptor's size before the score and inspection fields were appended: callers
/// compiled against that header pass it, and get the defaults for everything after.
const DESC_V1_SIZE: usize = offset_of!(SimdAttnDesc, score);

/// Every size a descriptor has had, oldest first: before the score fields, before the paged
/// K/V fields, before the packed-sequence fields, before the RoPE and append fields, before
/// the quantized-K/V fields, before the f16 factor arrays, and now. A caller's `struct_size`
/// must be one of them (or larger, with the unknown tail zero).
const DESC_SIZES: [usize; 7] = [
    DESC_V1_SIZE,
    offset_of!(SimdAttnDesc, block_table),
    offset_of!(SimdAttnDesc, cu_seqlens_q),
    offset_of!(SimdAttnDesc, rope_cos),
    offset_of!(SimdAttnDesc, k_scale_kind),
    offset_of!(SimdAttnDesc, k_scales_f16),
    size_of::<SimdAttnDesc>(),
];

/// One partial result for [`simd_attn_merge_partials`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SimdAttnPartial {
    pub out: SimdAttnTensor,
    pub lse: *const f32,
    pub lse_len: usize,
}

/// What a call ran on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SimdAttnRunInfo {
    pub isa: i32,
    pub specialised_head_dim: i32,
    pub threads: usize,
    pub decode: i32,
    pub reserved: i32,
}

/// Status codes. The numbers are ABI: never renumber, only append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NullPointer = 1,
    Misaligned = 2,
    DescSize = 3,
    AbiVersion = 4,
    UnknownDtype = 5,
    UnsupportedDtypes = 6,
    NegativeStride = 7,
    ZeroDim = 8,
    HeadsNotDivisible = 9,
    BufferTooSmall = 10,
    SizeOverflow = 11,
    OverlappingOutput = 12,
    Aliasing = 13,
    WrongLength = 14,
    KvLenOutOfRange = 15,
    NonFiniteScale = 16,
    InvalidSoftcap = 17,
    InvalidWindow = 18,
    InvalidValue = 19,
    ShareOutOfRange = 20,
    ShareAlreadyRun = 21,
    SharesNotFinished = 22,
    WorkspaceTooSmall = 23,
    OutOfMemory = 24,
    IsaUnavailable = 25,
    UnknownIsa = 26,
    Internal = 27,
    InvalidScore = 28,
    UnknownScore = 29,
    Unsupported = 30,
    Reserved = 31,
    InvalidPage = 32,
    InvalidSeqlens = 33,
    InvalidRope = 34,
}

/// Every status, in code order, with its header name and its short message.
const STATUS_TABLE: [(Status, &str, &str); 35] = [
    (Status::Ok, "SIMD_ATTN_OK\0", "success\0"),
    (Status::NullPointer, "SIMD_ATTN_ERR_NULL_POINTER\0", "a required pointer is NULL (or NULL with a non-zero length)\0"),
    (Status::Misaligned, "SIMD_ATTN_ERR_MISALIGNED\0", "a pointer is not aligned to its element type\0"),
    (Status::DescSize, "SIMD_ATTN_ERR_DESC_SIZE\0", "struct_size is smaller than version 1 of the descriptor, or a newer descriptor sets fields this library does not know\0"),
    (Status::AbiVersion, "SIMD_ATTN_ERR_ABI_VERSION\0", "abi_version is not one this library implements\0"),
    (Status::UnknownDtype, "SIMD_ATTN_ERR_UNKNOWN_DTYPE\0", "a dtype field holds an unknown value\0"),
    (Status::UnsupportedDtypes, "SIMD_ATTN_ERR_UNSUPPORTED_DTYPES\0", "this combination of dtypes is not supported (K and V, or all partial results, must share a dtype)\0"),
    (Status::NegativeStride, "SIMD_ATTN_ERR_NEGATIVE_STRIDE\0", "a stride is negative\0"),
    (Status::ZeroDim, "SIMD_ATTN_ERR_ZERO_DIM\0", "a dimension that must be at least 1 is 0\0"),
    (Status::HeadsNotDivisible, "SIMD_ATTN_ERR_HEADS_NOT_DIVISIBLE\0", "q_heads is not a multiple of kv_heads\0"),
    (Status::BufferTooSmall, "SIMD_ATTN_ERR_BUFFER_TOO_SMALL\0", "a buffer's length does not cover every element its shape and strides reach\0"),
    (Status::SizeOverflow, "SIMD_ATTN_ERR_SIZE_OVERFLOW\0", "shape x strides overflows the address space\0"),
    (Status::OverlappingOutput, "SIMD_ATTN_ERR_OVERLAPPING_OUTPUT\0", "an output's strides make distinct elements share memory\0"),
    (Status::Aliasing, "SIMD_ATTN_ERR_ALIASING\0", "an output buffer overlaps an input buffer or the other output\0"),
    (Status::WrongLength, "SIMD_ATTN_ERR_WRONG_LENGTH\0", "a per-batch or per-head array has the wrong number of entries\0"),
    (Status::KvLenOutOfRange, "SIMD_ATTN_ERR_KV_LEN_OUT_OF_RANGE\0", "a kv_lens entry is negative or larger than seq_kv\0"),
    (Status::NonFiniteScale, "SIMD_ATTN_ERR_NON_FINITE_SCALE\0", "scale is NaN or infinite\0"),
    (Status::InvalidSoftcap, "SIMD_ATTN_ERR_INVALID_SOFTCAP\0", "softcap must be 0 (off) or finite and positive\0"),
    (Status::InvalidWindow, "SIMD_ATTN_ERR_INVALID_WINDOW\0", "a window bound must be >= 0, or -1 for unbounded\0"),
    (Status::InvalidValue, "SIMD_ATTN_ERR_INVALID_VALUE\0", "an ALiBi slope or sink has a value the contract does not allow\0"),
    (Status::ShareOutOfRange, "SIMD_ATTN_ERR_SHARE_OUT_OF_RANGE\0", "a share number is not below the plan's share count\0"),
    (Status::ShareAlreadyRun, "SIMD_ATTN_ERR_SHARE_ALREADY_RUN\0", "this share (or its merge) has already run\0"),
    (Status::SharesNotFinished, "SIMD_ATTN_ERR_SHARES_NOT_FINISHED\0", "merge was called before every share's run returned\0"),
    (Status::WorkspaceTooSmall, "SIMD_ATTN_ERR_WORKSPACE_TOO_SMALL\0", "the workspace is smaller than simd_attn_plan_workspace_len\0"),
    (Status::OutOfMemory, "SIMD_ATTN_ERR_OUT_OF_MEMORY\0", "working memory could not be allocated\0"),
    (Status::IsaUnavailable, "SIMD_ATTN_ERR_ISA_UNAVAILABLE\0", "the requested instruction-set path cannot run on this machine\0"),
    (Status::UnknownIsa, "SIMD_ATTN_ERR_UNKNOWN_ISA\0", "an ISA value (or SIMD_ATTN_ISA) names no path\0"),
    (Status::Internal, "SIMD_ATTN_ERR_INTERNAL\0", "internal error (a bug in simd-attn: please report it)\0"),
    (Status::InvalidScore, "SIMD_ATTN_ERR_INVALID_SCORE\0", "the score function's arguments do not fit the call (weights, dims, temperature, or scale with a non-scaled-dot score)\0"),
    (Status::UnknownScore, "SIMD_ATTN_ERR_UNKNOWN_SCORE\0", "the score field holds an unknown value\0"),
    (Status::Unsupported, "SIMD_ATTN_ERR_UNSUPPORTED\0", "this operation does not support the chosen score function or inspection output (host-driven plans run the dot scores only)\0"),
    (Status::Reserved, "SIMD_ATTN_ERR_RESERVED\0", "a reserved field is not 0\0"),
    (Status::InvalidPage, "SIMD_ATTN_ERR_INVALID_PAGE\0", "a block-table entry that a visible key reaches names no page of the pool\0"),
    (Status::InvalidSeqlens, "SIMD_ATTN_ERR_INVALID_SEQLENS\0", "a cu_seqlens array is not batch + 1 non-negative, non-decreasing offsets whose segments fit seq_q / seq_kv\0"),
    (Status::InvalidRope, "SIMD_ATTN_ERR_INVALID_ROPE\0", "the rotary tables do not fit the head dim, or do not reach a row's position\0"),
];

/// A failed call: its status and the detailed message for `simd_attn_last_error`.
struct Fail(Status, String);

impl From<AttnError> for Fail {
    fn from(e: AttnError) -> Self {
        use AttnError::*;
        let status = match &e {
            ZeroDim { .. } => Status::ZeroDim,
            HeadsNotDivisible { .. } => Status::HeadsNotDivisible,
            BufferTooSmall { .. } => Status::BufferTooSmall,
            SizeOverflow { .. } => Status::SizeOverflow,
            OverlappingOutput { .. } => Status::OverlappingOutput,
            WrongLength { .. } => Status::WrongLength,
            KvLenOutOfRange { .. } => Status::KvLenOutOfRange,
            InvalidPage { .. } => Status::InvalidPage,
            NonFiniteScale { .. } => Status::NonFiniteScale,
            InvalidSoftcap { .. } => Status::InvalidSoftcap,
            InvalidWindow { .. } => Status::InvalidWindow,
            InvalidValue { .. } => Status::InvalidValue,
            ShareOutOfRange { .. } => Status::ShareOutOfRange,
            ShareAlreadyRun { .. } => Status::ShareAlreadyRun,
            SharesNotFinished { .. } => Status::SharesNotFinished,
            WorkspaceTooSmall { .. } => Status::WorkspaceTooSmall,
            OutOfMemory { .. } => Status::OutOfMemory,
            IsaUnavailable { .. } => Status::IsaUnavailable,
            UnknownIsaName { .. } => Status::UnknownIsa,
            InvalidScore { .. } => Status::InvalidScore,
            UnsupportedScore { .. } | Unsupported { .. } => Status::Unsupported,
            InvalidSeqlens { .. } => Status::InvalidSeqlens,
            InvalidRope { .. } => Status::InvalidRope,
        };
        Fail(status, e.to_string())
    }
}

fn fail<T>(status: Status, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(status, msg.into()))
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

thread_local! {
    /// Set while this thread runs inside an entry: its panics are caught and reported as a
    /// status, so the panic hook stays quiet for them.
    static INSIDE_ABI: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// `catch_unwind` without the panic message on the host's stderr. The first call wraps the
/// process's panic hook once: panics on a thread inside an entry are silent (the status and
/// `simd_attn_last_error` carry the message), every other panic goes to the hook the host had.
fn quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let host = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !INSIDE_ABI.with(|f| f.get()) {
                host(info);
            }
        }));
    });
    let outer = INSIDE_ABI.with(|f| f.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    INSIDE_ABI.with(|f| f.set(outer));
    r
}

/// Runs an entry's body: catches panics (a bug, reported as `Internal`), records the message
/// of a failure, and returns the status code.
fn entry(body: impl FnOnce() -> Result<(), Fail>) -> i32 {
    let (status, msg) = match quiet(body) {
        Ok(Ok(())) => (Status::Ok, String::new()),
        Ok(Err(Fail(s, m))) => (s, m),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (Status::Internal, format!("internal error: {what}"))
        }
    };
    set_last_error(&msg);
    status as i32
}

fn dtype(code: i32, what: &str) -> Result<DType, Fail> {
    match code {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::Bf16),
        3 => Ok(DType::I8),
        4 => Ok(DType::F8E4M3),
        5 => Ok(DType::F8E5M2),
        6 => Ok(DType::Q8_0),
        _ => fail(
            Status::UnknownDtype,
            format!("{what}.dtype = {code}: expected SIMD_ATTN_F32 (0), SIMD_ATTN_F16 (1), SIMD_ATTN_BF16 (2) or, for k and v, SIMD_ATTN_I8 (3), SIMD_ATTN_F8E4M3 (4), SIMD_ATTN_F8E5M2 (5), SIMD_ATTN_Q8_0 (6)"),
        ),
    }
}

/// A reserved field must be 0, so that a later version can give it a meaning without old
/// callers' garbage being read as a request.
fn reserved(x: i32, what: &str) -> Result<(), Fail> {
    if x != 0 {
        return fail(Status::Reserved, format!("{what}.reserved = {x}: reserved fields must be 0"));
    }
    Ok(())
}

fn stride(x: i64, what: &str) -> Result<usize, Fail> {
    usize::try_from(x).or_else(|_| fail(Status::NegativeStride, format!("{what} = {x}: strides must be >= 0")))
}

fn strides(t: &SimdAttnTensor, what: &str) -> Result<Strides, Fail> {
    Ok(Strides::new(
        stride(t.stride_batch, &format!("{what}.stride_batch"))?,
        stride(t.stride_head, &format!("{what}.stride_head"))?,
        stride(t.stride_seq, &format!("{what}.stride_seq"))?,
    ))
}

/// A byte range of caller memory, for the aliasing check.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    what: &'static str,
}

impl Span {
    fn of<T>(s: &[T], what: &'static str) -> Self {
        let start = s.as_ptr() as usize;
        Span { start, end: start + core::mem::size_of_val(s), what }
    }
    fn overlaps(&self, o: &Span) -> bool {
        self.start < o.end && o.start < self.end
    }
}

/// `len` elements at `ptr` as a slice, after checking what can be checked: NULL with a
/// non-zero length, alignment, and a byte size the address space can hold.
///
/// # Safety
/// When `len > 0`, `ptr` must point to `len` readable elements that nothing writes while the
/// slice lives (the caller's contract in the header).
unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return fail(Status::NullPointer, format!("{what} is NULL but its length is {len}"));
    }
    if !(ptr as usize).is_multiple_of(core::mem::align_of::<T>()) {
        return fail(Status::Misaligned, format!("{what} = {ptr:p} is not aligned to {} bytes", core::mem::align_of::<T>()));
    }
    if len.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return fail(Status::SizeOverflow, format!("{what}: {len} elements exceed the address space"));
    }
    // SAFETY: non-NULL, aligned, size in range; validity is the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// [`slice`], writable.
///
/// # Safety
/// As [`slice`], and nothing else reads or writes the memory while the slice lives.
unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Fail> {
    // SAFETY: forwarded contract; the checks are the same.
    let s = unsafe { slice(ptr as *const T, len, what)? };
    // SAFETY: as above; exclusive access is the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts_mut(s.as_ptr() as *mut T, s.len()) })
}

/// Reads a descriptor whatever version of the header the caller compiled against: the first
/// `struct_size` bytes are copied; a larger struct from a newer header is accepted only if
/// every byte this library does not know is zero (an unset future option).
///
/// # Safety
/// `desc` is NULL or points to `struct_size` readable bytes.
unsafe fn read_desc(desc: *const SimdAttnDesc) -> Result<SimdAttnDesc, Fail> {
    if desc.is_null() {
        return fail(Status::NullPointer, "desc is NULL");
    }
    // SAFETY: the first field is a u32 every version has.
    let size = unsafe { (desc as *const u32).read_unaligned() } as usize;
    let ours = size_of::<SimdAttnDesc>();
    if size < ours && !DESC_SIZES.contains(&size) {
        return fail(Status::DescSize, format!("desc->struct_size = {size}: expected {ours} (or {DESC_SIZES:?} from an older header; call simd_attn_desc_init)"));
    }
    if size > ours {
        // SAFETY: the caller's struct has `size` bytes.
        let tail = unsafe { core::slice::from_raw_parts((desc as *const u8).add(ours), size - ours) };
        if tail.iter().any(|&b| b != 0) {
            return fail(Status::DescSize, format!("desc->struct_size = {size}: fields past byte {ours} are set, and this library does not know them"));
        }
    }
    let mut d = default_desc();
    // SAFETY: the caller's struct has at least min(size, ours) readable bytes; every bit pattern
    // of the fields is valid, and a short (older) descriptor leaves the appended fields at
    // their defaults.
    unsafe { core::ptr::copy_nonoverlapping(desc as *const u8, (&mut d as *mut SimdAttnDesc).cast::<u8>(), size.min(ours)) };
    if d.abi_version != ABI_VERSION {
        return fail(Status::AbiVersion, format!("desc->abi_version = {}, this library implements {ABI_VERSION}", d.abi_version));
    }
    Ok(d)
}

/// What `simd_attn_desc_init` writes: every option off.
fn default_desc() -> SimdAttnDesc {
        let t = SimdAttnTensor { data: core::ptr::null(), len: 0, dtype: 0, reserved: 0, stride_batch: 0, stride_head: 0, stride_seq: 0 };
        let o = SimdAttnOutput { data: core::ptr::null_mut(), len: 0, dtype: 0, reserved: 0, stride_batch: 0, stride_head: 0, stride_seq: 0 };
    SimdAttnDesc {
            struct_size: size_of::<SimdAttnDesc>() as u32,
            abi_version: ABI_VERSION,
            batch: 0,
            q_heads: 0,
            kv_heads: 0,
            seq_q: 0,
            seq_kv: 0,
            head_dim: 0,
            v_head_dim: 0,
            q: t,
            k: t,
            v: t,
            out: o,
            lse: core::ptr::null_mut(),
            lse_len: 0,
            use_scale: 0,
            scale: 0.0,
            causal: 0,
            softcap: 0.0,
            window_left: -1,
            window_right: -1,
            kv_lens: core::ptr::null(),
            kv_lens_len: 0,
            bias: core::ptr::null(),
            bias_len: 0,
            bias_stride_batch: 0,
            bias_stride_head: 0,
            bias_stride_row: 0,
            alibi_slopes: core::ptr::null(),
            alibi_slopes_len: 0,
            sinks: core::ptr::null(),
            sinks_len: 0,
            score: 0,
            temperature: 1.0,
            q_dim: 0,
            score_w: core::ptr::null(),
            score_w_len: 0,
            additive_v: core::ptr::null(),
            additive_v_len: 0,
            additive_w_q: core::ptr::null(),
            additive_w_q_len: 0,
            additive_w_k: core::ptr::null(),
            additive_w_k_len: 0,
            alignment: core::ptr::null_mut(),
            alignment_len: 0,
            coverage: core::ptr::null_mut(),
            coverage_len: 0,
            block_table: core::ptr::null(),
            block_table_len: 0,
            pages_per_seq: 0,
            page_size: 0,
            num_pages: 0,
            cu_seqlens_q: core::ptr::null(),
            cu_seqlens_q_len: 0,
            cu_seqlens_k: core::ptr::null(),
            cu_seqlens_k_len: 0,
            rope_cos: core::ptr::null(),
            rope_sin: core::ptr::null(),
            rope_len: 0,
            rotary_dim: 0,
            rope_interleaved: 0,
            rope_reserved: 0,
            k_new: t,
            v_new: t,
            seq_new: 0,
            cu_seqlens_new: core::ptr::null(),
            cu_seqlens_new_len: 0,
            cache_lens: core::ptr::null(),
            cache_lens_len: 0,
            k_scale_kind: 0,
            k_scale: 0.0,
            k_scales: core::ptr::null(),
            k_scales_len: 0,
            k_scale_stride_batch: 0,
            k_scale_stride_head: 0,
            k_scale_stride_seq: 0,
            v_scale_kind: 0,
            v_scale: 0.0,
            v_scales: core::ptr::null(),
            v_scales_len: 0,
            v_scale_stride_batch: 0,
            v_scale_stride_head: 0,
            v_scale_stride_seq: 0,
            k_scales_f16: core::ptr::null(),
            v_scales_f16: core::ptr::null(),
        }
}

/// A descriptor turned into the safe API's arguments (element types still erased, as the
/// Rust entries erase them: see `dtypes`). `K` is how K and V are taken: read ([`AnyKv`]) or,
/// for an append, written ([`CacheArg`]).
struct Decoded<'a, K> {
    shape: AttentionShape,
    q: AnyRef<'a>,
    kv: K,
    out: AnyMut<'a>,
    lse: Option<&'a mut [f32]>,
    inspect: Inspect<'a>,
    /// Converted from the descriptor's int32 lengths; `options.params` borrows it.
    kv_lens: Option<Vec<usize>>,
    options: Options<'a>,
}

/// Everything of [`AttentionParams`] but the KV lengths, which the call owns.
#[derive(Clone, Copy)]
struct Options<'a> {
    bias: Option<BiasRef<'a>>,
    alibi: Option<&'a [f32]>,
    sinks: Option<&'a [f32]>,
    scale: Option<f32>,
    causal: bool,
    softcap: Option<f32>,
    window: Option<Window>,
    score: Score<'a>,
    cu_seqlens_q: Option<&'a [i32]>,
    cu_seqlens_k: Option<&'a [i32]>,
    rope: Option<Rope<'a>>,
    kv_scales: Option<crate::KvScales<'a>>,
}

impl<'a> Options<'a> {
    fn params<'p>(self, kv_lens: Option<&'p [usize]>) -> AttentionParams<'p>
    where
        'a: 'p,
    {
        AttentionParams {
            scale: self.scale,
            causal: self.causal,
            window: self.window,
            kv_lens,
            softcap: self.softcap,
            bias: self.bias,
            alibi_slopes: self.alibi,
            sinks: self.sinks,
            score: self.score,
            cu_seqlens_q: self.cu_seqlens_q,
            cu_seqlens_k: self.cu_seqlens_k,
            rope: self.rope,
            kv_scales: self.kv_scales,
        }
    }
}

/// An optional input array: `None` for NULL with length 0, else [`slice`], recorded in
/// `inputs` for the aliasing check.
///
/// # Safety
/// As [`slice`].
unsafe fn optional<'a, T>(p: *const T, len: usize, what: &'static str, inputs: &mut Vec<Span>) -> Result<Option<&'a [T]>, Fail> {
    if p.is_null() && len == 0 {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { required(p, len, what, inputs) }.map(Some)
}

/// [`slice`] of `len` elements of `T` at `data`, recorded in `spans` for the aliasing check.
///
/// # Safety
/// As [`slice`].
unsafe fn checked<'a, T>(data: *const c_void, len: usize, what: &'static str, spans: &mut Vec<Span>) -> Result<&'a [T], Fail> {
    // SAFETY: forwarded contract.
    let s = unsafe { slice(data as *const T, len, &format!("{what}.data"))? };
    spans.push(Span::of(s, what));
    Ok(s)
}

/// [`checked`], writable.
///
/// # Safety
/// As [`slice_mut`].
unsafe fn checked_mut<'a, T>(data: *mut c_void, len: usize, what: &'static str, spans: &mut Vec<Span>) -> Result<&'a mut [T], Fail> {
    // SAFETY: forwarded contract.
    let s = unsafe { slice_mut(data as *mut T, len, &format!("{what}.data"))? };
    spans.push(Span::of(s, what));
    Ok(s)
}

/// # Safety
/// The tensor's `data` points to `len` readable elements of its dtype (see the header).
unsafe fn tensor<'a>(t: &SimdAttnTensor, what: &'static str, spans: &mut Vec<Span>) -> Result<AnyRef<'a>, Fail> {
    reserved(t.reserved, what)?;
    let st = strides(t, what)?;
    // SAFETY (both arms): forwarded contract.
    Ok(match dtype(t.dtype, what)? {
        DType::F32 => AnyRef::F32(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
        DType::F16 => AnyRef::F16(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
        DType::Bf16 => AnyRef::Bf16(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
        DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0 => return fail(Status::UnknownDtype, format!("{what}.dtype = {}: quantized codes are a storage type of k and v only", t.dtype)),
    })
}

/// A K or V input: [`tensor`], or quantized codes.
enum KvTensor<'a> {
    Float(AnyRef<'a>),
    I8(TensorRef<'a, i8>),
    E4M3(TensorRef<'a, crate::F8E4M3>),
    E5M2(TensorRef<'a, crate::F8E5M2>),
    Q8_0(TensorRef<'a, crate::BlockQ8_0>),
}

/// # Safety
/// As [`tensor`].
unsafe fn kv_tensor<'a>(t: &SimdAttnTensor, what: &'static str, spans: &mut Vec<Span>) -> Result<KvTensor<'a>, Fail> {
    if (3..=6).contains(&t.dtype) {
        reserved(t.reserved, what)?;
        let st = strides(t, what)?;
        // SAFETY (every arm): forwarded contract.
        return Ok(match t.dtype {
            3 => KvTensor::I8(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
            4 => KvTensor::E4M3(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
            5 => KvTensor::E5M2(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
            _ => KvTensor::Q8_0(TensorRef::new(unsafe { checked(t.data, t.len, what, spans)? }, st)),
        });
    }
    // SAFETY: forwarded contract.
    Ok(KvTensor::Float(unsafe { tensor(t, what, spans)? }))
}

/// # Safety
/// `data` points to `len` writable elements of the dtype that nothing else touches during the
/// call.
unsafe fn output<'a>(t: &SimdAttnOutput, what: &'static str, spans: &mut Vec<Span>) -> Result<AnyMut<'a>, Fail> {
    let view = SimdAttnTensor { data: t.data, len: t.len, dtype: t.dtype, reserved: t.reserved, stride_batch: t.stride_batch, stride_head: t.stride_head, stride_seq: t.stride_seq };
    // SAFETY: forwarded contract.
    unsafe { writable(&view, what, spans) }
}

/// A tensor written in place: an output, or a cache the call appends to.
///
/// # Safety
/// As [`output`], for `t.data`.
unsafe fn writable<'a>(t: &SimdAttnTensor, what: &'static str, spans: &mut Vec<Span>) -> Result<AnyMut<'a>, Fail> {
    reserved(t.reserved, what)?;
    let st = strides(t, what)?;
    let data = t.data as *mut c_void;
    // SAFETY (both arms): forwarded contract.
    Ok(match dtype(t.dtype, what)? {
        DType::F32 => AnyMut::F32(TensorMut::new(unsafe { checked_mut(data, t.len, what, spans)? }, st)),
        DType::F16 => AnyMut::F16(TensorMut::new(unsafe { checked_mut(data, t.len, what, spans)? }, st)),
        DType::Bf16 => AnyMut::Bf16(TensorMut::new(unsafe { checked_mut(data, t.len, what, spans)? }, st)),
        DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0 => {
            return fail(Status::UnknownDtype, format!("{what}.dtype = {}: quantized caches are read, not written (no quantizing append yet)", t.dtype))
        }
    })
}

/// A required input array ([`slice`]), recorded in `inputs` for the aliasing check.
///
/// # Safety
/// As [`slice`].
unsafe fn required<'a, T>(p: *const T, len: usize, what: &'static str, inputs: &mut Vec<Span>) -> Result<&'a [T], Fail> {
    // SAFETY: forwarded contract.
    let s = unsafe { slice(p, len, what)? };
    inputs.push(Span::of(s, what));
    Ok(s)
}

/// The dequantization factors of K (`value` false) or V from the descriptor's scale fields:
/// `None` for SIMD_ATTN_SCALE_NONE (every other field must then be 0). Per-token factors come
/// from `k_scales` (f32) or `k_scales_f16`, exactly one of them.
///
/// # Safety
/// The scale array follows the header's contract.
unsafe fn dequant<'a>(d: &SimdAttnDesc, value: bool, inputs: &mut Vec<Span>) -> Result<Option<crate::Dequant<'a>>, Fail> {
    let (kind, one, data, data_f16, len, st, what) = if value {
        (d.v_scale_kind, d.v_scale, d.v_scales, d.v_scales_f16, d.v_scales_len, [d.v_scale_stride_batch, d.v_scale_stride_head, d.v_scale_stride_seq], "v_scales")
    } else {
        (d.k_scale_kind, d.k_scale, d.k_scales, d.k_scales_f16, d.k_scales_len, [d.k_scale_stride_batch, d.k_scale_stride_head, d.k_scale_stride_seq], "k_scales")
    };
    let unused = |ok: bool| if ok { Ok(()) } else { fail(Status::InvalidValue, format!("{what}: fields set that the scale kind {kind} does not read")) };
    // Only per-token factors may be stored as f16.
    if kind != 3 {
        unused(data_f16.is_null())?;
    }
    Ok(match kind {
        0 => {
            unused(one == 0.0 && data.is_null() && len == 0 && st == [0; 3])?;
            None
        }
        1 => {
            unused(data.is_null() && len == 0 && st == [0; 3])?;
            Some(crate::Dequant::Tensor(one))
        }
        2 => {
            unused(one == 0.0 && st == [0; 3])?;
            // SAFETY: forwarded contract.
            Some(crate::Dequant::Head(unsafe { required(data, len, what, inputs)? }))
        }
        3 => {
            unused(one == 0.0)?;
            let s = Strides::new(stride(st[0], &format!("{what} stride_batch"))?, stride(st[1], &format!("{what} stride_head"))?, stride(st[2], &format!("{what} stride_seq"))?);
            let paged = !d.block_table.is_null();
            match (data.is_null(), data_f16.is_null()) {
                (false, false) => return fail(Status::InvalidValue, format!("{what}: both the f32 array and the f16 one ({what}_f16) are set; give one")),
                (_, true) => {
                    // SAFETY: forwarded contract.
                    let f = unsafe { required(data, len, what, inputs)? };
                    Some(if paged { crate::Dequant::PagedToken(f, page_strides(s)) } else { crate::Dequant::Token(f, s) })
                }
                (true, false) => {
                    let what_f16 = if value { "v_scales_f16" } else { "k_scales_f16" };
                    // SAFETY: forwarded contract.
                    let f = unsafe { required(data_f16, len, what_f16, inputs)? };
                    Some(if paged { crate::Dequant::PagedTokenF16(f, page_strides(s)) } else { crate::Dequant::TokenF16(f, s) })
                }
            }
        }
        k => return fail(Status::InvalidValue, format!("{}_scale_kind = {k}: expected SIMD_ATTN_SCALE_NONE (0) .. SIMD_ATTN_SCALE_TOKEN (3)", if value { "v" } else { "k" })),
    })
}

/// A pool's page strides from a descriptor tensor's (batch, head, seq) = (page, head, slot).
fn page_strides(t: Strides) -> PageStrides {
    PageStrides::new(t.batch, t.head, t.seq)
}

/// Outputs must not overlap inputs or each other: the safe API cannot see this (Rust's
/// borrows rule it out), C callers can.
fn check_aliasing(inputs: &[Span], outputs: &[Span]) -> Result<(), Fail> {
    for (n, o) in outputs.iter().enumerate() {
        for i in inputs.iter().chain(&outputs[n + 1..]) {
            if o.overlaps(i) && o.end > o.start && i.end > i.start {
                return fail(Status::Aliasing, format!("{} overlaps {}: outputs must not share memory with inputs or each other", o.what, i.what));
            }
        }
    }
    Ok(())
}

/// Non-negative int64 lengths (`kv_lens`, `cache_lens`) as `usize`.
fn lengths(raw: &[i64], what: &str) -> Result<Vec<usize>, Fail> {
    let mut lens = Vec::new();
    lens.try_reserve_exact(raw.len()).or_else(|_| fail(Status::OutOfMemory, format!("{what} copy")))?;
    for (b, &x) in raw.iter().enumerate() {
        match usize::try_from(x) {
            Ok(x) => lens.push(x),
            Err(_) => return fail(Status::KvLenOutOfRange, format!("{what}[{b}] = {x} is negative")),
        }
    }
    Ok(lens)
}

/// How a descriptor's `k` and `v` (and the append fields) become the call's K/V.
trait KvArg<'a>: Sized {
    /// # Safety
    /// Every pointer in `d` follows the header's contract.
    unsafe fn decode(d: &SimdAttnDesc, pages: Option<PageTable<'a>>, inputs: &mut Vec<Span>, outputs: &mut Vec<Span>) -> Result<Self, Fail>;
}

/// The append fields are unset: only `simd_attn_forward_with_kvcache` reads them.
fn no_append(d: &SimdAttnDesc) -> Result<(), Fail> {
    let t = &d.k_new;
    let set = !t.data.is_null() || t.len != 0 || !d.v_new.data.is_null() || d.v_new.len != 0 || d.seq_new != 0;
    if set || !d.cu_seqlens_new.is_null() || d.cu_seqlens_new_len != 0 || !d.cache_lens.is_null() || d.cache_lens_len != 0 {
        return fail(Status::Unsupported, "k_new, v_new, seq_new, cu_seqlens_new and cache_lens are read by simd_attn_forward_with_kvcache only");
    }
    Ok(())
}

/// Quantized K and V codes as tensors, or as a paged pool.
fn codes<'a, K, V>(k: TensorRef<'a, K>, v: TensorRef<'a, V>, pages: Option<PageTable<'a>>) -> Kv<'a, K, V> {
    match pages {
        None => Kv::Tensors(k, v),
        Some(pages) => Kv::Paged(PagedKv { k: k.data, v: v.data, k_strides: page_strides(k.strides), v_strides: page_strides(v.strides), pages }),
    }
}

/// Why a K/V pair of types is refused.
const MIXED_MESSAGE: &str = "k and v must have the same dtype, or be q8_0 K with f16 V, or f16 K with q8_0 V";

/// Read K/V: tensors, or a paged pool.
impl<'a> KvArg<'a> for AnyKv<'a> {
    unsafe fn decode(d: &SimdAttnDesc, pages: Option<PageTable<'a>>, inputs: &mut Vec<Span>, _outputs: &mut Vec<Span>) -> Result<Self, Fail> {
        no_append(d)?;
        // SAFETY: the header's contract on k and v.
        let k = unsafe { kv_tensor(&d.k, "k", inputs)? };
        let v = unsafe { kv_tensor(&d.v, "v", inputs)? };
        let (k, v) = match (k, v) {
            (KvTensor::Float(k), KvTensor::Float(v)) => (k, v),
            (KvTensor::I8(k), KvTensor::I8(v)) => return Ok(AnyKv::I8(codes(k, v, pages))),
            (KvTensor::E4M3(k), KvTensor::E4M3(v)) => return Ok(AnyKv::F8E4M3(codes(k, v, pages))),
            (KvTensor::E5M2(k), KvTensor::E5M2(v)) => return Ok(AnyKv::F8E5M2(codes(k, v, pages))),
            (KvTensor::Q8_0(k), KvTensor::Q8_0(v)) => return Ok(AnyKv::Q8_0(codes(k, v, pages))),
            // The mixed pairs (`MIXED_KV_PAIRS`).
            (KvTensor::Q8_0(k), KvTensor::Float(AnyRef::F16(v))) => return Ok(AnyKv::Q8_0F16(codes(k, v, pages))),
            (KvTensor::Float(AnyRef::F16(k)), KvTensor::Q8_0(v)) => return Ok(AnyKv::F16Q8_0(codes(k, v, pages))),
            _ => return fail(Status::UnsupportedDtypes, MIXED_MESSAGE),
        };
        Ok(match (k, v, pages) {
            (AnyRef::F32(k), AnyRef::F32(v), None) => AnyKv::F32(Kv::Tensors(k, v)),
            (AnyRef::F16(k), AnyRef::F16(v), None) => AnyKv::F16(Kv::Tensors(k, v)),
            (AnyRef::Bf16(k), AnyRef::Bf16(v), None) => AnyKv::Bf16(Kv::Tensors(k, v)),
            (AnyRef::F32(k), AnyRef::F32(v), Some(pages)) => {
                AnyKv::F32(Kv::Paged(PagedKv { k: k.data, v: v.data, k_strides: page_strides(k.strides), v_strides: page_strides(v.strides), pages }))
            }
            (AnyRef::F16(k), AnyRef::F16(v), Some(pages)) => {
                AnyKv::F16(Kv::Paged(PagedKv { k: k.data, v: v.data, k_strides: page_strides(k.strides), v_strides: page_strides(v.strides), pages }))
            }
            (AnyRef::Bf16(k), AnyRef::Bf16(v), Some(pages)) => {
                AnyKv::Bf16(Kv::Paged(PagedKv { k: k.data, v: v.data, k_strides: page_strides(k.strides), v_strides: page_strides(v.strides), pages }))
            }
            _ => return fail(Status::UnsupportedDtypes, MIXED_MESSAGE),
        })
    }
}

/// A cache the call appends to: `k` and `v` written in place (tensors or a paged pool), the
/// new rows (if any) and each sequence's current length.
struct CacheArg<'a> {
    cache: AnyCache<'a, 'a>,
    cache_lens: Vec<usize>,
}

impl<'a> KvArg<'a> for CacheArg<'a> {
    unsafe fn decode(d: &SimdAttnDesc, pages: Option<PageTable<'a>>, inputs: &mut Vec<Span>, outputs: &mut Vec<Span>) -> Result<Self, Fail> {
        // SAFETY (every block): the header's contract, which for this entry makes k and v
        // writable and touched by nothing else during the call.
        let k = unsafe { writable(&d.k, "k", outputs)? };
        let v = unsafe { writable(&d.v, "v", outputs)? };
        let none = |t: &SimdAttnTensor| t.data.is_null() && t.len == 0;
        let new = if none(&d.k_new) && none(&d.v_new) {
            None
        } else {
            Some((unsafe { tensor(&d.k_new, "k_new", inputs)? }, unsafe { tensor(&d.v_new, "v_new", inputs)? }))
        };
        let cu = unsafe { optional::<i32>(d.cu_seqlens_new, d.cu_seqlens_new_len, "cu_seqlens_new", inputs)? };
        if d.cache_lens.is_null() && d.cache_lens_len == 0 {
            return fail(Status::NullPointer, "cache_lens is NULL: simd_attn_forward_with_kvcache needs each sequence's current length");
        }
        let cache_lens = lengths(unsafe { required(d.cache_lens, d.cache_lens_len, "cache_lens", inputs)? }, "cache_lens")?;
        fn cache<'c, T>(k: TensorMut<'c, T>, v: TensorMut<'c, T>, pages: Option<PageTable<'c>>) -> KvCacheMut<'c, T> {
            match pages {
                None => KvCacheMut::Tensors { k, v },
                Some(pages) => KvCacheMut::Paged { k_strides: page_strides(k.strides), v_strides: page_strides(v.strides), k: k.data, v: v.data, pages },
            }
        }
        fn new_kv<'n, T>(k: TensorRef<'n, T>, v: TensorRef<'n, T>, seq_new: usize, cu_seqlens: Option<&'n [i32]>) -> NewKv<'n, T> {
            NewKv { k, v, seq_new, cu_seqlens }
        }
        let mismatch = || fail(Status::UnsupportedDtypes, "k, v, k_new and v_new must have the same dtype");
        let cache = match (k, v, new) {
            (AnyMut::F32(k), AnyMut::F32(v), None) => AnyCache::F32(cache(k, v, pages), None),
            (AnyMut::F16(k), AnyMut::F16(v), None) => AnyCache::F16(cache(k, v, pages), None),
            (AnyMut::Bf16(k), AnyMut::Bf16(v), None) => AnyCache::Bf16(cache(k, v, pages), None),
            (AnyMut::F32(k), AnyMut::F32(v), Some((AnyRef::F32(kn), AnyRef::F32(vn)))) => AnyCache::F32(cache(k, v, pages), Some(new_kv(kn, vn, d.seq_new, cu))),
            (AnyMut::F16(k), AnyMut::F16(v), Some((AnyRef::F16(kn), AnyRef::F16(vn)))) => AnyCache::F16(cache(k, v, pages), Some(new_kv(kn, vn, d.seq_new, cu))),
            (AnyMut::Bf16(k), AnyMut::Bf16(v), Some((AnyRef::Bf16(kn), AnyRef::Bf16(vn)))) => AnyCache::Bf16(cache(k, v, pages), Some(new_kv(kn, vn, d.seq_new, cu))),
            _ => return mismatch(),
        };
        Ok(CacheArg { cache, cache_lens })
    }
}

impl<'a, K: KvArg<'a>> Decoded<'a, K> {
    /// # Safety
    /// Every pointer in `d` follows the header's contract.
    unsafe fn new(d: &SimdAttnDesc) -> Result<Self, Fail> {
        let v_head_dim = if d.v_head_dim == 0 { d.head_dim } else { d.v_head_dim };
        let shape = AttentionShape::new(d.batch, d.q_heads, d.kv_heads, d.seq_q, d.seq_kv, d.head_dim).with_v_head_dim(v_head_dim);
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        // SAFETY (every block below): the header's contract on each pointer.
        let q = unsafe { tensor(&d.q, "q", &mut inputs)? };
        let out = unsafe { output(&d.out, "out", &mut outputs)? };
        // A paged pool: k and v are its pages, their strides (batch, head, seq) those of
        // (page, head, slot).
        let pages = if d.block_table.is_null() && d.block_table_len == 0 && d.page_size == 0 {
            None
        } else {
            let table = unsafe { required(d.block_table, d.block_table_len, "block_table", &mut inputs)? };
            Some(PageTable { block_table: table, pages_per_seq: d.pages_per_seq, page_size: d.page_size, num_pages: d.num_pages })
        };
        let kv = unsafe { K::decode(d, pages, &mut inputs, &mut outputs)? };
        let lse = if d.lse.is_null() && d.lse_len == 0 {
            None
        } else {
            let s = unsafe { slice_mut(d.lse, d.lse_len, "lse")? };
            outputs.push(Span::of(s, "lse"));
            Some(s)
        };
        let kv_lens = if d.kv_lens.is_null() && d.kv_lens_len == 0 {
            None
        } else {
            Some(lengths(unsafe { required(d.kv_lens, d.kv_lens_len, "kv_lens", &mut inputs)? }, "kv_lens")?)
        };
        let bias = if d.bias.is_null() && d.bias_len == 0 {
            None
        } else {
            let s = unsafe { slice(d.bias, d.bias_len, "bias")? };
            inputs.push(Span::of(s, "bias"));
            let st = BiasStrides {
                batch: stride(d.bias_stride_batch, "bias_stride_batch")?,
                head: stride(d.bias_stride_head, "bias_stride_head")?,
                row: stride(d.bias_stride_row, "bias_stride_row")?,
            };
            Some(BiasRef::new(s, st))
        };
        // SAFETY (both): the header's contract on each optional array.
        let per_head = |p: *const f32, len: usize, what: &'static str, inputs: &mut Vec<Span>| unsafe { optional::<f32>(p, len, what, inputs) };
        let cu_seqlens_q = unsafe { optional::<i32>(d.cu_seqlens_q, d.cu_seqlens_q_len, "cu_seqlens_q", &mut inputs)? };
        let cu_seqlens_k = unsafe { optional::<i32>(d.cu_seqlens_k, d.cu_seqlens_k_len, "cu_seqlens_k", &mut inputs)? };
        let alibi = per_head(d.alibi_slopes, d.alibi_slopes_len, "alibi_slopes", &mut inputs)?;
        let sinks = per_head(d.sinks, d.sinks_len, "sinks", &mut inputs)?;
        let weights = |p: *const f32, len: usize, what: &'static str, inputs: &mut Vec<Span>| Ok::<_, Fail>(per_head(p, len, what, inputs)?.unwrap_or(&[]));
        let q_dim = if d.q_dim == 0 { d.head_dim } else { d.q_dim };
        let score = match d.score {
            0 => Score::ScaledDot,
            1 => Score::Dot,
            2 => Score::Cosine { temperature: d.temperature },
            3 => Score::General { w: weights(d.score_w, d.score_w_len, "score_w", &mut inputs)?, q_dim },
            4 => {
                let v = weights(d.additive_v, d.additive_v_len, "additive_v", &mut inputs)?;
                let w_q = weights(d.additive_w_q, d.additive_w_q_len, "additive_w_q", &mut inputs)?;
                let w_k = weights(d.additive_w_k, d.additive_w_k_len, "additive_w_k", &mut inputs)?;
                let projection = (!w_q.is_empty() || !w_k.is_empty()).then_some(AdditiveProjection { w_q, w_k, q_dim });
                Score::Additive { v, projection }
            }
            x => return fail(Status::UnknownScore, format!("score = {x}: expected SIMD_ATTN_SCORE_SCALED_DOT (0) .. SIMD_ATTN_SCORE_ADDITIVE (4)")),
        };
        let inspect_out = |p: *mut f32, len: usize, what: &'static str, outputs: &mut Vec<Span>| -> Result<Option<&'a mut [f32]>, Fail> {
            if p.is_null() && len == 0 {
                return Ok(None);
            }
            let s = unsafe { slice_mut(p, len, what)? };
            outputs.push(Span::of(s, what));
            Ok(Some(s))
        };
        let alignment = inspect_out(d.alignment, d.alignment_len, "alignment", &mut outputs)?;
        let coverage = inspect_out(d.coverage, d.coverage_len, "coverage", &mut outputs)?;
        reserved(d.rope_reserved, "rope_reserved")?;
        let rope = if d.rope_cos.is_null() && d.rope_sin.is_null() && d.rope_len == 0 && d.rotary_dim == 0 {
            None
        } else {
            let cos = unsafe { required(d.rope_cos, d.rope_len, "rope_cos", &mut inputs)? };
            let sin = unsafe { required(d.rope_sin, d.rope_len, "rope_sin", &mut inputs)? };
            Some(Rope { cos, sin, rotary_dim: d.rotary_dim, interleaved: d.rope_interleaved != 0 })
        };
        // SAFETY: the header's contract on the scale arrays.
        let k_scale = unsafe { dequant(d, false, &mut inputs)? };
        let v_scale = unsafe { dequant(d, true, &mut inputs)? };
        let kv_scales = match (k_scale, v_scale) {
            (None, None) => None,
            (k, v) => Some(crate::KvScales { k: k.unwrap_or(crate::Dequant::Tensor(1.0)), v: v.unwrap_or(crate::Dequant::Tensor(1.0)) }),
        };
        check_aliasing(&inputs, &outputs)?;

        let bound = |x: i64| -> Result<Option<usize>, Fail> {
            match x {
                -1 => Ok(None),
                x if x >= 0 => Ok(Some(usize::try_from(x).unwrap_or(usize::MAX))),
                _ => Err(AttnError::InvalidWindow { left: d.window_left, right: d.window_right }.into()),
            }
        };
        let (left, right) = (bound(d.window_left)?, bound(d.window_right)?);
        let window = (left.is_some() || right.is_some()).then_some(Window { left, right });
        let softcap = match d.softcap {
            0.0 => None,
            c => Some(c),
        };
        Ok(Decoded {
            shape,
            q,
            kv,
            out,
            lse,
            inspect: Inspect { alignment, coverage },
            kv_lens,
            options: Options { bias, alibi, sinks, scale: (d.use_scale != 0).then_some(d.scale), causal: d.causal != 0, softcap, window, score, cu_seqlens_q, cu_seqlens_k, rope, kv_scales },
        })
    }
}

fn isa_from(code: i32) -> Result<Option<Isa>, Fail> {
    if code == -1 {
        return Ok(None);
    }
    match Isa::ALL.into_iter().find(|i| *i as i32 == code) {
        Some(i) => Ok(Some(i)),
        None => fail(Status::UnknownIsa, format!("isa = {code}: expected -1 (auto) or 0..=4")),
    }
}

fn write_info(info: *mut SimdAttnRunInfo, r: &RunInfo) {
    if !info.is_null() {
        let v = SimdAttnRunInfo {
            isa: r.isa as i32,
            specialised_head_dim: r.specialised_head_dim.map_or(0, |d| d as i32),
            threads: r.threads,
            decode: i32::from(matches!(r.plan.kind, crate::plan::work::PlanKind::Decode { .. })),
            reserved: 0,
        };
        // SAFETY: the caller passes NULL or a writable SimdAttnRunInfo.
        unsafe { info.write_unaligned(v) };
    }
}

/// The f64 reference, rounded into the output once.
struct ReferenceOp<'c, 'p> {
    shape: &'c AttentionShape,
    lse: Option<&'c mut [f32]>,
    params: &'c AttentionParams<'p>,
    inspect: Inspect<'c>,
}

impl<'a, 'o> TypedOp<'a, 'o> for ReferenceOp<'_, '_> {
    type Output = Result<(), Fail>;
    fn run<TQ: Element, P: KvPair, TO: Element>(self, q: TensorRef<'a, TQ>, kv: KvOf<'a, P>, out: TensorMut<'o, TO>) -> Result<(), Fail> {
        // A paged pool is gathered into tensors: the reference's definition of a paged call.
        let gathered;
        let (mut k_factors, mut v_factors) = (Vec::new(), Vec::new());
        let (mut k_factors_f16, mut v_factors_f16) = (Vec::new(), Vec::new());
        let (k, v) = match kv {
            Kv::Tensors(k, v) => (k, v),
            Kv::Paged(pk) => {
                gathered = crate::reference::gather_paged(self.shape, &pk, self.params.kv_lens)?;
                // Per-token factors of a paged cache are gathered the same way, as rows of one
                // element (`[B, Hkv, Skv]`).
                if let Some(sc) = self.params.kv_scales {
                    fn gather<T: Element>(shape: &AttentionShape, f: &[T], st: PageStrides, pages: PageTable<'_>, lens: Option<&[usize]>) -> Result<Vec<T>, crate::AttnError> {
                        let one = AttentionShape { head_dim: 1, v_head_dim: 1, ..*shape };
                        Ok(crate::reference::gather_paged(&one, &PagedKv { k: f, v: f, k_strides: st, v_strides: st, pages }, lens)?.0)
                    }
                    for (d, dst, dst_f16) in [(sc.k, &mut k_factors, &mut k_factors_f16), (sc.v, &mut v_factors, &mut v_factors_f16)] {
                        match d {
                            crate::Dequant::PagedToken(f, st) => *dst = gather(self.shape, f, st, pk.pages, self.params.kv_lens)?,
                            crate::Dequant::PagedTokenF16(f, st) => *dst_f16 = gather(self.shape, f, st, pk.pages, self.params.kv_lens)?,
                            _ => {}
                        }
                    }
                }
                // Rows of storage units: a q8_0 side's head dims count 32-value blocks.
                let [_, ks, vs, _] = crate::validate::kv_units::<P::K, P::V>(self.shape)?.bhsd_strides();
                (TensorRef::new(&gathered.0[..], ks), TensorRef::new(&gathered.1[..], vs))
            }
        };
        let mut params: AttentionParams<'_> = *self.params;
        if let Some(sc) = params.kv_scales {
            let [_, fs, _, _] = AttentionShape { head_dim: 1, v_head_dim: 1, ..*self.shape }.bhsd_strides();
            fn strided<'x>(d: crate::Dequant<'x>, f: &'x [f32], f16s: &'x [half::f16], fs: Strides) -> crate::Dequant<'x> {
                match d {
                    crate::Dequant::PagedToken(..) => crate::Dequant::Token(f, fs),
                    crate::Dequant::PagedTokenF16(..) => crate::Dequant::TokenF16(f16s, fs),
                    d => d,
                }
            }
            params.kv_scales = Some(crate::KvScales { k: strided(sc.k, &k_factors, &k_factors_f16, fs), v: strided(sc.v, &v_factors, &v_factors_f16, fs) });
        }
        let params = &params;
        let cu_q = params.cu_seqlens_q;
        crate::validate::validate_outputs(self.shape, (out.data.len(), out.strides), self.lse.as_deref(), cu_q)?;
        crate::api::validate_inspect(self.shape, &self.inspect, params)?;
        let reference = crate::Reference::new(self.shape, q, k, v, params)?;
        let r = reference.try_compute()?;
        let s = self.shape;
        let mut lse = self.lse;
        let Inspect { mut alignment, mut coverage } = self.inspect;
        // Every row's probabilities are computed (and allocated) before any output is written.
        let mut probs = Vec::new();
        // `try_compute` succeeded, so the rows fit (and are 0 when any of their dims is).
        let rows = r.lse.len();
        if rows > 0 && (alignment.is_some() || coverage.is_some()) {
            probs.try_reserve_exact(rows).or_else(|_| fail(Status::OutOfMemory, "reference probabilities"))?;
            for b in 0..s.batch {
                for h in 0..s.q_heads {
                    for i in 0..s.seq_q {
                        probs.push(reference.try_probabilities(b, h, i)?.unwrap_or_default());
                    }
                }
            }
        }
        if let Some(c) = coverage.as_deref_mut() {
            c[..s.batch * s.q_heads * s.seq_kv].fill(0.0);
        }
        if rows > 0 && (alignment.is_some() || coverage.is_some()) {
            for b in 0..s.batch {
                for h in 0..s.q_heads {
                    for i in 0..s.seq_q {
                        let probs = &probs[(b * s.q_heads + h) * s.seq_q + i];
                        let row = (b * s.q_heads + h) * s.seq_q + i;
                        for (j, &p) in probs.iter().enumerate() {
                            if let Some(a) = alignment.as_deref_mut() {
                                a[row * s.seq_kv + j] = p as f32;
                            }
                            if let Some(c) = coverage.as_deref_mut() {
                                c[(b * s.q_heads + h) * s.seq_kv + j] += p as f32;
                            }
                        }
                    }
                }
            }
        }
        // Packed queries: row `i` of sequence `b` is token `cu[b] + i`, LSE `[Hq, tokens]`.
        let q_len = |b: usize| params.q_len(b, s.seq_q);
        let locate = |b: usize, h: usize, i: usize| match cu_q {
            None => (out.strides.offset(b, h, i), (b * s.q_heads + h) * s.seq_q + i),
            Some(cu) => {
                let t = cu[b] as usize + i;
                (t * out.strides.seq + h * out.strides.head, h * cu[cu.len() - 1] as usize + t)
            }
        };
        for b in (0..s.batch).filter(|_| rows > 0) {
            for h in 0..s.q_heads {
                for i in 0..q_len(b) {
                    let (o, li) = locate(b, h, i);
                    for (d, &x) in out.data[o..o + s.v_head_dim].iter_mut().zip(r.out_row(b, h, i).unwrap_or(&[])) {
                        *d = TO::from_f32(x as f32);
                    }
                    if let Some(l) = lse.as_deref_mut() {
                        l[li] = r.lse_at(b, h, i).unwrap_or(f64::NEG_INFINITY) as f32;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Fills `desc` with version 1 defaults: sizes and version set, every optional field off
/// (windows unbounded), every pointer NULL, f32 dtypes.
///
/// # Safety
/// `desc` is NULL or points to a writable `simd_attn_desc`.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_desc_init(desc: *mut SimdAttnDesc) -> i32 {
    entry(|| {
        if desc.is_null() {
            return fail(Status::NullPointer, "desc is NULL");
        }
        let d = default_desc();
        // SAFETY: checked non-NULL; the caller's contract makes it writable.
        unsafe { desc.write_unaligned(d) };
        Ok(())
    })
}

/// Fused attention on the crate's pool.
///
/// # Safety
/// `desc` follows the header's contract; `info` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_forward(desc: *const SimdAttnDesc, threads: usize, isa: i32, info: *mut SimdAttnRunInfo) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { read_desc(desc)? };
        let config = RunConfig { isa: isa_from(isa)?, threads: (threads > 0).then_some(threads) };
        // SAFETY: the caller's contract.
        let Decoded { shape, q, kv, out, lse, inspect, kv_lens, options } = unsafe { Decoded::new(&d)? };
        let call = crate::request::Request { shape, q, kv, out, lse, params: options.params(kv_lens.as_deref()), inspect };
        let r = crate::api::run_call(&config, call)?;
        write_info(info, &r);
        Ok(())
    })
}

/// Appends this step's K/V to the cache and attends over it, in one call (as
/// `flash_attn_with_kvcache`): `desc.k` and `desc.v` are the cache, written in place.
///
/// # Safety
/// As [`simd_attn_forward`], and `desc.k.data` / `desc.v.data` point to writable memory that
/// nothing else touches during the call.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_forward_with_kvcache(desc: *const SimdAttnDesc, threads: usize, isa: i32, info: *mut SimdAttnRunInfo) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { read_desc(desc)? };
        let config = RunConfig { isa: isa_from(isa)?, threads: (threads > 0).then_some(threads) };
        // SAFETY: the caller's contract.
        let Decoded { shape, q, kv, out, lse, inspect, kv_lens, options } = unsafe { Decoded::<CacheArg<'_>>::new(&d)? };
        if inspect.alignment.is_some() || inspect.coverage.is_some() {
            return fail(Status::Unsupported, "simd_attn_forward_with_kvcache does not produce the alignment matrix or coverage: append, then call simd_attn_forward");
        }
        let CacheArg { cache, cache_lens } = kv;
        let r = kvcache_call(&config, &shape, q, cache, &cache_lens, out, lse, &options.params(kv_lens.as_deref()))?;
        write_info(info, &r);
        Ok(())
    })
}

/// The f64 reference for the same descriptor, rounded once into `out` (and `lse`).
///
/// # Safety
/// As [`simd_attn_forward`].
#[no_mangle]
pub unsafe extern "C" fn simd_attn_reference(desc: *const SimdAttnDesc) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { read_desc(desc)? };
        // SAFETY: the caller's contract.
        let Decoded { shape, q, kv, out, lse, inspect, kv_lens, options } = unsafe { Decoded::new(&d)? };
        let params = options.params(kv_lens.as_deref());
        dispatch(q, kv, out, ReferenceOp { shape: &shape, lse, params: &params, inspect })
    })
}

/// A host-driven plan, and the KV lengths its call borrows (declared after the plan, so they
/// are dropped after it).
pub struct SimdAttnPlan {
    plan: Box<dyn PlanShares>,
    _kv_lens: Option<Vec<usize>>,
}

/// Validates and plans a host-driven call for `nth` workers.
///
/// # Safety
/// As [`simd_attn_forward`]; every buffer `desc` points to must stay valid (and the outputs
/// untouched by others) until [`simd_attn_plan_destroy`]. `plan_out` is writable.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_create(desc: *const SimdAttnDesc, nth: usize, isa: i32, plan_out: *mut *mut SimdAttnPlan) -> i32 {
    entry(|| {
        if plan_out.is_null() {
            return fail(Status::NullPointer, "plan_out is NULL");
        }
        // SAFETY: checked non-NULL.
        unsafe { plan_out.write_unaligned(core::ptr::null_mut()) };
        // SAFETY: the caller's contract.
        let d = unsafe { read_desc(desc)? };
        let config = RunConfig { isa: isa_from(isa)?, threads: None };
        // SAFETY: the caller's contract, which keeps every buffer alive (and the outputs to the
        // plan) until simd_attn_plan_destroy: the plan may borrow them for 'static.
        let Decoded { shape, q, kv, out, lse, inspect, kv_lens, options } = unsafe { Decoded::<'static, AnyKv<'static>>::new(&d)? };
        if inspect.alignment.is_some() || inspect.coverage.is_some() {
            return fail(Status::Unsupported, "host-driven plans do not produce the alignment matrix or coverage: use simd_attn_forward");
        }
        // SAFETY: the lengths' heap buffer moves, unchanged, into the SimdAttnPlan below with
        // the plan that borrows it, and is freed only after the plan (field order).
        let lens: Option<&'static [usize]> = kv_lens.as_deref().map(|l| unsafe { core::slice::from_raw_parts(l.as_ptr(), l.len()) });
        let call = crate::request::Request { shape, q, kv, out, lse, params: options.params(lens), inspect };
        let plan = crate::api::plan_call(&config, call, nth)?;
        let boxed = Box::new(SimdAttnPlan { plan, _kv_lens: kv_lens });
        // SAFETY: checked non-NULL.
        unsafe { plan_out.write_unaligned(Box::into_raw(boxed)) };
        Ok(())
    })
}

/// # Safety
/// `plan` is NULL or came from [`simd_attn_plan_create`] and was not destroyed.
unsafe fn plan_ref<'p>(plan: *const SimdAttnPlan) -> Result<&'p SimdAttnPlan, Fail> {
    if plan.is_null() {
        return fail(Status::NullPointer, "plan is NULL");
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { &*plan })
}

/// f32 elements of workspace each worker passes to run and merge (0 for a NULL plan).
///
/// # Safety
/// `plan` is NULL or a live plan.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_workspace_len(plan: *const SimdAttnPlan) -> usize {
    // SAFETY: the caller's contract.
    quiet(|| unsafe { plan_ref(plan) }.map_or(0, |p| p.plan.workspace_len())).unwrap_or(0)
}

/// 1 when the plan split the keys and each worker must call merge after the barrier, else 0
/// (also for a NULL plan).
///
/// # Safety
/// `plan` is NULL or a live plan.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_needs_merge(plan: *const SimdAttnPlan) -> i32 {
    // SAFETY: the caller's contract.
    quiet(|| unsafe { plan_ref(plan) }.map_or(0, |p| i32::from(p.plan.needs_merge()))).unwrap_or(0)
}

/// Runs share `ith`; thread-safe: each worker calls it once with its own workspace.
///
/// # Safety
/// `plan` is NULL or a live plan; `workspace` points to `workspace_len` writable floats that
/// no other call uses at the same time.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_run(plan: *const SimdAttnPlan, ith: usize, workspace: *mut f32, workspace_len: usize, info: *mut SimdAttnRunInfo) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { plan_ref(plan)? };
        // SAFETY: the caller's contract.
        let ws = unsafe { slice_mut(workspace, workspace_len, "workspace")? };
        let r = p.plan.run(ith, ws)?;
        write_info(info, &r);
        Ok(())
    })
}

/// The merge step of share `ith`, after every share's run returned.
///
/// # Safety
/// As [`simd_attn_plan_run`].
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_merge(plan: *const SimdAttnPlan, ith: usize, workspace: *mut f32, workspace_len: usize) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { plan_ref(plan)? };
        // SAFETY: the caller's contract.
        let ws = unsafe { slice_mut(workspace, workspace_len, "workspace")? };
        Ok(p.plan.merge(ith, ws)?)
    })
}

/// Frees a plan (NULL is a no-op).
///
/// # Safety
/// `plan` is NULL or a live plan that no other thread is using; it is dangling afterwards.
#[no_mangle]
pub unsafe extern "C" fn simd_attn_plan_destroy(plan: *mut SimdAttnPlan) {
    if !plan.is_null() {
        // SAFETY: created by Box::into_raw in `simd_attn_plan_create`, freed once.
        let _ = quiet(|| drop(unsafe { Box::from_raw(plan) }));
    }
}

/// Merges partial results over disjoint key sets into `out` (and `lse`, optional).
///
/// # Safety
/// `parts` points to `n_parts` partials whose buffers follow the header's contract; `out` and
/// `lse` are writable and overlap no input.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn simd_attn_merge_partials(
    batch: usize,
    q_heads: usize,
    seq_q: usize,
    v_head_dim: usize,
    parts: *const SimdAttnPartial,
    n_parts: usize,
    out: *const SimdAttnOutput,
    lse: *mut f32,
    lse_len: usize,
) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract.
        let parts = unsafe { slice(parts, n_parts, "parts")? };
        if out.is_null() {
            return fail(Status::NullPointer, "out is NULL");
        }
        // SAFETY: checked non-NULL; the caller's contract.
        let o = unsafe { out.read_unaligned() };
        let shape = AttentionShape::new(batch, q_heads, 1, seq_q, 1, v_head_dim.max(1)).with_v_head_dim(v_head_dim);
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        // SAFETY: the caller's contract.
        let mut out = unsafe { output(&o, "out", &mut outputs)? };
        let lse = if lse.is_null() && lse_len == 0 {
            None
        } else {
            // SAFETY: the caller's contract.
            let s = unsafe { slice_mut(lse, lse_len, "lse")? };
            outputs.push(Span::of(s, "lse"));
            Some(s)
        };
        let dt = match parts.first() {
            Some(p) => dtype(p.out.dtype, "parts[0].out")?,
            None => DType::F32,
        };
        let mut typed_parts = Vec::new();
        typed_parts.try_reserve_exact(parts.len()).or_else(|_| fail(Status::OutOfMemory, "parts"))?;
        let (mut typed_f16, mut typed_bf16) = (Vec::new(), Vec::new());
        for (n, p) in parts.iter().enumerate() {
            if dtype(p.out.dtype, "parts[].out")? != dt {
                return fail(Status::UnsupportedDtypes, format!("parts[{n}] has another dtype than parts[0]: all partial results must share one"));
            }
            // SAFETY: the caller's contract.
            let t = unsafe { tensor(&p.out, "a partial output", &mut inputs)? };
            // SAFETY: the caller's contract.
            let l = unsafe { slice(p.lse, p.lse_len, "a partial lse")? };
            inputs.push(Span::of(l, "a partial lse"));
            match t {
                AnyRef::F32(t) => typed_parts.push(PartialResult { out: t, lse: l }),
                AnyRef::F16(t) => typed_f16.push(PartialResult { out: t, lse: l }),
                AnyRef::Bf16(t) => typed_bf16.push(PartialResult { out: t, lse: l }),
            }
        }
        check_aliasing(&inputs, &outputs)?;
        /// The merge of `parts` into `out`, whatever its type.
        fn merge_into<TP: crate::FloatElement>(s: &AttentionShape, parts: &[PartialResult<'_, TP>], out: &mut AnyMut<'_>, lse: Option<&mut [f32]>) -> Result<(), crate::AttnError> {
            match out {
                AnyMut::F32(o) => crate::merge_partials(s, parts, o.reborrow(), lse),
                AnyMut::F16(o) => crate::merge_partials(s, parts, o.reborrow(), lse),
                AnyMut::Bf16(o) => crate::merge_partials(s, parts, o.reborrow(), lse),
            }
        }
        match dt {
            DType::F32 => merge_into(&shape, &typed_parts, &mut out, lse)?,
            DType::F16 => merge_into(&shape, &typed_f16, &mut out, lse)?,
            DType::Bf16 => merge_into(&shape, &typed_bf16, &mut out, lse)?,
            DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0 => return fail(Status::UnknownDtype, "parts[0].out.dtype: partial results are f32, f16 or bf16"),
        }
        Ok(())
    })
}

/// The best ISA this machine has.
#[no_mangle]
pub extern "C" fn simd_attn_isa_best() -> i32 {
    quiet(Isa::best).map_or(Isa::Portable as i32, |i| i as i32)
}

/// The ISA a call with `isa = SIMD_ATTN_ISA_AUTO` runs on now (override, then `SIMD_ATTN_ISA`,
/// then the best), or a negative status when `SIMD_ATTN_ISA` is invalid.
#[no_mangle]
pub extern "C" fn simd_attn_isa_current() -> i32 {
    let mut isa = 0;
    let status = entry(|| {
        isa = crate::resolve_isa(None)? as i32;
        Ok(())
    });
    if status == 0 { isa } else { -status }
}

/// 1 if `isa` can run here, else 0 (also for unknown values).
#[no_mangle]
pub extern "C" fn simd_attn_isa_available(isa: i32) -> i32 {
    quiet(|| matches!(isa_from(isa), Ok(Some(i)) if i.is_available())).map_or(0, i32::from)
}

/// Forces every call that names no ISA onto `isa` (`SIMD_ATTN_ISA_AUTO` clears it).
#[no_mangle]
pub extern "C" fn simd_attn_set_isa(isa: i32) -> i32 {
    entry(|| Ok(crate::set_isa_override(isa_from(isa)?)?))
}

/// The ISA's name ("avx512", ...), or NULL for an unknown value. Static storage.
#[no_mangle]
pub extern "C" fn simd_attn_isa_name(isa: i32) -> *const c_char {
    // One name per `Isa::ALL` entry, in its order (the assertion keeps them in step).
    const NAMES: [&str; 6] = ["portable\0", "scalar\0", "avx2\0", "avx512\0", "neon\0", "avx512bf16\0"];
    const _: () = assert!(NAMES.len() == Isa::ALL.len());
    match isa_from(isa) {
        Ok(Some(i)) => NAMES[i as usize].as_ptr().cast(),
        _ => core::ptr::null(),
    }
}

/// Sets the thread count of forward calls that pass `threads = 0` (0 restores "every core").
#[no_mangle]
pub extern "C" fn simd_attn_set_default_threads(threads: usize) {
    crate::set_default_threads(threads);
}

/// The crate version, e.g. "0.1.0". Static storage.
#[no_mangle]
pub extern "C" fn simd_attn_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version this library implements (`SIMD_ATTN_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn simd_attn_abi_version() -> u32 {
    ABI_VERSION
}

/// A one-line description of a status code (static storage; never NULL).
#[no_mangle]
pub extern "C" fn simd_attn_status_string(status: i32) -> *const c_char {
    STATUS_TABLE.iter().find(|e| e.0 as i32 == status).map_or("unknown status code\0", |e| e.2).as_ptr().cast()
}

/// The header's name of a status code ("SIMD_ATTN_ERR_ALIASING"), or NULL for an unknown code.
#[no_mangle]
pub extern "C" fn simd_attn_status_name(status: i32) -> *const c_char {
    STATUS_TABLE.iter().find(|e| e.0 as i32 == status).map_or(core::ptr::null(), |e| e.1.as_ptr().cast())
}

/// The detailed message of the last call on this thread that failed ("" after a success).
/// Valid until the next simd_attn call on the same thread.
#[no_mangle]
pub extern "C" fn simd_attn_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's struct sizes and field offsets, in the order the header's
/// `SIMD_ATTN_ABI_LAYOUT` lists them: writes up to `cap` values and returns how many exist.
///
/// # Safety
/// `out` points to `cap` writable `size_t` (or is NULL with `cap = 0`).
#[no_mangle]
pub unsafe extern "C" fn simd_attn_abi_layout(out: *mut usize, cap: usize) -> usize {
    let t = |o: usize| o;
    let layout = [
        size_of::<SimdAttnTensor>(),
        t(offset_of!(SimdAttnTensor, data)),
        t(offset_of!(SimdAttnTensor, len)),
        t(offset_of!(SimdAttnTensor, dtype)),
        t(offset_of!(SimdAttnTensor, stride_batch)),
        t(offset_of!(SimdAttnTensor, stride_head)),
        t(offset_of!(SimdAttnTensor, stride_seq)),
        size_of::<SimdAttnOutput>(),
        size_of::<SimdAttnDesc>(),
        offset_of!(SimdAttnDesc, struct_size),
        offset_of!(SimdAttnDesc, abi_version),
        offset_of!(SimdAttnDesc, batch),
        offset_of!(SimdAttnDesc, q_heads),
        offset_of!(SimdAttnDesc, kv_heads),
        offset_of!(SimdAttnDesc, seq_q),
        offset_of!(SimdAttnDesc, seq_kv),
        offset_of!(SimdAttnDesc, head_dim),
        offset_of!(SimdAttnDesc, v_head_dim),
        offset_of!(SimdAttnDesc, q),
        offset_of!(SimdAttnDesc, k),
        offset_of!(SimdAttnDesc, v),
        offset_of!(SimdAttnDesc, out),
        offset_of!(SimdAttnDesc, lse),
        offset_of!(SimdAttnDesc, lse_len),
        offset_of!(SimdAttnDesc, use_scale),
        offset_of!(SimdAttnDesc, scale),
        offset_of!(SimdAttnDesc, causal),
        offset_of!(SimdAttnDesc, softcap),
        offset_of!(SimdAttnDesc, window_left),
        offset_of!(SimdAttnDesc, window_right),
        offset_of!(SimdAttnDesc, kv_lens),
        offset_of!(SimdAttnDesc, kv_lens_len),
        offset_of!(SimdAttnDesc, bias),
        offset_of!(SimdAttnDesc, bias_len),
        offset_of!(SimdAttnDesc, bias_stride_batch),
        offset_of!(SimdAttnDesc, bias_stride_head),
        offset_of!(SimdAttnDesc, bias_stride_row),
        offset_of!(SimdAttnDesc, alibi_slopes),
        offset_of!(SimdAttnDesc, alibi_slopes_len),
        offset_of!(SimdAttnDesc, sinks),
        offset_of!(SimdAttnDesc, sinks_len),
        size_of::<SimdAttnPartial>(),
        offset_of!(SimdAttnPartial, out),
        offset_of!(SimdAttnPartial, lse),
        offset_of!(SimdAttnPartial, lse_len),
        size_of::<SimdAttnRunInfo>(),
        offset_of!(SimdAttnRunInfo, isa),
        offset_of!(SimdAttnRunInfo, specialised_head_dim),
        offset_of!(SimdAttnRunInfo, threads),
        offset_of!(SimdAttnRunInfo, decode),
        offset_of!(SimdAttnDesc, score),
        offset_of!(SimdAttnDesc, temperature),
        offset_of!(SimdAttnDesc, q_dim),
        offset_of!(SimdAttnDesc, score_w),
        offset_of!(SimdAttnDesc, score_w_len),
        offset_of!(SimdAttnDesc, additive_v),
        offset_of!(SimdAttnDesc, additive_v_len),
        offset_of!(SimdAttnDesc, additive_w_q),
        offset_of!(SimdAttnDesc, additive_w_q_len),
        offset_of!(SimdAttnDesc, additive_w_k),
        offset_of!(SimdAttnDesc, additive_w_k_len),
        offset_of!(SimdAttnDesc, alignment),
        offset_of!(SimdAttnDesc, alignment_len),
        offset_of!(SimdAttnDesc, coverage),
        offset_of!(SimdAttnDesc, coverage_len),
        offset_of!(SimdAttnDesc, block_table),
        offset_of!(SimdAttnDesc, block_table_len),
        offset_of!(SimdAttnDesc, pages_per_seq),
        offset_of!(SimdAttnDesc, page_size),
        offset_of!(SimdAttnDesc, num_pages),
        offset_of!(SimdAttnDesc, cu_seqlens_q),
        offset_of!(SimdAttnDesc, cu_seqlens_q_len),
        offset_of!(SimdAttnDesc, cu_seqlens_k),
        offset_of!(SimdAttnDesc, cu_seqlens_k_len),
        offset_of!(SimdAttnDesc, rope_cos),
        offset_of!(SimdAttnDesc, rope_sin),
        offset_of!(SimdAttnDesc, rope_len),
        offset_of!(SimdAttnDesc, rotary_dim),
        offset_of!(SimdAttnDesc, rope_interleaved),
        offset_of!(SimdAttnDesc, rope_reserved),
        offset_of!(SimdAttnDesc, k_new),
        offset_of!(SimdAttnDesc, v_new),
        offset_of!(SimdAttnDesc, seq_new),
        offset_of!(SimdAttnDesc, cu_seqlens_new),
        offset_of!(SimdAttnDesc, cu_seqlens_new_len),
        offset_of!(SimdAttnDesc, cache_lens),
        offset_of!(SimdAttnDesc, cache_lens_len),
        offset_of!(SimdAttnDesc, k_scale_kind),
        offset_of!(SimdAttnDesc, k_scale),
        offset_of!(SimdAttnDesc, k_scales),
        offset_of!(SimdAttnDesc, k_scales_len),
        offset_of!(SimdAttnDesc, k_scale_stride_batch),
        offset_of!(SimdAttnDesc, k_scale_stride_head),
        offset_of!(SimdAttnDesc, k_scale_stride_seq),
        offset_of!(SimdAttnDesc, v_scale_kind),
        offset_of!(SimdAttnDesc, v_scale),
        offset_of!(SimdAttnDesc, v_scales),
        offset_of!(SimdAttnDesc, v_scales_len),
        offset_of!(SimdAttnDesc, v_scale_stride_batch),
        offset_of!(SimdAttnDesc, v_scale_stride_head),
        offset_of!(SimdAttnDesc, v_scale_stride_seq),
        offset_of!(SimdAttnDesc, k_scales_f16),
        offset_of!(SimdAttnDesc, v_scales_f16),
    ];
    if !out.is_null() {
        for (n, &x) in layout.iter().enumerate().take(cap) {
            // SAFETY: `n < cap`, the caller's contract.
            unsafe { out.add(n).write_unaligned(x) };
        }
    }
    layout.len()
}
