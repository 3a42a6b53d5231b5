//! `fdpo exact solve`: π* of every prompt for one divergence and β.

use anyhow::{Context, Result};
use clap::Args;
use fdpo_core::{lab::solve_instance, Divergence};
use serde_json::json;

use super::InstanceArgs;
use crate::output::{fmt_num, Table};

/// Arguments of `fdpo exact solve`.
#[derive(Debug, Args)]
pub struct SolveArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// The f-divergence: reverse-kl (rkl, kl), forward-kl (fkl), alpha:<a> (paper's α in (0,1):
    /// α→0 is reverse KL, α=1 forward KL), js, chi-po.
    #[arg(long)]
    pub divergence: Divergence,
    /// Regularisation strength β > 0.
    #[arg(long, value_parser = crate::cmd::parse::positive)]
    pub beta: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Responses listed per prompt in the text output (highest π* first).
    #[arg(long, default_value_t = 5)]
    pub top: usize,
}

/// Runs `fdpo exact solve`.
pub fn run(args: SolveArgs) -> Result<()> {
    let instance = args.instance.load(None)?;
    let sol = solve_instance(&instance, args.divergence, args.beta).context("solving")?;
    if args.json {
        let prompts: Vec<_> = instance
            .prompts
            .iter()
            .zip(&sol.prompts)
            .map(|(p, s)| {
                json!({
                    "id": p.id,
                    "policy": s.policy,
                    "lambda": s.lambda,
                    "reward": s.reward,
                    "entropy": s.entropy,
                    "divergence_value": s.divergence_value,
                    "objective": s.objective,
                })
            })
            .collect();
        let out = json!({
            "divergence": args.divergence.name(),
            "beta": args.beta,
            "prompts": prompts,
            "reward": sol.reward,
            "entropy": sol.entropy,
            "divergence_value": sol.divergence_value,
            "objective": sol.objective,
        });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!("divergence {}, beta {}", args.divergence, args.beta);
    let mut table =
        Table::new(&["prompt", "responses", "lambda", "reward", "entropy", "divergence", "objective"]);
    for (p, s) in instance.prompts.iter().zip(&sol.prompts) {
        table.push(vec![
            p.id.clone(),
            p.rewards.len().to_string(),
            fmt_num(s.lambda),
            fmt_num(s.reward),
            fmt_num(s.entropy),
            fmt_num(s.divergence_value),
            fmt_num(s.objective),
        ]);
    }
    table.push(vec![
        "mean".into(),
        String::new(),
        String::new(),
        fmt_num(sol.reward),
        fmt_num(sol.entropy),
        fmt_num(sol.divergence_value),
        fmt_num(sol.objective),
    ]);
    print!("{}", table.to_text());
    if args.top > 0 {
        for (p, s) in instance.prompts.iter().zip(&sol.prompts).take(10) {
            let mut order: Vec<usize> = (0..p.rewards.len()).collect();
            order.sort_by(|&a, &b| s.policy[b].total_cmp(&s.policy[a]));
            println!("\n{}: top {} of {} responses by pi*", p.id, args.top.min(order.len()), order.len());
            let mut t = Table::new(&["#", "reward", "pi_ref", "pi*", "text"]);
            for &i in order.iter().take(args.top) {
                let text: String = p.texts[i].chars().take(48).collect();
                t.push(vec![
                    i.to_string(),
                    fmt_num(p.rewards[i]),
                    fmt_num(p.ref_logprobs[i].exp()),
                    fmt_num(s.policy[i]),
                    text,
                ]);
            }
            print!("{}", t.to_text());
        }
        if instance.prompts.len() > 10 {
            println!("\n({} more prompts; --json prints every policy)", instance.prompts.len() - 10);
        }
    }
    Ok(())
}
