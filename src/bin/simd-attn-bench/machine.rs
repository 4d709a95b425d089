//! What this machine can do, measured in the same run as the kernels: the single-core f32 FMA
//! peak and the memory read bandwidth. Figures are quoted as fractions of these, because
//! absolute times on shared machines drift.

use pulp::{Simd, WithSimd};
use seq_macro::seq;
use std::hint::black_box;
use std::time::Instant;

/// Independent FMA chains: enough to cover latency x throughput on AVX2 and AVX-512 without
/// spilling AVX2's 16 registers.
const CHAINS: usize = 12;

struct FmaLoop {
    iters: usize,
}

impl WithSimd for FmaLoop {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let a = simd.splat_f32s(black_box(0.999_999));
        let b = simd.splat_f32s(black_box(1e-6));
        let mut acc = [simd.splat_f32s(black_box(1.0)); CHAINS];
        for _ in 0..self.iters {
            seq!(N in 0..12 {
                acc[N] = simd.mul_add_e_f32s(acc[N], a, b);
            });
        }
        let mut total = simd.splat_f32s(0.0);
        for x in acc {
            total = simd.add_f32s(total, x);
        }
        simd.reduce_sum_f32s(total)
    }
}

struct Lanes;
impl WithSimd for Lanes {
    type Output = usize;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> usize {
        S::F32_LANES
    }
}

/// Peak single-thread f32 FMA throughput in GFLOP/s (best of several trials) with one vector
/// width: `vector_bits` 512 (AVX-512), 256 (AVX2+FMA), or 0 for the widest the CPU has. `None`
/// when the CPU lacks that width.
pub fn fma_peak_gflops(vector_bits: u32) -> Option<f64> {
    fn measure(run: impl Fn(FmaLoop) -> f32, lanes: usize) -> f64 {
        let iters = 20_000_000 / lanes.max(1);
        black_box(run(FmaLoop { iters: iters / 10 }));
        let mut best = 0.0f64;
        for _ in 0..5 {
            let t = Instant::now();
            black_box(run(FmaLoop { iters }));
            let flops = (iters * CHAINS * lanes * 2) as f64;
            best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
        }
        best
    }
    match vector_bits {
        #[cfg(target_arch = "x86_64")]
        512 => pulp::x86::V4::try_new().map(|s| measure(|op| Simd::vectorize(s, op), Simd::vectorize(s, Lanes))),
        #[cfg(target_arch = "x86_64")]
        256 => pulp::x86::V3::try_new().map(|s| measure(|op| Simd::vectorize(s, op), Simd::vectorize(s, Lanes))),
        0 => {
            let arch = pulp::Arch::new();
            Some(measure(|op| arch.dispatch(op), arch.dispatch(Lanes)))
        }
        _ => None,
    }
}

/// Peak single-thread throughput of the bf16 dot-product instruction (`vdpbf16ps` on 512-bit
/// vectors: 32 multiply-adds each) in GFLOP/s, best of several trials; `None` without
/// AVX512_BF16. It is not twice the f32 FMA peak everywhere: the bf16 kernel's ceiling is
/// this number, so the bench states it next to the FMA peak.
pub fn bf16_dot_peak_gflops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512f") {
        // Twelve independent chains in assembly (a compiler may spill or fold an intrinsic
        // loop): enough to cover the instruction's latency at any throughput seen so far.
        fn run(iters: u64) -> f64 {
            let t = Instant::now();
            // SAFETY: the CPU has AVX512_BF16 (checked above); registers only, all clobbered
            // ones declared.
            unsafe {
                core::arch::asm!(
                    "vpxord zmm12, zmm12, zmm12",
                    "vpternlogd zmm13, zmm13, zmm13, 0xff",
                    "2:",
                    "vdpbf16ps zmm0, zmm12, zmm13", "vdpbf16ps zmm1, zmm12, zmm13", "vdpbf16ps zmm2, zmm12, zmm13",
                    "vdpbf16ps zmm3, zmm12, zmm13", "vdpbf16ps zmm4, zmm12, zmm13", "vdpbf16ps zmm5, zmm12, zmm13",
                    "vdpbf16ps zmm6, zmm12, zmm13", "vdpbf16ps zmm7, zmm12, zmm13", "vdpbf16ps zmm8, zmm12, zmm13",
                    "vdpbf16ps zmm9, zmm12, zmm13", "vdpbf16ps zmm10, zmm12, zmm13", "vdpbf16ps zmm11, zmm12, zmm13",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) iters => _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                    out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _,
                    options(nomem, nostack),
                );
            }
            // 12 instructions x 16 lanes x 2 pairs x 2 flops per iteration.
            (iters * 12 * 64) as f64 / t.elapsed().as_secs_f64() / 1e9
        }
        let iters = 2_000_000;
        run(iters / 10);
        return Some((0..5).map(|_| run(iters)).fold(0.0, f64::max));
    }
    None
}

struct SumLoop<'a> {
    data: &'a [f32],
}

impl WithSimd for SumLoop<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (vecs, tail) = S::as_simd_f32s(self.data);
        let mut acc = [simd.splat_f32s(0.0); 8];
        let mut chunks = vecs.chunks_exact(8);
        for c in &mut chunks {
            seq!(N in 0..8 {
                acc[N] = simd.add_f32s(acc[N], c[N]);
            });
        }
        for &x in chunks.remainder() {
            acc[0] = simd.add_f32s(acc[0], x);
        }
        let mut total = acc[0];
        for &x in &acc[1..] {
            total = simd.add_f32s(total, x);
        }
        simd.reduce_sum_f32s(total) + tail.iter().sum::<f32>()
    }
}

/// The last-level cache size in bytes (sysfs), or 64 MiB when unknown.
pub fn llc_bytes() -> usize {
    (0..8)
        .filter_map(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .filter_map(|s| {
            let s = s.trim();
            let (num, mult) = match s.chars().last() {
                Some('K') => (&s[..s.len() - 1], 1 << 10),
                Some('M') => (&s[..s.len() - 1], 1 << 20),
                _ => (s, 1),
            };
            num.parse::<usize>().ok().map(|n| n * mult)
        })
        .max()
        .unwrap_or(64 << 20)
}

/// A buffer of at least four times the last-level cache (at least 1 GiB) to measure memory read
/// bandwidth on, so it measures memory, not cache. It is kept for the whole run: on a shared VM
/// the bandwidth drifts by 20% or more within minutes, so decode rows are judged against a
/// figure measured right after them rather than at start-up.
pub struct ReadBandwidth {
    buf: Vec<f32>,
}

impl ReadBandwidth {
    pub fn new() -> Self {
        let n = (4 * llc_bytes()).max(1 << 30) / 4;
        Self { buf: (0..n).map(|i| (i & 7) as f32).collect() }
    }

    /// GB/s (best of 3) with `threads` threads, each summing its own contiguous part. A row is
    /// judged against the bandwidth of its own thread count: on this class of VM a second core
    /// nearly doubles it, so a 1-thread figure would flatter every multi-thread row.
    pub fn gbs(&self, threads: usize) -> f64 {
        let arch = pulp::Arch::new();
        let part = self.buf.len().div_ceil(threads.max(1));
        let mut best = 0.0f64;
        for _ in 0..3 {
            let t = Instant::now();
            std::thread::scope(|sc| {
                for data in self.buf.chunks(part) {
                    sc.spawn(move || black_box(arch.dispatch(SumLoop { data: black_box(data) })));
                }
            });
            best = best.max((self.buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        best
    }

    /// [`Self::gbs`] with one thread and with each of `thread_counts` (each count once, one
    /// thread first).
    pub fn at_counts(&self, thread_counts: &[usize]) -> Vec<(usize, f64)> {
        let mut counts = vec![1];
        for &t in thread_counts {
            if !counts.contains(&t) {
                counts.push(t);
            }
        }
        counts.into_iter().map(|t| (t, self.gbs(t))).collect()
    }
}

/// The CPU model, from /proc/cpuinfo where there is one.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
