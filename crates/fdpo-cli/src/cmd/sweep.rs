//! `fdpo sweep`: frontiers over β, trained and exact, on the review task,
//! and the question only an exact lab can answer: is the extra diversity
//! of a divergence a property of its objective (its optimum π*) or of a
//! policy that has not reached π*?
//!
//! Stages, each writing under the run folder:
//! 1. the reference (cached, as `fdpo demo` builds it) and the grammar's
//!    problem as `instance.json`; the exact frontier of every divergence
//!    along a fine β grid (`frontier.csv`, the format of `fdpo exact
//!    frontier`, which reproduces it from `instance.json`);
//! 2. one f-DPO policy per divergence and β (`runs/`), evaluated exactly
//!    over the grammar, drawn as points on the exact frontiers
//!    (`frontier.svg`), and both read at matched reward;
//! 3. the optimisation study at one β (`study/`): each divergence trained
//!    on 1×, 4×, 16× the pairs and on fresh pairs (no pair seen twice: SGD
//!    on the expected loss), its distance to its own π* measured at
//!    checkpoints along training (`study_*.svg`);
//! 4. merges at that β (`merges/`): reverse KL ⊕ forward KL, a soup of
//!    reverse-KL policies from several data orders, interpolation from
//!    π_ref toward and past a policy (WARP/ExPO), and the exact arithmetic
//!    and geometric mixtures, placed against the frontiers (`merges.svg`);
//! 5. `report.md` and `summary.json`.
//!
//! Pairs are two responses drawn from π_ref renormalised over the grammar —
//! the distribution π* is defined against — labelled by Bradley–Terry on
//! the true reward.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use fdpo_core::lab::distance::{interpolate, kl, total_variation};
use fdpo_core::lab::frontier::{frontier, FrontierPoint};
use fdpo_core::lab::mixture::{arithmetic, geometric};
use fdpo_core::lab::{log_grid, reference_point, solve_instance, InstanceSolution};
use fdpo_core::{evaluate_policy, normalise_ref_logprobs, Divergence, Instance};
use fdpo_model::merge::{merge_checkpoints, MergeMethod};
use serde::Serialize;
use serde_json::{json, Value};

use super::exact::frontier::frontier_csv;
use super::review::{
    build_reference, check_divergences, claim_output_dir, json_file_where, Grammar, PolicyRun, RunLength,
    TaskArgs, TaskModel, DIVERGENCES,
};
use crate::output::{cell3, progress, write_file, Table};
use crate::plot::{self, Panel, Series};

/// Arguments of `fdpo sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Run folder.
    #[arg(long, default_value = "runs/sweep")]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// β of the trained policies, comma-separated (the study's β is added).
    #[arg(long, value_delimiter = ',', default_value = "0.03,0.1,0.3,1", value_parser = crate::cmd::parse::positive)]
    pub betas: Vec<f64>,
    /// Divergences of the frontiers, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = DIVERGENCES
    )]
    pub divergences: Vec<Divergence>,
    /// Smallest β of the exact frontiers' log-spaced grid.
    #[arg(long, default_value_t = 0.01, value_parser = crate::cmd::parse::positive)]
    pub frontier_beta_min: f64,
    /// Largest β of the exact frontiers' grid.
    #[arg(long, default_value_t = 100.0, value_parser = crate::cmd::parse::positive)]
    pub frontier_beta_max: f64,
    /// Number of β values of the exact frontiers' grid.
    #[arg(long, default_value_t = 41, value_parser = crate::cmd::parse::at_least_one)]
    pub frontier_num_betas: usize,
    /// β of the optimisation study and of the merges.
    #[arg(long, default_value_t = 0.1, value_parser = crate::cmd::parse::positive)]
    pub study_beta: f64,
    /// Divergences of the optimisation study, comma-separated (each also in
    /// --divergences).
    #[arg(long, value_delimiter = ',', default_value = "reverse-kl,forward-kl,js,alpha:0.5")]
    pub study_divergences: Vec<Divergence>,
    /// Data sizes of the study, as multiples of --pairs-per-prompt.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16", value_parser = crate::cmd::parse::at_least_one)]
    pub data_multipliers: Vec<usize>,
    /// Optimiser steps of every study run (batch 32); a fresh-pairs run sees
    /// each of steps × 32 pairs once.
    #[arg(long, default_value_t = 1000, value_parser = crate::cmd::parse::at_least_one)]
    pub study_steps: usize,
    /// Checkpoints evaluated along each study run.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub study_evals: usize,
    /// Reverse-KL policies (data orders) in the model soup; below 2 skips it.
    #[arg(long, default_value_t = 3)]
    pub soup_seeds: usize,
    /// Rebuild the reference even when cached.
    #[arg(long)]
    pub fresh: bool,
}

impl SweepArgs {
    fn check(&self) -> Result<()> {
        self.task.check()?;
        for (flag, list) in
            [("--divergences", &self.divergences), ("--study-divergences", &self.study_divergences)]
        {
            check_divergences(flag, list)?;
        }
        if let Some(d) = self.study_divergences.iter().find(|d| !self.divergences.contains(d)) {
            bail!(
                "--study-divergences: {} is not in --divergences, whose frontier it is measured against",
                d.name()
            );
        }
        if self.frontier_beta_max < self.frontier_beta_min {
            bail!(
                "--frontier-beta-max ({}) must be >= --frontier-beta-min ({})",
                self.frontier_beta_max,
                self.frontier_beta_min
            );
        }
        if self.study_evals > self.study_steps {
            bail!(
                "--study-evals ({}) must not exceed --study-steps ({})",
                self.study_evals,
                self.study_steps
            );
        }
        Ok(())
    }

    /// The trained βs: --betas with the study's β, sorted, deduplicated.
    fn trained_betas(&self) -> Vec<f64> {
        let mut b = self.betas.clone();
        b.push(self.study_beta);
        b.sort_by(f64::total_cmp);
        b.dedup();
        b
    }

    fn settings(&self) -> Value {
        let mut v = self.task.settings();
        let extra = json!({
            "betas": self.trained_betas(),
            "divergences": self.divergences.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "frontier_betas": [self.frontier_beta_min, self.frontier_beta_max, self.frontier_num_betas],
            "study_beta": self.study_beta,
            "study_divergences": self.study_divergences.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "data_multipliers": self.data_multipliers, "study_steps": self.study_steps,
            "study_evals": self.study_evals, "soup_seeds": self.soup_seeds,
        });
        v.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
        v
    }
}

/// What a policy over the grammar scores, averaged over prompts.
#[derive(Debug, Clone, Copy, Serialize)]
struct Measure {
    /// E_π[r].
    reward: f64,
    /// H(π) in nats.
    entropy: f64,
    /// KL(π‖π_ref).
    kl_ref: f64,
    /// Total variation to the divergence's π* (NaN when none).
    tv_opt: f64,
    /// KL(π*‖π): the mass of π* that π misses (finite: π > 0 everywhere).
    kl_opt: f64,
    /// H(π) − H(π*).
    entropy_gap: f64,
}

/// The exact problem and the measures on it.
struct Lab {
    instance: Instance,
}

impl Lab {
    /// Measures the distribution with log-probabilities `log_policy` (per
    /// prompt, renormalised over the grammar), against `optimum` if given.
    fn measure(&self, log_policy: &[Vec<f64>], optimum: Option<&InstanceSolution>) -> Result<Measure> {
        let n = self.instance.prompts.len() as f64;
        let mut m =
            Measure { reward: 0.0, entropy: 0.0, kl_ref: 0.0, tv_opt: 0.0, kl_opt: 0.0, entropy_gap: 0.0 };
        for (g, p) in self.instance.prompts.iter().enumerate() {
            let (log_p, _) = normalise_ref_logprobs(&log_policy[g])?;
            // Reverse KL's D_f is KL(π‖π_ref); β does not enter the three values read.
            let v = evaluate_policy(Divergence::ReverseKl, 1.0, &p.ref_logprobs, &p.rewards, &log_p)?;
            m.reward += v.reward / n;
            m.entropy += v.entropy / n;
            m.kl_ref += v.divergence_value / n;
            if let Some(opt) = optimum {
                let star = &opt.prompts[g];
                m.tv_opt += total_variation(&log_p, &star.log_policy) / n;
                m.kl_opt += kl(&star.log_policy, &log_p) / n;
                m.entropy_gap += (v.entropy - star.entropy) / n;
            }
        }
        if optimum.is_none() {
            (m.tv_opt, m.kl_opt, m.entropy_gap) = (f64::NAN, f64::NAN, f64::NAN);
        }
        Ok(m)
    }

    /// Measures π* itself (its KL to π_ref, and zero distance to itself).
    fn measure_optimum(&self, optimum: &InstanceSolution) -> Result<Measure> {
        let logs: Vec<Vec<f64>> = optimum.prompts.iter().map(|s| s.log_policy.clone()).collect();
        self.measure(&logs, Some(optimum))
    }
}

/// A trained policy of the β sweep.
#[derive(Debug, Clone, Serialize)]
struct SweepPoint {
    divergence: String,
    beta: f64,
    trained: Measure,
    exact: Measure,
    model_dir: PathBuf,
    /// The trained policy's log π over the grammar, per prompt (for the mixtures).
    #[serde(skip)]
    log_policy: Vec<Vec<f64>>,
}

/// One evaluation along a study run.
#[derive(Debug, Clone, Serialize)]
struct StudyPoint {
    step: usize,
    epochs: f64,
    measure: Measure,
}

/// One study run: a divergence on one data setting.
#[derive(Debug, Clone, Serialize)]
struct StudyRun {
    divergence: String,
    data: String,
    pairs: usize,
    points: Vec<StudyPoint>,
    optimum: Measure,
}

/// A merged or mixed policy placed against the frontiers.
#[derive(Debug, Clone, Serialize)]
struct MergePoint {
    name: String,
    kind: String,
    measure: Measure,
    /// max over divergences of the exact frontier's entropy at this reward.
    exact_frontier_entropy: Option<f64>,
    /// The same over the trained policies (joined with the reference point).
    trained_frontier_entropy: Option<f64>,
}

/// Entropy differences below this many nats are read as ties in the report.
const TIE: f64 = 0.01;

/// Slug of a divergence for folder names.
fn slug(d: &Divergence) -> String {
    d.name().replace(':', "-")
}

/// Whether `out` was written by `fdpo sweep`.
fn is_sweep_folder(out: &Path) -> bool {
    json_file_where(&out.join("sweep.json"), |v| v.get("study_steps").is_some())
}

/// Writes `lines` (JSONL records) to `path`.
fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    write_file(path, text.as_bytes())
}

/// Runs the sweep.
pub fn run(a: SweepArgs) -> Result<()> {
    a.check()?;
    let started = Instant::now();
    let device = Device::Cpu;
    let out = a.output_dir.clone();
    claim_output_dir(
        &out,
        "fdpo sweep",
        "sweep.json",
        &a.settings(),
        is_sweep_folder,
        &["runs", "study", "merges", "data"],
    )?;
    let ref_dir = build_reference(&a.task, a.fresh, &out.join("reference"), &device)?;
    let reference = TaskModel::load(&ref_dir, &device)?;
    let bar = progress(1, "exact: reference over the grammar");
    let grammar = Grammar::new(&reference)?;
    bar.finish_and_clear();
    let coverage = grammar.coverage().into_iter().fold(f64::INFINITY, f64::min);
    let lab = Lab { instance: grammar.instance()? };
    write_file(&out.join("instance.json"), serde_json::to_string(&lab.instance.to_json())?.as_bytes())?;

    // Stage 1: the exact frontiers.
    let grid = log_grid(a.frontier_beta_min, a.frontier_beta_max, a.frontier_num_betas);
    let bar = progress(a.divergences.len(), "exact frontiers");
    let mut exact_points: Vec<FrontierPoint> = Vec::new();
    for d in &a.divergences {
        bar.set_message(d.name());
        exact_points.extend(frontier(&lab.instance, std::slice::from_ref(d), &grid).context("solving")?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let ref_point = reference_point(&lab.instance);
    write_file(&out.join("frontier.csv"), frontier_csv(&exact_points, ref_point).to_csv().as_bytes())?;

    // The data: one stream of pairs per prompt, of which every set is a prefix.
    let ppp = a.task.pairs_per_prompt;
    let fresh_per_prompt = (a.study_steps * 32).div_ceil(lab.instance.prompts.len());
    let max_mult = a.data_multipliers.iter().copied().max().unwrap_or(1);
    let longest = (max_mult * ppp).max(fresh_per_prompt).max(ppp);
    let pool = grammar.pairs(longest, a.task.seed ^ 0x5eed)?;
    let data_dir = out.join("data");
    let data_file = |n: usize, name: &str| -> Result<(PathBuf, usize)> {
        let path = data_dir.join(format!("pairs-{name}.jsonl"));
        write_lines(&path, pool.iter().flat_map(|per| per[..n].iter().cloned()))?;
        Ok((path, n * pool.len()))
    };
    let (base_pairs, _) = data_file(ppp, "1x")?;

    let betas = a.trained_betas();
    let soup = if a.soup_seeds >= 2 && a.divergences.contains(&Divergence::ReverseKl) {
        a.soup_seeds - 1
    } else {
        0
    };
    let study_settings = a.data_multipliers.len() + 1;
    let total = a.divergences.len() * betas.len() + a.study_divergences.len() * study_settings + soup;
    let bar = progress(total, "f-DPO runs");
    let run = |dir: PathBuf, d: Divergence, beta: f64, train_file: &Path, length: RunLength, seed: u64| {
        PolicyRun {
            reference: ref_dir.clone(),
            train_file: train_file.to_path_buf(),
            output_dir: dir,
            divergence: d,
            beta,
            learning_rate: a.task.learning_rate,
            length,
            seed,
        }
        .train(&device)
    };
    let optimum = |d: Divergence, beta: f64| solve_instance(&lab.instance, d, beta).context("solving π*");
    let logps_of = |dir: &Path| grammar.logps(&TaskModel::load(dir, &device)?);
    let measure_dir = |dir: &Path, opt: Option<&InstanceSolution>| lab.measure(&logps_of(dir)?, opt);

    // Stage 2: trained policies along β.
    let mut sweep = Vec::new();
    for &beta in &betas {
        for d in &a.divergences {
            bar.set_message(format!("{} β={beta}", d.name()));
            let dir = out.join("runs").join(format!("{}-beta-{beta}", slug(d)));
            let trained =
                run(dir, *d, beta, &base_pairs, RunLength::Epochs(a.task.num_train_epochs), a.task.seed)?;
            let opt = optimum(*d, beta)?;
            let log_policy = logps_of(&trained.model_dir)?;
            sweep.push(SweepPoint {
                divergence: d.name(),
                beta,
                trained: lab.measure(&log_policy, Some(&opt))?,
                exact: lab.measure_optimum(&opt)?,
                log_policy,
                model_dir: trained.model_dir,
            });
            bar.inc(1);
        }
    }

    // Stage 3: the optimisation study.
    // (label, folder suffix, file, pairs)
    let mut data_sets: Vec<(String, String, PathBuf, usize)> = Vec::new();
    for &m in &a.data_multipliers {
        let (path, n) = data_file(m * ppp, &format!("{m}x"))?;
        data_sets.push((format!("{m}× pairs"), format!("{m}x"), path, n));
    }
    let (path, n) = data_file(fresh_per_prompt, "fresh")?;
    data_sets.push(("fresh pairs".into(), "fresh".into(), path, n));
    let save_every = a.study_steps.div_ceil(a.study_evals);
    let mut study = Vec::new();
    for d in &a.study_divergences {
        let opt = optimum(*d, a.study_beta)?;
        let at_ref = lab.measure(&grammar.ref_logps, Some(&opt))?;
        for (name, short, path, pairs) in &data_sets {
            bar.set_message(format!("study {} {name}", d.name()));
            let dir = out.join("study").join(format!("{}-{short}", slug(d)));
            let length = RunLength::Steps { steps: a.study_steps, save_every };
            let trained = run(dir.clone(), *d, a.study_beta, path, length, a.task.seed)?;
            let mut points = vec![StudyPoint { step: 0, epochs: 0.0, measure: at_ref }];
            let mut steps: Vec<usize> =
                (1..=a.study_evals).map(|k| (k * save_every).min(a.study_steps)).collect();
            steps.dedup();
            for step in steps {
                let model_dir = if step == a.study_steps {
                    trained.model_dir.clone()
                } else {
                    dir.join("checkpoints").join(format!("step-{step}"))
                };
                let epochs = (step * 32) as f64 / *pairs as f64;
                points.push(StudyPoint { step, epochs, measure: measure_dir(&model_dir, Some(&opt))? });
            }
            // The checkpoints are measured; the final model stays.
            let checkpoints = dir.join("checkpoints");
            if checkpoints.exists() {
                std::fs::remove_dir_all(&checkpoints)
                    .with_context(|| format!("removing {}", checkpoints.display()))?;
            }
            study.push(StudyRun {
                divergence: d.name(),
                data: name.clone(),
                pairs: *pairs,
                points,
                optimum: lab.measure_optimum(&opt)?,
            });
            bar.inc(1);
        }
    }

    // Stage 4: merges and mixtures at the study's β.
    let at_beta = |d: Divergence| sweep.iter().find(|p| p.divergence == d.name() && p.beta == a.study_beta);
    let mut merges = Vec::new();
    let merge_dir = out.join("merges");
    let merged =
        |name: &str, method: MergeMethod, models: &[PathBuf], weights: &[f64], base: Option<&Path>| {
            let dir = merge_dir.join(name);
            merge_checkpoints(method, models, weights, base, &dir)?;
            measure_dir(&dir, None)
        };
    let mut push = |name: &str, kind: &str, measure: Measure| {
        merges.push(MergePoint {
            name: name.into(),
            kind: kind.into(),
            measure,
            exact_frontier_entropy: None,
            trained_frontier_entropy: None,
        })
    };
    let (rkl, fkl) = (at_beta(Divergence::ReverseKl), at_beta(Divergence::ForwardKl));
    if let (Some(r), Some(f)) = (rkl, fkl) {
        let models = [r.model_dir.clone(), f.model_dir.clone()];
        push(
            "reverse KL ⊕ forward KL (linear ½ ½)",
            "weight space",
            merged("rkl-fkl", MergeMethod::Linear, &models, &[0.5, 0.5], None)?,
        );
        let (r_opt, f_opt) =
            (optimum(Divergence::ReverseKl, a.study_beta)?, optimum(Divergence::ForwardKl, a.study_beta)?);
        let mixed = |geo: bool, one: &[Vec<f64>], two: &[Vec<f64>]| -> Vec<Vec<f64>> {
            one.iter()
                .zip(two)
                .map(|(x, y)| {
                    let mix = if geo {
                        geometric(&[x, y], &[0.5, 0.5])
                    } else {
                        let (px, py): (Vec<f64>, Vec<f64>) =
                            (x.iter().map(|l| l.exp()).collect(), y.iter().map(|l| l.exp()).collect());
                        arithmetic(&[&px, &py], &[0.5, 0.5])
                    };
                    mix.iter().map(|p| p.ln()).collect()
                })
                .collect()
        };
        let logs = |s: &InstanceSolution| -> Vec<Vec<f64>> {
            s.prompts.iter().map(|p| p.log_policy.clone()).collect()
        };
        push(
            "½ π*(reverse KL) + ½ π*(forward KL)",
            "arithmetic mixture",
            lab.measure(&mixed(false, &logs(&r_opt), &logs(&f_opt)), None)?,
        );
        push(
            "π*(reverse KL)^½ · π*(forward KL)^½",
            "geometric mixture",
            lab.measure(&mixed(true, &logs(&r_opt), &logs(&f_opt)), None)?,
        );
        let norm = |l: &[Vec<f64>]| -> Result<Vec<Vec<f64>>> {
            l.iter().map(|x| Ok(normalise_ref_logprobs(x)?.0)).collect()
        };
        push(
            "½ trained reverse KL + ½ trained forward KL",
            "arithmetic mixture (ensemble)",
            lab.measure(&mixed(false, &norm(&r.log_policy)?, &norm(&f.log_policy)?), None)?,
        );
    }
    if let Some(r) = rkl {
        for t in [0.5, 1.5, 2.0] {
            let name = format!("π_ref + {t}·(reverse KL − π_ref)");
            let kind = if t < 1.0 { "interpolation (WARP)" } else { "extrapolation (ExPO)" };
            let dir_name = format!("rkl-from-ref-{t}");
            push(
                &name,
                kind,
                merged(
                    &dir_name,
                    MergeMethod::TaskArithmetic,
                    std::slice::from_ref(&r.model_dir),
                    &[t],
                    Some(&ref_dir),
                )?,
            );
        }
        if soup > 0 {
            let mut models = vec![r.model_dir.clone()];
            for k in 1..=soup {
                bar.set_message(format!("soup: reverse KL, data order {k}"));
                let dir = merge_dir.join(format!("rkl-order-{k}"));
                let length = RunLength::Epochs(a.task.num_train_epochs);
                models.push(
                    run(
                        dir,
                        Divergence::ReverseKl,
                        a.study_beta,
                        &base_pairs,
                        length,
                        a.task.seed + k as u64,
                    )?
                    .model_dir,
                );
                bar.inc(1);
            }
            let w = vec![1.0 / models.len() as f64; models.len()];
            push(
                &format!("soup of {} reverse-KL policies", models.len()),
                "weight space",
                merged("rkl-soup", MergeMethod::Linear, &models, &w, None)?,
            );
        }
    }
    bar.finish_and_clear();

    // Frontier entropy at each merge's reward.
    let exact_curves: Vec<Vec<(f64, f64)>> = a
        .divergences
        .iter()
        .map(|d| {
            let mut c: Vec<(f64, f64)> =
                exact_points.iter().filter(|p| p.divergence == *d).map(|p| (p.reward, p.entropy)).collect();
            c.push(ref_point);
            c
        })
        .collect();
    let trained_curves: Vec<Vec<(f64, f64)>> = a
        .divergences
        .iter()
        .map(|d| {
            let mut c: Vec<(f64, f64)> = sweep
                .iter()
                .filter(|p| p.divergence == d.name())
                .map(|p| (p.trained.reward, p.trained.entropy))
                .collect();
            c.push(ref_point);
            c
        })
        .collect();
    let best_at = |curves: &[Vec<(f64, f64)>], r: f64| {
        curves
            .iter()
            .filter_map(|c| interpolate(c, r))
            .fold(None, |m: Option<f64>, h| Some(m.map_or(h, |m| m.max(h))))
    };
    for m in &mut merges {
        m.exact_frontier_entropy = best_at(&exact_curves, m.measure.reward);
        m.trained_frontier_entropy = best_at(&trained_curves, m.measure.reward);
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        a: &a,
        coverage,
        ref_point,
        exact_points: &exact_points,
        sweep: &sweep,
        study: &study,
        merges: &merges,
        exact_curves: &exact_curves,
        trained_curves: &trained_curves,
        seconds,
    };
    report.write(&out)
}

/// Everything the report is written from.
struct Report<'a> {
    a: &'a SweepArgs,
    coverage: f64,
    ref_point: (f64, f64),
    exact_points: &'a [FrontierPoint],
    sweep: &'a [SweepPoint],
    study: &'a [StudyRun],
    merges: &'a [MergePoint],
    exact_curves: &'a [Vec<(f64, f64)>],
    trained_curves: &'a [Vec<(f64, f64)>],
    seconds: f64,
}

/// `levels` rewards evenly spaced strictly between the reference's reward
/// and the highest reward every curve reaches.
fn reward_levels(curves: &[Vec<(f64, f64)>], from: f64, levels: usize) -> Vec<f64> {
    let top = curves
        .iter()
        .map(|c| c.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max))
        .fold(f64::INFINITY, f64::min);
    if top.is_nan() || top <= from {
        return vec![];
    }
    (1..=levels).map(|k| from + (top - from) * k as f64 / (levels + 1) as f64).collect()
}

impl Report<'_> {
    /// The matched-reward table of `curves`, and per level the divergence
    /// with the most entropy.
    fn matched(&self, curves: &[Vec<(f64, f64)>]) -> (Table, Vec<(f64, String)>) {
        let mut header = vec!["reward".to_string()];
        header.extend(self.a.divergences.iter().map(|d| d.name()));
        header.push("most entropy".into());
        header.push("lead over the least".into());
        let mut t = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
        let mut winners = Vec::new();
        for r in reward_levels(curves, self.ref_point.0, 5) {
            let hs: Vec<Option<f64>> = curves.iter().map(|c| interpolate(c, r)).collect();
            let best = hs
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i, h)))
                .max_by(|x, y| x.1.total_cmp(&y.1));
            let mut row = vec![cell3(r)];
            row.extend(hs.iter().enumerate().map(|(i, h)| match (h, best) {
                (Some(h), Some((b, _))) if b == i => format!("**{}**", cell3(*h)),
                (Some(h), _) => cell3(*h),
                (None, _) => "—".into(),
            }));
            let name = best.map_or("—".to_string(), |(i, _)| self.a.divergences[i].name());
            let least = hs.iter().flatten().copied().fold(f64::INFINITY, f64::min);
            row.push(name.clone());
            row.push(best.map_or("—".to_string(), |(_, h)| cell3(h - least)));
            winners.push((r, name));
            t.push(row);
        }
        (t, winners)
    }

    fn write(&self, out: &Path) -> Result<()> {
        let a = self.a;
        let mut written = Vec::new();
        // Figure 1: the frontiers, exact (lines) and trained (dots).
        let panel = |title: &str, x_label: &str, x: fn(&FrontierPoint) -> f64, tx: fn(&Measure) -> f64| {
            let mut series = Vec::new();
            for (i, d) in a.divergences.iter().enumerate() {
                let line: Vec<(f64, f64)> = self
                    .exact_points
                    .iter()
                    .filter(|p| p.divergence == *d)
                    .map(|p| (x(p), p.reward))
                    .collect();
                series.push(Series::line(d.name(), line).coloured(i));
                let dots: Vec<(f64, f64)> = self
                    .sweep
                    .iter()
                    .filter(|p| p.divergence == d.name())
                    .map(|p| (tx(&p.trained), p.trained.reward))
                    .collect();
                series.push(Series::markers("", dots).coloured(i));
            }
            Panel {
                title: title.into(),
                x_label: x_label.into(),
                y_label: "E[true reward]".into(),
                x_log: false,
                y_log: false,
                series,
            }
        };
        let mut left = panel(
            "reward vs entropy: π* (lines), trained (dots)",
            "entropy of the response distribution (nats)",
            |p| p.entropy,
            |m| m.entropy,
        );
        left.series.push(Series::markers("reference", vec![(self.ref_point.1, self.ref_point.0)]));
        let mut right = panel("reward vs KL(π‖π_ref)", "KL(π‖π_ref) (nats)", |p| p.kl, |m| m.kl_ref);
        right.series.push(Series::markers("reference", vec![(0.0, self.ref_point.0)]));
        written.extend(plot::save(&[left, right], &out.join("frontier"))?);

        // Figures 2 and 3: the study, one panel per divergence.
        let study_panels = |y_label: &str, y: fn(&Measure) -> f64, with_optimum: bool| -> Vec<Panel> {
            a.study_divergences
                .iter()
                .map(|d| {
                    let runs: Vec<&StudyRun> =
                        self.study.iter().filter(|r| r.divergence == d.name()).collect();
                    let mut series: Vec<Series> = runs
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            Series::line(
                                r.data.clone(),
                                r.points.iter().map(|p| (p.step as f64, y(&p.measure))).collect(),
                            )
                            .coloured(i)
                        })
                        .collect();
                    if with_optimum {
                        if let Some(r) = runs.first() {
                            let last = r.points.last().map_or(0.0, |p| p.step as f64);
                            series.push(
                                Series::line("π*", vec![(0.0, y(&r.optimum)), (last, y(&r.optimum))])
                                    .coloured(7),
                            );
                        }
                    }
                    Panel {
                        title: format!("{} (β = {})", d.name(), a.study_beta),
                        x_label: "optimiser steps".into(),
                        y_label: y_label.into(),
                        x_log: false,
                        y_log: false,
                        series,
                    }
                })
                .collect()
        };
        written.extend(plot::save(
            &study_panels("total variation to π*", |m| m.tv_opt, false),
            &out.join("study_distance"),
        )?);
        written.extend(plot::save(
            &study_panels("entropy (nats)", |m| m.entropy, true),
            &out.join("study_entropy"),
        )?);

        // Figure 4: merges against the frontiers.
        if !self.merges.is_empty() {
            let mut series = Vec::new();
            for (i, d) in a.divergences.iter().enumerate() {
                if matches!(d, Divergence::ReverseKl | Divergence::ForwardKl) {
                    let line: Vec<(f64, f64)> = self
                        .exact_points
                        .iter()
                        .filter(|p| p.divergence == *d)
                        .map(|p| (p.entropy, p.reward))
                        .collect();
                    series.push(Series::line(format!("π* {}", d.name()), line).coloured(i));
                    let dots: Vec<(f64, f64)> = self
                        .sweep
                        .iter()
                        .filter(|p| p.divergence == d.name())
                        .map(|p| (p.trained.entropy, p.trained.reward))
                        .collect();
                    series.push(Series::markers("", dots).coloured(i));
                }
            }
            let mut kinds: Vec<&str> = self.merges.iter().map(|m| m.kind.as_str()).collect();
            kinds.dedup();
            for (k, kind) in kinds.iter().enumerate() {
                let pts = self
                    .merges
                    .iter()
                    .filter(|m| m.kind == *kind)
                    .map(|m| (m.measure.entropy, m.measure.reward))
                    .collect();
                series.push(Series::markers(kind.to_string(), pts).coloured(2 + k));
            }
            series.push(Series::markers("reference", vec![(self.ref_point.1, self.ref_point.0)]));
            let panel = Panel {
                title: format!("merges and mixtures at β = {}", a.study_beta),
                x_label: "entropy (nats)".into(),
                y_label: "E[true reward]".into(),
                x_log: false,
                y_log: false,
                series,
            };
            written.extend(plot::save(&[panel], &out.join("merges"))?);
        }

        let mut md = String::new();
        md.push_str(&format!(
            "# fdpo sweep: frontiers over β, trained and exact\n\n\
             Review task, seed {}; reference: {} SFT steps on {} reviews, hidden size {}; {} preference pairs per prompt \
             (8 prompts), two responses drawn from π_ref over the grammar, Bradley–Terry labels on the true reward; f-DPO \
             with learning rate {}, batch 32, {} epochs per β. The grammar's 3840 responses per prompt hold at least \
             {:.2}% of the reference's mass. **{:.0} s** ({:.1} min) on this machine.\n\n\
             Every number is exact over the grammar's responses (each policy renormalised over them), not sampled. The \
             exact frontiers are reproducible with `fdpo exact frontier --instance instance.json --divergence {} \
             --beta-min {} --beta-max {} --num-betas {}` (same values as `frontier.csv`).\n\n",
            a.task.seed, a.task.sft_steps, a.task.corpus, a.task.hidden, a.task.pairs_per_prompt, a.task.learning_rate,
            a.task.num_train_epochs, 100.0 * self.coverage, self.seconds, self.seconds / 60.0,
            a.divergences.iter().map(|d| d.name()).collect::<Vec<_>>().join(","),
            a.frontier_beta_min, a.frontier_beta_max, a.frontier_num_betas,
        ));
        md.push_str("## 1. Frontiers\n\n![frontiers](frontier.svg)\n\nLines: the exact optimum π* of each divergence along β; dots of the same colour: the trained policies at β = ");
        md.push_str(&a.trained_betas().iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "));
        md.push_str(".\n\n");
        let mut t = Table::new(&[
            "divergence",
            "β",
            "reward",
            "entropy",
            "KL(π‖π_ref)",
            "reward π*",
            "entropy π*",
            "KL π*",
            "TV to π*",
        ]);
        for p in self.sweep {
            t.push(vec![
                p.divergence.clone(),
                p.beta.to_string(),
                cell3(p.trained.reward),
                cell3(p.trained.entropy),
                cell3(p.trained.kl_ref),
                cell3(p.exact.reward),
                cell3(p.exact.entropy),
                cell3(p.exact.kl_ref),
                cell3(p.trained.tv_opt),
            ]);
        }
        md.push_str(&t.to_markdown());
        let (exact_table, exact_winners) = self.matched(self.exact_curves);
        let (trained_table, trained_winners) = self.matched(self.trained_curves);
        md.push_str("\n### Entropy at matched reward\n\nEach frontier (joined to the reference point) read at rewards between the reference's and the highest every frontier reaches; the most entropy in bold.\n\n**Exact optima π\\***\n\n");
        md.push_str(&exact_table.to_markdown());
        md.push_str("\n**Trained policies**\n\n");
        md.push_str(&trained_table.to_markdown());
        let tally = |w: &[(f64, String)]| {
            let mut names: Vec<&String> = w.iter().map(|x| &x.1).collect();
            names.sort();
            names.dedup();
            names
                .iter()
                .map(|n| format!("{n} at {} of {}", w.iter().filter(|x| &x.1 == *n).count(), w.len()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.push_str(&format!(
            "\nMost entropy at matched reward — exact: {}; trained: {}.\n\n",
            tally(&exact_winners),
            tally(&trained_winners)
        ));

        // The study.
        md.push_str(&format!(
            "## 2. Optimisation or objective (β = {})\n\nEach divergence trained for {} optimiser steps on {} the pairs and on fresh pairs (each pair seen once: stochastic gradients of the expected loss, the infinite-data limit); the distance to its own π* measured at {} checkpoints.\n\n![distance to π*](study_distance.svg)\n![entropy along training](study_entropy.svg)\n\n",
            a.study_beta,
            a.study_steps,
            a.data_multipliers.iter().map(|m| format!("{m}×")).collect::<Vec<_>>().join(", "),
            a.study_evals
        ));
        let mut t = Table::new(&[
            "divergence",
            "data",
            "pairs",
            "epochs",
            "reward",
            "entropy",
            "entropy π*",
            "H − H(π*)",
            "TV to π*",
            "KL(π*‖π)",
        ]);
        for r in self.study {
            let last = r.points.last().expect("at least the reference");
            t.push(vec![
                r.divergence.clone(),
                r.data.clone(),
                r.pairs.to_string(),
                format!("{:.1}", last.epochs),
                cell3(last.measure.reward),
                cell3(last.measure.entropy),
                cell3(r.optimum.entropy),
                cell3(last.measure.entropy_gap),
                cell3(last.measure.tv_opt),
                cell3(last.measure.kl_opt),
            ]);
        }
        md.push_str(&t.to_markdown());
        md.push_str(&self.reading());

        if !self.merges.is_empty() {
            md.push_str(&format!("\n## 3. Merges and mixtures (β = {})\n\n![merges](merges.svg)\n\nEach merged or mixed policy beside the most entropy any single divergence's frontier keeps at the same reward (exact π* lines; trained points joined with the reference).\n\n", a.study_beta));
            let mut t = Table::new(&[
                "policy",
                "kind",
                "reward",
                "entropy",
                "KL(π‖π_ref)",
                "best exact frontier entropy",
                "above it",
                "best trained frontier entropy",
                "above it",
            ]);
            let above = |h: f64, f: Option<f64>| {
                f.map_or("—".to_string(), |f| {
                    if h > f + TIE {
                        format!("yes (+{:.3})", h - f)
                    } else {
                        format!("no ({:.3})", h - f)
                    }
                })
            };
            for m in self.merges {
                t.push(vec![
                    m.name.clone(),
                    m.kind.clone(),
                    cell3(m.measure.reward),
                    cell3(m.measure.entropy),
                    cell3(m.measure.kl_ref),
                    m.exact_frontier_entropy.map_or("—".into(), cell3),
                    above(m.measure.entropy, m.exact_frontier_entropy),
                    m.trained_frontier_entropy.map_or("—".into(), cell3),
                    above(m.measure.entropy, m.trained_frontier_entropy),
                ]);
            }
            md.push_str(&t.to_markdown());
            let over_exact: Vec<&str> = self
                .merges
                .iter()
                .filter(|m| m.exact_frontier_entropy.is_some_and(|f| m.measure.entropy > f + TIE))
                .map(|m| m.name.as_str())
                .collect();
            let over_trained: Vec<&str> = self
                .merges
                .iter()
                .filter(|m| m.trained_frontier_entropy.is_some_and(|f| m.measure.entropy > f + TIE))
                .map(|m| m.name.as_str())
                .collect();
            md.push_str(&format!(
                "\nAbove the best single-divergence exact frontier (by more than {TIE} nats): {}. Above the best trained \
                 frontier: {}.\n",
                if over_exact.is_empty() { "none".to_string() } else { over_exact.join("; ") },
                if over_trained.is_empty() { "none".to_string() } else { over_trained.join("; ") },
            ));
        }
        md.push_str(&format!("\nFiles: `frontier.csv` (exact), `summary.json` (every number here), `instance.json`, `runs/`, `study/`, `merges/`; {} plots (SVG and PNG).\n", written.len() / 2));
        write_file(&out.join("report.md"), md.as_bytes())?;
        let summary = json!({
            "settings": a.settings(), "seconds": self.seconds, "coverage": self.coverage,
            "reference": {"reward": self.ref_point.0, "entropy": self.ref_point.1},
            "sweep": self.sweep, "study": self.study, "merges": self.merges,
            "matched_reward": {"exact": exact_winners, "trained": trained_winners},
        });
        write_file(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        eprintln!(
            "report: {} ({} plots), {:.0} s",
            out.join("report.md").display(),
            written.len(),
            self.seconds
        );
        Ok(())
    }

    /// The study's answer in words. A divergence's extra entropy over
    /// reverse KL (after the sweep's epochs, at the study's β) is the
    /// objective's if its own π* has more entropy than reverse KL's π*, and
    /// the optimisation's otherwise: then it is the distance still to go,
    /// and the study shows how close more data and more steps bring it.
    fn reading(&self) -> String {
        let a = self.a;
        let short =
            |d: &Divergence| self.sweep.iter().find(|p| p.divergence == d.name() && p.beta == a.study_beta);
        // The study run that ends closest to π*.
        let closest = |d: &Divergence| {
            self.study
                .iter()
                .filter(|r| r.divergence == d.name())
                .filter_map(|r| r.points.last().map(|p| (r, p.measure)))
                .min_by(|x, y| x.1.tv_opt.total_cmp(&y.1.tv_opt))
        };
        let rkl = Divergence::ReverseKl;
        let (Some(rs), Some((rc, rc_end))) = (short(&rkl), closest(&rkl)) else {
            return "\n(The reading compares each divergence with reverse KL; add reverse-kl to --study-divergences.)\n"
                .into();
        };
        let mut t = Table::new(&[
            "divergence",
            "ΔH of π*",
            "ΔH trained",
            "closest approach to its π*",
            "H − H(π*) there",
            "extra diversity is",
        ]);
        let (mut objective, mut optimisation) = (Vec::new(), Vec::new());
        for d in &a.study_divergences {
            let (Some(s), Some((c, c_end))) = (short(d), closest(d)) else { continue };
            let dh_opt = c.optimum.entropy - rc.optimum.entropy;
            let dh_trained = s.trained.entropy - rs.trained.entropy;
            let verdict = if *d == rkl {
                "(the yardstick)".to_string()
            } else if dh_trained <= TIE {
                "none: not more diverse than reverse KL when trained".into()
            } else if dh_opt > TIE {
                objective.push(d.name());
                "the objective's: its π* is more diverse too".into()
            } else {
                optimisation.push(d.name());
                "the optimisation's: its π* is less diverse".into()
            };
            t.push(vec![
                d.name(),
                format!("{dh_opt:+.3}"),
                format!("{dh_trained:+.3}"),
                format!(
                    "TV {} ({}, {} steps)",
                    cell3(c_end.tv_opt),
                    c.data,
                    c.points.last().map_or(0, |p| p.step)
                ),
                format!("{:+.3}", c_end.entropy_gap),
                verdict,
            ]);
        }
        let mut s = format!(
            "\n### Reading\n\nΔH: entropy minus reverse KL's (nats) at β = {}, of the exact optima and of the policies \
             trained for the sweep's {} epochs. Closest approach: the study run that ends nearest its own π*.\n\n",
            a.study_beta, a.task.num_train_epochs
        );
        s.push_str(&t.to_markdown());
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        s.push_str(&format!(
            "\nReverse KL comes to TV {} of its π* ({}), entropy {:+.3} nats from it. Extra diversity (more than {TIE} \
             nats) that is the objective's: {}. Extra diversity that is the optimisation's — the trained policy has \
             more entropy than reverse KL's while its own optimum has less: {}.\n",
            cell3(rc_end.tv_opt),
            rc.data,
            rc_end.entropy_gap,
            list(&objective),
            list(&optimisation),
        ));
        s
    }
}
