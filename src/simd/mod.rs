//! The ISA layer: the operations pulp lacks (exp), and running an op on a chosen ISA.
//!
//! Kernels are written once against pulp's `Simd` plus [`SimdExt`]; `run_on` monomorphises
//! them for AVX-512 (`V4`), AVX2+FMA (`V3`), NEON or the portable scalar `Simd`, inside a
//! function compiled with that ISA's target features.

pub(crate) mod exp;
pub(crate) mod tanh;

use crate::isa::Isa;
use crate::element::{BlockQ8_0, F8E4M3, F8E5M2};
use half::{bf16, f16};
use pulp::{Simd, WithSimd};

/// What the kernels need beyond pulp's `Simd`. Implemented for every token the crate
/// dispatches to; the default bodies are written in pulp operations (or lane by lane), so every
/// ISA has them, and x86 overrides the f16 conversion with the hardware instruction.
pub(crate) trait SimdExt: Simd {
    /// `e^x` per lane: max relative error below 2e-7 on the softmax's input range (x <= 0),
    /// exactly 0 below the underflow threshold and for -inf.
    #[inline(always)]
    fn exp_f32s(self, x: Self::f32s) -> Self::f32s {
        exp::exp_f32s(self, x)
    }

    /// `tanh(x)` per lane, absolute error below [`tanh::TANH_MAX_ABS_ERROR`].
    #[inline(always)]
    fn tanh_f32s(self, x: Self::f32s) -> Self::f32s {
        tanh::tanh_f32s(self, x)
    }

    /// The first `F32_LANES` values of `src` (which holds at least that many), widened to f32.
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        widen_lanes::<Self, f16>(src)
    }

    /// The first `2 * F32_LANES` values of `src` (which holds at least that many), widened to
    /// f32 as two vectors: ISAs whose vectors hold fewer f32 than one load brings in f16 (NEON:
    /// 8 f16 per 128-bit load, 4 f32 per register) widen both halves of one load.
    #[inline(always)]
    fn load_f16s_pair(self, src: &[f16]) -> (Self::f32s, Self::f32s) {
        load_halves(self, src)
    }

    /// The first `F32_LANES` values of `src`, widened from bf16 to f32 (exact: a bf16 is the
    /// top 16 bits of an f32). The SIMD ISAs override this with a zero-extend and a shift.
    #[inline(always)]
    fn load_bf16s(self, src: &[bf16]) -> Self::f32s {
        widen_lanes::<Self, bf16>(src)
    }

    /// [`SimdExt::load_bf16s`] for `2 * F32_LANES` values, as two vectors (NEON widens both
    /// halves of one 128-bit load).
    #[inline(always)]
    fn load_bf16s_pair(self, src: &[bf16]) -> (Self::f32s, Self::f32s) {
        load_halves(self, src)
    }

    /// The first `F32_LANES` values of `src`, widened from int8 to f32 (exact). The SIMD ISAs
    /// override this with a sign-extend and an integer conversion.
    #[inline(always)]
    fn load_i8s(self, src: &[i8]) -> Self::f32s {
        widen_lanes::<Self, i8>(src)
    }

    /// [`SimdExt::load_i8s`] for `2 * F32_LANES` values, as two vectors.
    #[inline(always)]
    fn load_i8s_pair(self, src: &[i8]) -> (Self::f32s, Self::f32s) {
        load_halves(self, src)
    }

    /// The first `F32_LANES` values of `src`, decoded from fp8 E4M3 to f32 (exact, NaN for the
    /// NaN codes): [`SimdExt::load_e4m3s_raw`] times 2^8.
    #[inline(always)]
    fn load_e4m3s(self, src: &[F8E4M3]) -> Self::f32s {
        self.mul_f32s(self.load_e4m3s_raw(src), self.splat_f32s(256.0))
    }

    /// 2^-8 times the first `F32_LANES` values of `src` decoded from fp8 E4M3 (exact: every
    /// E4M3 value over 2^8 is an f16, NaN for the NaN codes). The SIMD ISAs override this:
    /// sign-extend to 16 bits, shift the code into an f16, patch the NaN codes, widen the f16.
    /// Kernels that can apply the 2^8 to a whole dot product or accumulator instead of to every
    /// loaded vector call this one (see `kernel::lanes_unit`).
    #[inline(always)]
    fn load_e4m3s_raw(self, src: &[F8E4M3]) -> Self::f32s {
        self.mul_f32s(widen_lanes::<Self, F8E4M3>(src), self.splat_f32s(1.0 / 256.0))
    }

    /// [`SimdExt::load_e4m3s`] for `2 * F32_LANES` values, as two vectors.
    #[inline(always)]
    fn load_e4m3s_pair(self, src: &[F8E4M3]) -> (Self::f32s, Self::f32s) {
        load_halves(self, src)
    }

    /// The first `F32_LANES` values of `src`, decoded from fp8 E5M2 to f32 (exact: a code is the
    /// top byte of an f16). The SIMD ISAs override this with a zero-extend, a shift and the f16
    /// widening.
    #[inline(always)]
    fn load_e5m2s(self, src: &[F8E5M2]) -> Self::f32s {
        widen_lanes::<Self, F8E5M2>(src)
    }

    /// [`SimdExt::load_e5m2s`] for `2 * F32_LANES` values, as two vectors.
    #[inline(always)]
    fn load_e5m2s_pair(self, src: &[F8E5M2]) -> (Self::f32s, Self::f32s) {
        load_halves(self, src)
    }

    /// Values `start..start + F32_LANES` of a row of ggml `q8_0` blocks (`start` a multiple of
    /// `F32_LANES`, which divides 32, so one block holds them all): the block's codes widened
    /// like int8 times its f16 scale widened like f16, both in registers, so every ISA's
    /// overrides of those two loads serve here. Exact: an 8-bit code times an 11-bit scale.
    #[inline(always)]
    fn load_q8_0s(self, row: &[BlockQ8_0], start: usize) -> Self::f32s {
        let block = &row[start / BlockQ8_0::LEN];
        let codes = self.load_i8s(&block.qs[start % BlockQ8_0::LEN..]);
        self.mul_f32s(self.q8_0_scale(block), codes)
    }

    /// A `q8_0` block's f16 scale widened to f32 in every lane (the widening of `load_f16s`).
    #[inline(always)]
    fn q8_0_scale(self, block: &BlockQ8_0) -> Self::f32s {
        self.load_f16s(&[block.d; 16])
    }

    /// Lane `i` of the result is the sum of the lanes of `acc[i]` (`acc` holds `F32_LANES`
    /// vectors): the horizontal sums of a whole register tile of dot products at once, which
    /// costs a few shuffles per sum instead of a full reduction each.
    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        let mut buf = [0.0f32; 16];
        let lanes = Self::F32_LANES;
        for (d, &a) in buf[..lanes].iter_mut().zip(&acc[..lanes]) {
            *d = self.reduce_sum_f32s(a);
        }
        Self::as_simd_f32s(&buf[..lanes]).0[0]
    }

    /// Hints that the cache line holding `p` will be read soon (into L2): decode streams K and V
    /// from memory, and the hardware prefetcher stops at every 4 KiB page. Never dereferences
    /// `p`, so any address is allowed; a no-op where the ISA layer has no hint.
    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        let _ = p;
    }
}

impl SimdExt for pulp::Scalar {}

/// The first `F32_LANES` values of `src` widened one lane at a time: the default body of every
/// `SimdExt::load_*s`, for the ISAs without a widening instruction (the scalar body).
#[inline(always)]
fn widen_lanes<S: SimdExt, T: Widen>(src: &[T]) -> S::f32s {
    let mut buf = [0.0f32; 16];
    let lanes = S::F32_LANES;
    for (d, &s) in buf[..lanes].iter_mut().zip(&src[..lanes]) {
        *d = s.widen();
    }
    S::as_simd_f32s(&buf[..lanes]).0[0]
}

/// The first `2 * F32_LANES` values of `src` as two single-vector loads: the default body of
/// every `SimdExt::load_*s_pair` (ISAs whose one load fills two vectors override it).
#[inline(always)]
fn load_halves<S: SimdExt, T: Widen>(simd: S, src: &[T]) -> (S::f32s, S::f32s) {
    let lanes = S::F32_LANES;
    (T::load(simd, &src[..lanes]), T::load(simd, &src[lanes..2 * lanes]))
}

/// The narrow storage types the ISA layer widens (f16, bf16, int8, fp8): one vector's worth, two
/// vectors' worth, and one element, so the row conversion and its tests are written once.
pub(crate) trait Widen: Copy {
    fn load<S: SimdExt>(simd: S, src: &[Self]) -> S::f32s;
    fn load_pair<S: SimdExt>(simd: S, src: &[Self]) -> (S::f32s, S::f32s);
    fn widen(self) -> f32;
}

impl Widen for f16 {
    #[inline(always)]
    fn load<S: SimdExt>(simd: S, src: &[f16]) -> S::f32s {
        simd.load_f16s(src)
    }
    #[inline(always)]
    fn load_pair<S: SimdExt>(simd: S, src: &[f16]) -> (S::f32s, S::f32s) {
        simd.load_f16s_pair(src)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn load<S: SimdExt>(simd: S, src: &[bf16]) -> S::f32s {
        simd.load_bf16s(src)
    }
    #[inline(always)]
    fn load_pair<S: SimdExt>(simd: S, src: &[bf16]) -> (S::f32s, S::f32s) {
        simd.load_bf16s_pair(src)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for i8 {
    #[inline(always)]
    fn load<S: SimdExt>(simd: S, src: &[i8]) -> S::f32s {
        simd.load_i8s(src)
    }
    #[inline(always)]
    fn load_pair<S: SimdExt>(simd: S, src: &[i8]) -> (S::f32s, S::f32s) {
        simd.load_i8s_pair(src)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }
}

impl Widen for F8E4M3 {
    #[inline(always)]
    fn load<S: SimdExt>(simd: S, src: &[F8E4M3]) -> S::f32s {
        simd.load_e4m3s(src)
    }
    #[inline(always)]
    fn load_pair<S: SimdExt>(simd: S, src: &[F8E4M3]) -> (S::f32s, S::f32s) {
        simd.load_e4m3s_pair(src)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for F8E5M2 {
    #[inline(always)]
    fn load<S: SimdExt>(simd: S, src: &[F8E5M2]) -> S::f32s {
        simd.load_e5m2s(src)
    }
    #[inline(always)]
    fn load_pair<S: SimdExt>(simd: S, src: &[F8E5M2]) -> (S::f32s, S::f32s) {
        simd.load_e5m2s_pair(src)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Sixteen-bit lanes holding E4M3 codes sign-extended and shifted left by 7 (so bit 15 and bit 14
/// are the sign, bits 13..7 the exponent and mantissa), made into f16 bits worth 2^-8 times the
/// code: clear bit 14; where the 7 bits are all ones (the NaN codes) set it again, which makes
/// the exponent all ones over a non-zero mantissa. `bits + 0x80` carries into bit 14 exactly
/// there. Written once over any 16-bit lane vector type through its and/or/add.
macro_rules! e4m3_f16_bits {
    ($w:expr, $and:path, $or:path, $add:path, $splat:path) => {{
        let bits = $and($w, $splat(0xBFFFu16 as i16));
        $or(bits, $and($add(bits, $splat(0x80)), $splat(0x4000)))
    }};
}

/// NEON (Advanced SIMD) is part of every AArch64 CPU, ARMv8.0 on: pulp's plain `Neon` token,
/// not `NeonFcma`, whose FCMA (complex multiply, ARMv8.3) the kernels never use and which
/// Graviton2, Ampere Altra, Cortex-A72 and other ARMv8.0-8.2 cores lack. f16 widening and the
/// prefetch hint are single instructions with no stable intrinsic (the f16 vector types are
/// unstable), so they are written as inline assembly.
#[cfg(target_arch = "aarch64")]
impl SimdExt for pulp::aarch64::Neon {
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        use core::arch::aarch64::{float32x4_t, uint16x4_t, vld1_u16};
        let src = &src[..4];
        // SAFETY: `src` holds 4 f16 = 8 bytes; NEON is enabled in every Neon context.
        let bits: uint16x4_t = unsafe { vld1_u16(src.as_ptr().cast::<u16>()) };
        let out: float32x4_t;
        // SAFETY: `fcvtl` widens 4 half-precision lanes to single precision, registers only
        // (exact: every f16 value, subnormals, infinities and NaNs, is an f32 value).
        unsafe {
            core::arch::asm!("fcvtl {out:v}.4s, {bits:v}.4h", out = lateout(vreg) out, bits = in(vreg) bits, options(pure, nomem, nostack, preserves_flags));
            core::mem::transmute::<float32x4_t, Self::f32s>(out)
        }
    }

    #[inline(always)]
    fn load_f16s_pair(self, src: &[f16]) -> (Self::f32s, Self::f32s) {
        use core::arch::aarch64::{float32x4_t, uint16x8_t, vld1q_u16};
        let src = &src[..8];
        // SAFETY: `src` holds 8 f16 = 16 bytes; NEON is enabled in every Neon context.
        let bits: uint16x8_t = unsafe { vld1q_u16(src.as_ptr().cast::<u16>()) };
        let (lo, hi): (float32x4_t, float32x4_t);
        // SAFETY: `fcvtl`/`fcvtl2` widen the low and high 4 half-precision lanes, registers only.
        unsafe {
            core::arch::asm!(
                "fcvtl {lo:v}.4s, {bits:v}.4h",
                "fcvtl2 {hi:v}.4s, {bits:v}.8h",
                lo = out(vreg) lo, hi = lateout(vreg) hi, bits = in(vreg) bits,
                options(pure, nomem, nostack, preserves_flags)
            );
            (core::mem::transmute::<float32x4_t, Self::f32s>(lo), core::mem::transmute::<float32x4_t, Self::f32s>(hi))
        }
    }

    #[inline(always)]
    fn load_bf16s(self, src: &[bf16]) -> Self::f32s {
        use core::arch::aarch64::{vld1_u16, vshll_n_u16};
        let src = &src[..4];
        // SAFETY: `src` holds 4 bf16 = 8 bytes; NEON is enabled in every Neon context.
        // `ushll #16` widens each 16-bit lane into the top half of a 32-bit lane.
        unsafe { core::mem::transmute(vshll_n_u16::<16>(vld1_u16(src.as_ptr().cast::<u16>()))) }
    }

    #[inline(always)]
    fn load_bf16s_pair(self, src: &[bf16]) -> (Self::f32s, Self::f32s) {
        use core::arch::aarch64::{vget_low_u16, vld1q_u16, vshll_high_n_u16, vshll_n_u16};
        let src = &src[..8];
        // SAFETY: `src` holds 8 bf16 = 16 bytes; NEON is enabled in every Neon context.
        unsafe {
            let bits = vld1q_u16(src.as_ptr().cast::<u16>());
            (core::mem::transmute(vshll_n_u16::<16>(vget_low_u16(bits))), core::mem::transmute(vshll_high_n_u16::<16>(bits)))
        }
    }

    #[inline(always)]
    fn load_i8s(self, src: &[i8]) -> Self::f32s {
        use core::arch::aarch64::{vcvtq_f32_s32, vdup_n_s32, vget_low_s16, vmovl_s16, vmovl_s8, vreinterpret_s8_s32};
        let src = &src[..4];
        let word = i32::from_ne_bytes([src[0] as u8, src[1] as u8, src[2] as u8, src[3] as u8]);
        // SAFETY: NEON is enabled in every Neon context; registers only. The low 4 bytes of
        // the duplicated word are `src` in memory order (little-endian lanes).
        unsafe { core::mem::transmute(vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(word))))))) }
    }

    #[inline(always)]
    fn load_e4m3s_raw(self, src: &[F8E4M3]) -> Self::f32s {
        use core::arch::aarch64::{vandq_s16, vaddq_s16, vdup_n_s32, vdupq_n_s16, vget_low_s16, vorrq_s16, vreinterpret_s8_s32, vreinterpret_u16_s16, vshll_n_s8};
        let src = &src[..4];
        let word = i32::from_ne_bytes([src[0].0, src[1].0, src[2].0, src[3].0]);
        // SAFETY: NEON is enabled in every Neon context; registers only. `sshll #7` sign-extends
        // and shifts in one step (the low 4 lanes hold `src`, little-endian).
        unsafe {
            let w = vshll_n_s8::<7>(vreinterpret_s8_s32(vdup_n_s32(word)));
            let bits = e4m3_f16_bits!(w, vandq_s16, vorrq_s16, vaddq_s16, vdupq_n_s16);
            core::mem::transmute(neon_f16x4(vreinterpret_u16_s16(vget_low_s16(bits))))
        }
    }

    #[inline(always)]
    fn load_e4m3s_pair(self, src: &[F8E4M3]) -> (Self::f32s, Self::f32s) {
        use core::arch::aarch64::{vandq_s16, vaddq_s16, vdupq_n_s16, vld1_s8, vmulq_n_f32, vorrq_s16, vreinterpretq_u16_s16, vshll_n_s8};
        let src = &src[..8];
        // SAFETY: `src` holds 8 codes = 8 bytes; NEON is enabled in every Neon context.
        unsafe {
            let w = vshll_n_s8::<7>(vld1_s8(src.as_ptr().cast::<i8>()));
            let bits = e4m3_f16_bits!(w, vandq_s16, vorrq_s16, vaddq_s16, vdupq_n_s16);
            let (lo, hi) = neon_f16x8(vreinterpretq_u16_s16(bits));
            (core::mem::transmute(vmulq_n_f32(lo, 256.0)), core::mem::transmute(vmulq_n_f32(hi, 256.0)))
        }
    }

    #[inline(always)]
    fn load_e5m2s(self, src: &[F8E5M2]) -> Self::f32s {
        use core::arch::aarch64::{vdup_n_u32, vget_low_u16, vreinterpret_u8_u32, vshll_n_u8};
        let src = &src[..4];
        let word = u32::from_ne_bytes([src[0].0, src[1].0, src[2].0, src[3].0]);
        // SAFETY: NEON is enabled in every Neon context; registers only. `ushll #8` puts each
        // code in the top byte of a 16-bit lane: an f16.
        unsafe { core::mem::transmute(neon_f16x4(vget_low_u16(vshll_n_u8::<8>(vreinterpret_u8_u32(vdup_n_u32(word)))))) }
    }

    #[inline(always)]
    fn load_e5m2s_pair(self, src: &[F8E5M2]) -> (Self::f32s, Self::f32s) {
        use core::arch::aarch64::{vld1_u8, vshll_n_u8};
        let src = &src[..8];
        // SAFETY: `src` holds 8 codes = 8 bytes; NEON is enabled in every Neon context.
        unsafe {
            let (lo, hi) = neon_f16x8(vshll_n_u8::<8>(vld1_u8(src.as_ptr().cast::<u8>())));
            (core::mem::transmute(lo), core::mem::transmute(hi))
        }
    }

    #[inline(always)]
    fn load_i8s_pair(self, src: &[i8]) -> (Self::f32s, Self::f32s) {
        use core::arch::aarch64::{vcvtq_f32_s32, vget_low_s16, vld1_s8, vmovl_high_s16, vmovl_s16, vmovl_s8};
        let src = &src[..8];
        // SAFETY: `src` holds 8 int8 = 8 bytes; NEON is enabled in every Neon context.
        unsafe {
            let w = vmovl_s8(vld1_s8(src.as_ptr()));
            (core::mem::transmute(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)))), core::mem::transmute(vcvtq_f32_s32(vmovl_high_s16(w))))
        }
    }

    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        use core::arch::aarch64::{float32x4_t, vpaddq_f32};
        let acc = &acc[..4];
        // SAFETY: NEON is enabled in every Neon context; pairwise adds of registers only.
        unsafe {
            let a: [float32x4_t; 4] = core::mem::transmute::<[Self::f32s; 4], [float32x4_t; 4]>([acc[0], acc[1], acc[2], acc[3]]);
            // [a0 + a1 lanes pairwise, a2 + a3 ...] then once more: lane i = sum of acc[i].
            let lo = vpaddq_f32(a[0], a[1]);
            let hi = vpaddq_f32(a[2], a[3]);
            core::mem::transmute::<float32x4_t, Self::f32s>(vpaddq_f32(lo, hi))
        }
    }

    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        // SAFETY: `prfm` is a hint: it never faults or reads architecturally, whatever the
        // address. PLDL2KEEP: for a load, into L2, normal (temporal) retention.
        unsafe { core::arch::asm!("prfm pldl2keep, [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly)) }
    }
}

/// Four f16 lanes widened to f32 (`fcvtl`: the f16 vector types are unstable, so assembly).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn neon_f16x4(bits: core::arch::aarch64::uint16x4_t) -> core::arch::aarch64::float32x4_t {
    let out;
    // SAFETY: `fcvtl` widens 4 half-precision lanes, registers only; NEON is part of AArch64.
    unsafe { core::arch::asm!("fcvtl {out:v}.4s, {bits:v}.4h", out = lateout(vreg) out, bits = in(vreg) bits, options(pure, nomem, nostack, preserves_flags)) };
    out
}

/// Eight f16 lanes widened to two vectors of f32 (`fcvtl`, `fcvtl2`).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn neon_f16x8(bits: core::arch::aarch64::uint16x8_t) -> (core::arch::aarch64::float32x4_t, core::arch::aarch64::float32x4_t) {
    let (lo, hi);
    // SAFETY: as in `neon_f16x4`.
    unsafe {
        core::arch::asm!(
            "fcvtl {lo:v}.4s, {bits:v}.4h",
            "fcvtl2 {hi:v}.4s, {bits:v}.8h",
            lo = out(vreg) lo, hi = lateout(vreg) hi, bits = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    (lo, hi)
}

#[cfg(target_arch = "x86_64")]
impl SimdExt for pulp::x86::V4 {
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        use core::arch::x86_64::{__m256i, _mm256_loadu_si256};
        let src = &src[..16];
        // SAFETY: `src` holds 16 f16 = 32 bytes; AVX is enabled in every V4 context.
        let bits = unsafe { _mm256_loadu_si256(src.as_ptr().cast::<__m256i>()) };
        pulp::cast(self.avx512f._mm512_cvtph_ps(bits))
    }

    #[inline(always)]
    fn load_bf16s(self, src: &[bf16]) -> Self::f32s {
        use core::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtepu16_epi32, _mm512_slli_epi32};
        let src = &src[..16];
        // SAFETY: `src` holds 16 bf16 = 32 bytes; AVX-512F is enabled in every V4 context.
        unsafe { pulp::cast(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(src.as_ptr().cast::<__m256i>())))) }
    }

    #[inline(always)]
    fn load_i8s(self, src: &[i8]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm512_cvtepi32_ps, _mm512_cvtepi8_epi32, _mm_loadu_si128};
        let src = &src[..16];
        // SAFETY: `src` holds 16 int8 = 16 bytes; AVX-512F is enabled in every V4 context.
        unsafe { pulp::cast(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src.as_ptr().cast::<__m128i>())))) }
    }

    #[inline(always)]
    fn load_e4m3s_raw(self, src: &[F8E4M3]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_add_epi16, _mm256_and_si256, _mm256_cvtepi8_epi16, _mm256_or_si256, _mm256_set1_epi16, _mm256_slli_epi16, _mm512_cvtph_ps, _mm_loadu_si128};
        let src = &src[..16];
        // SAFETY: `src` holds 16 codes = 16 bytes; AVX-512F (and so AVX2 and F16C) is enabled
        // in every V4 context; the rest is registers only.
        unsafe {
            let w = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(_mm_loadu_si128(src.as_ptr().cast::<__m128i>())));
            let bits = e4m3_f16_bits!(w, _mm256_and_si256, _mm256_or_si256, _mm256_add_epi16, _mm256_set1_epi16);
            pulp::cast(_mm512_cvtph_ps(bits))
        }
    }

    #[inline(always)]
    fn load_e5m2s(self, src: &[F8E5M2]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtepu8_epi16, _mm256_slli_epi16, _mm512_cvtph_ps, _mm_loadu_si128};
        let src = &src[..16];
        // SAFETY: `src` holds 16 codes = 16 bytes; AVX-512F is enabled in every V4 context.
        unsafe { pulp::cast(_mm512_cvtph_ps(_mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(_mm_loadu_si128(src.as_ptr().cast::<__m128i>()))))) }
    }

    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        use core::arch::x86_64::*;
        let acc = &acc[..16];
        // Loops, not closures: a closure is a function of its own, compiled without the target
        // features, and the intrinsics in it would not inline.
        // SAFETY (every block below): AVX-512F is enabled in every V4 context; the intrinsics
        // only shuffle and add registers.
        // 16 -> 8: 256-bit halves; pair k holds sums of acc 2k (128-bit lanes 0, 1) and 2k+1.
        let mut p = [unsafe { _mm512_setzero_ps() }; 8];
        for k in 0..8 {
            let (x, y): (__m512, __m512) = (pulp::cast(acc[2 * k]), pulp::cast(acc[2 * k + 1]));
            p[k] = unsafe { _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y)) };
        }
        // 8 -> 4: 128-bit lane i of q[m] holds the 4 partial sums of acc 4m + i.
        let mut q = [p[0]; 4];
        for m in 0..4 {
            let (x, y) = (p[2 * m], p[2 * m + 1]);
            q[m] = unsafe { _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y)) };
        }
        // 4 -> 2 -> 1 inside 128-bit lanes: position 4i + j ends up with the sum of acc 4j + i.
        let mut r = [q[0]; 2];
        for m in 0..2 {
            let (x, y) = (q[2 * m], q[2 * m + 1]);
            r[m] = unsafe { _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y)) };
        }
        unsafe {
            let t = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(r[0], r[1]), _mm512_shuffle_ps::<0xDD>(r[0], r[1]));
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            pulp::cast(_mm512_permutexvar_ps(idx, t))
        }
    }

    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch never faults or reads architecturally, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
impl SimdExt for pulp::x86::V3 {
    #[inline(always)]
    fn load_f16s(self, src: &[f16]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_loadu_si128};
        let src = &src[..8];
        // SAFETY: `src` holds 8 f16 = 16 bytes. The crate hands a V3 token to kernels only
        // inside `run_avx2`, which runs them under `V3F16C` (F16C present and enabled), so the
        // conversion inlines to one `vcvtph2ps`.
        unsafe { pulp::cast(_mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast::<__m128i>()))) }
    }

    #[inline(always)]
    fn load_bf16s(self, src: &[bf16]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtepu16_epi32, _mm256_slli_epi32, _mm_loadu_si128};
        let src = &src[..8];
        // SAFETY: `src` holds 8 bf16 = 16 bytes; AVX2 is enabled in every V3 context.
        unsafe { pulp::cast(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(src.as_ptr().cast::<__m128i>())))) }
    }

    #[inline(always)]
    fn load_i8s(self, src: &[i8]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtepi32_ps, _mm256_cvtepi8_epi32, _mm_loadl_epi64};
        let src = &src[..8];
        // SAFETY: `src` holds 8 int8 = 8 bytes (a 64-bit load); AVX2 is enabled in every V3
        // context.
        unsafe { pulp::cast(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(src.as_ptr().cast::<__m128i>())))) }
    }

    #[inline(always)]
    fn load_e4m3s_raw(self, src: &[F8E4M3]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_add_epi16, _mm_and_si128, _mm_cvtepi8_epi16, _mm_loadl_epi64, _mm_or_si128, _mm_set1_epi16, _mm_slli_epi16};
        let src = &src[..8];
        // SAFETY: `src` holds 8 codes = 8 bytes (a 64-bit load); AVX2 is enabled in every V3
        // context, and F16C under `run_avx2` (see `load_f16s`).
        unsafe {
            let w = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(_mm_loadl_epi64(src.as_ptr().cast::<__m128i>())));
            let bits = e4m3_f16_bits!(w, _mm_and_si128, _mm_or_si128, _mm_add_epi16, _mm_set1_epi16);
            pulp::cast(_mm256_cvtph_ps(bits))
        }
    }

    #[inline(always)]
    fn load_e5m2s(self, src: &[F8E5M2]) -> Self::f32s {
        use core::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_cvtepu8_epi16, _mm_loadl_epi64, _mm_slli_epi16};
        let src = &src[..8];
        // SAFETY: as in `load_e4m3s_raw`.
        unsafe { pulp::cast(_mm256_cvtph_ps(_mm_slli_epi16::<8>(_mm_cvtepu8_epi16(_mm_loadl_epi64(src.as_ptr().cast::<__m128i>()))))) }
    }

    #[inline(always)]
    fn transpose_sum_f32s(self, acc: &[Self::f32s]) -> Self::f32s {
        use core::arch::x86_64::*;
        let acc = &acc[..8];
        // Loops, not closures (see V4).
        // SAFETY (every block below): AVX2 is enabled in every V3 context; the intrinsics only
        // shuffle and add registers.
        // 8 -> 4: 128-bit lane i of p[k] holds the 4 partial sums of acc 2k + i.
        let mut p = [unsafe { _mm256_setzero_ps() }; 4];
        for k in 0..4 {
            let (x, y): (__m256, __m256) = (pulp::cast(acc[2 * k]), pulp::cast(acc[2 * k + 1]));
            p[k] = unsafe { _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y)) };
        }
        // 4 -> 2 -> 1 inside 128-bit lanes: position 4i + j ends up with the sum of acc 2j + i.
        let mut r = [p[0]; 2];
        for m in 0..2 {
            let (x, y) = (p[2 * m], p[2 * m + 1]);
            r[m] = unsafe { _mm256_add_ps(_mm256_shuffle_ps::<0x44>(x, y), _mm256_shuffle_ps::<0xEE>(x, y)) };
        }
        unsafe {
            let t = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(r[0], r[1]), _mm256_shuffle_ps::<0xDD>(r[0], r[1]));
            let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            pulp::cast(_mm256_permutevar8x32_ps(t, idx))
        }
    }

    #[inline(always)]
    fn prefetch_l2(self, p: *const u8) {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch never faults or reads architecturally, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
pulp::simd_type! {
    /// pulp's `V3` (AVX2 + FMA) plus F16C, which `V3` does not enable: without it the f16
    /// conversion compiles to an out-of-line call, about 5x slower.
    pub struct V3F16C {
        pub sse: "sse",
        pub sse2: "sse2",
        pub fxsr: "fxsr",
        pub sse3: "sse3",
        pub ssse3: "ssse3",
        pub sse4_1: "sse4.1",
        pub sse4_2: "sse4.2",
        pub popcnt: "popcnt",
        pub avx: "avx",
        pub avx2: "avx2",
        pub bmi1: "bmi1",
        pub bmi2: "bmi2",
        pub fma: "fma",
        pub lzcnt: "lzcnt",
        pub f16c: "f16c",
    }
}

/// Runs an op with a V3 token inside `V3F16C::vectorize` (so F16C is enabled too).
#[cfg(target_arch = "x86_64")]
struct UnderF16C<Op> {
    v3: pulp::x86::V3,
    op: Op,
}

#[cfg(target_arch = "x86_64")]
impl<Op: WithSimdExt> pulp::NullaryFnOnce for UnderF16C<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn call(self) -> Op::Output {
        self.op.with_simd(self.v3)
    }
}

/// An op the ISA layer can run: like pulp's `WithSimd`, but bound on [`SimdExt`].
pub(crate) trait WithSimdExt {
    type Output;
    fn with_simd<S: SimdExt>(self, simd: S) -> Self::Output;
}

/// Runs `op` on the portable scalar `Simd` (available everywhere).
#[inline]
pub(crate) fn run_scalar<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    Some(op.with_simd(pulp::Scalar::new()))
}

/// Runs `op` with AVX2+FMA (and F16C, which every AVX2 CPU has and the f16 kernels need), if
/// the CPU has them.
#[inline]
pub(crate) fn run_avx2<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(tok), Some(v3)) = (V3F16C::try_new(), pulp::x86::V3::try_new()) {
        return Some(tok.vectorize(UnderF16C { v3, op }));
    }
    let _ = op;
    None
}

/// Runs `op` with AVX-512 (F/BW/CD/DQ/VL), if the CPU has it.
#[inline]
pub(crate) fn run_avx512<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "x86_64")]
    if let Some(v4) = pulp::x86::V4::try_new() {
        return Some(Simd::vectorize(v4, Vectorize { simd: v4, op }));
    }
    let _ = op;
    None
}

#[cfg(target_arch = "x86_64")]
pulp::simd_type! {
    /// pulp's `V4` (AVX-512 F/BW/CD/DQ/VL) plus AVX512_BF16, which pulp has no token for: the
    /// `vdpbf16ps` / `vcvtne2ps2bf16` kernels run inside this token's `vectorize`.
    pub struct V4Bf16 {
        pub sse: "sse",
        pub sse2: "sse2",
        pub fxsr: "fxsr",
        pub sse3: "sse3",
        pub ssse3: "ssse3",
        pub sse4_1: "sse4.1",
        pub sse4_2: "sse4.2",
        pub popcnt: "popcnt",
        pub avx: "avx",
        pub avx2: "avx2",
        pub bmi1: "bmi1",
        pub bmi2: "bmi2",
        pub fma: "fma",
        pub lzcnt: "lzcnt",
        pub avx512f: "avx512f",
        pub avx512bw: "avx512bw",
        pub avx512cd: "avx512cd",
        pub avx512dq: "avx512dq",
        pub avx512vl: "avx512vl",
        pub avx512bf16: "avx512bf16",
    }
}

/// A V4 token that also proves AVX512_BF16 is present and enabled: made only by
/// [`run_avx512bf16`], so the bf16 dot-product kernels that take it may use the instructions.
/// (Off x86-64 it has no constructor at all.)
#[derive(Clone, Copy)]
pub(crate) struct Bf16Dot {
    #[cfg(target_arch = "x86_64")]
    pub v4: pulp::x86::V4,
    _proof: (),
}

/// An op the bf16 dot-product path runs.
pub(crate) trait WithBf16Dot {
    type Output;
    fn with_bf16(self, bf: Bf16Dot) -> Self::Output;
}

/// Runs `op` with AVX-512 and AVX512_BF16 enabled, if this CPU (and target) has them.
#[inline]
pub(crate) fn run_bf16_dot<Op: WithBf16Dot>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "x86_64")]
    return run_avx512bf16(op);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = op;
        None
    }
}

#[cfg(target_arch = "x86_64")]
struct UnderBf16<Op> {
    bf: Bf16Dot,
    op: Op,
}

#[cfg(target_arch = "x86_64")]
impl<Op: WithBf16Dot> pulp::NullaryFnOnce for UnderBf16<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn call(self) -> Op::Output {
        self.op.with_bf16(self.bf)
    }
}

/// Runs `op` with AVX-512 and AVX512_BF16 enabled, if the CPU has them.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn run_avx512bf16<Op: WithBf16Dot>(op: Op) -> Option<Op::Output> {
    if let (Some(tok), Some(v4)) = (V4Bf16::try_new(), pulp::x86::V4::try_new()) {
        return Some(tok.vectorize(UnderBf16 { bf: Bf16Dot { v4, _proof: () }, op }));
    }
    let _ = op;
    None
}

/// Runs `op` with NEON (any AArch64 CPU, ARMv8.0 on).
#[inline]
pub(crate) fn run_neon<Op: WithSimdExt>(op: Op) -> Option<Op::Output> {
    #[cfg(target_arch = "aarch64")]
    if let Some(n) = pulp::aarch64::Neon::try_new() {
        return Some(Simd::vectorize(n, Vectorize { simd: n, op }));
    }
    let _ = op;
    None
}

/// Carries the concrete token into `vectorize`, which enables its target features around the
/// (fully inlined) op.
struct Vectorize<S, Op> {
    simd: S,
    op: Op,
}
impl<S: SimdExt, Op: WithSimdExt> WithSimd for Vectorize<S, Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn with_simd<S2: Simd>(self, _: S2) -> Self::Output {
        self.op.with_simd(self.simd)
    }
}

/// Whether this CPU and build can run `isa`.
pub(crate) fn supported(isa: Isa) -> bool {
    match isa {
        Isa::Portable | Isa::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => pulp::x86::V3::try_new().is_some() && V3F16C::try_new().is_some(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => pulp::x86::V4::try_new().is_some(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => pulp::x86::V4::try_new().is_some() && V4Bf16::try_new().is_some(),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => pulp::aarch64::Neon::try_new().is_some(),
        _ => false,
    }
}

/// Whether this CPU issues `vdpbf16ps` at least at its f32 FMA rate (see
/// [`Isa::prefers_bf16_dot`]): measured on Zen 4 (2.0x the FMA flops), Zen 5 (2.06-2.11x) and
/// on Intel Sapphire / Emerald Rapids (0.48x: one port against two for FMAs). Decided from the
/// CPUID vendor.
pub(crate) fn bf16_dot_at_fma_rate() -> bool {
    cpu_is_amd()
}

/// Whether decode hints a row of every 4 KiB page two chunks ahead, so the hint's page walk
/// brings the page into the TLB before its rows are hinted. On the Intel Xeon it was tuned on
/// that was 1-4% faster than walking the page with a demand read; on AMD Zen 5 a profile put
/// about a fifth of the decode kernel's samples on those two hints (a software prefetch that
/// misses the TLB holds up retirement there), so AMD CPUs leave the page walks to the loads.
pub(crate) fn hints_page_walks() -> bool {
    !cpu_is_amd()
}

/// Whether the CPUID vendor string is AMD's, read once.
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMD.get_or_init(|| {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let id = unsafe { core::arch::x86_64::__cpuid(0) };
            let mut vendor = [0u8; 12];
            vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
            vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
            vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
            &vendor == b"AuthenticAMD"
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
