//! The public entry points: validate, plan, run the kernel per query block, store.

use crate::element::{DType, Element};
use crate::error::AttnError;
use crate::isa::{resolve_isa, Isa};
use crate::kernel::{flash, portable};
use crate::layout::{AttentionShape, TensorMut, TensorRef};
use crate::params::AttentionParams;
use crate::plan::{for_each_simd_family, Family, Tiles};
use crate::problem::Problem;
use crate::simd::{run_avx2, run_avx512, run_neon, run_scalar, SimdExt, WithSimdExt};
use crate::store::store_rows;
use crate::validate::validate_outputs;

/// What a call ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInfo {
    pub isa: Isa,
    /// The compile-time specialised head dim that ran, or `None` for the generic path.
    pub specialised_head_dim: Option<usize>,
    pub tiles: Tiles,
}

/// How a call runs (not what it computes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// Force an instruction-set path for this call; `None` follows [`crate::set_isa_override`],
    /// then `SIMD_ATTN_ISA`, then the best path the CPU has.
    pub isa: Option<Isa>,
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
/// let info = attention(
///     &shape,
///     TensorRef::new(&q, qs),
///     TensorRef::new(&k, ks),
///     TensorRef::new(&v, vs),
///     TensorMut::new(&mut out, os),
///     None,
///     &AttentionParams::new().causal(true),
/// )?;
/// assert!((out[0] - 0.3).abs() < 1e-6);
/// println!("ran on {}", info.isa);
/// # Ok::<(), simd_attn::AttnError>(())
/// ```
pub fn attention<TQ: Element, TKV: Element, TO: Element>(
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TKV>,
    v: TensorRef<'_, TKV>,
    out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError> {
    attention_with(&RunConfig::default(), shape, q, k, v, out, lse, params)
}

/// [`attention`] with a [`RunConfig`] (e.g. a forced ISA path).
#[allow(clippy::too_many_arguments)]
pub fn attention_with<TQ: Element, TKV: Element, TO: Element>(
    config: &RunConfig,
    shape: &AttentionShape,
    q: TensorRef<'_, TQ>,
    k: TensorRef<'_, TKV>,
    v: TensorRef<'_, TKV>,
    mut out: TensorMut<'_, TO>,
    lse: Option<&mut [f32]>,
    params: &AttentionParams<'_>,
) -> Result<RunInfo, AttnError> {
    let p = Problem::new(shape, q, k, v, params)?;
    validate_outputs(shape, &out, lse.as_deref())?;
    let isa = resolve_isa(config.isa)?;
    if isa == Isa::Portable {
        return Ok(run_portable(&p, &mut out, lse));
    }
    let call = Call { p: &p, out: &mut out, lse };
    dispatch(isa, call).ok_or(AttnError::IsaUnavailable { isa })
}

fn run_portable<TQ: Element, TKV: Element, TO: Element>(
    p: &Problem<'_, TQ, TKV>,
    out: &mut TensorMut<'_, TO>,
    mut lse: Option<&mut [f32]>,
) -> RunInfo {
    let s = &p.shape;
    let family = Family::find(Isa::Portable, DType::F32).expect("kernels/ declares the portable f32 family");
    let tiles = family.tiles(s.head_dim, s.v_head_dim);
    let mut scratch = portable::Scratch::new(&tiles, s.head_dim, s.v_head_dim);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i0 in (0..s.seq_q).step_by(tiles.br) {
                let i1 = (i0 + tiles.br).min(s.seq_q);
                portable::query_block(p, &tiles, b, h, i0, i1, &mut scratch);
                let rows = i1 - i0;
                store_rows(s, out, lse.as_deref_mut(), b, h, i0, &scratch.acc, s.v_head_dim, rows, &scratch.lse[..rows]);
            }
        }
    }
    RunInfo { isa: Isa::Portable, specialised_head_dim: None, tiles }
}

/// One call's validated inputs and outputs, run by a SIMD specialisation.
struct Call<'c, 'a, 'o, TQ, TKV, TO> {
    p: &'c Problem<'a, TQ, TKV>,
    out: &'c mut TensorMut<'o, TO>,
    lse: Option<&'c mut [f32]>,
}

/// A [`Call`] bound to one specialisation: head dim `D` (0 = generic) and register tile
/// `MR x NRV`.
struct Specialised<'c, 'a, 'o, TQ, TKV, TO, const D: usize, const MR: usize, const NRV: usize> {
    call: Call<'c, 'a, 'o, TQ, TKV, TO>,
    isa: Isa,
    tiles: Tiles,
}

impl<TQ: Element, TKV: Element, TO: Element, const D: usize, const MR: usize, const NRV: usize> WithSimdExt
    for Specialised<'_, '_, '_, TQ, TKV, TO, D, MR, NRV>
{
    type Output = RunInfo;

    #[inline(always)]
    fn with_simd<S: SimdExt>(self, simd: S) -> RunInfo {
        let Call { p, out, mut lse } = self.call;
        let s = &p.shape;
        let tiles = self.tiles;
        let mut scratch = flash::Scratch::new(&tiles, S::F32_LANES, s.head_dim, s.v_head_dim);
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for i0 in (0..s.seq_q).step_by(tiles.br) {
                    let i1 = (i0 + tiles.br).min(s.seq_q);
                    flash::query_block::<S, TQ, TKV, D, MR, NRV>(simd, p, &tiles, b, h, i0, i1, &mut scratch);
                    let rows = i1 - i0;
                    store_rows(s, out, lse.as_deref_mut(), b, h, i0, &scratch.acc, scratch.dv_pad, rows, &scratch.lse[..rows]);
                }
            }
        }
        RunInfo { isa: self.isa, specialised_head_dim: (D != 0).then_some(D), tiles }
    }
}

/// Picks the family of `isa` for the K/V storage type and, within it, the head-dim
/// specialisation (or the generic path), as `kernels/` declares them.
fn dispatch<TQ: Element, TKV: Element, TO: Element>(isa: Isa, call: Call<'_, '_, '_, TQ, TKV, TO>) -> Option<RunInfo> {
    let (d, dv) = (call.p.shape.head_dim, call.p.shape.v_head_dim);
    macro_rules! run_isa {
        (Scalar, $op:expr) => { run_scalar($op) };
        (Avx2, $op:expr) => { run_avx2($op) };
        (Avx512, $op:expr) => { run_avx512($op) };
        (Neon, $op:expr) => { run_neon($op) };
    }
    macro_rules! arms {
        ($([$isa:ident, $dt:ident, $mr:literal, $nrv:literal, [$($hd:literal),*]])*) => {
            $(
                if isa == Isa::$isa && TKV::DTYPE == DType::$dt {
                    let family = Family::find(isa, TKV::DTYPE).expect("generated from the same table");
                    let tiles = family.tiles(d, dv);
                    $(
                        if d == $hd && dv == $hd {
                            return run_isa!($isa, Specialised::<_, _, _, $hd, $mr, $nrv> { call, isa, tiles });
                        }
                    )*
                    return run_isa!($isa, Specialised::<_, _, _, 0, $mr, $nrv> { call, isa, tiles });
                }
            )*
        };
    }
    for_each_simd_family!(arms);
    None
}
