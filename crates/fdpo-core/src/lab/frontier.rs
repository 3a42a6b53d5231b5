//! Reward–entropy frontier of the exact optimum: for each divergence and each
//! β of a grid, the prompt-averaged E_π*[r] and H(π*). Small β buys reward
//! with entropy; how fast depends on f.

use super::{solve_instance, LabError};
use crate::{Divergence, Instance};

/// One point of the frontier.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FrontierPoint {
    /// The divergence.
    pub divergence: Divergence,
    /// The regularisation strength.
    pub beta: f64,
    /// Mean E_π*[r].
    pub reward: f64,
    /// Mean H(π*) in nats.
    pub entropy: f64,
    /// Mean D_f(π*‖π_ref).
    pub divergence_value: f64,
    /// Mean KL(π*‖π_ref), the common yardstick of every divergence's cost.
    pub kl: f64,
    /// Mean E_π*[r] − β·D_f.
    pub objective: f64,
}

/// The frontier for every (divergence, β) pair, divergence-major.
///
/// ```
/// use fdpo_core::{lab::frontier::frontier, Divergence, Instance};
/// let inst = Instance::random(0, 2, 6);
/// let pts = frontier(&inst, &[Divergence::ReverseKl], &[0.1, 10.0]).unwrap();
/// assert!(pts[0].reward > pts[1].reward && pts[0].entropy < pts[1].entropy);
/// ```
pub fn frontier(
    instance: &Instance,
    divergences: &[Divergence],
    betas: &[f64],
) -> Result<Vec<FrontierPoint>, LabError> {
    let mut out = Vec::with_capacity(divergences.len() * betas.len());
    for &divergence in divergences {
        for &beta in betas {
            let sol = solve_instance(instance, divergence, beta)?;
            let kl = sol
                .prompts
                .iter()
                .zip(&instance.prompts)
                .map(|(s, p)| super::distance::kl(&s.log_policy, &p.ref_logprobs))
                .sum::<f64>()
                / sol.prompts.len().max(1) as f64;
            out.push(FrontierPoint {
                divergence,
                beta,
                reward: sol.reward,
                entropy: sol.entropy,
                divergence_value: sol.divergence_value,
                kl,
                objective: sol.objective,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{log_grid, reference_point};

    /// As β → ∞ every divergence returns π_ref; as β → 0 every divergence
    /// concentrates on the best response (reward → mean of max r).
    #[test]
    fn frontier_ends_are_the_reference_and_the_argmax() {
        let inst = Instance::random(3, 5, 10);
        let (ref_reward, ref_entropy) = reference_point(&inst);
        let best: f64 = inst
            .prompts
            .iter()
            .map(|p| p.rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max))
            .sum::<f64>()
            / 5.0;
        let divs: Vec<Divergence> =
            ["rkl", "fkl", "alpha:0.5", "js", "chi-po"].iter().map(|s| s.parse().unwrap()).collect();
        let pts = frontier(&inst, &divs, &[1e-4, 1e6]).unwrap();
        for pair in pts.chunks(2) {
            let (cold, hot) = (&pair[0], &pair[1]);
            assert!(
                (hot.reward - ref_reward).abs() < 1e-5,
                "{}: {} vs {ref_reward}",
                hot.divergence,
                hot.reward
            );
            assert!((hot.entropy - ref_entropy).abs() < 1e-5);
            assert!((cold.reward - best).abs() < 1e-2, "{}: {} vs best {best}", cold.divergence, cold.reward);
        }
    }

    /// Reward rises and entropy falls monotonically as β shrinks.
    #[test]
    fn frontier_is_monotone_in_beta() {
        let inst = Instance::random(4, 6, 12);
        let betas = log_grid(1e-2, 1e2, 15);
        for d in ["rkl", "fkl", "alpha:0.3", "js", "chi-po"] {
            let pts = frontier(&inst, &[d.parse().unwrap()], &betas).unwrap();
            for w in pts.windows(2) {
                assert!(w[0].reward >= w[1].reward - 1e-12, "{d}: reward not monotone");
            }
        }
    }

    /// For reverse KL the KL column is the divergence itself; for another f
    /// it is a different number, and zero only at π_ref (β → ∞).
    #[test]
    fn kl_column_is_the_reverse_kl_divergence() {
        let inst = Instance::random(5, 4, 16);
        let pts = frontier(&inst, &[Divergence::ReverseKl, Divergence::ForwardKl], &[0.3, 1e7]).unwrap();
        assert!((pts[0].kl - pts[0].divergence_value).abs() < 1e-12, "{pts:?}");
        assert!((pts[2].kl - pts[2].divergence_value).abs() > 1e-3, "{pts:?}");
        assert!(pts[3].kl.abs() < 1e-6 && pts[2].kl > 0.0);
    }
}
