//! Data coverage: the gap J(π*) − J(π̂) when r̂ is learned from preference
//! pairs, as a function of how many pairs and of which policy μ drew them.
//!
//! Per prompt: n pairs (y₁, y₂) drawn from μ (y₂ conditioned on y₂ ≠ y₁:
//! identical responses carry no preference), labelled by
//! Bradley–Terry on the true reward (y₁ wins with probability
//! σ(r₁ − r₂)); r̂ is the tabular maximum-likelihood estimate with a small
//! ridge penalty (so that unseen or always-winning responses stay finite:
//! an unseen response gets r̂ = 0); π̂ is the exact optimum for r̂. μ is the
//! reference, the uniform policy, or π* itself. The iterative variant draws
//! each round's pairs from the current π̂ (online / iterative DPO in the
//! exact setting) and refits on everything seen so far.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::str::FromStr;

use super::LabError;
use crate::{evaluate_policy, solve_prompt, Divergence, Instance, Prompt};

/// Which policy draws the preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPolicy {
    /// μ = π_ref, as offline preference data usually is.
    Reference,
    /// μ uniform over the responses.
    Uniform,
    /// μ = π*, data where the optimal policy puts its mass.
    Optimal,
}

impl fmt::Display for DataPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPolicy::Reference => "reference",
            DataPolicy::Uniform => "uniform",
            DataPolicy::Optimal => "optimal",
        })
    }
}

impl FromStr for DataPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reference" | "ref" => Ok(DataPolicy::Reference),
            "uniform" => Ok(DataPolicy::Uniform),
            "optimal" | "pi-star" => Ok(DataPolicy::Optimal),
            _ => Err(format!("unknown data policy `{s}` (reference, uniform, optimal)")),
        }
    }
}

/// Settings of a coverage run.
#[derive(Debug, Clone, PartialEq)]
pub struct CoverageConfig {
    /// Divergence of π* and π̂.
    pub divergence: Divergence,
    /// Regularisation strength.
    pub beta: f64,
    /// Offline data policies to compare.
    pub policies: Vec<DataPolicy>,
    /// Numbers of pairs per prompt for the offline runs.
    pub pairs: Vec<usize>,
    /// Rounds of the iterative variant (0 to skip it).
    pub rounds: usize,
    /// Pairs per prompt drawn in each round.
    pub pairs_per_round: usize,
    /// Ridge penalty of the tabular Bradley–Terry fit.
    pub ridge: f64,
    /// Seed of every draw.
    pub seed: u64,
}

/// One row: a data policy (or "iterative") at a number of pairs per prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CoveragePoint {
    /// The divergence.
    pub divergence: Divergence,
    /// `reference`, `uniform`, `optimal` or `iterative`.
    pub data: String,
    /// Pairs per prompt used for r̂ (cumulative for the iterative variant).
    pub pairs: usize,
    /// Round number for the iterative variant, 0 for offline rows.
    pub round: usize,
    /// Mean over prompts of J(π*) − J(π̂), J = E_π[r].
    pub reward_gap: f64,
    /// The same for the regularised objective (≥ 0).
    pub objective_gap: f64,
    /// Mean π*-mass of the responses that appear in at least one pair.
    pub optimal_mass_covered: f64,
}

/// Runs the coverage experiment.
pub fn coverage(instance: &Instance, cfg: &CoverageConfig) -> Result<Vec<CoveragePoint>, LabError> {
    if !(cfg.ridge > 0.0 && cfg.ridge.is_finite()) {
        return Err(LabError::Option(format!("ridge must be > 0, got {}", cfg.ridge)));
    }
    let n = instance.prompts.len() as f64;
    let stars = instance
        .prompts
        .iter()
        .map(|p| {
            solve_prompt(cfg.divergence, cfg.beta, &p.ref_logprobs, &p.rewards)
                .map_err(|source| LabError::Prompt { id: p.id.clone(), source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for (k, &policy) in cfg.policies.iter().enumerate() {
        for &pairs in &cfg.pairs {
            let mut acc = Accumulator::default();
            for (i, (p, star)) in instance.prompts.iter().zip(&stars).enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, &[k as u64, pairs as u64, i as u64]));
                let mu: Vec<f64> = match policy {
                    DataPolicy::Reference => p.ref_logprobs.iter().map(|l| l.exp()).collect(),
                    DataPolicy::Uniform => vec![1.0; p.rewards.len()],
                    DataPolicy::Optimal => star.policy.clone(),
                };
                let mut wins = Wins::new(p.rewards.len());
                wins.draw(&mu, &p.rewards, pairs, &mut rng);
                acc.add(cfg, p, star, &wins)?;
            }
            out.push(acc.point(cfg, &policy.to_string(), pairs, 0, n));
        }
    }
    if cfg.rounds > 0 {
        let mut wins: Vec<Wins> = instance.prompts.iter().map(|p| Wins::new(p.rewards.len())).collect();
        let mut current: Vec<Vec<f64>> =
            instance.prompts.iter().map(|p| p.ref_logprobs.iter().map(|l| l.exp()).collect()).collect();
        for round in 1..=cfg.rounds {
            let mut acc = Accumulator::default();
            for (i, (p, star)) in instance.prompts.iter().zip(&stars).enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, &[u64::MAX, round as u64, i as u64]));
                wins[i].draw(&current[i], &p.rewards, cfg.pairs_per_round, &mut rng);
                current[i] = acc.add(cfg, p, star, &wins[i])?;
            }
            out.push(acc.point(cfg, "iterative", round * cfg.pairs_per_round, round, n));
        }
    }
    Ok(out)
}

/// Sums over prompts for one row.
#[derive(Default)]
struct Accumulator {
    reward_gap: f64,
    objective_gap: f64,
    covered: f64,
}

impl Accumulator {
    /// Fits r̂ from `wins`, solves π̂, adds the gaps; returns π̂.
    fn add(
        &mut self,
        cfg: &CoverageConfig,
        p: &Prompt,
        star: &crate::PromptSolution,
        wins: &Wins,
    ) -> Result<Vec<f64>, LabError> {
        let err = |source| LabError::Prompt { id: p.id.clone(), source };
        let r_hat = fit_bradley_terry(wins, cfg.ridge);
        let hat = solve_prompt(cfg.divergence, cfg.beta, &p.ref_logprobs, &r_hat).map_err(err)?;
        let value = evaluate_policy(cfg.divergence, cfg.beta, &p.ref_logprobs, &p.rewards, &hat.log_policy)
            .map_err(err)?;
        self.reward_gap += star.reward - value.reward;
        self.objective_gap += star.objective - value.objective;
        self.covered +=
            star.policy.iter().zip(&wins.seen).filter(|(_, s)| **s).map(|(pi, _)| pi).sum::<f64>();
        Ok(hat.policy)
    }

    fn point(&self, cfg: &CoverageConfig, data: &str, pairs: usize, round: usize, n: f64) -> CoveragePoint {
        CoveragePoint {
            divergence: cfg.divergence,
            data: data.to_string(),
            pairs,
            round,
            reward_gap: self.reward_gap / n,
            objective_gap: self.objective_gap / n,
            optimal_mass_covered: self.covered / n,
        }
    }
}

/// Pairwise win counts of one prompt: `count[i * m + j]` = times i beat j.
#[derive(Debug, Clone, PartialEq)]
pub struct Wins {
    m: usize,
    count: Vec<f64>,
    seen: Vec<bool>,
}

impl Wins {
    /// No comparisons yet among `m` responses.
    pub fn new(m: usize) -> Self {
        Wins { m, count: vec![0.0; m * m], seen: vec![false; m] }
    }

    /// Records that `winner` was preferred to `loser`.
    pub fn record(&mut self, winner: usize, loser: usize) {
        self.count[winner * self.m + loser] += 1.0;
        self.seen[winner] = true;
        self.seen[loser] = true;
    }

    /// Draws `pairs` pairs from the (unnormalised) weights `mu`, labelled
    /// by Bradley–Terry on `rewards`.
    pub fn draw(&mut self, mu: &[f64], rewards: &[f64], pairs: usize, rng: &mut impl Rng) {
        if mu.len() < 2 {
            return;
        }
        let mut cdf = Vec::with_capacity(mu.len());
        let mut total = 0.0;
        for &w in mu {
            total += w.max(0.0);
            cdf.push(total);
        }
        let sample = |rng: &mut dyn rand::RngCore| {
            let u = rng.random::<f64>() * total;
            cdf.partition_point(|&c| c <= u).min(mu.len() - 1)
        };
        for _ in 0..pairs {
            let a = sample(rng);
            // A pair of identical responses carries no preference (datasets
            // drop them), so the second draw is conditioned on b ≠ a: by
            // rejection, falling back to uniform when μ sits almost on a.
            let b = (0..64).map(|_| sample(rng)).find(|&b| b != a).unwrap_or_else(|| {
                let b = rng.random_range(0..mu.len() - 1);
                if b >= a {
                    b + 1
                } else {
                    b
                }
            });
            let p_a = 1.0 / (1.0 + (rewards[b] - rewards[a]).exp());
            if rng.random::<f64>() < p_a {
                self.record(a, b);
            } else {
                self.record(b, a);
            }
        }
    }
}

/// Tabular Bradley–Terry maximum likelihood with a ridge penalty:
/// argmax Σ_{i beat j} log σ(r̂_i − r̂_j) − (ridge/2)·Σ r̂², by Newton's
/// method (the objective is strictly concave).
pub fn fit_bradley_terry(wins: &Wins, ridge: f64) -> Vec<f64> {
    let m = wins.m;
    let mut r = vec![0.0; m];
    for _ in 0..100 {
        // Gradient g and negated Hessian h (positive definite).
        let mut g: Vec<f64> = r.iter().map(|x| -ridge * x).collect();
        let mut h = vec![0.0; m * m];
        for i in 0..m {
            h[i * m + i] += ridge;
            for j in 0..m {
                let (w_ij, w_ji) = (wins.count[i * m + j], wins.count[j * m + i]);
                if i == j || w_ij + w_ji == 0.0 {
                    continue;
                }
                let s = 1.0 / (1.0 + (r[j] - r[i]).exp());
                g[i] += w_ij - (w_ij + w_ji) * s;
                let c = (w_ij + w_ji) * s * (1.0 - s);
                h[i * m + i] += c;
                h[i * m + j] -= c;
            }
        }
        let step = solve_positive_definite(&mut h, g, m);
        let mut largest: f64 = 0.0;
        for (ri, si) in r.iter_mut().zip(&step) {
            *ri += si;
            largest = largest.max(si.abs());
        }
        if largest < 1e-12 {
            break;
        }
    }
    r
}

/// Solves A x = b for symmetric positive definite A (row-major, m×m) by Cholesky.
fn solve_positive_definite(a: &mut [f64], mut b: Vec<f64>, m: usize) -> Vec<f64> {
    for j in 0..m {
        let mut d = a[j * m + j];
        for k in 0..j {
            d -= a[j * m + k] * a[j * m + k];
        }
        let d = d.max(f64::MIN_POSITIVE).sqrt();
        a[j * m + j] = d;
        for i in j + 1..m {
            let mut s = a[i * m + j];
            for k in 0..j {
                s -= a[i * m + k] * a[j * m + k];
            }
            a[i * m + j] = s / d;
        }
    }
    for i in 0..m {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * m + k] * b[k];
        }
        b[i] = s / a[i * m + i];
    }
    for i in (0..m).rev() {
        let mut s = b[i];
        for k in i + 1..m {
            s -= a[k * m + i] * b[k];
        }
        b[i] = s / a[i * m + i];
    }
    b
}

/// A seed derived from a base seed and a few coordinates (SplitMix64 steps).
fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed;
    for &p in parts {
        x = x.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Planted answer: with many comparisons the fit recovers the rewards up
    /// to the per-prompt constant.
    #[test]
    fn bradley_terry_fit_recovers_planted_rewards() {
        let rewards = [0.5, -1.0, 0.0, 1.5, -0.3];
        let mut wins = Wins::new(5);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        wins.draw(&[1.0; 5], &rewards, 200_000, &mut rng);
        let fit = fit_bradley_terry(&wins, 1e-6);
        let shift = fit[0] - rewards[0];
        for (f, r) in fit.iter().zip(&rewards) {
            assert!((f - shift - r).abs() < 0.03, "{fit:?} vs {rewards:?}");
        }
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let x = solve_positive_definite(&mut a, vec![2.0, 1.0], 2);
        // [[4,2],[2,3]] x = [2,1] → x = [0.5, 0].
        assert!((x[0] - 0.5).abs() < 1e-15 && x[1].abs() < 1e-15);
    }

    fn config(policies: Vec<DataPolicy>, pairs: Vec<usize>, rounds: usize) -> CoverageConfig {
        CoverageConfig {
            divergence: Divergence::ReverseKl,
            beta: 0.1,
            policies,
            pairs,
            rounds,
            pairs_per_round: 50,
            ridge: 1e-2,
            seed: 3,
        }
    }

    /// More data shrinks the gap; data from π* covers π*'s mass best; runs
    /// are deterministic for a seed.
    #[test]
    fn more_and_better_placed_data_shrink_the_gap() {
        let inst = Instance::random(11, 20, 16);
        let cfg = config(vec![DataPolicy::Reference, DataPolicy::Optimal], vec![10, 3000], 4);
        let rows = coverage(&inst, &cfg).unwrap();
        assert_eq!(rows, coverage(&inst, &cfg).unwrap());
        let get =
            |data: &str, pairs: usize| rows.iter().find(|r| r.data == data && r.pairs == pairs).unwrap();
        for data in ["reference", "optimal"] {
            assert!(get(data, 3000).objective_gap < get(data, 10).objective_gap, "{rows:#?}");
        }
        assert!(get("optimal", 10).optimal_mass_covered > get("reference", 10).optimal_mass_covered);
        assert!(get("optimal", 10).objective_gap < get("reference", 10).objective_gap, "{rows:#?}");
        let iterative: Vec<_> = rows.iter().filter(|r| r.data == "iterative").collect();
        assert_eq!(iterative.iter().map(|r| r.pairs).collect::<Vec<_>>(), vec![50, 100, 150, 200]);
        assert!(rows.iter().all(|r| r.objective_gap >= -1e-12));
    }
}
