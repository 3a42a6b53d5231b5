//! `fdpo merge`: merge Hugging Face checkpoints of one architecture into a
//! new one (fdpo_model::merge: linear, slerp, task-arithmetic, ties). The
//! output is a model directory that `fdpo` and transformers load.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use fdpo_model::merge::{merge_checkpoints, MergeMethod};

/// The merge methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Weighted average of the models (weights normalised to sum 1).
    Linear,
    /// Spherical interpolation of two models at --t.
    Slerp,
    /// base + Σ wᵢ(θᵢ − base).
    TaskArithmetic,
    /// TIES: trim task vectors to --density, elect signs, average the agreeing ones.
    Ties,
}

/// Arguments of `fdpo merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// How to merge.
    #[arg(long, value_enum)]
    pub method: Method,
    /// The models to merge, comma-separated Hugging Face model directories.
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<PathBuf>,
    /// One weight per model, comma-separated (default: all 1).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// The base model of task-arithmetic and ties (e.g. π_ref).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// slerp: 0 gives the first model, 1 the second.
    #[arg(long, default_value_t = 0.5, value_parser = crate::cmd::parse::probability_closed)]
    pub t: f64,
    /// ties: share of each task vector's entries kept, by magnitude, in (0, 1].
    #[arg(long, default_value_t = 0.2, value_parser = crate::cmd::parse::probability)]
    pub density: f64,
    /// Output model directory (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `fdpo merge`.
pub fn run(a: MergeArgs) -> Result<()> {
    let weights = if a.weights.is_empty() { vec![1.0; a.models.len()] } else { a.weights.clone() };
    if weights.len() != a.models.len() {
        bail!("--weights: {} given for {} models; give one per model", weights.len(), a.models.len());
    }
    if weights.iter().any(|w| !w.is_finite())
        || (a.method == Method::Linear && weights.iter().sum::<f64>() <= 0.0)
    {
        bail!("--weights: must be finite (and, for linear, sum to more than 0)");
    }
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{}: exists and is not empty; choose a new --out", a.out.display());
    }
    let method = match a.method {
        Method::Linear => MergeMethod::Linear,
        Method::Slerp => MergeMethod::Slerp { t: a.t },
        Method::TaskArithmetic => MergeMethod::TaskArithmetic,
        Method::Ties => MergeMethod::Ties { density: a.density },
    };
    merge_checkpoints(method, &a.models, &weights, a.base.as_deref(), &a.out)?;
    eprintln!("wrote {} ({:?} of {} models)", a.out.display(), a.method, a.models.len());
    Ok(())
}
