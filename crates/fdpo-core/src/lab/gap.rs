//! Error propagation: how much true reward is lost when the policy is the
//! exact optimum π̂ for an estimated reward r̂ = r + error instead of π* for r.
//!
//! The essay's bound for reverse KL: J(π*) − J(π̂) ≲ E_π*[exp(ε/β)·ε] with
//! ε = |r − r̂|. The lab computes the exact gap and this bound side by side
//! for every divergence; the bound is computed in log space (it overflows
//! f64 for small β) and reported as log10.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::fmt;
use std::str::FromStr;

use super::{solve_instance, LabError};
use crate::{evaluate_policy, log_sum_exp, Divergence, Instance};

/// How r̂ departs from r.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ErrorModel {
    /// ε ~ N(0, σ²) on every response.
    Gaussian {
        /// Noise scale.
        sigma: f64,
    },
    /// ε ~ N(0, σ²) only on the rarest half of the responses under π_ref
    /// (poorly covered by data drawn from the reference), 0 elsewhere.
    Rare {
        /// Noise scale.
        sigma: f64,
    },
    /// r̂ = r + b·z, z the response's length in words rescaled to [0, 1]
    /// within its prompt: a systematic preference for longer answers.
    LengthBias {
        /// Bias strength b.
        strength: f64,
    },
}

impl fmt::Display for ErrorModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorModel::Gaussian { sigma } => write!(f, "gaussian:{sigma}"),
            ErrorModel::Rare { sigma } => write!(f, "rare:{sigma}"),
            ErrorModel::LengthBias { strength } => write!(f, "length-bias:{strength}"),
        }
    }
}

impl FromStr for ErrorModel {
    type Err = String;

    /// `gaussian:<sigma>`, `rare:<sigma>`, `length-bias:<strength>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected gaussian:<sigma>, rare:<sigma> or length-bias:<b>"))?;
        let x: f64 = value.parse().map_err(|_| format!("`{s}`: `{value}` is not a number"))?;
        if !x.is_finite() || x < 0.0 {
            return Err(format!("`{s}`: the scale must be a finite number >= 0"));
        }
        match kind {
            "gaussian" => Ok(ErrorModel::Gaussian { sigma: x }),
            "rare" => Ok(ErrorModel::Rare { sigma: x }),
            "length-bias" | "length" => Ok(ErrorModel::LengthBias { strength: x }),
            _ => Err(format!("`{s}`: unknown error model `{kind}` (gaussian, rare, length-bias)")),
        }
    }
}

impl ErrorModel {
    /// r̂ − r for every prompt of `instance`, seeded.
    pub fn draw(&self, instance: &Instance, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        instance
            .prompts
            .iter()
            .map(|p| {
                let m = p.rewards.len();
                match *self {
                    ErrorModel::Gaussian { sigma } => {
                        let n = Normal::new(0.0, sigma).expect("sigma >= 0");
                        (0..m).map(|_| n.sample(&mut rng)).collect()
                    }
                    ErrorModel::Rare { sigma } => {
                        let n = Normal::new(0.0, sigma).expect("sigma >= 0");
                        let mut order: Vec<usize> = (0..m).collect();
                        order.sort_by(|&a, &b| p.ref_logprobs[a].total_cmp(&p.ref_logprobs[b]));
                        let mut err = vec![0.0; m];
                        for &i in &order[..m / 2] {
                            err[i] = n.sample(&mut rng);
                        }
                        err
                    }
                    ErrorModel::LengthBias { strength } => {
                        let len: Vec<f64> =
                            p.texts.iter().map(|t| t.split_whitespace().count() as f64).collect();
                        let lo = len.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = len.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let span = hi - lo;
                        len.iter()
                            .map(|l| if span > 0.0 { strength * (l - lo) / span } else { 0.0 })
                            .collect()
                    }
                }
            })
            .collect()
    }
}

/// One (divergence, error model, β) cell, averaged over prompts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GapPoint {
    /// The divergence of both π* and π̂.
    pub divergence: Divergence,
    /// The error model, as typed.
    pub error: String,
    /// Regularisation strength.
    pub beta: f64,
    /// J(π*) − J(π̂) with J = E_π[r] (the essay's eq. 9), true r.
    pub reward_gap: f64,
    /// The same for the regularised objective E[r] − β·D_f (always ≥ 0).
    pub objective_gap: f64,
    /// log10 of the mean over prompts of E_π*[exp(ε/β)·ε].
    pub log10_bound: f64,
    /// Mean E_π*[ε], the error seen by the optimal policy.
    pub mean_error: f64,
}

/// The gap experiment on every (divergence, error model, β).
pub fn gap(
    instance: &Instance,
    divergences: &[Divergence],
    errors: &[ErrorModel],
    betas: &[f64],
    seed: u64,
) -> Result<Vec<GapPoint>, LabError> {
    let n = instance.prompts.len() as f64;
    let mut out = Vec::new();
    for (e, error) in errors.iter().enumerate() {
        let eps = error.draw(instance, seed.wrapping_add(e as u64));
        let mut noisy = instance.clone();
        for (p, d) in noisy.prompts.iter_mut().zip(&eps) {
            for (r, di) in p.rewards.iter_mut().zip(d) {
                *r += di;
            }
        }
        for &divergence in divergences {
            for &beta in betas {
                let star = solve_instance(instance, divergence, beta)?;
                let hat = solve_instance(&noisy, divergence, beta)?;
                let (mut reward_gap, mut objective_gap, mut mean_error) = (0.0, 0.0, 0.0);
                let mut log_bounds = Vec::with_capacity(instance.prompts.len());
                for ((p, (s, h)), d) in
                    instance.prompts.iter().zip(star.prompts.iter().zip(&hat.prompts)).zip(&eps)
                {
                    let value_hat =
                        evaluate_policy(divergence, beta, &p.ref_logprobs, &p.rewards, &h.log_policy)
                            .map_err(|source| LabError::Prompt { id: p.id.clone(), source })?;
                    reward_gap += s.reward - value_hat.reward;
                    objective_gap += s.objective - value_hat.objective;
                    let terms: Vec<f64> = s
                        .log_policy
                        .iter()
                        .zip(d)
                        .map(|(lp, di)| {
                            let eps = di.abs();
                            mean_error += lp.exp() * eps;
                            if eps > 0.0 {
                                lp + eps / beta + eps.ln()
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    log_bounds.push(log_sum_exp(&terms));
                }
                let log_mean_bound = log_sum_exp(&log_bounds) - n.ln();
                out.push(GapPoint {
                    divergence,
                    error: error.to_string(),
                    beta,
                    reward_gap: reward_gap / n,
                    objective_gap: objective_gap / n,
                    log10_bound: log_mean_bound / std::f64::consts::LN_10,
                    mean_error: mean_error / n,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_error_models() {
        assert_eq!("gaussian:0.5".parse::<ErrorModel>(), Ok(ErrorModel::Gaussian { sigma: 0.5 }));
        assert_eq!("rare:1".parse::<ErrorModel>(), Ok(ErrorModel::Rare { sigma: 1.0 }));
        assert_eq!("length-bias:0.2".parse::<ErrorModel>(), Ok(ErrorModel::LengthBias { strength: 0.2 }));
        assert!("gaussian".parse::<ErrorModel>().is_err());
        assert!("gaussian:-1".parse::<ErrorModel>().is_err());
        assert!("laplace:1".parse::<ErrorModel>().is_err());
    }

    /// No error, no gap; the bound is then −∞ (log of 0).
    #[test]
    fn zero_error_gives_zero_gap() {
        let inst = Instance::random(1, 3, 8);
        let pts = gap(
            &inst,
            &[Divergence::ReverseKl, Divergence::ChiPo],
            &[ErrorModel::Gaussian { sigma: 0.0 }],
            &[0.1, 1.0],
            0,
        )
        .unwrap();
        for p in pts {
            assert!(p.reward_gap.abs() < 1e-12 && p.objective_gap.abs() < 1e-12, "{p:?}");
            assert_eq!(p.log10_bound, f64::NEG_INFINITY);
        }
    }

    /// The regularised gap is never negative (π* is optimal for the true
    /// objective), vanishes as β → ∞ (both policies tend to π_ref), and the
    /// bound matches E_π*[exp(ε/β)·ε] written out directly.
    #[test]
    fn objective_gap_is_nonnegative_and_bound_is_the_essays() {
        let inst = Instance::random(2, 10, 12);
        let errors = [
            ErrorModel::Gaussian { sigma: 0.3 },
            ErrorModel::Rare { sigma: 1.0 },
            ErrorModel::LengthBias { strength: 0.5 },
        ];
        let divs: Vec<Divergence> =
            ["rkl", "fkl", "alpha:0.5", "js", "chi-po"].iter().map(|s| s.parse().unwrap()).collect();
        let pts = gap(&inst, &divs, &errors, &[0.05, 0.3, 2.0, 1e4], 9).unwrap();
        for p in &pts {
            assert!(p.objective_gap >= -1e-12, "{p:?}");
            if p.beta == 1e4 {
                assert!(p.reward_gap.abs() < 1e-3, "{p:?}");
            }
        }
        // A length bias moves mass toward long answers: the gap is positive.
        assert!(pts
            .iter()
            .filter(|p| p.error.starts_with("length") && p.beta < 1e4)
            .all(|p| p.objective_gap > 0.0));

        let one = Instance { prompts: vec![inst.prompts[0].clone()] };
        let beta = 0.3;
        let pt = &gap(&one, &[Divergence::ReverseKl], &errors[..1], &[beta], 9).unwrap()[0];
        let eps = &errors[0].draw(&one, 9)[0];
        let star = crate::solve_prompt(
            Divergence::ReverseKl,
            beta,
            &one.prompts[0].ref_logprobs,
            &one.prompts[0].rewards,
        )
        .unwrap();
        let direct: f64 =
            star.policy.iter().zip(eps).map(|(p, e)| p * (e.abs() / beta).exp() * e.abs()).sum();
        assert!(
            (10f64.powf(pt.log10_bound) - direct).abs() < 1e-10 * direct,
            "{} vs {direct}",
            10f64.powf(pt.log10_bound)
        );
    }

    #[test]
    fn rare_noise_touches_only_the_rarest_half() {
        let inst = Instance::random(5, 1, 10);
        let eps = ErrorModel::Rare { sigma: 1.0 }.draw(&inst, 0);
        let p = &inst.prompts[0];
        let mut order: Vec<usize> = (0..10).collect();
        order.sort_by(|&a, &b| p.ref_logprobs[a].total_cmp(&p.ref_logprobs[b]));
        assert!(order[..5].iter().all(|&i| eps[0][i] != 0.0));
        assert!(order[5..].iter().all(|&i| eps[0][i] == 0.0));
    }
}
