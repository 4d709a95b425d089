//! The element types of a call, erased at the public boundary and recovered at one dispatch.
//!
//! The public entries are generic over the storage types (`TQ`, `TKV`, `TO`), but a generic
//! function is compiled in the crate that calls it: if the entries carried the types down to
//! the kernels, every engine (and every test binary) would compile the whole kernel tree again
//! for each combination it uses. Instead an entry turns its tensors into these enums (a few
//! instructions, inlined into the caller) and calls a non-generic function of this crate,
//! which matches the combination once and runs the typed pipeline compiled here, one copy per
//! supported combination. A new storage type is a new variant and new lines in [`dispatch`].

use crate::element::{BlockQ8_0, DType, Element, F8E4M3, F8E5M2, FloatElement, KvPair};
use crate::layout::{PagedKv, Strides, TensorMut, TensorRef};
use half::{bf16, f16};

/// An input tensor of any supported element type (`TensorRef::into()` makes one).
#[derive(Clone, Copy, Debug)]
pub enum AnyRef<'a> {
    F32(TensorRef<'a, f32>),
    F16(TensorRef<'a, f16>),
    Bf16(TensorRef<'a, bf16>),
}

/// K and V as the caller keeps them: two strided tensors or one paged pool. They share one
/// storage type (`Kv<'_, T>`), or are one of the mixed [`KvPair`]s (`Kv<'_, BlockQ8_0, f16>`).
#[derive(Clone, Copy, Debug)]
pub enum Kv<'a, K, V = K> {
    Tensors(TensorRef<'a, K>, TensorRef<'a, V>),
    Paged(PagedKv<'a, K, V>),
}

/// The [`Kv`] of a storage pair.
pub(crate) type KvOf<'a, P> = Kv<'a, <P as KvPair>::K, <P as KvPair>::V>;

/// K and V of any supported storage pair, in any layout: `(k, v).into()` for two tensors,
/// `paged.into()` for a [`PagedKv`] pool. `I8`, `F8E4M3`, `F8E5M2` and `Q8_0` are quantized
/// caches, dequantized by the call's `kv_scales` (factor 1 without them; `Q8_0` blocks carry
/// their own scales besides). The last variants are K and V of different types
/// ([`crate::element::MIXED_KV_PAIRS`]): named K type, then V type.
#[derive(Clone, Copy, Debug)]
pub enum AnyKv<'a> {
    F32(Kv<'a, f32>),
    F16(Kv<'a, f16>),
    Bf16(Kv<'a, bf16>),
    I8(Kv<'a, i8>),
    F8E4M3(Kv<'a, F8E4M3>),
    F8E5M2(Kv<'a, F8E5M2>),
    Q8_0(Kv<'a, BlockQ8_0>),
    /// ggml q8_0 K, f16 V (llama.cpp `-ctk q8_0 -ctv f16`).
    Q8_0F16(Kv<'a, BlockQ8_0, f16>),
    /// f16 K, ggml q8_0 V (llama.cpp `-ctk f16 -ctv q8_0`).
    F16Q8_0(Kv<'a, f16, BlockQ8_0>),
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
    /// The layout-independent part: `kv` at its own storage pair.
    #[inline(always)]
    pub(crate) fn typed<K: Element, V: Element>(kv: Kv<'a, K, V>) -> Self
    where
        (K, V): KvPair,
    {
        fn retype<'v, K: Element, V: Element, K2: Element, V2: Element>(kv: Kv<'v, K, V>) -> Kv<'v, K2, V2> {
            let rk = |s: &'v [K]| -> &'v [K2] { same::<K, K2>(s).expect("same DTYPE, same type") };
            let rv = |s: &'v [V]| -> &'v [V2] { same::<V, V2>(s).expect("same DTYPE, same type") };
            match kv {
                Kv::Tensors(k, v) => Kv::Tensors(TensorRef::new(rk(k.data), k.strides), TensorRef::new(rv(v.data), v.strides)),
                Kv::Paged(p) => Kv::Paged(PagedKv { k: rk(p.k), v: rv(p.v), k_strides: p.k_strides, v_strides: p.v_strides, pages: p.pages }),
            }
        }
        match (K::DTYPE, V::DTYPE) {
            (DType::F32, DType::F32) => AnyKv::F32(retype(kv)),
            (DType::F16, DType::F16) => AnyKv::F16(retype(kv)),
            (DType::Bf16, DType::Bf16) => AnyKv::Bf16(retype(kv)),
            (DType::I8, DType::I8) => AnyKv::I8(retype(kv)),
            (DType::F8E4M3, DType::F8E4M3) => AnyKv::F8E4M3(retype(kv)),
            (DType::F8E5M2, DType::F8E5M2) => AnyKv::F8E5M2(retype(kv)),
            (DType::Q8_0, DType::Q8_0) => AnyKv::Q8_0(retype(kv)),
            (DType::Q8_0, DType::F16) => AnyKv::Q8_0F16(retype(kv)),
            (DType::F16, DType::Q8_0) => AnyKv::F16Q8_0(retype(kv)),
            _ => unreachable!("every KvPair has a variant"),
        }
    }

    #[inline(always)]
    pub(crate) fn of<K: Element, V: Element>(k: TensorRef<'a, K>, v: TensorRef<'a, V>) -> Self
    where
        (K, V): KvPair,
    {
        Self::typed(Kv::Tensors(k, v))
    }

    #[inline(always)]
    pub(crate) fn paged<K: Element, V: Element>(kv: PagedKv<'a, K, V>) -> Self
    where
        (K, V): KvPair,
    {
        Self::typed(Kv::Paged(kv))
    }

    /// The storage types of K and V.
    pub fn dtypes(&self) -> (DType, DType) {
        fn of<K: Element, V: Element>(_: &Kv<'_, K, V>) -> (DType, DType) {
            (K::DTYPE, V::DTYPE)
        }
        match self {
            AnyKv::F32(kv) => of(kv),
            AnyKv::F16(kv) => of(kv),
            AnyKv::Bf16(kv) => of(kv),
            AnyKv::I8(kv) => of(kv),
            AnyKv::F8E4M3(kv) => of(kv),
            AnyKv::F8E5M2(kv) => of(kv),
            AnyKv::Q8_0(kv) => of(kv),
            AnyKv::Q8_0F16(kv) => of(kv),
            AnyKv::F16Q8_0(kv) => of(kv),
        }
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
    fn run<TQ: Element, P: KvPair, TO: Element>(self, q: TensorRef<'a, TQ>, kv: KvOf<'a, P>, out: TensorMut<'o, TO>) -> Self::Output;
}

/// Runs `op` with the call's element types: the one place the combinations are listed (every
/// K/V pair with every Q and output type).
pub(crate) fn dispatch<'a, 'o, Op: TypedOp<'a, 'o>>(q: AnyRef<'a>, kv: AnyKv<'a>, out: AnyMut<'o>, op: Op) -> Op::Output {
    #[inline(always)]
    fn with_q_out<'a, 'o, P: KvPair, Op: TypedOp<'a, 'o>>(q: AnyRef<'a>, kv: KvOf<'a, P>, out: AnyMut<'o>, op: Op) -> Op::Output {
        use {AnyMut as O, AnyRef as Q};
        match (q, out) {
            (Q::F32(q), O::F32(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::F32(q), O::F16(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::F32(q), O::Bf16(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::F16(q), O::F32(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::F16(q), O::F16(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::F16(q), O::Bf16(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::Bf16(q), O::F32(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::Bf16(q), O::F16(o)) => op.run::<_, P, _>(q, kv, o),
            (Q::Bf16(q), O::Bf16(o)) => op.run::<_, P, _>(q, kv, o),
        }
    }
    match kv {
        AnyKv::F32(kv) => with_q_out::<(f32, f32), Op>(q, kv, out, op),
        AnyKv::F16(kv) => with_q_out::<(f16, f16), Op>(q, kv, out, op),
        AnyKv::Bf16(kv) => with_q_out::<(bf16, bf16), Op>(q, kv, out, op),
        AnyKv::I8(kv) => with_q_out::<(i8, i8), Op>(q, kv, out, op),
        AnyKv::F8E4M3(kv) => with_q_out::<(F8E4M3, F8E4M3), Op>(q, kv, out, op),
        AnyKv::F8E5M2(kv) => with_q_out::<(F8E5M2, F8E5M2), Op>(q, kv, out, op),
        AnyKv::Q8_0(kv) => with_q_out::<(BlockQ8_0, BlockQ8_0), Op>(q, kv, out, op),
        AnyKv::Q8_0F16(kv) => with_q_out::<(BlockQ8_0, f16), Op>(q, kv, out, op),
        AnyKv::F16Q8_0(kv) => with_q_out::<(f16, BlockQ8_0), Op>(q, kv, out, op),
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

impl<'a, K: Element, V: Element> From<(TensorRef<'a, K>, TensorRef<'a, V>)> for AnyKv<'a>
where
    (K, V): KvPair,
{
    #[inline(always)]
    fn from((k, v): (TensorRef<'a, K>, TensorRef<'a, V>)) -> Self {
        AnyKv::of(k, v)
    }
}

impl<'a, K: Element, V: Element> From<PagedKv<'a, K, V>> for AnyKv<'a>
where
    (K, V): KvPair,
{
    #[inline(always)]
    fn from(kv: PagedKv<'a, K, V>) -> Self {
        AnyKv::paged(kv)
    }
}

impl<'o, T: FloatElement> From<TensorMut<'o, T>> for AnyMut<'o> {
    #[inline(always)]
    fn from(t: TensorMut<'o, T>) -> Self {
        AnyMut::of(t)
    }
}
