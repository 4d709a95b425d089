//! The element types of a call, erased at the public boundary and recovered at one dispatch.
//!
//! The public entries are generic over the storage types (`TQ`, `TKV`, `TO`), but a generic
//! function is compiled in the crate that calls it: if the entries carried the types down to
//! the kernels, every engine (and every test binary) would compile the whole kernel tree again
//! for each combination it uses. Instead an entry turns its tensors into these enums (a few
//! instructions, inlined into the caller) and calls a non-generic function of this crate,
//! which matches the combination once and runs the typed pipeline compiled here, one copy per
//! supported combination. A new storage type is a new variant and new lines in [`dispatch`].

use crate::element::{BlockQ8_0, DType, Element, F8E4M3, F8E5M2, FloatElement};
use crate::layout::{PagedKv, Strides, TensorMut, TensorRef};
use half::{bf16, f16};

/// An input tensor of any supported element type (`TensorRef::into()` makes one).
#[derive(Clone, Copy, Debug)]
pub enum AnyRef<'a> {
    F32(TensorRef<'a, f32>),
    F16(TensorRef<'a, f16>),
    Bf16(TensorRef<'a, bf16>),
}

/// K and V as the caller keeps them: two strided tensors or one paged pool.
#[derive(Clone, Copy, Debug)]
pub enum Kv<'a, T> {
    Tensors(TensorRef<'a, T>, TensorRef<'a, T>),
    Paged(PagedKv<'a, T>),
}

/// K and V of any supported element type (they share one), in any layout: `(k, v).into()` for
/// two tensors, `paged.into()` for a [`PagedKv`] pool. `I8`, `F8E4M3`, `F8E5M2` and `Q8_0` are
/// quantized caches, dequantized by the call's `kv_scales` (factor 1 without them; `Q8_0`
/// blocks carry their own scales besides).
#[derive(Clone, Copy, Debug)]
pub enum AnyKv<'a> {
    F32(Kv<'a, f32>),
    F16(Kv<'a, f16>),
    Bf16(Kv<'a, bf16>),
    I8(Kv<'a, i8>),
    F8E4M3(Kv<'a, F8E4M3>),
    F8E5M2(Kv<'a, F8E5M2>),
    Q8_0(Kv<'a, BlockQ8_0>),
}

/// An output tensor of any supported element type (`TensorMut::into()` makes one).
#[derive(Debug)]
pub enum AnyMut<'o> {
    F32(TensorMut<'o, f32>),
    F16(TensorMut<'o, f16>),
    Bf16(TensorMut<'o, bf16>),
}

/// `s` as a slice of `U`, when `T` and `U` are the same storage type.
#[inline(always)]
pub(crate) fn same<T: Element, U: Element>(s: &[T]) -> Option<&[U]> {
    // SAFETY: the trait is sealed and every implementor has a distinct DTYPE, so equal DTYPEs
    // mean T and U are the same type.
    (T::DTYPE == U::DTYPE).then(|| unsafe { core::slice::from_raw_parts(s.as_ptr().cast::<U>(), s.len()) })
}

/// [`same`], for a mutable slice.
#[inline(always)]
pub(crate) fn same_mut<T: Element, U: Element>(s: &mut [T]) -> Result<&mut [U], &mut [T]> {
    if T::DTYPE != U::DTYPE {
        return Err(s);
    }
    // SAFETY: as in `same`; the borrow moves into the result.
    Ok(unsafe { core::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<U>(), s.len()) })
}

impl<'a> AnyRef<'a> {
    #[inline(always)]
    pub(crate) fn of<T: FloatElement>(t: TensorRef<'a, T>) -> Self {
        match T::DTYPE {
            DType::F32 => AnyRef::F32(TensorRef::new(same(t.data).expect("DTYPE is F32"), t.strides)),
            DType::F16 => AnyRef::F16(TensorRef::new(same(t.data).expect("DTYPE is F16"), t.strides)),
            DType::Bf16 => AnyRef::Bf16(TensorRef::new(same(t.data).expect("DTYPE is Bf16"), t.strides)),
            DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::Q8_0 => unreachable!("quantized codes are not a FloatElement"),
        }
    }
}

impl<'a> AnyKv<'a> {
    /// The layout-independent part: `kv` at its own storage type.
    #[inline(always)]
    pub(crate) fn typed<T: Element>(kv: Kv<'a, T>) -> Self {
        fn retype<'v, T: Element, U: Element>(kv: Kv<'v, T>) -> Kv<'v, U> {
            let r = |s: &'v [T]| -> &'v [U] { same::<T, U>(s).expect("same DTYPE, same type") };
            match kv {
                Kv::Tensors(k, v) => Kv::Tensors(TensorRef::new(r(k.data), k.strides), TensorRef::new(r(v.data), v.strides)),
                Kv::Paged(p) => Kv::Paged(PagedKv { k: r(p.k), v: r(p.v), k_strides: p.k_strides, v_strides: p.v_strides, pages: p.pages }),
            }
        }
        match T::DTYPE {
            DType::F32 => AnyKv::F32(retype(kv)),
            DType::F16 => AnyKv::F16(retype(kv)),
            DType::Bf16 => AnyKv::Bf16(retype(kv)),
            DType::I8 => AnyKv::I8(retype(kv)),
            DType::F8E4M3 => AnyKv::F8E4M3(retype(kv)),
            DType::F8E5M2 => AnyKv::F8E5M2(retype(kv)),
            DType::Q8_0 => AnyKv::Q8_0(retype(kv)),
        }
    }

    #[inline(always)]
    pub(crate) fn of<T: Element>(k: TensorRef<'a, T>, v: TensorRef<'a, T>) -> Self {
        Self::typed(Kv::Tensors(k, v))
    }

    #[inline(always)]
    pub(crate) fn paged<T: Element>(kv: PagedKv<'a, T>) -> Self {
        Self::typed(Kv::Paged(kv))
    }
}

impl<'o> AnyMut<'o> {
    #[inline(always)]
    pub(crate) fn of<T: FloatElement>(t: TensorMut<'o, T>) -> Self {
        let strides = t.strides;
        let d = match same_mut::<T, f32>(t.data) {
            Ok(d) => return AnyMut::F32(TensorMut::new(d, strides)),
            Err(d) => d,
        };
        match same_mut::<T, f16>(d) {
            Ok(d) => AnyMut::F16(TensorMut::new(d, strides)),
            Err(d) => AnyMut::Bf16(TensorMut::new(same_mut::<T, bf16>(d).expect("DTYPE is Bf16"), strides)),
        }
    }
}

/// Something to do with a call's typed tensors: implemented by each entry's body.
pub(crate) trait TypedOp<'a, 'o> {
    type Output;
    fn run<TQ: Element, TKV: Element, TO: Element>(self, q: TensorRef<'a, TQ>, kv: Kv<'a, TKV>, out: TensorMut<'o, TO>) -> Self::Output;
}

/// Runs `op` with the call's element types: the one place the combinations are listed.
pub(crate) fn dispatch<'a, 'o, Op: TypedOp<'a, 'o>>(q: AnyRef<'a>, kv: AnyKv<'a>, out: AnyMut<'o>, op: Op) -> Op::Output {
    use {AnyKv as K, AnyMut as O, AnyRef as Q};
    match (q, kv, out) {
        (Q::F32(q), K::F32(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F32(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F32(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Bf16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Bf16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Bf16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F32(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F32(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F32(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Bf16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Bf16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Bf16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F32(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F32(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F32(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Bf16(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Bf16(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Bf16(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::I8(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::I8(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::I8(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::I8(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::I8(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::I8(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::I8(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::I8(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::I8(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E4M3(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E4M3(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E4M3(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E4M3(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E4M3(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E4M3(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E4M3(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E4M3(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E4M3(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E5M2(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E5M2(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::F8E5M2(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E5M2(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E5M2(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::F8E5M2(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E5M2(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E5M2(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::F8E5M2(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Q8_0(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Q8_0(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F32(q), K::Q8_0(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Q8_0(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Q8_0(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::F16(q), K::Q8_0(kv), O::Bf16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Q8_0(kv), O::F32(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Q8_0(kv), O::F16(o)) => op.run(q, kv, o),
        (Q::Bf16(q), K::Q8_0(kv), O::Bf16(o)) => op.run(q, kv, o),
    }
}

impl<'a> AnyRef<'a> {
    /// Elements in the tensor's slice.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        match self {
            AnyRef::F32(t) => t.data.len(),
            AnyRef::F16(t) => t.data.len(),
            AnyRef::Bf16(t) => t.data.len(),
        }
    }

    #[inline(always)]
    pub(crate) fn strides(&self) -> Strides {
        match self {
            AnyRef::F32(t) => t.strides,
            AnyRef::F16(t) => t.strides,
            AnyRef::Bf16(t) => t.strides,
        }
    }

    /// Passes `(t, x)` for the `d` elements at offset `o`, widened to f32, whatever the
    /// storage (Q is packed once per block, so the match per row costs nothing and the kernels
    /// are compiled once, not once per Q type).
    #[inline(always)]
    pub(crate) fn row_at(&self, o: usize, d: usize, mut put: impl FnMut(usize, f32)) {
        match self {
            AnyRef::F32(t) => t.data[o..o + d].iter().enumerate().for_each(|(c, &x)| put(c, x)),
            AnyRef::F16(t) => t.data[o..o + d].iter().enumerate().for_each(|(c, &x)| put(c, x.to_f32())),
            AnyRef::Bf16(t) => t.data[o..o + d].iter().enumerate().for_each(|(c, &x)| put(c, Element::to_f32(x))),
        }
    }
}

impl AnyRef<'_> {
    /// [`AnyRef::row_at`], rotated by `rope` at position `pos` (within its tables: validated):
    /// a pass over the pairs with the position's cos/sin rows, then the unrotated tail.
    #[inline(always)]
    pub(crate) fn row_rotated(&self, o: usize, d: usize, rope: &crate::rope::Rope<'_>, pos: usize, put: impl FnMut(usize, f32)) {
        #[inline(always)]
        fn pairs(rope: &crate::rope::Rope<'_>, pos: usize, d: usize, x: impl Fn(usize) -> f32, mut put: impl FnMut(usize, f32)) {
            let half = rope.rotary_dim / 2;
            let (cos, sin) = (&rope.cos[pos * half..][..half], &rope.sin[pos * half..][..half]);
            // Pair k is (2k, 2k + 1) interleaved (GPT-J), (k, k + half) otherwise (NeoX).
            let (step, second) = if rope.interleaved { (2, 1) } else { (1, half) };
            for (k, (&c, &s)) in cos.iter().zip(sin).enumerate() {
                let (i, j) = (k * step, k * step + second);
                let (a, b) = (x(i), x(j));
                put(i, a * c - b * s);
                put(j, b * c + a * s);
            }
            for t in rope.rotary_dim..d {
                put(t, x(t));
            }
        }
        match self {
            AnyRef::F32(t) => {
                let row = &t.data[o..o + d];
                pairs(rope, pos, d, |u| row[u], put);
            }
            AnyRef::F16(t) => {
                let row = &t.data[o..o + d];
                pairs(rope, pos, d, |u| row[u].to_f32(), put);
            }
            AnyRef::Bf16(t) => {
                let row = &t.data[o..o + d];
                pairs(rope, pos, d, |u| Element::to_f32(row[u]), put);
            }
        }
    }
}

impl AnyMut<'_> {
    /// Elements in the tensor's slice, and its strides.
    #[inline(always)]
    pub(crate) fn extent(&self) -> (usize, Strides) {
        match self {
            AnyMut::F32(t) => (t.data.len(), t.strides),
            AnyMut::F16(t) => (t.data.len(), t.strides),
            AnyMut::Bf16(t) => (t.data.len(), t.strides),
        }
    }
}

impl<'a, T: FloatElement> From<TensorRef<'a, T>> for AnyRef<'a> {
    #[inline(always)]
    fn from(t: TensorRef<'a, T>) -> Self {
        AnyRef::of(t)
    }
}

impl<'a, T: Element> From<(TensorRef<'a, T>, TensorRef<'a, T>)> for AnyKv<'a> {
    #[inline(always)]
    fn from((k, v): (TensorRef<'a, T>, TensorRef<'a, T>)) -> Self {
        AnyKv::of(k, v)
    }
}

impl<'a, T: Element> From<PagedKv<'a, T>> for AnyKv<'a> {
    #[inline(always)]
    fn from(kv: PagedKv<'a, T>) -> Self {
        AnyKv::paged(kv)
    }
}

impl<'o, T: FloatElement> From<TensorMut<'o, T>> for AnyMut<'o> {
    #[inline(always)]
    fn from(t: TensorMut<'o, T>) -> Self {
        AnyMut::of(t)
    }
}
