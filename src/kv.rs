//! Where the kernels find K and V rows: contiguous strided tensors or paged pools.
//!
//! Engines keep their cache in fixed-size pages addressed through a per-sequence block table
//! (vLLM, SGLang, TGI, FlashAttention's `flash_attn_with_kvcache`). A kernel never needs more
//! than "where does row `j` of KV head `hk` of sequence `b` start", plus, to read a run of rows
//! at one stride (the in-place f32 register tiles), how far that stride holds. [`KvSource`]
//! answers both for every layout, so the kernels read pages in place and a new layout is a new
//! [`KvIndex`] variant, not a new kernel.

use crate::element::Element;
use crate::error::{AttnError, TensorName};
use crate::layout::{PageStrides, PageTable, Strides};
use crate::validate::reach;

/// How a K or V tensor's rows are addressed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KvIndex<'a> {
    /// Rows at element strides: the classic tensor, or packed sequences.
    Strided(Tokens<'a>),
    /// Pages of `page_size` rows, found through a block table.
    Paged(Paged<'a>),
}

/// A strided tensor: `[batch, head, seq]` strides, or (`packed`) packed variable-length
/// sequences, where key `j` of sequence `b` is token `cu[b] + j` (`strides.seq` between
/// tokens, `strides.head` between heads; `batch` unused). One variant with a flag and an
/// empty `cu`, not two: a branch LLVM hoists out of a kernel loop then reads set bytes, never
/// the payload of another variant (valgrind reported exactly that with two variants).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tokens<'a> {
    strides: Strides,
    cu: &'a [i32],
    packed: bool,
}

impl Tokens<'_> {
    #[inline(always)]
    fn offset(&self, b: usize, hk: usize, j: usize) -> usize {
        if self.packed {
            (self.cu[b] as usize + j) * self.strides.seq + hk * self.strides.head
        } else {
            self.strides.offset(b, hk, j)
        }
    }
}

impl<'a> KvIndex<'a> {
    /// Element offset of row `j` of KV head `hk`, sequence `b` (a validated row).
    #[inline(always)]
    pub fn offset(&self, b: usize, hk: usize, j: usize) -> usize {
        match self {
            KvIndex::Strided(t) => t.offset(b, hk, j),
            KvIndex::Paged(p) => p.offset(b, hk, j),
        }
    }

    /// The index of a `[batch, head, seq]` tensor.
    pub fn tensor(strides: Strides) -> Self {
        KvIndex::Strided(Tokens { strides, cu: &[], packed: false })
    }

    /// The index of a paged layout, without its pool (for writers, who hold the pool `mut`).
    pub fn paged(table: &PageTable<'a>, strides: PageStrides) -> Self {
        KvIndex::Paged(Paged { table: table.block_table, pages_per_seq: table.pages_per_seq, page_size: table.page_size, strides })
    }
}

/// A validated paged layout: every block-table entry a visible key reaches names a page of the
/// pool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Paged<'a> {
    table: &'a [i32],
    pages_per_seq: usize,
    page_size: usize,
    strides: PageStrides,
}

/// K or V: the caller's slice and how its rows are addressed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvSource<'a, T> {
    pub data: &'a [T],
    pub index: KvIndex<'a>,
}

impl<'a, T> KvSource<'a, T> {
    pub fn strided(data: &'a [T], strides: Strides) -> Self {
        Self { data, index: KvIndex::tensor(strides) }
    }

    /// Element offset of row `j` of KV head `hk`, sequence `b` (a key some row can see, so its
    /// page exists).
    #[inline(always)]
    pub fn offset(&self, b: usize, hk: usize, j: usize) -> usize {
        self.index.offset(b, hk, j)
    }

    /// From row `j` on, how many rows lie `ld` elements apart (at least 1), and `ld`: the whole
    /// sequence for a strided tensor, the rest of `j`'s page for a paged one.
    #[inline(always)]
    pub fn run(&self, j: usize) -> (usize, usize) {
        match &self.index {
            KvIndex::Strided(t) => (usize::MAX, t.strides.seq),
            KvIndex::Paged(p) => (p.page_size - j % p.page_size, p.strides.slot),
        }
    }

    /// The offsets of rows `j0..j0 + out.len()` of KV head `hk`, sequence `b` (keys some row
    /// sees): a page-table lookup per page, not a division per row.
    #[inline(always)]
    pub fn row_offsets(&self, b: usize, hk: usize, j0: usize, out: &mut [usize]) {
        match &self.index {
            KvIndex::Strided(t) => {
                if out.is_empty() {
                    return; // `j0` may be past a packed sequence, even past the last token
                }
                let base = t.offset(b, hk, j0);
                for (c, o) in out.iter_mut().enumerate() {
                    *o = base + c * t.strides.seq;
                }
            }
            KvIndex::Paged(p) => {
                if out.is_empty() {
                    return; // no row: no page to look up (`j0` may be past the sequence)
                }
                let (row, head, ps, st) = (b * p.pages_per_seq, hk * p.strides.head, p.page_size, p.strides.slot);
                let (mut page, mut slot) = (j0 / ps, j0 % ps);
                let mut rest = out;
                // Page by page, each page's run of rows one arithmetic loop (the compiler
                // vectorises it): a branch per row cost as much as the rest of a decode chunk's
                // bookkeeping. A page is looked up only when a row needs it: the entry after a
                // sequence's last page may hold anything.
                while !rest.is_empty() {
                    let base = p.table[row + page] as usize * p.strides.page + head + slot * st;
                    let (run, next) = rest.split_at_mut((ps - slot).min(rest.len()));
                    for (c, o) in run.iter_mut().enumerate() {
                        *o = base + c * st;
                    }
                    (rest, page, slot) = (next, page + 1, 0);
                }
            }
        }
    }

    /// Row `j`'s storage for `width` values (`width / T::BLOCK` units; read values with
    /// [`Element::value`]).
    #[inline(always)]
    pub fn row(&self, b: usize, hk: usize, j: usize, width: usize) -> &'a [T]
    where
        T: Element,
    {
        let o = self.offset(b, hk, j);
        &self.data[o..o + width / T::BLOCK]
    }

    /// The address of row `j` for a prefetch hint, or `None` when row `j` may have no page
    /// (`j >= len`, the sequence's key count). Never dereferenced.
    #[inline(always)]
    pub fn hint(&self, b: usize, hk: usize, j: usize, len: usize) -> Option<*const T> {
        (j < len).then(|| self.data.as_ptr().wrapping_add(self.offset(b, hk, j)))
    }

    /// Elements between the rows of neighbouring KV heads (of one key).
    #[inline(always)]
    pub fn head_stride(&self) -> usize {
        match &self.index {
            KvIndex::Strided(t) => t.strides.head,
            KvIndex::Paged(p) => p.strides.head,
        }
    }

    /// Whether a token's KV heads lie closer together than its neighbouring tokens do
    /// (`[B, S, Hkv, D]` tensors, token-major pages): the decode plan then runs all heads of a
    /// key partition in one unit (see [`crate::plan::work`]).
    pub fn heads_side_by_side(&self) -> bool {
        match self.index {
            KvIndex::Strided(t) => t.strides.head < t.strides.seq,
            KvIndex::Paged(p) => p.strides.head < p.strides.slot,
        }
    }

    /// Whether rows past a sequence's key count may not exist (a paged pool, packed
    /// sequences): such rows must never be addressed, not even for a norm.
    pub fn bounded_by_len(&self) -> bool {
        match self.index {
            KvIndex::Paged(_) => true,
            KvIndex::Strided(t) => t.packed,
        }
    }
}

impl Paged<'_> {
    #[inline(always)]
    fn offset(&self, b: usize, hk: usize, j: usize) -> usize {
        let page = self.table[b * self.pages_per_seq + j / self.page_size] as usize;
        page * self.strides.page + hk * self.strides.head + (j % self.page_size) * self.strides.slot
    }
}

/// Checks packed variable-length K or V (`heads` heads of `dim` elements per token) against a
/// call: `cu` was validated (`cu_seqlens_k`), so the tokens are `0..cu[batch]`.
pub(crate) fn validate_packed<'a, T>(tensor: TensorName, data: &'a [T], strides: Strides, cu: &'a [i32], heads: usize, dim: usize) -> Result<KvSource<'a, T>, AttnError> {
    let tokens = cu[cu.len() - 1] as usize;
    let needed = reach(tensor, &[(tokens, strides.seq), (heads, strides.head)], dim)?;
    if needed > data.len() {
        return Err(AttnError::BufferTooSmall { tensor, needed, len: data.len() });
    }
    Ok(KvSource { data, index: KvIndex::Strided(Tokens { strides, cu, packed: true }) })
}

/// Checks a paged pool against a call: the page table's shape, every page index that a key
/// below its sequence's length reaches (`lens[b]`, the keys of sequence `b`), and that the
/// pool's slice holds `num_pages` pages of `heads` rows of `dim` elements. Entries past a
/// sequence's last page are never read and may hold anything (engines leave -1 there).
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_paged<'a, T>(
    tensor: TensorName,
    data: &'a [T],
    strides: PageStrides,
    table: &PageTable<'a>,
    batch: usize,
    heads: usize,
    dim: usize,
    lens: impl Iterator<Item = usize>,
) -> Result<KvSource<'a, T>, AttnError> {
    let t = table;
    if t.page_size == 0 {
        return Err(AttnError::ZeroDim { dim: "page_size" });
    }
    let rows = batch.checked_mul(t.pages_per_seq).ok_or(AttnError::SizeOverflow { tensor: TensorName::BlockTable })?;
    if t.block_table.len() < rows {
        return Err(AttnError::BufferTooSmall { tensor: TensorName::BlockTable, needed: rows, len: t.block_table.len() });
    }
    let needed = reach(tensor, &[(t.num_pages, strides.page), (heads, strides.head), (t.page_size, strides.slot)], dim)?;
    if needed > data.len() {
        return Err(AttnError::BufferTooSmall { tensor, needed, len: data.len() });
    }
    for (b, len) in lens.enumerate().take(batch) {
        let capacity = t.pages_per_seq.saturating_mul(t.page_size);
        if len > capacity {
            return Err(AttnError::KvLenOutOfRange { batch: b, kv_len: len, seq_kv: capacity });
        }
        for (slot, &page) in t.block_table[b * t.pages_per_seq..][..len.div_ceil(t.page_size)].iter().enumerate() {
            if page < 0 || page as usize >= t.num_pages {
                return Err(AttnError::InvalidPage { batch: b, slot, page, num_pages: t.num_pages });
            }
        }
    }
    let paged = Paged { table: t.block_table, pages_per_seq: t.pages_per_seq, page_size: t.page_size, strides };
    Ok(KvSource { data, index: KvIndex::Paged(paged) })
}
