// The block-size rule, shared verbatim by build.rs (which bakes the table for specialised head
// dims) and the crate (which applies it at run time for the generic head-dim path), so both
// always agree. Plain `const fn`s over integers: no crate types, so build.rs can include it.

/// Keys per key block. The packed K^T tile and the V tile (f32 after conversion) are re-read by
/// every register tile of rows in the query block, so together they fill at most a quarter of
/// the L2 budget. Rounded down to whole register tiles (`nr` keys), at least one, at most 256:
/// beyond that the score tile outgrows L1 and online-softmax rescales are already rare.
pub const fn key_block(head_dim: usize, v_head_dim: usize, l2_bytes: usize, nr: usize) -> usize {
    let per_key = (head_dim + v_head_dim) * 4;
    let mut bc = (l2_bytes / 4) / per_key;
    if bc > 256 {
        bc = 256;
    }
    bc = bc / nr * nr;
    if bc < nr {
        bc = nr;
    }
    bc
}

/// Query rows per query block: the block's Q rows and output accumulators fill at most a
/// quarter of the L2 budget, so each K/V tile brought into L2 serves all of them. Whole
/// register tiles (`mr` rows), at least one; at most 64 rows so causal prefill has enough
/// blocks to balance across threads.
pub const fn query_block(head_dim: usize, v_head_dim: usize, l2_bytes: usize, mr: usize) -> usize {
    let per_row = (head_dim + v_head_dim) * 4;
    let mut br = (l2_bytes / 4) / per_row;
    if br > 64 {
        br = 64;
    }
    br = br / mr * mr;
    if br < mr {
        br = mr;
    }
    br
}

/// The L1 working set of the Q.K^T register tile: the panel of `nr` packed keys it streams
/// through (`head_dim * nr` f32). Must fit in half the L1 budget for a specialisation to be
/// accepted.
pub const fn panel_bytes(head_dim: usize, nr: usize) -> usize {
    head_dim * nr * 4
}

/// Vector registers a register tile needs in its busiest phase, Q.K^T: `mr * nr_vectors`
/// accumulators, `nr_vectors` K loads and one broadcast query element.
pub const fn registers_needed(mr: usize, nr_vectors: usize) -> usize {
    mr * nr_vectors + nr_vectors + 1
}
