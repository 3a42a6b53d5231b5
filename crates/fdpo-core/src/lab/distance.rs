//! How far one policy is from another over a finite response set, and how
//! to read a frontier at a given reward: the measures of `fdpo sweep`'s
//! question (is a divergence's diversity a property of its optimum π*, or of
//! a policy that has not reached it?).

use crate::{CompensatedSum, Divergence};

/// KL(p‖q) = Σ p·log(p/q) of two normalised distributions given as logs
/// (the reverse-KL divergence term, so that one formula serves both).
///
/// ```
/// let (p, q) = ([0.5f64.ln(), 0.5f64.ln()], [0.25f64.ln(), 0.75f64.ln()]);
/// let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
/// assert!((fdpo_core::lab::distance::kl(&p, &q) - want).abs() < 1e-15);
/// ```
pub fn kl(log_p: &[f64], log_q: &[f64]) -> f64 {
    assert_eq!(log_p.len(), log_q.len(), "two distributions over one response set");
    let mut sum = CompensatedSum::default();
    for (&lp, &lq) in log_p.iter().zip(log_q) {
        sum.add(Divergence::ReverseKl.divergence_term(lp, lq));
    }
    sum.total()
}

/// Total variation ½·Σ|p − q| of two distributions given as logs.
///
/// ```
/// let (p, q) = ([0.5f64.ln(), 0.5f64.ln()], [0.25f64.ln(), 0.75f64.ln()]);
/// assert!((fdpo_core::lab::distance::total_variation(&p, &q) - 0.25).abs() < 1e-15);
/// ```
pub fn total_variation(log_p: &[f64], log_q: &[f64]) -> f64 {
    assert_eq!(log_p.len(), log_q.len(), "two distributions over one response set");
    let mut sum = CompensatedSum::default();
    for (&lp, &lq) in log_p.iter().zip(log_q) {
        sum.add((lp.exp() - lq.exp()).abs());
    }
    0.5 * sum.total()
}

/// The y of a curve at `x`, linearly interpolated between the two points
/// whose x bracket it; `None` outside the curve's x range. The points may
/// come in any order (a frontier is monotone in reward, so reading entropy
/// at a reward is well defined); non-finite points are ignored.
///
/// ```
/// use fdpo_core::lab::distance::interpolate;
/// let curve = [(2.0, 1.0), (0.0, 5.0), (1.0, 3.0)];
/// assert_eq!(interpolate(&curve, 1.5), Some(2.0));
/// assert_eq!(interpolate(&curve, 2.5), None);
/// ```
pub fn interpolate(points: &[(f64, f64)], x: f64) -> Option<f64> {
    let mut sorted: Vec<(f64, f64)> =
        points.iter().copied().filter(|(a, b)| a.is_finite() && b.is_finite()).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (first, last) = (sorted.first()?, sorted.last()?);
    if !(first.0..=last.0).contains(&x) {
        return None;
    }
    let i = sorted.partition_point(|p| p.0 < x);
    if sorted[i].0 == x {
        return Some(sorted[i].1);
    }
    let ((x0, y0), (x1, y1)) = (sorted[i - 1], sorted[i]);
    Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{normalise_ref_logprobs, Instance};

    /// KL and total variation against their definitions on random
    /// distributions, written out with plain probabilities; both vanish for
    /// a distribution against itself, and TV is symmetric while KL is not.
    #[test]
    fn distances_match_their_definitions() {
        let inst = Instance::random(11, 2, 40);
        let (p, q) = (&inst.prompts[0].ref_logprobs, &inst.prompts[1].ref_logprobs);
        let kl_direct: f64 = p.iter().zip(q).map(|(a, b)| a.exp() * (a - b)).sum();
        let tv_direct: f64 = 0.5 * p.iter().zip(q).map(|(a, b)| (a.exp() - b.exp()).abs()).sum::<f64>();
        assert!((kl(p, q) - kl_direct).abs() < 1e-12, "{} vs {kl_direct}", kl(p, q));
        assert!((total_variation(p, q) - tv_direct).abs() < 1e-12);
        assert!((total_variation(p, q) - total_variation(q, p)).abs() < 1e-15);
        assert!((kl(p, q) - kl(q, p)).abs() > 1e-3, "KL is not symmetric on these");
        assert!(kl(p, p).abs() < 1e-15 && total_variation(p, p) == 0.0);
        // Pinsker: TV ≤ sqrt(KL / 2).
        assert!(total_variation(p, q) <= (kl(p, q) / 2.0).sqrt());
    }

    /// A response the policy gives no mass costs nothing in KL(p‖q); one q
    /// gives no mass makes KL(p‖q) infinite.
    #[test]
    fn kl_handles_zero_mass() {
        let (p, _) = normalise_ref_logprobs(&[0.0, f64::NEG_INFINITY]).unwrap();
        let (q, _) = normalise_ref_logprobs(&[0.0, 0.0]).unwrap();
        assert!((kl(&p, &q) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(kl(&q, &p), f64::INFINITY);
    }

    #[test]
    fn interpolation_reads_between_points_and_refuses_outside() {
        let curve = [(0.0, 0.0), (1.0, 10.0), (3.0, 12.0), (f64::NAN, 1.0)];
        assert_eq!(interpolate(&curve, 0.0), Some(0.0));
        assert_eq!(interpolate(&curve, 0.25), Some(2.5));
        assert_eq!(interpolate(&curve, 2.0), Some(11.0));
        assert_eq!(interpolate(&curve, 3.0), Some(12.0));
        assert_eq!(interpolate(&curve, -0.1), None);
        assert_eq!(interpolate(&[], 0.0), None);
    }
}
