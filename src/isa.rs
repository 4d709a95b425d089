//! Instruction-set paths a call can run on.

use crate::error::AttnError;
use core::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A kernel path. `Portable` is the plain-Rust flash kernel (the fallback and the baseline);
/// the others are the SIMD kernels, one per instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Isa {
    Portable = 0,
    Scalar = 1,
    Avx2 = 2,
    Avx512 = 3,
    Neon = 4,
    /// AVX-512 with AVX512_BF16: bf16 Q and K/V run the `vdpbf16ps` flash kernel (see
    /// `kernel::bf16dot`); everything else runs the AVX-512 kernels.
    Avx512Bf16 = 5,
}

impl Isa {
    pub const ALL: [Isa; 6] = [Isa::Portable, Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Isa {
    /// Whether this CPU (and this build's target) can run the path.
    pub fn is_available(self) -> bool {
        crate::simd::supported(self)
    }

    /// The fastest path this CPU has: AVX-512, then AVX2+FMA, NEON, then the portable scalar
    /// SIMD body.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::Neon].into_iter().find(|i| i.is_available()).unwrap_or(Isa::Scalar)
    }

    /// Whether an automatically chosen path sends bf16 prefill (bf16 Q and K/V) to the
    /// `vdpbf16ps` kernel ([`Isa::Avx512Bf16`]): where the CPU has AVX512_BF16 and runs it at
    /// least at the rate of its f32 FMAs, so that its two products per lane double the
    /// multiply-adds. AMD Zen 4 and Zen 5 do (the bench measured 2.0x and 2.06-2.11x the f32 FMA
    /// peak). Intel Sapphire and Emerald Rapids issue it on one port (0.48x), and there the
    /// widened AVX-512 kernel is faster, so automatic choice keeps it. Decided from the CPU
    /// vendor, never by timing, so that a machine always makes the same choice.
    pub fn prefers_bf16_dot() -> bool {
        Isa::Avx512Bf16.is_available() && crate::simd::bf16_dot_at_fma_rate()
    }

    /// Every path this machine can run, the portable kernel first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }
}

/// 0: no process-wide override; otherwise `Isa as u32 + 1`.
static OVERRIDE: AtomicU32 = AtomicU32::new(0);

/// Forces every later call in this process onto `isa` (`None` returns to automatic choice),
/// taking precedence over the `SIMD_ATTN_ISA` environment variable. A per-call choice
/// (`RunConfig::isa`) takes precedence over both. Fails if this machine cannot run `isa`.
pub fn set_isa_override(isa: Option<Isa>) -> Result<(), AttnError> {
    if let Some(i) = isa {
        if !i.is_available() {
            return Err(AttnError::IsaUnavailable { isa: i });
        }
    }
    OVERRIDE.store(isa.map_or(0, |i| i as u32 + 1), Ordering::Relaxed);
    Ok(())
}

/// The process-wide override set by [`set_isa_override`], if any.
pub fn isa_override() -> Option<Isa> {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => None,
        n => Isa::ALL.get(n as usize - 1).copied(),
    }
}

/// `SIMD_ATTN_ISA=scalar|avx2|avx512|avx512bf16|neon|portable|auto`, read once per process.
fn env_isa() -> Result<Option<Isa>, AttnError> {
    static ENV: OnceLock<Result<Option<Isa>, String>> = OnceLock::new();
    let parsed = ENV.get_or_init(|| match std::env::var("SIMD_ATTN_ISA") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("auto") => Ok(None),
        Ok(v) => Isa::from_name(&v).map(Some).ok_or(v),
    });
    match parsed {
        Ok(isa) => Ok(*isa),
        Err(v) => Err(AttnError::UnknownIsaName { name: v.clone() }),
    }
}

/// The path a call with `requested` (per call) would run: the per-call choice, else the
/// process override, else `SIMD_ATTN_ISA`, else [`Isa::best`]. Errors if the chosen path is not
/// available here or the variable names no path.
pub fn resolve_isa(requested: Option<Isa>) -> Result<Isa, AttnError> {
    resolve_isa_choice(requested).map(|(isa, _)| isa)
}

/// [`resolve_isa`], and whether the path was chosen automatically (nothing named it), so that
/// the planner may still pick the bf16 dot-product kernel for a call it takes.
pub(crate) fn resolve_isa_choice(requested: Option<Isa>) -> Result<(Isa, bool), AttnError> {
    let (isa, automatic) = match requested.or_else(isa_override) {
        Some(i) => (i, false),
        None => match env_isa()? {
            Some(i) => (i, false),
            None => (Isa::best(), true),
        },
    };
    if !isa.is_available() {
        return Err(AttnError::IsaUnavailable { isa });
    }
    Ok((isa, automatic))
}
