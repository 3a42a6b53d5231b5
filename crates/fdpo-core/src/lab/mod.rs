//! The exact lab: experiments built on [`crate::solve_prompt`], averaged over
//! the prompts of an [`crate::Instance`].
//!
//! - [`frontier`]: reward and entropy of π* along a β grid, per divergence
//!   (the exact version of Wang et al.'s Figure 3);
//! - [`gap`]: the performance gap J(π*) − J(π̂) when the reward is estimated
//!   with error, beside the essay's bound E_π*[exp(ε/β)·ε];
//! - [`coverage`]: the gap when r̂ is fitted from n Bradley–Terry pairs drawn
//!   from a data policy μ, and its iterative (online) variant;
//! - [`mixture`]: arithmetic and geometric mixtures of policies;
//! - [`distance`]: KL and total variation between policies, and reading a
//!   frontier at a given reward.
//!
//! J(π) is the essay's eq. (9): the expected true reward E_π[r]. The
//! regularised objective E_π[r] − β·D_f is reported beside it.

pub mod coverage;
pub mod distance;
pub mod frontier;
pub mod gap;
pub mod mixture;

use crate::{solve_prompt, Divergence, Instance, PromptSolution, SolveError};

/// π* for every prompt of an instance, and the means over prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSolution {
    /// Per prompt, in instance order.
    pub prompts: Vec<PromptSolution>,
    /// Mean of E_π*[r].
    pub reward: f64,
    /// Mean entropy H(π*).
    pub entropy: f64,
    /// Mean D_f(π*‖π_ref).
    pub divergence_value: f64,
    /// Mean objective.
    pub objective: f64,
}

/// Solves every prompt of `instance`; errors name the prompt.
///
/// ```
/// use fdpo_core::{lab::solve_instance, Divergence, Instance};
/// let sol = solve_instance(&Instance::random(0, 4, 8), Divergence::ForwardKl, 0.5).unwrap();
/// assert_eq!(sol.prompts.len(), 4);
/// ```
pub fn solve_instance(
    instance: &Instance,
    divergence: Divergence,
    beta: f64,
) -> Result<InstanceSolution, LabError> {
    let prompts = instance
        .prompts
        .iter()
        .map(|p| {
            solve_prompt(divergence, beta, &p.ref_logprobs, &p.rewards)
                .map_err(|source| LabError::Prompt { id: p.id.clone(), source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mean =
        |f: fn(&PromptSolution) -> f64| prompts.iter().map(f).sum::<f64>() / prompts.len().max(1) as f64;
    Ok(InstanceSolution {
        reward: mean(|s| s.reward),
        entropy: mean(|s| s.entropy),
        divergence_value: mean(|s| s.divergence_value),
        objective: mean(|s| s.objective),
        prompts,
    })
}

/// An error in a lab run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabError {
    /// A prompt could not be solved. The message names the prompt only: the
    /// reason is the error's `source()`, which error reporters (anyhow's
    /// `{:#}`) print after it; putting it in the message too printed it twice.
    #[error("prompt `{id}`")]
    Prompt {
        /// The prompt's id.
        id: String,
        /// Why.
        source: SolveError,
    },
    /// An option is out of range.
    #[error("{0}")]
    Option(String),
}

/// Mean of E_π_ref[r] and H(π_ref) over prompts: the reference point.
pub fn reference_point(instance: &Instance) -> (f64, f64) {
    let n = instance.prompts.len().max(1) as f64;
    let (mut reward, mut entropy) = (0.0, 0.0);
    for p in &instance.prompts {
        for (lq, r) in p.ref_logprobs.iter().zip(&p.rewards) {
            let q = lq.exp();
            if q > 0.0 {
                reward += q * r;
                entropy -= q * lq;
            }
        }
    }
    (reward / n, entropy / n)
}

/// `count` values log-spaced from `lo` to `hi` inclusive.
///
/// ```
/// let g = fdpo_core::lab::log_grid(0.01, 100.0, 5);
/// assert!((g[2] - 1.0).abs() < 1e-12 && (g[4] - 100.0).abs() < 1e-9);
/// ```
pub fn log_grid(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    if count <= 1 {
        return vec![lo];
    }
    let (a, b) = (lo.ln(), hi.ln());
    (0..count).map(|i| (a + (b - a) * i as f64 / (count - 1) as f64).exp()).collect()
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// An error reporter prints the message, then each source: the reason
    /// must appear once ("prompt `p0`: beta …", not "… got 0: beta … got 0").
    #[test]
    fn prompt_errors_give_their_reason_once_in_the_chain() {
        let e = LabError::Prompt { id: "p0".into(), source: SolveError::BadBeta(0.0) };
        let chain = format!("{e}: {}", e.source().unwrap());
        assert_eq!(chain, "prompt `p0`: beta must be finite and > 0, got 0");
    }
}
