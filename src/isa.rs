//! Instruction-set paths a call can run on.

use core::fmt;

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
}

impl Isa {
    pub const ALL: [Isa; 5] = [Isa::Portable, Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
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
