//! Writing finished rows into the caller's output: the only place that touches it, and the
//! crate's one piece of shared mutable state across worker threads.
//!
//! Workers hold the output as raw pointers so that several can write at once. That is sound
//! because (1) validation proved every offset the strides reach lies inside the slices and that
//! no two output elements share memory, and (2) the work plan gives every output row (and LSE
//! entry) to exactly one unit, and each unit runs once.

use crate::dtypes::AnyMut;
use crate::layout::{AttentionShape, Strides};
use crate::rows::QRows;
use core::marker::PhantomData;

/// Where the output's elements are, by storage type: the one match `store` makes per row, so
/// the kernels that call it are compiled once whatever the output type.
#[derive(Clone, Copy)]
enum OutPtr {
    F32(*mut f32),
    F16(*mut half::f16),
    Bf16(*mut half::bf16),
}

/// The output tensor and LSE buffer of one call, shareable by the call's workers.
pub(crate) struct OutRows<'a> {
    out: OutPtr,
    out_len: usize,
    strides: Strides,
    lse: *mut f32,
    lse_len: usize,
    shape: AttentionShape,
    /// Padded rows, or packed sequences' tokens.
    rows: QRows<'a>,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: see the module docs: workers write disjoint, validated elements.
unsafe impl Send for OutRows<'_> {}
unsafe impl Sync for OutRows<'_> {}

impl<'a> OutRows<'a> {
    /// Takes the (validated) output and LSE for the duration of the call.
    pub fn new(shape: &AttentionShape, out: AnyMut<'a>, lse: Option<&'a mut [f32]>, rows: QRows<'a>) -> Self {
        let (lse, lse_len) = match lse {
            Some(l) => (l.as_mut_ptr(), l.len()),
            None => (core::ptr::null_mut(), 0),
        };
        let (out, out_len, strides) = match out {
            AnyMut::F32(t) => (OutPtr::F32(t.data.as_mut_ptr()), t.data.len(), t.strides),
            AnyMut::F16(t) => (OutPtr::F16(t.data.as_mut_ptr()), t.data.len(), t.strides),
            AnyMut::Bf16(t) => (OutPtr::Bf16(t.data.as_mut_ptr()), t.data.len(), t.strides),
        };
        Self { out, out_len, strides, lse, lse_len, shape: *shape, rows, _borrow: PhantomData }
    }

    /// An output that receives nothing: the alignment pass's jobs, which write only through
    /// [`InspectRows`].
    pub fn none(shape: &AttentionShape) -> Self {
        Self {
            out: OutPtr::F32(core::ptr::null_mut()),
            out_len: 0,
            strides: Strides::bhsd(0, 0, 0),
            lse: core::ptr::null_mut(),
            lse_len: 0,
            shape: *shape,
            rows: QRows::new(shape, &Default::default()),
            _borrow: PhantomData,
        }
    }

    /// Rounds `n` rows of `rows` (`pitch` apart) for query rows `i0..i0 + n` of batch `b`, query
    /// head `h` into the output, and their LSE into the LSE buffer if there is one.
    ///
    /// # Safety
    /// No other thread may write these rows concurrently: the caller runs each unit of the
    /// work plan once.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn store(&self, b: usize, h: usize, i0: usize, rows: &[f32], pitch: usize, n: usize, row_lse: &[f32]) {
        let dv = self.shape.v_head_dim;
        for r in 0..n {
            let src = &rows[r * pitch..r * pitch + dv];
            let o = self.rows.offset(&self.strides, b, h, i0 + r);
            assert!(o + dv <= self.out_len, "validated offsets stay inside the output");
            // SAFETY (both arms): in bounds (validated, checked above); disjoint from every
            // other row.
            match self.out {
                OutPtr::F32(p) => unsafe { core::slice::from_raw_parts_mut(p.add(o), dv) }.copy_from_slice(src),
                OutPtr::F16(p) => {
                    let dst = unsafe { core::slice::from_raw_parts_mut(p.add(o), dv) };
                    for (d, &x) in dst.iter_mut().zip(src) {
                        *d = half::f16::from_f32(x);
                    }
                }
                OutPtr::Bf16(p) => {
                    let dst = unsafe { core::slice::from_raw_parts_mut(p.add(o), dv) };
                    for (d, &x) in dst.iter_mut().zip(src) {
                        *d = half::bf16::from_f32(x);
                    }
                }
            }
        }
        if !self.lse.is_null() {
            // A row's LSEs are contiguous in both layouts (`[B, Hq, Sq]`, `[Hq, tokens]`).
            let at = self.rows.lse_index(b, h, i0);
            assert!(at + n <= self.lse_len, "validated LSE length");
            // SAFETY: as above.
            let dst = unsafe { core::slice::from_raw_parts_mut(self.lse.add(at), n) };
            dst.copy_from_slice(&row_lse[..n]);
        }
    }
}

/// The inspection outputs of one call (attention probabilities `[B, Hq, Sq, Skv]` and coverage
/// `[B, Hq, Skv]`, both contiguous), shareable by the alignment pass's workers. The same
/// argument as for [`OutRows`] makes it sound: the lengths were validated, and each alignment
/// unit owns every row and the coverage of its own `(batch, head)` pairs.
pub(crate) struct InspectRows<'a> {
    alignment: *mut f32,
    alignment_len: usize,
    coverage: *mut f32,
    coverage_len: usize,
    shape: AttentionShape,
    _borrow: PhantomData<&'a mut f32>,
}

// SAFETY: see the type docs.
unsafe impl Send for InspectRows<'_> {}
unsafe impl Sync for InspectRows<'_> {}

impl<'a> InspectRows<'a> {
    pub fn new(shape: &AttentionShape, alignment: Option<&'a mut [f32]>, coverage: Option<&'a mut [f32]>) -> Self {
        let raw = |x: Option<&'a mut [f32]>| x.map_or((core::ptr::null_mut(), 0), |s| (s.as_mut_ptr(), s.len()));
        let ((alignment, alignment_len), (coverage, coverage_len)) = (raw(alignment), raw(coverage));
        Self { alignment, alignment_len, coverage, coverage_len, shape: *shape, _borrow: PhantomData }
    }

    /// The alignment rows (`seq_q * seq_kv`) and coverage (`seq_kv`) of `(b, h)`, for the
    /// outputs that were asked for.
    ///
    /// # Safety
    /// Only one worker holds the slices of a given `(b, h)` at a time.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn head(&self, b: usize, h: usize) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
        let s = &self.shape;
        let bh = b * s.q_heads + h;
        let take = |ptr: *mut f32, len: usize, n: usize| {
            (!ptr.is_null()).then(|| {
                assert!((bh + 1) * n <= len, "validated inspection lengths");
                // SAFETY: in bounds (checked); exclusive per the contract.
                unsafe { core::slice::from_raw_parts_mut(ptr.add(bh * n), n) }
            })
        };
        (take(self.alignment, self.alignment_len, s.seq_q * s.seq_kv), take(self.coverage, self.coverage_len, s.seq_kv))
    }
}
