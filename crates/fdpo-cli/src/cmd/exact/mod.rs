//! `fdpo exact`: the exact lab. Each subcommand loads (or generates) an
//! instance, runs one fdpo-core experiment, prints a table and, except
//! `solve`, writes CSV and plots into `--output-dir`.

mod coverage;
pub mod frontier;
mod gap;
mod solve;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fdpo_core::{Divergence, Instance};

/// The exact-lab subcommands.
#[derive(Debug, Subcommand)]
pub enum ExactCommand {
    /// The optimal policy π* of every prompt for one divergence and β.
    Solve(solve::SolveArgs),
    /// Reward–entropy frontier of π* over a β grid, per divergence.
    Frontier(frontier::FrontierArgs),
    /// Gap J(π*) − J(π̂) for an erroneous reward r̂, beside the essay's bound.
    Gap(gap::GapArgs),
    /// Gap when r̂ is learned from n Bradley–Terry pairs drawn from μ.
    Coverage(coverage::CoverageArgs),
}

impl ExactCommand {
    /// Runs the subcommand.
    pub fn run(self) -> Result<()> {
        match self {
            ExactCommand::Solve(a) => solve::run(a),
            ExactCommand::Frontier(a) => frontier::run(a),
            ExactCommand::Gap(a) => gap::run(a),
            ExactCommand::Coverage(a) => coverage::run(a),
        }
    }
}

/// Where the instance comes from: a file, or a seeded random generator.
#[derive(Debug, Clone, Args)]
pub struct InstanceArgs {
    /// Instance file (JSON): {"prompts": [{"id": .., "responses": [{"text": .., "ref_logprob"
    /// (or "ref_prob"): .., "reward": ..}]}]}.
    #[arg(long, conflicts_with = "random")]
    pub instance: Option<PathBuf>,
    /// Generate a random instance with this seed instead of reading one.
    #[arg(long, value_name = "SEED")]
    pub random: Option<u64>,
    /// Number of prompts of a random instance.
    #[arg(long, default_value_t = 16)]
    pub prompts: usize,
    /// Number of responses per prompt of a random instance.
    #[arg(long, default_value_t = 32)]
    pub responses: usize,
    /// Also write the instance that was used to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

impl InstanceArgs {
    /// Reads or generates the instance; `default_seed` is used when neither
    /// `--instance` nor `--random` is given (an error when `None`).
    pub fn load(&self, default_seed: Option<u64>) -> Result<Instance> {
        let instance = match (&self.instance, self.random.or(default_seed)) {
            (Some(path), _) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let loaded = Instance::from_json(&text).with_context(|| format!("{}", path.display()))?;
                if !loaded.normalised.is_empty() {
                    eprintln!(
                        "note: {}: reference values of {} prompt(s) did not sum to 1 and were normalised: {}",
                        path.display(),
                        loaded.normalised.len(),
                        abbreviate(&loaded.normalised, 8)
                    );
                }
                loaded.instance
            }
            (None, Some(seed)) => {
                if self.prompts == 0 || self.responses == 0 {
                    bail!("--prompts and --responses must be at least 1");
                }
                Instance::random(seed, self.prompts, self.responses)
            }
            (None, None) => bail!("give --instance FILE or --random SEED"),
        };
        if let Some(path) = &self.save {
            let json = serde_json::to_string_pretty(&instance.to_json())?;
            crate::output::write_file(path, json.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
        Ok(instance)
    }
}

/// The β grid of a sweep: explicit values, or a log-spaced range.
#[derive(Debug, Clone, Args)]
pub struct BetaGridArgs {
    /// Explicit β values (comma-separated, each > 0); overrides the range below.
    #[arg(long = "beta", value_delimiter = ',', value_parser = crate::cmd::parse::positive)]
    pub betas: Vec<f64>,
    /// Smallest β of the log-spaced grid.
    #[arg(long, default_value_t = 0.01, value_parser = crate::cmd::parse::positive)]
    pub beta_min: f64,
    /// Largest β of the log-spaced grid.
    #[arg(long, default_value_t = 100.0, value_parser = crate::cmd::parse::positive)]
    pub beta_max: f64,
    /// Number of β values in the grid.
    #[arg(long, default_value_t = 25, value_parser = crate::cmd::parse::at_least_one)]
    pub num_betas: usize,
}

impl BetaGridArgs {
    /// The grid (each value was checked finite and > 0 while parsing).
    pub fn grid(&self) -> Result<Vec<f64>> {
        if !self.betas.is_empty() {
            return Ok(self.betas.clone());
        }
        if self.beta_max < self.beta_min {
            bail!("--beta-max ({}) must be >= --beta-min ({})", self.beta_max, self.beta_min);
        }
        Ok(fdpo_core::lab::log_grid(self.beta_min, self.beta_max, self.num_betas))
    }
}

/// The default divergences of a sweep: all families, three α.
pub fn default_divergences() -> Vec<Divergence> {
    ["reverse-kl", "alpha:0.3", "alpha:0.5", "alpha:0.7", "forward-kl", "js", "chi-po"]
        .iter()
        .map(|s| s.parse().expect("valid divergence names"))
        .collect()
}

/// Up to `n` items joined with ", ", then "… (k more)".
fn abbreviate(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        s.push_str(&format!(", … ({} more)", items.len() - n));
    }
    s
}

/// The paper's α of a divergence for CSV columns ("" when not an α-divergence).
pub fn alpha_column(d: &Divergence) -> String {
    match d {
        Divergence::Alpha { alpha } => alpha.to_string(),
        _ => String::new(),
    }
}

/// Indices of the first, middle and last β of a grid (deduplicated).
pub fn summary_indices(len: usize) -> Vec<usize> {
    let mut idx = vec![0, len / 2, len.saturating_sub(1)];
    idx.dedup();
    idx
}
