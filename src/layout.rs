//! How tensors are laid out in the caller's memory.
//!
//! Engines keep Q/K/V in many layouts: `[B, H, S, D]`, `[B, S, H, D]`, or one packed QKV buffer
//! per token. Rather than copy into a canonical layout, every tensor is a slice plus element
//! strides for its batch, head and sequence axes; the last axis (the head dim) is contiguous.

/// The sizes of one attention call.
///
/// Q is `[batch, q_heads, seq_q, head_dim]`, K is `[batch, kv_heads, seq_kv, head_dim]`,
/// V is `[batch, kv_heads, seq_kv, v_head_dim]` and the output is
/// `[batch, q_heads, seq_q, v_head_dim]`, each addressed through its own [`Strides`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

impl AttentionShape {
    /// A shape whose value head dim equals the key head dim.
    pub fn new(
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        seq_q: usize,
        seq_kv: usize,
        head_dim: usize,
    ) -> Self {
        Self { batch, q_heads, kv_heads, seq_q, seq_kv, head_dim, v_head_dim: head_dim }
    }

    /// Set a value head dim different from the key head dim (`Dv != D`).
    pub fn with_v_head_dim(mut self, v_head_dim: usize) -> Self {
        self.v_head_dim = v_head_dim;
        self
    }

    /// Query heads that share one KV head (1 for MHA, `q_heads` for MQA).
    pub fn group_size(&self) -> usize {
        self.q_heads.checked_div(self.kv_heads).unwrap_or(0)
    }

    /// The contiguous `[B, H, S, D]` strides of each tensor, in the order Q, K, V, out.
    pub fn bhsd_strides(&self) -> [Strides; 4] {
        [
            Strides::bhsd(self.q_heads, self.seq_q, self.head_dim),
            Strides::bhsd(self.kv_heads, self.seq_kv, self.head_dim),
            Strides::bhsd(self.kv_heads, self.seq_kv, self.v_head_dim),
            Strides::bhsd(self.q_heads, self.seq_q, self.v_head_dim),
        ]
    }

    /// Element counts of contiguous `[B, H, S, D]` Q, K, V and out buffers.
    pub fn bhsd_lens(&self) -> [usize; 4] {
        let n = |h: usize, s: usize, d: usize| {
            self.batch.saturating_mul(h).saturating_mul(s).saturating_mul(d)
        };
        [
            n(self.q_heads, self.seq_q, self.head_dim),
            n(self.kv_heads, self.seq_kv, self.head_dim),
            n(self.kv_heads, self.seq_kv, self.v_head_dim),
            n(self.q_heads, self.seq_q, self.v_head_dim),
        ]
    }
}

/// Element strides of a `[batch, head, seq, dim]` tensor whose `dim` axis is contiguous.
///
/// Zero strides are allowed on inputs (e.g. one K/V shared by every batch entry); outputs
/// must not overlap, which validation checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub seq: usize,
}

impl Strides {
    pub const fn new(batch: usize, head: usize, seq: usize) -> Self {
        Self { batch, head, seq }
    }

    /// Contiguous `[B, H, S, D]` (heads outermost after batch).
    pub const fn bhsd(heads: usize, seq: usize, dim: usize) -> Self {
        Self {
            batch: heads.saturating_mul(seq).saturating_mul(dim),
            head: seq.saturating_mul(dim),
            seq: dim,
        }
    }

    /// Contiguous `[B, S, H, D]` (tokens outermost after batch), as most engines store them.
    pub const fn bshd(heads: usize, seq: usize, dim: usize) -> Self {
        Self {
            batch: seq.saturating_mul(heads).saturating_mul(dim),
            head: dim,
            seq: heads.saturating_mul(dim),
        }
    }

    #[inline(always)]
    pub(crate) fn offset(&self, b: usize, h: usize, s: usize) -> usize {
        b * self.batch + h * self.head + s * self.seq
    }
}

/// An input tensor: a borrowed slice and its strides.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a, T> {
    pub data: &'a [T],
    pub strides: Strides,
}

impl<'a, T> TensorRef<'a, T> {
    pub fn new(data: &'a [T], strides: Strides) -> Self {
        Self { data, strides }
    }
}

/// An output tensor: a mutably borrowed slice and its strides.
#[derive(Debug)]
pub struct TensorMut<'a, T> {
    pub data: &'a mut [T],
    pub strides: Strides,
}

impl<'a, T> TensorMut<'a, T> {
    pub fn new(data: &'a mut [T], strides: Strides) -> Self {
        Self { data, strides }
    }

    /// Reborrow, so one output buffer can be passed to several calls.
    pub fn reborrow(&mut self) -> TensorMut<'_, T> {
        TensorMut { data: self.data, strides: self.strides }
    }
}

/// Strides of the additive bias `[batch, q_head, seq_q, seq_kv]`, keys contiguous. A zero
/// stride broadcasts that axis: `[1, 1, Sq, Skv]` masks, `[B, 1, 1, Skv]` key-padding masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BiasStrides {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

/// An additive f32 bias (or mask, with `-inf` entries) added to the scores.
#[derive(Clone, Copy, Debug)]
pub struct BiasRef<'a> {
    pub data: &'a [f32],
    pub strides: BiasStrides,
}

impl<'a> BiasRef<'a> {
    pub fn new(data: &'a [f32], strides: BiasStrides) -> Self {
        Self { data, strides }
    }

    #[inline(always)]
    pub(crate) fn row(&self, b: usize, h: usize, i: usize) -> usize {
        b * self.strides.batch + h * self.strides.head + i * self.strides.row
    }
}

/// Element strides of a paged K or V pool: between pages, between KV heads and between the
/// tokens (slots) of a page; the head dim is contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PageStrides {
    pub page: usize,
    pub head: usize,
    pub slot: usize,
}

impl PageStrides {
    pub const fn new(page: usize, head: usize, slot: usize) -> Self {
        Self { page, head, slot }
    }

    /// `[num_pages, page_size, heads, dim]`, as vLLM and FlashAttention keep their pages.
    pub const fn token_major(page_size: usize, heads: usize, dim: usize) -> Self {
        Self { page: page_size.saturating_mul(heads).saturating_mul(dim), head: dim, slot: heads.saturating_mul(dim) }
    }

    /// `[num_pages, heads, page_size, dim]`: each head's rows of a page contiguous.
    pub const fn head_major(page_size: usize, heads: usize, dim: usize) -> Self {
        Self { page: page_size.saturating_mul(heads).saturating_mul(dim), head: page_size.saturating_mul(dim), slot: dim }
    }
}

/// Which pages hold each sequence's keys: key `j` of sequence `b` is slot `j % page_size` of
/// page `block_table[b * pages_per_seq + j / page_size]`. Page indices are `i32`, as engines
/// keep them; only the entries a sequence's length reaches are read (and validated), so the
/// rest may hold anything (-1, say). Pages may be shared between sequences (prefix caching).
#[derive(Clone, Copy, Debug)]
pub struct PageTable<'a> {
    /// `[batch, pages_per_seq]`, row-major.
    pub block_table: &'a [i32],
    pub pages_per_seq: usize,
    /// Tokens per page: any size from 1.
    pub page_size: usize,
    /// Pages in the pool: every index must be below it.
    pub num_pages: usize,
}

/// K and V kept in a paged pool, read in place. The keys of sequence `b` are its first
/// `kv_lens[b]` slots ([`crate::AttentionParams::kv_lens`]; without it every sequence has
/// `seq_kv` keys), which must fit in `pages_per_seq * page_size`. K and V share one storage
/// type, or are one of the [`crate::element::MIXED_KV_PAIRS`] (`PagedKv<'_, BlockQ8_0, f16>`).
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a, T, V = T> {
    pub k: &'a [T],
    pub v: &'a [V],
    pub k_strides: PageStrides,
    pub v_strides: PageStrides,
    pub pages: PageTable<'a>,
}
