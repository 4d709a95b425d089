//! Checks every argument before any kernel runs.
//!
//! After these pass, every index a kernel computes from the shape and strides lies inside the
//! caller's slices, and no two output elements share memory; the kernels rely on exactly this.

use crate::error::{AttnError, TensorName};
use crate::layout::{AttentionShape, BiasRef, Strides};
use crate::params::{AttentionParams, Score};

/// One past the highest element index reachable through `dims` (size, stride) and a contiguous
/// inner axis of `inner` elements; 0 when any size is 0.
pub(crate) fn reach(
    tensor: TensorName,
    dims: &[(usize, usize)],
    inner: usize,
) -> Result<usize, AttnError> {
    if inner == 0 || dims.iter().any(|&(n, _)| n == 0) {
        return Ok(0);
    }
    let overflow = || AttnError::SizeOverflow { tensor };
    let mut last = inner - 1;
    for &(n, s) in dims {
        let step = (n - 1).checked_mul(s).ok_or_else(overflow)?;
        last = last.checked_add(step).ok_or_else(overflow)?;
    }
    last.checked_add(1).ok_or_else(overflow)
}

fn check_fits(
    tensor: TensorName,
    len: usize,
    dims: &[(usize, usize)],
    inner: usize,
) -> Result<(), AttnError> {
    let needed = reach(tensor, dims, inner)?;
    if needed > len {
        return Err(AttnError::BufferTooSmall { tensor, needed, len });
    }
    Ok(())
}

/// Distinct indices must address distinct memory: sorting the axes by stride, each stride must
/// step past everything the faster axes span.
pub(crate) fn check_no_overlap(
    tensor: TensorName,
    dims: &[(&'static str, usize, usize); 3],
    inner: usize,
) -> Result<(), AttnError> {
    if inner == 0 || dims.iter().any(|&(_, n, _)| n == 0) {
        return Ok(()); // no elements, nothing to overlap
    }
    // A fixed-size copy: validation runs on every call and must not allocate.
    let mut axes = *dims;
    axes.sort_unstable_by_key(|&(_, _, s)| s);
    let mut span = inner;
    let mut span_name = "contiguous last axis";
    for (name, n, s) in axes.into_iter().filter(|a| a.1 > 1) {
        if s < span {
            return Err(AttnError::OverlappingOutput {
                tensor,
                detail: format!("{name} stride {s} is smaller than the {span} elements the {span_name} spans"),
            });
        }
        span = (n - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(span))
            .ok_or(AttnError::SizeOverflow { tensor })?;
        span_name = name;
    }
    Ok(())
}

fn dims4(heads: usize, seq: usize, batch: usize, st: &Strides) -> [(usize, usize); 3] {
    [(batch, st.batch), (heads, st.head), (seq, st.seq)]
}

/// [`dims4`] of a Q or out tensor: padded, or packed tokens `0..cu[batch]` when `cu` is a
/// validated `cu_seqlens_q` (the batch stride is then unused).
fn row_dims(heads: usize, seq: usize, batch: usize, st: &Strides, cu: Option<&[i32]>) -> [(usize, usize); 3] {
    match cu {
        None => dims4(heads, seq, batch, st),
        Some(cu) => [(1, 0), (heads, st.head), (cu[cu.len() - 1] as usize, st.seq)],
    }
}

/// Rotary tables against the call: the tables' own shape, a score that reads Q as the kernels
/// pack it, and every present row's position `i + kv_len - q_len` in `0..positions`.
fn validate_rope(s: &AttentionShape, params: &AttentionParams<'_>, rope: &crate::rope::Rope<'_>) -> Result<(), AttnError> {
    rope.validate(s.head_dim)?;
    if !matches!(params.score, Score::ScaledDot | Score::Dot | Score::Cosine { .. }) {
        return Err(AttnError::UnsupportedScore { score: params.score.name(), operation: "rope (Q is rotated as the dot kernels pack it)" });
    }
    let positions = rope.positions();
    for b in 0..s.batch {
        let (q_len, kv_len) = (params.q_len(b, s.seq_q), params.kv_len(b, s.seq_kv));
        if q_len == 0 {
            continue;
        }
        if kv_len < q_len {
            return Err(AttnError::InvalidRope { detail: format!("sequence {b} has {q_len} query rows but {kv_len} keys: its first row would sit at a negative position") });
        }
        if kv_len > positions {
            return Err(AttnError::InvalidRope { detail: format!("sequence {b}'s last row sits at position {} but the tables hold {positions}", kv_len - 1) });
        }
        rope.check_rows(kv_len - q_len..kv_len)?;
    }
    Ok(())
}

/// A `cu_seqlens` array: `batch + 1` entries, from a non-negative start, non-decreasing, each
/// segment at most `max` (`max_name`) long.
pub(crate) fn validate_cu_seqlens(arg: &'static str, cu: &[i32], batch: usize, max: usize, max_name: &str) -> Result<(), AttnError> {
    let expected = batch.checked_add(1).ok_or(AttnError::SizeOverflow { tensor: TensorName::Q })?;
    check_len(arg, expected, cu.len())?;
    if cu[0] < 0 {
        return Err(AttnError::InvalidSeqlens { arg, index: 0, detail: format!("{} is negative", cu[0]) });
    }
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(AttnError::InvalidSeqlens { arg, index: b + 1, detail: format!("{} is below the entry before it ({})", w[1], w[0]) });
        }
        let len = (w[1] - w[0]) as usize;
        if len > max {
            return Err(AttnError::InvalidSeqlens { arg, index: b + 1, detail: format!("sequence {b} has {len} tokens, more than {max_name} = {max}") });
        }
    }
    Ok(())
}

fn check_len(arg: &'static str, expected: usize, got: usize) -> Result<(), AttnError> {
    if expected != got {
        return Err(AttnError::WrongLength { arg, expected, got });
    }
    Ok(())
}

/// Shape, input tensors and options. Returns the scale to use.
/// Q is given as its slice length and strides; K and V are checked by their layout's own
/// function ([`validate_kv_tensors`], `kv::validate_paged`) after this.
pub(crate) fn validate_inputs(shape: &AttentionShape, q: (usize, Strides), params: &AttentionParams<'_>) -> Result<f32, AttnError> {
    let s = shape;
    for (dim, n) in [
        ("head_dim", s.head_dim),
        ("v_head_dim", s.v_head_dim),
        ("q_heads", s.q_heads),
        ("kv_heads", s.kv_heads),
    ] {
        if n == 0 {
            return Err(AttnError::ZeroDim { dim });
        }
    }
    if !s.q_heads.is_multiple_of(s.kv_heads) {
        return Err(AttnError::HeadsNotDivisible { q_heads: s.q_heads, kv_heads: s.kv_heads });
    }
    validate_score(s, params)?;
    if let Some(cu) = params.cu_seqlens_q {
        validate_cu_seqlens("cu_seqlens_q", cu, s.batch, s.seq_q, "seq_q")?;
        if params.bias.is_some() {
            return Err(AttnError::Unsupported { what: "bias with packed variable-length queries (cu_seqlens_q)" });
        }
        if !matches!(params.score, Score::ScaledDot | Score::Dot) {
            return Err(AttnError::UnsupportedScore { score: params.score.name(), operation: "packed variable-length queries (cu_seqlens_q)" });
        }
    }
    if let Some(cu) = params.cu_seqlens_k {
        validate_cu_seqlens("cu_seqlens_k", cu, s.batch, s.seq_kv, "seq_kv")?;
    }
    let q_dim = params.score.q_dim(s.head_dim);
    check_fits(TensorName::Q, q.0, &row_dims(s.q_heads, s.seq_q, s.batch, &q.1, params.cu_seqlens_q), q_dim)?;

    let scale = params.effective_scale(s.head_dim);
    if !scale.is_finite() {
        return Err(AttnError::NonFiniteScale { scale });
    }
    if let Some(c) = params.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(AttnError::InvalidSoftcap { softcap: c });
        }
    }
    if let Some(lens) = params.kv_lens {
        check_len("kv_lens", s.batch, lens.len())?;
        // With packed keys, `kv_lens` (as `seqused_k`) may use part of each segment only.
        let cap = |b: usize| params.cu_seqlens_k.map_or(s.seq_kv, |cu| (cu[b + 1] - cu[b]) as usize);
        if let Some((batch, &kv_len)) = lens.iter().enumerate().find(|&(b, &l)| l > cap(b)) {
            return Err(AttnError::KvLenOutOfRange { batch, kv_len, seq_kv: cap(batch) });
        }
    }
    if let Some(bias) = &params.bias {
        validate_bias(s, bias)?;
    }
    if let Some(rope) = &params.rope {
        validate_rope(s, params, rope)?;
    }
    if let Some(slopes) = params.alibi_slopes {
        check_len("alibi_slopes", s.q_heads, slopes.len())?;
        if let Some((index, &value)) = slopes.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(AttnError::InvalidValue { arg: "alibi_slopes", index, value, allowed: "finite" });
        }
    }
    if let Some(sinks) = params.sinks {
        check_len("sinks", s.q_heads, sinks.len())?;
        if let Some((index, &value)) =
            sinks.iter().enumerate().find(|(_, x)| x.is_nan() || **x == f32::INFINITY)
        {
            return Err(AttnError::InvalidValue {
                arg: "sinks",
                index,
                value,
                allowed: "finite or -inf",
            });
        }
    }
    Ok(scale)
}

/// The shape with its K and V row widths counted in storage units of `TK` and `TV` (values for
/// every type but a block format: [`crate::BlockQ8_0`] rows are `head_dim / 32` blocks), the unit
/// the caller's strides and slice lengths count; a width that is not whole blocks is an error.
pub(crate) fn kv_units<TK: crate::element::Element, TV: crate::element::Element>(shape: &AttentionShape) -> Result<AttentionShape, AttnError> {
    let (bk, bv) = (TK::BLOCK, TV::BLOCK);
    if !shape.head_dim.is_multiple_of(bk) {
        return Err(AttnError::Unsupported { what: "a q8_0 K cache with head_dim not a multiple of 32 (its rows are whole 32-value blocks)" });
    }
    if !shape.v_head_dim.is_multiple_of(bv) {
        return Err(AttnError::Unsupported { what: "a q8_0 V cache with v_head_dim not a multiple of 32 (its rows are whole 32-value blocks)" });
    }
    Ok(AttentionShape { head_dim: shape.head_dim / bk, v_head_dim: shape.v_head_dim / bv, ..*shape })
}

/// K and V as strided tensors (slice length and strides each) hold every row the shape reaches.
pub(crate) fn validate_kv_tensors(shape: &AttentionShape, k: (usize, Strides), v: (usize, Strides)) -> Result<(), AttnError> {
    let s = shape;
    check_fits(TensorName::K, k.0, &dims4(s.kv_heads, s.seq_kv, s.batch, &k.1), s.head_dim)?;
    check_fits(TensorName::V, v.0, &dims4(s.kv_heads, s.seq_kv, s.batch, &v.1), s.v_head_dim)
}

/// The score function's own arguments: lengths against the shape, finite weights, and no
/// `scale` where the score has its own scaling.
fn validate_score(s: &AttentionShape, params: &AttentionParams<'_>) -> Result<(), AttnError> {
    let bad = |detail: String| Err(AttnError::InvalidScore { detail });
    let finite = |arg: &'static str, w: &[f32]| match w.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(AttnError::InvalidValue { arg, index, value: w[index], allowed: "finite" }),
        None => Ok(()),
    };
    let sized = |arg: &'static str, w: &[f32], rows: usize, cols: usize| {
        let expected = rows.checked_mul(cols).ok_or(AttnError::SizeOverflow { tensor: TensorName::Q })?;
        check_len(arg, expected, w.len())?;
        finite(arg, w)
    };
    let score = params.score;
    if score != Score::ScaledDot && params.scale.is_some() {
        return bad(format!("`scale` applies to scaled_dot only; the {} score has its own scaling", score.name()));
    }
    match score {
        Score::ScaledDot | Score::Dot => Ok(()),
        Score::Cosine { temperature } if !temperature.is_finite() => {
            bad(format!("cosine temperature must be finite, got {temperature}"))
        }
        Score::Cosine { .. } => Ok(()),
        Score::General { w, q_dim } => {
            if q_dim == 0 {
                return Err(AttnError::ZeroDim { dim: "q_dim" });
            }
            sized("general w [q_dim, head_dim]", w, q_dim, s.head_dim)
        }
        Score::Additive { v, projection } => {
            if v.is_empty() {
                return Err(AttnError::ZeroDim { dim: "additive attention dim (v.len())" });
            }
            finite("additive v", v)?;
            match projection {
                None if s.head_dim != v.len() => bad(format!(
                    "additive without projection scores q' and k' directly: head_dim ({}) must equal v.len() ({})",
                    s.head_dim,
                    v.len()
                )),
                None => Ok(()),
                Some(pr) => {
                    if pr.q_dim == 0 {
                        return Err(AttnError::ZeroDim { dim: "q_dim" });
                    }
                    sized("additive w_q [A, q_dim]", pr.w_q, v.len(), pr.q_dim)?;
                    sized("additive w_k [A, head_dim]", pr.w_k, v.len(), s.head_dim)
                }
            }
        }
    }
}

/// The bias fits its slice, and every entry it reaches is finite or `-inf` (a mask). NaN and
/// `+inf` have no meaning as a logit offset (`+inf` would make a row's softmax `inf / inf`), so
/// they are rejected here, once, rather than left for each path's arithmetic to decide. The
/// scan reads each reachable row once (a broadcast axis once), as the kernels do.
fn validate_bias(s: &AttentionShape, bias: &BiasRef<'_>) -> Result<(), AttnError> {
    let st = &bias.strides;
    let dims = [(s.batch, st.batch), (s.q_heads, st.head), (s.seq_q, st.row)];
    check_fits(TensorName::Bias, bias.data.len(), &dims, s.seq_kv)?;
    if s.seq_kv == 0 || dims.iter().any(|&(n, _)| n == 0) {
        return Ok(());
    }
    // Zero-stride axes are scanned at index 0 only.
    let [nb, nh, ni] = dims.map(|(n, stride)| if stride == 0 { 1 } else { n });
    for b in 0..nb {
        for h in 0..nh {
            for i in 0..ni {
                let o = b * st.batch + h * st.head + i * st.row;
                let row = &bias.data[o..o + s.seq_kv];
                // A branch-free integer test first (it vectorises: all exponent bits set and
                // not -inf's pattern); the position is looked up only when something is off.
                let bad = |x: &f32| {
                    let b = x.to_bits();
                    u32::from((b & 0x7f80_0000 == 0x7f80_0000) & (b != 0xff80_0000))
                };
                if row.iter().map(bad).fold(0, |a, x| a | x) == 0 {
                    continue;
                }
                if let Some(j) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(AttnError::InvalidValue { arg: "bias", index: o + j, value: row[j], allowed: "finite or -inf" });
                }
            }
        }
    }
    Ok(())
}

/// The output tensor and the optional LSE buffer (`[B, Hq, Sq]`, contiguous; `[Hq, tokens]`
/// for packed queries). `out` is the output's slice length and strides; `cu` the call's
/// validated `cu_seqlens_q`.
pub(crate) fn validate_outputs(shape: &AttentionShape, out: (usize, Strides), lse: Option<&[f32]>, cu: Option<&[i32]>) -> Result<(), AttnError> {
    let s = shape;
    let st = &out.1;
    let dims = row_dims(s.q_heads, s.seq_q, s.batch, st, cu);
    check_fits(TensorName::Out, out.0, &dims, s.v_head_dim)?;
    let [(nb, sb), (nh, sh), (ns, ss)] = dims;
    check_no_overlap(TensorName::Out, &[("batch", nb, sb), ("head", nh, sh), ("seq", ns, ss)], s.v_head_dim)?;
    if let Some(lse) = lse {
        let needed = nb
            .checked_mul(nh)
            .and_then(|x| x.checked_mul(ns))
            .ok_or(AttnError::SizeOverflow { tensor: TensorName::Lse })?;
        if lse.len() < needed {
            return Err(AttnError::BufferTooSmall { tensor: TensorName::Lse, needed, len: lse.len() });
        }
    }
    Ok(())
}
