//! `fdpo exact gap`: the true-reward gap of the optimum for an erroneous
//! reward, beside the essay's bound E_π*[exp(ε/β)·ε], against β.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fdpo_core::lab::gap::{gap, ErrorModel};
use fdpo_core::Divergence;

use super::{alpha_column, default_divergences, summary_indices, BetaGridArgs, InstanceArgs};
use crate::output::{fmt_num, progress, report_written, write_file, Table};
use crate::plot::{self, Panel, Series};

/// Arguments of `fdpo exact gap`.
#[derive(Debug, Args)]
pub struct GapArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Divergences (comma-separated; paper's α convention). Default: all families.
    #[arg(long = "divergence", value_delimiter = ',')]
    pub divergences: Vec<Divergence>,
    /// Error models of r̂ − r (comma-separated): gaussian:<sigma> (everywhere), rare:<sigma> (only
    /// on the rarest half of responses under π_ref), length-bias:<b> (b × length rescaled to [0,1]).
    #[arg(long = "error", value_delimiter = ',', default_value = "gaussian:0.3,rare:1,length-bias:0.5")]
    pub errors: Vec<ErrorModel>,
    #[command(flatten)]
    pub betas: BetaGridArgs,
    /// Seed of the error draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for gap.csv and the plots gap.{svg,png} and bound.{svg,png}.
    #[arg(long, default_value = "runs/exact-gap")]
    pub output_dir: PathBuf,
}

/// Runs `fdpo exact gap`.
pub fn run(args: GapArgs) -> Result<()> {
    let instance = args.instance.load(Some(0))?;
    let divergences = if args.divergences.is_empty() { default_divergences() } else { args.divergences };
    let betas = args.betas.grid()?;
    let bar = progress(args.errors.len() * divergences.len(), "gap");
    let mut points = Vec::new();
    for (k, e) in args.errors.iter().enumerate() {
        for d in &divergences {
            bar.set_message(format!("{e} {d}"));
            // Same seed offset per error model as a single call would use.
            let seed = args.seed.wrapping_add(k as u64);
            points.extend(
                gap(&instance, std::slice::from_ref(d), std::slice::from_ref(e), &betas, seed)
                    .context("solving")?,
            );
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let mut csv = Table::new(&[
        "divergence",
        "alpha",
        "error",
        "beta",
        "reward_gap",
        "objective_gap",
        "log10_bound",
        "mean_error",
    ]);
    for p in &points {
        csv.push(vec![
            p.divergence.name(),
            alpha_column(&p.divergence),
            p.error.clone(),
            p.beta.to_string(),
            p.reward_gap.to_string(),
            p.objective_gap.to_string(),
            p.log10_bound.to_string(),
            p.mean_error.to_string(),
        ]);
    }
    let csv_path = args.output_dir.join("gap.csv");
    write_file(&csv_path, csv.to_csv().as_bytes())?;

    let panels = |y_label: &str, f: fn(&fdpo_core::lab::gap::GapPoint) -> f64| -> Vec<Panel> {
        args.errors
            .iter()
            .map(|e| Panel {
                title: format!("error {e}"),
                x_label: "beta".into(),
                y_label: y_label.into(),
                x_log: true,
                y_log: false,
                series: divergences
                    .iter()
                    .map(|d| {
                        let pts = points
                            .iter()
                            .filter(|p| p.divergence == *d && p.error == e.to_string())
                            .map(|p| (p.beta, f(p)))
                            .collect();
                        Series::line(d.name(), pts)
                    })
                    .collect(),
            })
            .collect()
    };
    let gap_fig =
        plot::save(&panels("J(pi*) - J(pi_hat), J = E[r]", |p| p.reward_gap), &args.output_dir.join("gap"))?;
    let bound_fig = plot::save(
        &panels("log10 E_pi*[exp(eps/beta) eps]", |p| p.log10_bound),
        &args.output_dir.join("bound"),
    )?;

    let mut table = Table::new(&["error", "divergence", "beta", "reward_gap", "objective_gap", "bound"]);
    for e in &args.errors {
        for d in &divergences {
            let row: Vec<_> =
                points.iter().filter(|p| p.divergence == *d && p.error == e.to_string()).collect();
            for i in summary_indices(row.len()) {
                let p = row[i];
                table.push(vec![
                    e.to_string(),
                    d.name(),
                    fmt_num(p.beta),
                    fmt_num(p.reward_gap),
                    fmt_num(p.objective_gap),
                    if p.log10_bound < 300.0 {
                        fmt_num(10f64.powf(p.log10_bound))
                    } else {
                        format!("1e{:.0}", p.log10_bound)
                    },
                ]);
            }
        }
    }
    print!("{}", table.to_text());
    report_written(&[&csv_path, &gap_fig[0], &gap_fig[1], &bound_fig[0], &bound_fig[1]]);
    Ok(())
}
