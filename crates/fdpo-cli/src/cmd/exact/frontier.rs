//! `fdpo exact frontier`: reward and entropy of π* along a β grid, one curve
//! per divergence — the exact version of Wang et al.'s Figure 3 — and
//! against KL(π*‖π_ref), the yardstick common to every divergence.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fdpo_core::lab::frontier::{frontier, FrontierPoint};
use fdpo_core::lab::reference_point;
use fdpo_core::Divergence;

use super::{alpha_column, default_divergences, summary_indices, BetaGridArgs, InstanceArgs};
use crate::output::{fmt_num, progress, report_written, write_file, Table};
use crate::plot::{self, Panel, Series};

/// Arguments of `fdpo exact frontier`.
#[derive(Debug, Args)]
pub struct FrontierArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Divergences to trace (comma-separated; paper's α convention). Default:
    /// reverse-kl,alpha:0.3,alpha:0.5,alpha:0.7,forward-kl,js,chi-po.
    #[arg(long = "divergence", value_delimiter = ',')]
    pub divergences: Vec<Divergence>,
    #[command(flatten)]
    pub betas: BetaGridArgs,
    /// Folder for frontier.csv, frontier.svg and frontier.png.
    #[arg(long, default_value = "runs/exact-frontier")]
    pub output_dir: PathBuf,
}

/// Runs `fdpo exact frontier`.
pub fn run(args: FrontierArgs) -> Result<()> {
    let instance = args.instance.load(Some(0))?;
    let divergences = if args.divergences.is_empty() { default_divergences() } else { args.divergences };
    let betas = args.betas.grid()?;
    let bar = progress(divergences.len(), "frontier");
    let mut points = Vec::new();
    for d in &divergences {
        bar.set_message(d.name());
        points.extend(frontier(&instance, std::slice::from_ref(d), &betas).context("solving")?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (ref_reward, ref_entropy) = reference_point(&instance);

    let csv = frontier_csv(&points, (ref_reward, ref_entropy));
    let csv_path = args.output_dir.join("frontier.csv");
    write_file(&csv_path, csv.to_csv().as_bytes())?;

    let curves = |f: fn(&fdpo_core::lab::frontier::FrontierPoint) -> (f64, f64)| -> Vec<Series> {
        divergences
            .iter()
            .map(|d| Series::line(d.name(), points.iter().filter(|p| p.divergence == *d).map(f).collect()))
            .collect()
    };
    let mut left = curves(|p| (p.entropy, p.reward));
    left.push(Series::markers("reference", vec![(ref_entropy, ref_reward)]));
    let panels = [
        Panel {
            title: "Exact optimum: reward against entropy".into(),
            x_label: "entropy H(pi*) (nats)".into(),
            y_label: "reward E[r]".into(),
            x_log: false,
            y_log: false,
            series: left,
        },
        Panel {
            title: "Reward against KL(pi*||pi_ref)".into(),
            x_label: "KL(pi*||pi_ref) (nats)".into(),
            y_label: "reward E[r]".into(),
            x_log: false,
            y_log: false,
            series: curves(|p| (p.kl, p.reward)),
        },
        Panel {
            title: "Reward against beta".into(),
            x_label: "beta".into(),
            y_label: "reward E[r]".into(),
            x_log: true,
            y_log: false,
            series: curves(|p| (p.beta, p.reward)),
        },
    ];
    let figures = plot::save(&panels, &args.output_dir.join("frontier"))?;

    println!(
        "{} prompts; reference: reward {}, entropy {}",
        instance.prompts.len(),
        fmt_num(ref_reward),
        fmt_num(ref_entropy)
    );
    let mut table = Table::new(&["divergence", "beta", "reward", "entropy", "divergence_value"]);
    for d in &divergences {
        let row: Vec<_> = points.iter().filter(|p| p.divergence == *d).collect();
        for i in summary_indices(row.len()) {
            let p = row[i];
            table.push(vec![
                d.name(),
                fmt_num(p.beta),
                fmt_num(p.reward),
                fmt_num(p.entropy),
                fmt_num(p.divergence_value),
            ]);
        }
    }
    print!("{}", table.to_text());
    report_written(&[&csv_path, &figures[0], &figures[1]]);
    Ok(())
}

/// `frontier.csv`: the reference's row (β = ∞), then one row per point;
/// `fdpo sweep` writes its exact frontier with this function too, so that
/// the two files can be compared line by line.
pub fn frontier_csv(points: &[FrontierPoint], (ref_reward, ref_entropy): (f64, f64)) -> Table {
    let mut csv = Table::new(&[
        "divergence",
        "alpha",
        "beta",
        "reward",
        "entropy",
        "divergence_value",
        "kl",
        "objective",
    ]);
    csv.push(vec![
        "reference".into(),
        String::new(),
        "inf".into(),
        ref_reward.to_string(),
        ref_entropy.to_string(),
        "0".into(),
        "0".into(),
        ref_reward.to_string(),
    ]);
    for p in points {
        csv.push(vec![
            p.divergence.name(),
            alpha_column(&p.divergence),
            p.beta.to_string(),
            p.reward.to_string(),
            p.entropy.to_string(),
            p.divergence_value.to_string(),
            p.kl.to_string(),
            p.objective.to_string(),
        ]);
    }
    csv
}
