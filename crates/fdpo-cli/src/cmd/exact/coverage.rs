//! `fdpo exact coverage`: the gap when r̂ is fitted from n Bradley–Terry
//! pairs drawn from a data policy μ, and the iterative (online) variant.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fdpo_core::lab::coverage::{coverage, CoverageConfig, DataPolicy};
use fdpo_core::Divergence;

use super::{alpha_column, InstanceArgs};
use crate::output::{fmt_num, progress, report_written, write_file, Table};
use crate::plot::{self, Panel, Series};

/// Arguments of `fdpo exact coverage`.
#[derive(Debug, Args)]
pub struct CoverageArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Divergences (comma-separated; paper's α convention).
    #[arg(long = "divergence", value_delimiter = ',', default_value = "reverse-kl,forward-kl")]
    pub divergences: Vec<Divergence>,
    /// Regularisation strength β.
    #[arg(long, default_value_t = 0.1, value_parser = crate::cmd::parse::positive)]
    pub beta: f64,
    /// Data policies μ that draw the offline pairs (comma-separated): reference, uniform, optimal
    /// (= π*).
    #[arg(long = "data", value_delimiter = ',', default_value = "reference,uniform,optimal")]
    pub data: Vec<DataPolicy>,
    /// Numbers of preference pairs per prompt for the offline runs (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8,16,32,64,128,256,512,1024",
        value_parser = crate::cmd::parse::at_least_one
    )]
    pub pairs: Vec<usize>,
    /// Rounds of the iterative variant, each drawing pairs from the current π̂ (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub rounds: usize,
    /// Pairs per prompt drawn in each round of the iterative variant.
    #[arg(long, default_value_t = 32, value_parser = crate::cmd::parse::at_least_one)]
    pub pairs_per_round: usize,
    /// Ridge penalty of the tabular Bradley–Terry fit (keeps unseen responses at r̂ = 0).
    #[arg(long, default_value_t = 0.01, value_parser = crate::cmd::parse::positive)]
    pub ridge: f64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for coverage.csv, coverage.svg and coverage.png.
    #[arg(long, default_value = "runs/exact-coverage")]
    pub output_dir: PathBuf,
}

/// Runs `fdpo exact coverage`.
pub fn run(args: CoverageArgs) -> Result<()> {
    let instance = args.instance.load(Some(0))?;
    let bar = progress(args.divergences.len(), "coverage");
    let mut rows = Vec::new();
    for d in &args.divergences {
        bar.set_message(d.name());
        let cfg = CoverageConfig {
            divergence: *d,
            beta: args.beta,
            policies: args.data.clone(),
            pairs: args.pairs.clone(),
            rounds: args.rounds,
            pairs_per_round: args.pairs_per_round,
            ridge: args.ridge,
            seed: args.seed,
        };
        rows.extend(coverage(&instance, &cfg).context("coverage experiment")?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let header = [
        "divergence",
        "alpha",
        "beta",
        "data",
        "pairs",
        "round",
        "reward_gap",
        "objective_gap",
        "optimal_mass_covered",
    ];
    let mut csv = Table::new(&header);
    let mut text =
        Table::new(&["divergence", "data", "pairs", "reward_gap", "objective_gap", "pi*_mass_seen"]);
    for r in &rows {
        csv.push(vec![
            r.divergence.name(),
            alpha_column(&r.divergence),
            args.beta.to_string(),
            r.data.clone(),
            r.pairs.to_string(),
            r.round.to_string(),
            r.reward_gap.to_string(),
            r.objective_gap.to_string(),
            r.optimal_mass_covered.to_string(),
        ]);
        text.push(vec![
            r.divergence.name(),
            r.data.clone(),
            r.pairs.to_string(),
            fmt_num(r.reward_gap),
            fmt_num(r.objective_gap),
            fmt_num(r.optimal_mass_covered),
        ]);
    }
    let csv_path = args.output_dir.join("coverage.csv");
    write_file(&csv_path, csv.to_csv().as_bytes())?;

    let mut labels: Vec<String> = args.data.iter().map(|d| d.to_string()).collect();
    if args.rounds > 0 {
        labels.push("iterative".into());
    }
    let panels: Vec<Panel> = args
        .divergences
        .iter()
        .map(|d| Panel {
            title: format!("{d}, beta {}", args.beta),
            x_label: "preference pairs per prompt".into(),
            y_label: "J(pi*) - J(pi_hat), J = E[r]".into(),
            x_log: true,
            y_log: false,
            series: labels
                .iter()
                .map(|label| {
                    let pts = rows
                        .iter()
                        .filter(|r| r.divergence == *d && &r.data == label)
                        .map(|r| (r.pairs as f64, r.reward_gap))
                        .collect();
                    Series::line(format!("mu = {label}"), pts)
                })
                .collect(),
        })
        .collect();
    let figures = plot::save(&panels, &args.output_dir.join("coverage"))?;
    print!("{}", text.to_text());
    report_written(&[&csv_path, &figures[0], &figures[1]]);
    Ok(())
}
