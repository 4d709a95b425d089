// The block-size rule, shared verbatim by build.rs (which bakes the table for specialised head
// dims) and the crate (which applies it at run time for the generic head-dim path), so both
// always agree. Plain `const fn`s over integers: no crate types, so build.rs can include it.

/// Keys per key block. Two limits, the tighter wins:
/// - L2: the K and V tiles (f32) are re-read by every row tile of the query block, so together
///   they take at most a quarter of the L2 budget;
/// - L1: one row tile's scores (`bc` keys x `rows` f32) and its packed Q^T (`head_dim` x `rows`)
///   are touched for every key group, so together they fit in the L1 budget.
///
/// Rounded down to whole key groups (`quantum` keys), at least one, at most 256 (beyond that
/// online-softmax rescales are already rare).
pub const fn key_block(
    head_dim: usize,
    v_head_dim: usize,
    l1_bytes: usize,
    l2_bytes: usize,
    rows: usize,
    quantum: usize,
) -> usize {
    // Zero sizes (never reached by a validated call) must not divide by zero.
    // Saturating: a head dim near the integer limit (an empty call may carry one) must not wrap.
    let dims = head_dim.saturating_add(v_head_dim);
    let dims = if dims == 0 { 1 } else { dims };
    let rows = if rows == 0 { 1 } else { rows };
    let mut bc = (l2_bytes / 4) / dims.saturating_mul(4);
    let q_tile = head_dim.saturating_mul(rows).saturating_mul(4);
    let l1_keys = if l1_bytes > q_tile { (l1_bytes - q_tile) / (rows * 4) } else { 0 };
    let quantum = if quantum == 0 { 1 } else { quantum };
    if l1_keys < bc {
        bc = l1_keys;
    }
    if bc > 256 {
        bc = 256;
    }
    bc = bc / quantum * quantum;
    if bc < quantum {
        bc = quantum;
    }
    bc
}

/// Query rows per query block: the block's Q rows and output accumulators fill at most a
/// quarter of the L2 budget, so each K/V tile brought into L2 serves all of them. Whole row
/// tiles (`quantum` rows), at least one; at most 64 rows so causal prefill has enough blocks
/// to balance across threads.
pub const fn query_block(head_dim: usize, v_head_dim: usize, l2_bytes: usize, quantum: usize) -> usize {
    let dims = head_dim.saturating_add(v_head_dim);
    let per_row = if dims == 0 { 4 } else { dims.saturating_mul(4) };
    let quantum = if quantum == 0 { 1 } else { quantum };
    let mut br = (l2_bytes / 4) / per_row;
    if br > 64 {
        br = 64;
    }
    br = br / quantum * quantum;
    if br < quantum {
        br = quantum;
    }
    br
}

/// The L1 working set of the Q.K^T register tile: the packed Q^T of one row tile (`head_dim`
/// x `rows` f32) it streams through for every group of keys. Must fit in half the L1 budget for
/// a specialisation to be accepted.
pub const fn panel_bytes(head_dim: usize, rows: usize) -> usize {
    head_dim * rows * 4
}

/// Vector registers a register tile needs in its busiest phase: `mr * nr_vectors`
/// accumulators, `nr_vectors` loads and one broadcast.
pub const fn registers_needed(mr: usize, nr_vectors: usize) -> usize {
    mr * nr_vectors + nr_vectors + 1
}
