//! Planning: which tiles a call uses. The block sizes come from `kernels/*.toml` through the
//! table build.rs generates, or, for head dims without a specialisation, from the same rule
//! applied at run time.

pub mod tile_rule;
pub mod work;

use crate::element::DType;
use crate::isa::Isa;

/// Block sizes of one kernel instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    /// Query rows per query block.
    pub br: usize,
    /// Keys per key block.
    pub bc: usize,
    /// Keys per Q.K^T register tile, and rows per P.V register tile.
    pub mr: usize,
    /// Query rows per row tile (`nr_vectors * lanes`: rows run along the lanes).
    pub nr: usize,
}

/// One `[[family]]` of `kernels/*.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub isa: Isa,
    pub dtype: DType,
    pub head_dims: &'static [usize],
    /// Attention dims of the additive score with a specialised kernel (padded to 16).
    pub additive_dims: &'static [usize],
    pub mr: usize,
    pub nr_vectors: usize,
    pub lanes: usize,
    pub registers: usize,
    pub l1_bytes: usize,
    pub l2_bytes: usize,
}

/// A compile-time specialised head dim of a family, with its baked block sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Specialisation {
    pub isa: Isa,
    pub dtype: DType,
    pub head_dim: usize,
    pub tiles: Tiles,
}

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));
pub(crate) use for_each_simd_family;

impl Family {
    /// The family of an ISA and K/V storage type, if `kernels/` declares one.
    pub fn find(isa: Isa, dtype: DType) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.isa == isa && f.dtype == dtype)
    }

    /// The family a call on `isa` with K/V of `kv_dtype` plans with: its own, else the ISA's
    /// f32 family (whose kernel body converts through `Element`); the AVX512_BF16 path declares
    /// bf16 only, and runs everything else on the AVX-512 families (build.rs checks that they
    /// share one register tile, so either kernel can run a plan made with either).
    pub fn for_call(isa: Isa, kv_dtype: DType) -> &'static Family {
        Family::find(isa, kv_dtype)
            .or_else(|| Family::find(isa, DType::F32))
            .unwrap_or_else(|| {
                assert_eq!(isa, Isa::Avx512Bf16, "kernels/ declares an f32 family for every path but avx512bf16");
                Family::for_call(Isa::Avx512, kv_dtype)
            })
    }

    /// Block sizes for any head dims: the baked entry when one is specialised, else the rule.
    pub fn tiles(&self, head_dim: usize, v_head_dim: usize) -> Tiles {
        if head_dim == v_head_dim {
            if let Some(s) = SPECIALISATIONS
                .iter()
                .find(|s| s.isa == self.isa && s.dtype == self.dtype && s.head_dim == head_dim)
            {
                return s.tiles;
            }
        }
        let nr = self.nr_vectors * self.lanes;
        let bc = tile_rule::key_block(head_dim, v_head_dim, self.l1_bytes, self.l2_bytes, nr, self.mr);
        let br = tile_rule::query_block(head_dim, v_head_dim, self.l2_bytes, nr);
        Tiles { br, bc, mr: self.mr, nr }
    }
}
