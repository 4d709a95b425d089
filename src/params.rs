//! The options of one attention call, all combinable.

use crate::layout::BiasRef;

/// A sliding window around each query's aligned position `i + off` (see [`AttentionParams`]):
/// key `j` is visible iff `i + off - left <= j <= i + off + right`. `None` leaves that side
/// unbounded. `Window { left: Some(w - 1), right: Some(0) }` is the usual causal window of
/// `w` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

/// The score function `e = f(q, k)` that feeds the softmax. Every one runs fused with the same
/// online softmax, masks, terms and weighted sum over V, in every storage type.
///
/// All weights are shared by every head, row-major, f32, and must be finite.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Score<'a> {
    /// `e = scale * (q . k)`, `scale` from [`AttentionParams::scale`] (default
    /// `1 / sqrt(head_dim)`): the Transformer's score.
    #[default]
    ScaledDot,
    /// `e = q . k`, unscaled (Luong's "dot").
    Dot,
    /// Content-based (Graves): `e = temperature * (q . k) / (max(|q|, eps) * max(|k|, eps))`
    /// with `eps =` [`COSINE_EPS`], so a zero vector scores 0, never NaN. The norms are computed
    /// once per row and once per key (in f64), not per pair.
    Cosine { temperature: f32 },
    /// Multiplicative (Luong's "general"): `e = q^T W k` with `w` of `[q_dim, head_dim]`. Q has
    /// `q_dim` columns (the decoder state need not be as wide as the keys); it is projected
    /// once per call (`q' = W^T q`) and the dot kernel runs on `q'`.
    General { w: &'a [f32], q_dim: usize },
    /// Additive (Bahdanau): `e = sum_a v_a tanh(q'_a + k'_a)` over the attention dim
    /// `A = v.len()`. Without `projection`, Q and K *are* `q'` and `k'` (`head_dim == A`);
    /// with it, `q' = W_q q` and `k' = W_k k` are computed once per call.
    Additive { v: &'a [f32], projection: Option<AdditiveProjection<'a>> },
}

/// The projections of [`Score::Additive`]: `w_q` is `[A, q_dim]`, `w_k` is `[A, head_dim]`, and Q
/// has `q_dim` columns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdditiveProjection<'a> {
    pub w_q: &'a [f32],
    pub w_k: &'a [f32],
    pub q_dim: usize,
}

/// The `eps` of [`Score::Cosine`], as in PyTorch's `cosine_similarity`.
pub const COSINE_EPS: f64 = 1e-8;

impl Score<'_> {
    /// Columns of the Q tensor under this score for keys of `head_dim` columns.
    pub fn q_dim(&self, head_dim: usize) -> usize {
        match *self {
            Score::General { q_dim, .. } => q_dim,
            Score::Additive { projection: Some(pr), .. } => pr.q_dim,
            _ => head_dim,
        }
    }

    /// A short name: `scaled_dot`, `dot`, `cosine`, `general`, `additive`.
    pub fn name(&self) -> &'static str {
        match self {
            Score::ScaledDot => "scaled_dot",
            Score::Dot => "dot",
            Score::Cosine { .. } => "cosine",
            Score::General { .. } => "general",
            Score::Additive { .. } => "additive",
        }
    }
}

/// Everything about an attention call besides the tensors.
///
/// For batch `b`, query head `h`, query row `i` and key `j`, with
/// `kv_len = kv_lens[b]` (or `seq_kv`) and `off = kv_len - seq_q` (may be negative):
///
/// 1. `s = f(q_i, k_j)`, the [`Score`] function (default `scale * (q_i . k_j)`)
/// 2. `s = softcap * tanh(s / softcap)` if `softcap` is set
/// 3. `s += bias[b, h, i, j] + alibi_slopes[h] * (j - (i + off))` for the options set
/// 4. key `j` is *visible* iff `j < kv_len`, and (if `causal`) `j <= i + off`, and it lies
///    inside `window`; invisible keys, and keys whose `s` is `-inf`, get weight 0
/// 5. `p_j = exp(s_j - m) / (sum_visible exp(s_j - m) + exp(sink_h - m))`, the sink term only
///    when `sinks` is set; `out_i = sum_j p_j v_j`, `lse_i = m + ln(denominator)`.
///
/// A row with nothing visible (and no finite sink) gets an all-zero output row and
/// `lse = -inf`; it is never NaN.
///
/// Causal masking is aligned to the **bottom right** (`off = kv_len - seq_q`): the last query
/// row sees every key, which is what decoding or chunked prefill against a KV cache needs.
/// Libraries that align top-left (`j <= i`) agree only when `seq_q == kv_len`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionParams<'a> {
    /// Multiplies `q . k` under [`Score::ScaledDot`]; `None` means `1 / sqrt(head_dim)`. Other
    /// scores carry their own scaling and reject this option.
    pub scale: Option<f32>,
    pub causal: bool,
    pub window: Option<Window>,
    /// Valid keys per batch entry (`len == batch`, each `<= seq_kv`); `None` means `seq_kv`.
    pub kv_lens: Option<&'a [usize]>,
    /// Logit soft-capping (Gemma 2, Grok): `s -> c * tanh(s / c)`, before bias and masks.
    pub softcap: Option<f32>,
    /// Additive bias `[B, Hq, Sq, Skv]` with broadcasting strides; `-inf` masks.
    pub bias: Option<BiasRef<'a>>,
    /// ALiBi slope per query head (`len == q_heads`).
    pub alibi_slopes: Option<&'a [f32]>,
    /// Attention-sink logit per query head (`len == q_heads`): a virtual key with a zero
    /// value that only joins the softmax denominator. `-inf` means no sink for that head.
    pub sinks: Option<&'a [f32]>,
    /// The score function; [`Score::ScaledDot`] by default.
    pub score: Score<'a>,
    /// Packed variable-length queries, as `flash_attn_varlen_func`'s `cu_seqlens_q`
    /// (`len == batch + 1`, non-negative, non-decreasing): Q and out hold tokens, and row `i` of
    /// sequence `b` is token `cu_seqlens_q[b] + i` (their strides' `seq` steps between tokens,
    /// `head` between heads; `batch` is not used). Sequence `b` has
    /// `q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b] <= seq_q` rows and its own bottom-right
    /// alignment, `off = kv_len - q_len`; the LSE is `[q_heads, cu_seqlens_q[batch]]`. Only the
    /// dot scores, without `bias` or inspection outputs.
    pub cu_seqlens_q: Option<&'a [i32]>,
    /// Packed variable-length keys (`flash_attn_varlen_func`'s `cu_seqlens_k`): K and V hold
    /// tokens, key `j` of sequence `b` is token `cu_seqlens_k[b] + j`, and sequence `b` has
    /// `cu_seqlens_k[b + 1] - cu_seqlens_k[b] <= seq_kv` keys (fewer if `kv_lens` says so,
    /// as `seqused_k`). K and V must be tensors, not a paged pool.
    pub cu_seqlens_k: Option<&'a [i32]>,
    /// Rotary embedding of Q ([`crate::Rope`]): row `i` of sequence `b` is rotated at its
    /// position `i + off` (`off = kv_len - q_len`, so the last row is at `kv_len - 1`: the
    /// positions of a cache's new tokens) as the kernels pack it. Keys are read as stored (an
    /// append rotates them as it writes, see [`crate::attention_with_kvcache`]). Needs
    /// `kv_len >= q_len` for every sequence and a dot or cosine score.
    pub rope: Option<crate::rope::Rope<'a>>,
    /// Dequantization factors of a quantized K/V cache ([`crate::KvScales`]): K and V are
    /// read as `factor * code`. `None`: every factor is 1. Only the dot scores read K through
    /// them (the other scores and KV appends reject a quantized cache).
    pub kv_scales: Option<crate::quant::KvScales<'a>>,
}

/// Entries of segment `b` of a `cu_seqlens` array (0 past its end or where it decreases).
#[inline]
pub(crate) fn segment(cu: &[i32], b: usize) -> usize {
    match (cu.get(b), cu.get(b + 1)) {
        (Some(&lo), Some(&hi)) => usize::try_from(i64::from(hi) - i64::from(lo)).unwrap_or(0),
        _ => 0,
    }
}

impl<'a> AttentionParams<'a> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window = Some(Window { left, right });
        self
    }
    pub fn kv_lens(mut self, kv_lens: &'a [usize]) -> Self {
        self.kv_lens = Some(kv_lens);
        self
    }
    pub fn softcap(mut self, softcap: f32) -> Self {
        self.softcap = Some(softcap);
        self
    }
    pub fn bias(mut self, bias: BiasRef<'a>) -> Self {
        self.bias = Some(bias);
        self
    }
    pub fn alibi_slopes(mut self, slopes: &'a [f32]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn sinks(mut self, sinks: &'a [f32]) -> Self {
        self.sinks = Some(sinks);
        self
    }

    pub fn score(mut self, score: Score<'a>) -> Self {
        self.score = score;
        self
    }
    /// Packed variable-length queries (see [`AttentionParams::cu_seqlens_q`]).
    pub fn cu_seqlens_q(mut self, cu: &'a [i32]) -> Self {
        self.cu_seqlens_q = Some(cu);
        self
    }
    /// Rotary embedding of Q (see [`AttentionParams::rope`]).
    pub fn rope(mut self, rope: crate::rope::Rope<'a>) -> Self {
        self.rope = Some(rope);
        self
    }
    /// Packed variable-length keys (see [`AttentionParams::cu_seqlens_k`]).
    pub fn cu_seqlens_k(mut self, cu: &'a [i32]) -> Self {
        self.cu_seqlens_k = Some(cu);
        self
    }
    /// Dequantization factors of a quantized K/V cache (see [`AttentionParams::kv_scales`]).
    pub fn kv_scales(mut self, k: crate::quant::Dequant<'a>, v: crate::quant::Dequant<'a>) -> Self {
        self.kv_scales = Some(crate::quant::KvScales { k, v });
        self
    }

    /// The keys of sequence `b` (`kv_lens`, else its `cu_seqlens_k` segment, else `seq_kv`);
    /// 0 past the arrays' ends, so unvalidated callers (FLOP counts) never panic.
    #[inline]
    pub(crate) fn kv_len(&self, b: usize, seq_kv: usize) -> usize {
        match (self.kv_lens, self.cu_seqlens_k) {
            (Some(l), _) => l.get(b).copied().unwrap_or(0),
            (None, Some(cu)) => segment(cu, b),
            (None, None) => seq_kv,
        }
    }

    /// The query rows of sequence `b` (its `cu_seqlens_q` segment, else `seq_q`).
    #[inline]
    pub(crate) fn q_len(&self, b: usize, seq_q: usize) -> usize {
        self.cu_seqlens_q.map_or(seq_q, |cu| segment(cu, b))
    }

    /// The factor on `q . k` for a head dim: the scale under [`Score::ScaledDot`], 1 under the
    /// other scores (cosine applies its temperature per row).
    pub fn effective_scale(&self, head_dim: usize) -> f32 {
        match self.score {
            Score::ScaledDot => self.scale.unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt()),
            _ => 1.0,
        }
    }
}
