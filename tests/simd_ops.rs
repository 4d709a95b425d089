//! The SIMD layer's own operations on every path this machine can run (NEON under qemu in
//! CI): the vector exp and tanh against f64, the transpose-sum, f16 widening for every bit
//! pattern, and prefetch hints on addresses that must never be dereferenced. Through the
//! hidden `simd_attn::selftest` probes.

use half::f16;
use simd_attn::{selftest, Isa, ADDITIVE_TANH_MAX_ABS_ERROR};

/// The SIMD layers this machine has (every path but the portable kernel); at least scalar and,
/// on x86-64 and aarch64, one vector ISA.
fn simd_paths() -> Vec<Isa> {
    let paths: Vec<Isa> = Isa::available().into_iter().filter(|&i| i != Isa::Portable).collect();
    assert!(paths.contains(&Isa::Scalar));
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        assert!(paths.len() >= 2, "no vector path on this machine: {paths:?}");
    }
    paths
}

/// Below this `e^x` is subnormal in f32, and the vector exp returns exactly 0.
const UNDERFLOW: f32 = -87.336_54;
const OVERFLOW: f32 = 88.3;

#[test]
fn exp_error_bound_on_every_isa() {
    // A dense grid over the softmax's range [-87.3, 0] and the rest of the finite range.
    let xs: Vec<f32> = (0..2_000_001).map(|i| UNDERFLOW + (OVERFLOW - UNDERFLOW) * i as f32 / 2e6).collect();
    for isa in simd_paths() {
        let mut ys = xs.clone();
        selftest::exp(isa, &mut ys).unwrap();
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            worst = worst.max(((y as f64 - want) / want).abs());
        }
        assert!(worst <= 2e-7, "{isa}: max relative error {worst:e}");
        let mut edge = vec![f32::NEG_INFINITY, -1e30, -100.0, UNDERFLOW - 0.01, -88.0, 0.0];
        selftest::exp(isa, &mut edge).unwrap();
        assert_eq!(&edge[..5], &[0.0; 5], "{isa}: below the underflow threshold must be exactly 0");
        assert_eq!(edge[5], 1.0, "{isa}: exp(0)");
    }
}

#[test]
fn tanh_stays_within_its_stated_absolute_error_on_every_isa() {
    // Dense near 0 (where the cancellation is), then the whole range out to saturation.
    let grid: Vec<f32> = (-200_000..=200_000)
        .map(|k| k as f32 * 1e-5)
        .chain((-120_000..=120_000).map(|k| k as f32 * 1e-4))
        .chain([f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, f32::MIN_POSITIVE, -0.0])
        .collect();
    for isa in simd_paths() {
        let mut ys = grid.clone();
        selftest::tanh(isa, &mut ys).unwrap();
        let worst = grid.iter().zip(&ys).map(|(&x, &y)| (y as f64 - (x as f64).tanh()).abs()).fold(0.0, f64::max);
        assert!(worst <= ADDITIVE_TANH_MAX_ABS_ERROR, "{isa}: max |tanh error| {worst:e}");
    }
}

#[test]
fn transpose_sum_puts_each_vectors_sum_in_its_lane_on_every_isa() {
    for isa in simd_paths() {
        let lanes = selftest::lanes(isa).unwrap();
        // Distinct, exactly representable values: the sums are exact in any order.
        let vals: Vec<f32> = (0..lanes * lanes).map(|i| (i * i % 97) as f32 + 0.25 * i as f32).collect();
        let want: Vec<f32> = vals.chunks(lanes).map(|c| c.iter().sum()).collect();
        assert_eq!(selftest::transpose_sum(isa, &vals).unwrap(), want, "{isa}");
    }
}

#[test]
fn f16_widening_is_exact_for_every_bit_pattern_on_every_isa() {
    let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    for isa in simd_paths() {
        let (one, pair) = selftest::widen_f16(isa, &all).unwrap();
        for (&h, (&a, &b)) in all.iter().zip(one.iter().zip(&pair)) {
            let want = h.to_f32();
            // NaNs keep their sign (payloads may be quieted); everything else is bit-exact.
            let same = |x: f32| if want.is_nan() { x.is_nan() && x.is_sign_negative() == want.is_sign_negative() } else { x.to_bits() == want.to_bits() };
            assert!(same(a), "{isa}: load_f16s({:#06x}) = {a:e}, want {want:e}", h.to_bits());
            assert!(same(b), "{isa}: load_f16s_pair({:#06x}) = {b:e}, want {want:e}", h.to_bits());
        }
    }
}

#[test]
fn bf16_widening_is_exact_for_every_bit_pattern_on_every_isa() {
    let all: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
    for isa in simd_paths() {
        let (one, pair) = selftest::widen_bf16(isa, &all).unwrap();
        for (&h, (&a, &b)) in all.iter().zip(one.iter().zip(&pair)) {
            // Widening is a shift, so every pattern, NaN payloads included, is kept bit for bit.
            let want = (h.to_bits() as u32) << 16;
            assert_eq!(a.to_bits(), want, "{isa}: load_bf16s({:#06x})", h.to_bits());
            assert_eq!(b.to_bits(), want, "{isa}: load_bf16s_pair({:#06x})", h.to_bits());
        }
    }
}

#[test]
fn prefetch_never_faults_on_any_address_on_every_isa() {
    let row = [1.0f32; 64];
    let base = row.as_ptr().cast::<u8>();
    // Null, unmapped, the top of the address space, past the end of a live row, the row itself.
    let addrs = [core::ptr::null(), 8usize as *const u8, usize::MAX as *const u8, base.wrapping_add(256), base, base.wrapping_sub(4096)];
    for isa in simd_paths() {
        selftest::prefetch(isa, &addrs).unwrap();
    }
    assert_eq!(row[63], 1.0);
}

#[test]
fn prefill_phase_probes_run_every_specialised_head_dim() {
    // The bench's `--set phases` times these; each must run the kernel's own tile (a whole
    // row tile against a whole key block) on every SIMD path with an f32 specialisation.
    use selftest::{flash_phase, Phase};
    for isa in simd_paths() {
        let lanes = selftest::lanes(isa).unwrap();
        for d in [64, 128] {
            let mut pairs = Vec::new();
            for phase in [Phase::QkTile, Phase::OnlineSoftmax, Phase::PvTile] {
                if let Some((p, secs)) = flash_phase(isa, phase, d, 3) {
                    assert!(p > 0 && p.is_multiple_of(lanes), "{isa} D{d} {phase:?}: {p} pairs");
                    assert!(secs.is_finite() && secs >= 0.0, "{isa} D{d} {phase:?}: {secs} s");
                    pairs.push(p);
                }
            }
            // All three phases or none (a head dim without a specialisation on this path).
            assert!(pairs.is_empty() || (pairs.len() == 3 && pairs.iter().all(|&p| p == pairs[0])), "{isa} D{d}: {pairs:?}");
        }
        assert_eq!(flash_phase(isa, Phase::QkTile, 96, 1), None, "{isa}: D96 has no specialisation");
    }
}
