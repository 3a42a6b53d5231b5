//! Compensated (Neumaier) summation, so that sums over a million responses
//! keep ~1e-16 relative accuracy instead of ~1e-10.

/// A running sum with Neumaier's error compensation.
///
/// ```
/// use fdpo_core::CompensatedSum;
/// let mut s = CompensatedSum::default();
/// for x in [1.0, 1e100, 1.0, -1e100] { s.add(x); }
/// assert_eq!(s.total(), 2.0);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CompensatedSum {
    sum: f64,
    compensation: f64,
}

impl CompensatedSum {
    /// Adds one term.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if !t.is_finite() {
            // ±∞ or NaN: the sum is exactly that; no compensation applies.
            self.sum = t;
            return;
        }
        if self.sum.abs() >= x.abs() {
            self.compensation += (self.sum - t) + x;
        } else {
            self.compensation += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// The compensated total.
    pub fn total(&self) -> f64 {
        if !self.sum.is_finite() {
            return self.sum;
        }
        self.sum + self.compensation
    }
}

impl FromIterator<f64> for CompensatedSum {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Self {
        let mut s = CompensatedSum::default();
        for x in iter {
            s.add(x);
        }
        s
    }
}

/// log Σ exp(x_i), ignoring −∞ entries; −∞ for an empty or all −∞ input.
///
/// ```
/// use fdpo_core::log_sum_exp;
/// assert!((log_sum_exp(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-15);
/// assert_eq!(log_sum_exp(&[1000.0, f64::NEG_INFINITY]), 1000.0);
/// ```
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY || !max.is_finite() {
        return max;
    }
    let sum: CompensatedSum = xs.iter().map(|&x| (x - max).exp()).collect();
    max + sum.total().ln()
}
