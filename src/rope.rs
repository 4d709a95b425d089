//! Rotary position embeddings (RoPE), applied where rows are read or written once: to Q as a
//! kernel packs it, and to new K rows as the append writes them into the cache.

use crate::error::AttnError;

/// Rotary embedding tables, as `flash_attn_with_kvcache` takes them: `cos` and `sin` are
/// `[positions, rotary_dim / 2]`, row-major. The first `rotary_dim` elements of a row at
/// position `p` rotate by pairs (the rest, a partial rotary, stay as they are): with
/// `c = cos[p][t]`, `s = sin[p][t]`, pair `(x, y)` becomes `(x c - y s, y c + x s)`, where the
/// pairs are `(x[2t], x[2t + 1])` when `interleaved` (GPT-J) and `(x[t], x[t + rotary_dim / 2])`
/// otherwise (GPT-NeoX, Llama).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub rotary_dim: usize,
    pub interleaved: bool,
}

impl<'a> Rope<'a> {
    /// The standard tables for base `theta` (10000 in most models): angle
    /// `p * theta^(-2t / rotary_dim)` for positions `0..positions`, computed in f64.
    pub fn tables(theta: f64, rotary_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let half = rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for t in 0..half {
                let angle = p as f64 * theta.powf(-2.0 * t as f64 / rotary_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Positions the tables hold.
    pub fn positions(&self) -> usize {
        self.cos.len() / (self.rotary_dim / 2).max(1)
    }

    /// The tables fit a head dim of `head_dim`: an even `rotary_dim` in `2..=head_dim`, equal
    /// table lengths of whole rows. (Entries are checked where a call reads them:
    /// [`Rope::check_rows`].)
    pub(crate) fn validate(&self, head_dim: usize) -> Result<(), AttnError> {
        let bad = |detail: String| Err(AttnError::InvalidRope { detail });
        if self.rotary_dim < 2 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > head_dim {
            return bad(format!("rotary_dim = {} must be even and in 2..={head_dim} (the head dim)", self.rotary_dim));
        }
        let half = self.rotary_dim / 2;
        if self.cos.len() != self.sin.len() || !self.cos.len().is_multiple_of(half) {
            return bad(format!("cos ({}) and sin ({}) must be [positions, rotary_dim / 2 = {half}]", self.cos.len(), self.sin.len()));
        }
        Ok(())
    }

    /// The entries of positions `rows` (within the tables) are finite: a call checks the rows
    /// it reads, not the whole tables (a model's tables span its context, a decode step reads
    /// one row).
    pub(crate) fn check_rows(&self, rows: core::ops::Range<usize>) -> Result<(), AttnError> {
        let half = self.rotary_dim / 2;
        let span = rows.start * half..rows.end * half;
        for (arg, t) in [("rope cos", self.cos), ("rope sin", self.sin)] {
            if let Some(n) = t[span.clone()].iter().position(|x| !x.is_finite()) {
                let index = span.start + n;
                return Err(AttnError::InvalidValue { arg, index, value: t[index], allowed: "finite" });
            }
        }
        Ok(())
    }

    /// Element `t` of a row at position `pos` after rotation, `x(u)` reading element `u`
    /// before it (`pos` is within the tables: validated).
    #[inline(always)]
    pub(crate) fn rotated(&self, pos: usize, t: usize, x: impl Fn(usize) -> f32) -> f32 {
        let r = self.rotary_dim;
        if t >= r {
            return x(t);
        }
        let half = r / 2;
        let (k, partner, first) = if self.interleaved {
            (t / 2, t ^ 1, t.is_multiple_of(2))
        } else if t < half {
            (t, t + half, true)
        } else {
            (t - half, t - half, false)
        };
        let (c, s) = (self.cos[pos * half + k], self.sin[pos * half + k]);
        if first { x(t) * c - x(partner) * s } else { x(t) * c + x(partner) * s }
    }
}
