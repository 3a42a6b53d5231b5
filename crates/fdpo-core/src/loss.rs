//! The f-DPO loss on one preference pair, in f64 (Wang et al. 2024,
//! Theorem 1; docs/DESIGN.md §1): with h = f'(u_w) − f'(u_l) computed
//! stably from ℓ = log π − log π_ref of the chosen (w) and rejected (l)
//! responses,
//!
//! - `sigmoid` (DPO): −(1−ε)·log σ(βh) − ε·log σ(−βh) (ε = label smoothing);
//! - `robust` (Chowdhury et al. 2024): (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε);
//! - `hinge`: max(0, 1 − βh);
//! - `ipo`: (h − 1/(2β))².
//!
//! Every one is a function of the chosen − rejected difference h, so any
//! admissible divergence may be used with it (constants of f' cancel).
//! This scalar form is the reference the tensor loss in fdpo-train is
//! tested against, element by element.

use std::fmt;
use std::str::FromStr;

use crate::Divergence;

/// Exponents in the α/forward-KL and χPO differences are capped here, so
/// that the loss and its gradient stay finite in f32 for |ℓ| up to 1e4:
/// e^30 ≈ 1e13, so even IPO's square of h/α (α ≥ 1e-4) stays below f32's
/// 3.4e38. Beyond the cap the loss is flat in that exponent (a ratio
/// π/π_ref of e^30 is far outside any sensible training regime).
pub const EXPONENT_CAP: f64 = 30.0;

/// A preference loss built on the chosen − rejected difference (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossType {
    /// DPO's logistic loss.
    Sigmoid,
    /// Hinge (SLiC).
    Hinge,
    /// IPO's squared loss.
    Ipo,
    /// Robust DPO (unbiased under label noise ε).
    Robust,
}

impl LossType {
    /// TRL's name.
    pub fn name(&self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::Robust => "robust",
        }
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = String;

    /// `sigmoid`, `hinge`, `ipo`, `robust`; TRL's other loss types are not
    /// chosen − rejected differences of f' and are refused with the reason.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sigmoid" => Ok(LossType::Sigmoid),
            "hinge" => Ok(LossType::Hinge),
            "ipo" => Ok(LossType::Ipo),
            "robust" => Ok(LossType::Robust),
            "exo_pair" | "nca_pair" | "bco_pair" | "sppo_hard" | "aot" | "aot_pair" | "apo_zero"
            | "apo_down" | "discopop" | "sft" => Err(format!(
                "loss_type `{s}` is not supported: fdpo's losses are functions of the chosen − rejected \
                 difference f'(u_w) − f'(u_l), which is what lets any f-divergence replace reverse KL \
                 (constants of f' cancel); use sigmoid, hinge, ipo or robust"
            )),
            other => Err(format!("unknown loss_type `{other}` (sigmoid, hinge, ipo, robust)")),
        }
    }
}

/// e^x with x capped at [`EXPONENT_CAP`].
fn capped_exp(x: f64) -> f64 {
    x.min(EXPONENT_CAP).exp()
}

/// log σ(x), stably.
fn log_sigmoid(x: f64) -> f64 {
    -crate::softplus(-x)
}

/// h = f'(u_w) − f'(u_l) from ℓ_w, ℓ_l in the stable forms of DESIGN.md §1
/// (exponents capped at [`EXPONENT_CAP`]); equals
/// `d.f_prime_of_log(l_w) - d.f_prime_of_log(l_l)` wherever neither
/// exponent reaches the cap.
///
/// ```
/// use fdpo_core::{loss::f_prime_difference, Divergence};
/// let d = Divergence::Alpha { alpha: 0.5 };
/// let want = d.f_prime_of_log(0.3) - d.f_prime_of_log(-0.2);
/// assert!((f_prime_difference(d, 0.3, -0.2) - want).abs() < 1e-14);
/// ```
pub fn f_prime_difference(d: Divergence, l_w: f64, l_l: f64) -> f64 {
    match d {
        Divergence::ReverseKl => l_w - l_l,
        Divergence::JensenShannon => log_sigmoid(l_w) - log_sigmoid(l_l),
        Divergence::ForwardKl => capped_exp(-l_l) - capped_exp(-l_w),
        Divergence::Alpha { alpha } => (capped_exp(-alpha * l_l) - capped_exp(-alpha * l_w)) / alpha,
        Divergence::ChiPo => (capped_exp(l_w) - capped_exp(l_l)) + (l_w - l_l),
    }
}

/// The loss of one pair (see the module comment); `label_smoothing` is ε
/// for `sigmoid` and `robust` (ignored by the others).
pub fn pair_loss(d: Divergence, loss: LossType, beta: f64, label_smoothing: f64, l_w: f64, l_l: f64) -> f64 {
    let h = f_prime_difference(d, l_w, l_l);
    let eps = label_smoothing;
    match loss {
        LossType::Sigmoid => -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
        LossType::Robust => {
            (-(1.0 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
        }
        LossType::Hinge => (1.0 - beta * h).max(0.0),
        LossType::Ipo => (h - 1.0 / (2.0 * beta)).powi(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Divergence> {
        ["rkl", "fkl", "alpha:0.3", "alpha:0.7", "js", "chi-po"].iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn difference_matches_f_prime_below_the_cap() {
        for d in all() {
            for &(w, l) in &[(0.3, -0.2), (-2.0, 1.5), (5.0, 4.0), (-10.0, -12.0)] {
                let want = d.f_prime_of_log(w) - d.f_prime_of_log(l);
                let got = f_prime_difference(d, w, l);
                assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{d} ({w}, {l}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn dpo_sigmoid_is_the_familiar_formula() {
        // Reverse KL, no smoothing: −log σ(β(ℓ_w − ℓ_l)).
        let got = pair_loss(Divergence::ReverseKl, LossType::Sigmoid, 0.1, 0.0, 2.0, -1.0);
        let want = (1.0 + (-0.1f64 * 3.0).exp()).ln();
        assert!((got - want).abs() < 1e-15);
        // IPO at the target margin 1/(2β) is 0; hinge beyond margin 1/β is 0.
        assert!(pair_loss(Divergence::ReverseKl, LossType::Ipo, 0.5, 0.0, 1.0, 0.0).abs() < 1e-15);
        assert_eq!(pair_loss(Divergence::ReverseKl, LossType::Hinge, 0.5, 0.0, 3.0, 0.0), 0.0);
    }

    #[test]
    fn extreme_log_ratios_stay_finite() {
        for d in all() {
            for loss in [LossType::Sigmoid, LossType::Robust, LossType::Hinge, LossType::Ipo] {
                for &(w, l) in &[(1e4, -1e4), (-1e4, 1e4), (1e4, 1e4), (-1e4, -1e4)] {
                    let v = pair_loss(d, loss, 0.1, 0.1, w, l);
                    assert!(v.is_finite(), "{d} {loss} ({w}, {l}): {v}");
                }
            }
        }
    }

    #[test]
    fn parses_trl_names_and_refuses_others_with_the_reason() {
        assert_eq!("ipo".parse::<LossType>(), Ok(LossType::Ipo));
        let err = "nca_pair".parse::<LossType>().unwrap_err();
        assert!(err.contains("chosen − rejected difference"), "{err}");
        assert!("foo".parse::<LossType>().unwrap_err().contains("unknown"));
    }
}
