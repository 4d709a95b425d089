//! The online-softmax state of one query row, shared by every kernel's final step.

/// Running max and running sum of one row. Starting from the sink (a virtual key with logit
/// `sink` and a zero value) folds the sink into the denominator for free: `m = sink, l = 1`;
/// with no sink `m = -inf, l = 0`, which is the empty row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RowState {
    pub max: f32,
    pub sum: f32,
}

impl RowState {
    #[inline(always)]
    pub fn start(sink: f32) -> Self {
        if sink == f32::NEG_INFINITY {
            Self { max: f32::NEG_INFINITY, sum: 0.0 }
        } else {
            Self { max: sink, sum: 1.0 }
        }
    }

    /// The factor that scales 1 / `sum` into the output, and the row's LSE. A row that saw
    /// nothing (no visible key, no sink) has `sum == 0`: the factor 0 zeroes its output and
    /// its LSE is `-inf`, never NaN.
    #[inline(always)]
    pub fn finish(&self) -> (f32, f32) {
        if self.sum > 0.0 {
            (1.0 / self.sum, self.max + self.sum.ln())
        } else {
            (0.0, f32::NEG_INFINITY)
        }
    }
}
