//! `fdpo demo`: the essay's story end to end on the built-in review task
//! (fdpo_train::task). A tiny Llama reference is trained with the SFT
//! machinery on a seeded corpus; preference pairs are two reference samples
//! per prompt labelled by Bradley–Terry on the true reward; f-DPO trains one
//! policy per divergence; each policy is evaluated from samples (reward,
//! diversity, token entropy, D_f to the reference) and exactly over the
//! grammar's responses, beside the exact optimum π* of the same task
//! computed by fdpo-core from the reference's sequence probabilities.
//! Writes `demo.json` (the settings; it marks the folder as the demo's),
//! `report.md`, `summary.json` and the plots (reward against entropy and
//! against diversity; online against offline) into the run folder.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use fdpo_core::diversity::mean_std;
use fdpo_core::Divergence;
use fdpo_core::{evaluate_policy, solve_prompt};
use fdpo_model::sample::SamplingConfig;
use fdpo_train::config::{parse_config, KtoKeys};
use fdpo_train::kto::train_kto;
use fdpo_train::online::{evaluate_policy_dir, run_online, Anchor, Judge, OnlineConfig, RoundRecord};
use fdpo_train::task::{ReviewTask, GENRES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::review::{
    build_pairs, build_reference, check_divergences, claim_output_dir, json_file_where, Grammar, PolicyRun,
    RunLength, TaskArgs, TaskModel, Trained, DIVERGENCES, REFERENCE_TASK,
};
use crate::output::{cell3, progress, write_file, Table};
use crate::plot::{self, Panel, Series};

/// Arguments of `fdpo demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    pub output_dir: std::path::PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// β of every f-DPO run and of the exact optimum.
    #[arg(long, default_value_t = 0.1, value_parser = crate::cmd::parse::positive)]
    pub beta: f64,
    /// Divergences, comma-separated.
    #[arg(
        long,
        default_value = DIVERGENCES,
        value_delimiter = ','
    )]
    pub divergences: Vec<Divergence>,
    /// Samples per prompt for evaluation (at least 2: diversity compares them).
    #[arg(long, default_value_t = 32, value_parser = crate::cmd::parse::at_least_one)]
    pub samples: usize,
    /// Online rounds of the online-vs-offline comparison (first divergence
    /// of the list; 0 skips it). Each round pairs the best with the worst of
    /// groups of 4 samples, --pairs-per-prompt / rounds groups per prompt.
    #[arg(long, default_value_t = 4)]
    pub online_rounds: usize,
    /// Rebuild the reference and the pairs even when cached.
    #[arg(long)]
    pub fresh: bool,
    /// β of a KTO run on the same pairs, unpaired (chosen desirable, rejected
    /// undesirable), placed beside the f-DPO runs; 0 skips it.
    #[arg(long, default_value_t = 0.1, value_parser = crate::cmd::parse::non_negative)]
    pub kto_beta: f64,
}

/// The settings of a run, recorded in `demo.json` and `summary.json`.
fn settings(a: &DemoArgs) -> Value {
    let mut v = a.task.settings();
    let extra = json!({
        "beta": a.beta,
        "divergences": a.divergences.iter().map(|d| d.name()).collect::<Vec<_>>(),
        "samples": a.samples, "online_rounds": a.online_rounds, "kto_beta": a.kto_beta,
    });
    v.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    v
}

/// Refuses settings the demo cannot run with, naming the flag, before
/// anything is written.
fn check_args(a: &DemoArgs) -> Result<()> {
    check_divergences("--divergences", &a.divergences)?;
    a.task.check()?;
    if a.samples < 2 {
        bail!("--samples must be at least 2: diversity compares a prompt's samples with each other");
    }
    if a.online_rounds > a.task.pairs_per_prompt {
        bail!(
            "--online-rounds ({}) must not exceed --pairs-per-prompt ({}): each round labels at least one group per \
             prompt, and the offline runs compare with as many of the reference's pairs",
            a.online_rounds,
            a.task.pairs_per_prompt
        );
    }
    Ok(())
}

/// Whether `out` was written by `fdpo demo`: its `demo.json`, or (from
/// before that marker) a demo summary or the demo reference's cache key.
fn is_demo_folder(out: &Path) -> bool {
    json_file_where(&out.join("demo.json"), |v| {
        v.get("pairs_per_prompt").is_some() && v.get("sft_steps").is_some()
    }) || json_file_where(&out.join("summary.json"), |v| {
        v.get("coverage").is_some() && v["rows"][0]["policy"] == "reference"
    }) || json_file_where(&out.join("reference/reference.json"), |v| v["task"] == REFERENCE_TASK)
}

/// Marks `out` as a demo folder, refusing one that holds anything else: the
/// demo replaces its own subfolders on a rerun and must never delete a
/// user's files.
fn claim_demo_dir(a: &DemoArgs, out: &Path) -> Result<()> {
    claim_output_dir(
        out,
        "fdpo demo",
        "demo.json",
        &settings(a),
        is_demo_folder,
        &["runs", "online", "offline"],
    )
}

/// The exact optimum π* of one divergence, averaged over prompts, and the
/// diversity of K samples drawn from it.
#[derive(Debug, Clone, Default)]
struct Optimum {
    reward: f64,
    entropy: f64,
    divergence: f64,
    diversity: Vec<(String, f64)>,
}

/// One row of the report.
#[derive(Debug, Clone, Default)]
struct Row {
    name: String,
    sampled_reward: f64,
    reward: f64,
    entropy: f64,
    divergence_sampled: f64,
    divergence: f64,
    mass: f64,
    exact_reward: f64,
    exact_entropy: f64,
    exact_divergence: f64,
    token_entropy: f64,
    diversity: Vec<(String, f64)>,
    exact_diversity: Vec<(String, f64)>,
}

/// Per-input diversity (mean over prompts) of texts, word ids as tokens.
fn diversity(model: &TaskModel, texts: &[Vec<String>]) -> Result<Vec<(String, f64)>> {
    let tokens: Vec<Vec<Vec<u32>>> = texts
        .iter()
        .map(|per| per.iter().map(|t| model.encode(t)).collect::<Result<Vec<_>>>())
        .collect::<Result<_>>()?;
    Ok(fdpo_eval::report::diversity(&tokens, ReviewTask::vocab_size())
        .into_iter()
        .filter(|m| ["distinct-1", "distinct-2", "ead", "1-self-bleu"].contains(&m.metric.as_str()))
        .map(|m| (m.metric, m.per_input_mean))
        .collect())
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    check_args(&a)?;
    let started = Instant::now();
    let device = Device::Cpu;
    let out = a.output_dir.clone();
    claim_demo_dir(&a, &out)?;
    let ref_dir = build_reference(&a.task, a.fresh, &out.join("reference"), &device)?;
    let reference = TaskModel::load(&ref_dir, &device)?;
    let prefs = build_pairs(&a.task, a.fresh, &reference, &out.join("reference"))?;

    // The grammar's responses, their rewards, and the reference over them;
    // instance.json lets any `fdpo exact` command rerun on the same problem.
    let bar = progress(1, "exact: reference over the grammar");
    let grammar = Grammar::new(&reference)?;
    bar.finish();
    write_file(
        &out.join("instance.json"),
        serde_json::to_string(&grammar.instance()?.to_json())?.as_bytes(),
    )?;
    let Grammar { texts, rewards, ref_logps } = &grammar;
    let coverage = grammar.coverage();
    let min_coverage = coverage.iter().cloned().fold(f64::INFINITY, f64::min);
    eprintln!(
        "the grammar's {} responses per prompt cover {:.2}%–{:.2}% of the reference's mass",
        texts.len(),
        100.0 * min_coverage,
        100.0 * coverage.iter().cloned().fold(0.0, f64::max)
    );

    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: a.task.seed ^ 0xe7a1,
    };
    let ref_samples = reference.sample(&cfg, a.samples)?;
    let ref_sample_logps = reference.logprobs(&ref_samples)?;
    let mut rows = Vec::new();
    // `policy` None is the reference, whose samples and log-probs are at hand.
    let evaluate = |name: &str, policy: Option<&TaskModel>, d: Divergence, exact: Optimum| -> Result<Row> {
        let (samples, own, under_ref, policy_logps) = match policy {
            None => {
                (ref_samples.clone(), ref_sample_logps.clone(), ref_sample_logps.clone(), ref_logps.clone())
            }
            Some(p) => {
                let samples = p.sample(&cfg, a.samples)?;
                let (own, under_ref) = (p.logprobs(&samples)?, reference.logprobs(&samples)?);
                (samples, own, under_ref, grammar.logps(p)?)
            }
        };
        let sampled_reward =
            mean_std(&samples.iter().flatten().map(|t| ReviewTask::reward(t)).collect::<Vec<_>>()).0;
        let token_entropy = mean_std(&own.iter().flatten().map(|x| x.1).collect::<Vec<_>>()).0;
        // D_f(π‖π_ref) = E_π[f(u)/u], u = π/π_ref, from π's own samples.
        let df: Vec<f64> = own
            .iter()
            .flatten()
            .zip(under_ref.iter().flatten())
            .map(|(p, q)| {
                let u = (p.0 - q.0).exp();
                d.f(u) / u
            })
            .collect();
        let (mut reward, mut entropy, mut div, mut mass) = (0.0, 0.0, 0.0, 0.0);
        for g in 0..GENRES.len() {
            let v = evaluate_policy(d, a.beta, &ref_logps[g], rewards, &policy_logps[g])?;
            reward += v.reward;
            entropy += v.entropy;
            div += v.divergence_value;
            mass += policy_logps[g].iter().map(|x| x.exp()).sum::<f64>();
        }
        let n = GENRES.len() as f64;
        Ok(Row {
            name: name.into(),
            sampled_reward,
            reward: reward / n,
            entropy: entropy / n,
            divergence_sampled: mean_std(&df).0,
            divergence: div / n,
            mass: mass / n,
            exact_reward: exact.reward,
            exact_entropy: exact.entropy,
            exact_divergence: exact.divergence,
            token_entropy,
            diversity: diversity(policy.unwrap_or(&reference), &samples)?,
            exact_diversity: exact.diversity,
        })
    };
    // The exact optimum of each divergence, and K samples from it.
    let exact = |d: Divergence| -> Result<Optimum> {
        let mut rng = ChaCha8Rng::seed_from_u64(a.task.seed ^ 0x0e);
        let (mut reward, mut entropy, mut div) = (0.0, 0.0, 0.0);
        let mut samples = Vec::new();
        for l in ref_logps {
            let s = solve_prompt(d, a.beta, l, rewards)?;
            reward += s.reward;
            entropy += s.entropy;
            div += s.divergence_value;
            samples.push(
                (0..a.samples)
                    .map(|_| {
                        let mut u: f64 = rng.random();
                        let i = s.policy.iter().position(|p| {
                            u -= p;
                            u < 0.0
                        });
                        texts[i.unwrap_or(texts.len() - 1)].clone()
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let n = GENRES.len() as f64;
        Ok(Optimum {
            reward: reward / n,
            entropy: entropy / n,
            divergence: div / n,
            diversity: diversity(&reference, &samples)?,
        })
    };
    rows.push(evaluate(
        "reference",
        None,
        Divergence::ReverseKl,
        Optimum { reward: f64::NAN, entropy: f64::NAN, ..Default::default() },
    )?);
    let runs = progress(a.divergences.len(), "f-DPO runs");
    for d in &a.divergences {
        let slug = d.name().replace(':', "-");
        runs.set_message(slug.clone());
        let run = PolicyRun {
            reference: ref_dir.clone(),
            train_file: prefs.clone(),
            output_dir: out.join("runs").join(&slug),
            divergence: *d,
            beta: a.beta,
            learning_rate: a.task.learning_rate,
            length: RunLength::Epochs(a.task.num_train_epochs),
            seed: a.task.seed,
        };
        let model_dir = run.train(&device)?.model_dir;
        let policy = TaskModel::load(&model_dir, &device)?;
        rows.push(evaluate(&d.name(), Some(&policy), *d, exact(*d)?)?);
        runs.inc(1);
    }
    runs.finish();
    if a.kto_beta > 0.0 {
        // KTO sees the same labels: each pair's chosen as desirable, its
        // rejected as undesirable (TRL's unpairing of a paired file).
        let run_dir = out.join("runs").join("kto");
        let text = format!(
            "model = {ref_dir:?}\ntrain_file = {prefs:?}\noutput_dir = {run_dir:?}\nbeta = {}\n\
             learning_rate = {}\nper_device_train_batch_size = 32\nnum_train_epochs = {}\nwarmup_ratio = 0.1\n\
             max_length = 32\nlogging_steps = 10\nsave_steps = 100000\nseed = {}\noverwrite_output_dir = true\n",
            a.kto_beta, a.task.learning_rate, a.task.num_train_epochs, a.task.seed
        );
        let path = run_dir.join("demo.toml");
        write_file(&path, text.as_bytes())?;
        let config = parse_config::<KtoKeys>(&text, &path)?;
        let summary = train_kto(&config, &device, false, &mut fdpo_train::trainer::Quiet, None)?;
        let fdpo_train::trainer::Outcome::Finished { model_dir } = summary.outcome else {
            bail!("the KTO run stopped early")
        };
        let policy = TaskModel::load(&model_dir, &device)?;
        let none =
            Optimum { reward: f64::NAN, entropy: f64::NAN, divergence: f64::NAN, ..Default::default() };
        rows.push(evaluate(
            &format!("kto (β = {})", a.kto_beta),
            Some(&policy),
            Divergence::ReverseKl,
            none,
        )?);
    }
    let comparison =
        if a.online_rounds > 0 { online_vs_offline(&a, &ref_dir, &prefs, &device)? } else { vec![] };
    write_report(&a, &out, &rows, &comparison, min_coverage, started.elapsed().as_secs_f64())
}

/// Round r of the comparison: the online policy after r rounds and an
/// offline f-DPO run on r·groups reference pairs per prompt.
#[derive(Debug, Clone)]
struct Comparison {
    online: RoundRecord,
    offline: RoundRecord,
}

/// Online rounds with the true reward as the judge against offline f-DPO
/// runs on as many of the reference's Bradley–Terry pairs.
fn online_vs_offline(a: &DemoArgs, ref_dir: &Path, prefs: &Path, device: &Device) -> Result<Vec<Comparison>> {
    let out = a.output_dir.join("online");
    let rounds = a.online_rounds;
    let groups = a.task.pairs_per_prompt.div_ceil(rounds);
    let cfg = OnlineConfig {
        policy: ref_dir.to_path_buf(),
        ref_model: ref_dir.to_path_buf(),
        prompts: ReviewTask::new(a.task.seed).prompts(),
        output_dir: out,
        rounds,
        groups,
        samples: 4,
        eval_samples: a.samples,
        anchor: Anchor::Reference,
        divergence: a.divergences[0],
        beta: a.beta,
        learning_rate: a.task.learning_rate,
        num_train_epochs: a.task.num_train_epochs,
        batch_size: 32,
        max_length: 32,
        max_prompt_length: 16,
        max_new_tokens: 12,
        seed: a.task.seed,
        demo_task: true,
    };
    let bar = progress(2 * rounds, "online vs offline");
    let online = run_online(&cfg, &Judge::DemoReward, device, &mut fdpo_train::trainer::Quiet, |r| {
        if r.round > 0 {
            bar.inc(1)
        }
    })?;
    let text = std::fs::read_to_string(prefs).with_context(|| format!("reading {}", prefs.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let per_prompt = lines.len() / GENRES.len();
    let mut out = Vec::new();
    for (r, online_round) in online.iter().enumerate().skip(1) {
        let n = (r * groups).min(per_prompt);
        let subset: String = (0..GENRES.len())
            .flat_map(|g| lines[g * per_prompt..g * per_prompt + n].iter())
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = a.output_dir.join("offline").join(format!("labels-{}", n * GENRES.len()));
        let train_file = dir.join("prefs.jsonl");
        write_file(&train_file, subset.as_bytes())?;
        let run = PolicyRun {
            reference: ref_dir.to_path_buf(),
            train_file,
            output_dir: dir,
            divergence: a.divergences[0],
            beta: a.beta,
            learning_rate: a.task.learning_rate,
            length: RunLength::Epochs(a.task.num_train_epochs),
            seed: a.task.seed,
        };
        // Labels: the pairs trained on, as the online rounds count them.
        let Trained { model_dir, pairs: labels } = run.train(device)?;
        let offline = evaluate_policy_dir(&cfg, &Judge::DemoReward, device, &model_dir, r, labels)?;
        out.push(Comparison { online: online_round.clone(), offline });
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

fn write_report(
    a: &DemoArgs,
    out: &Path,
    rows: &[Row],
    comparison: &[Comparison],
    coverage: f64,
    seconds: f64,
) -> Result<()> {
    let metric_names: Vec<String> = rows[0].diversity.iter().map(|(n, _)| n.clone()).collect();
    let mut header: Vec<String> = [
        "policy",
        "reward (samples)",
        "reward (trained)",
        "reward (exact π*)",
        "entropy (trained)",
        "entropy (exact π*)",
        "D_f (samples)",
        "D_f (trained)",
        "D_f (exact π*)",
        "token entropy",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(metric_names.iter().cloned());
    header.extend(metric_names.iter().map(|m| format!("{m} (π*)")));
    header.push("grammar mass".into());
    let mut table = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    for r in rows {
        let mut cells = vec![
            r.name.clone(),
            cell3(r.sampled_reward),
            cell3(r.reward),
            cell3(r.exact_reward),
            cell3(r.entropy),
            cell3(r.exact_entropy),
            cell3(r.divergence_sampled),
            cell3(r.divergence),
            cell3(r.exact_divergence),
            cell3(r.token_entropy),
        ];
        cells.extend(r.diversity.iter().map(|(_, v)| cell3(*v)));
        cells.extend(
            (0..metric_names.len()).map(|i| r.exact_diversity.get(i).map_or("—".into(), |x| cell3(x.1))),
        );
        cells.push(cell3(r.mass));
        table.push(cells);
    }
    // Plots: reward against entropy and against 1 − self-BLEU; each
    // divergence a segment from its trained policy (marked) to its π*.
    let div_of = |r: &Row, exact: bool| -> f64 {
        let list = if exact { &r.exact_diversity } else { &r.diversity };
        list.iter().find(|(n, _)| n == "1-self-bleu").map_or(f64::NAN, |x| x.1)
    };
    let mut entropy_panel = Panel {
        title: format!("reward vs entropy (β = {})", a.beta),
        x_label: "entropy of the response distribution (nats)".into(),
        y_label: "E[true reward]".into(),
        x_log: false,
        y_log: false,
        series: vec![],
    };
    let mut diversity_panel = Panel {
        title: "reward vs diversity".into(),
        x_label: "1 − self-BLEU (per input)".into(),
        y_label: "E[true reward]".into(),
        ..entropy_panel.clone()
    };
    // f-DPO runs have an exact optimum to draw a line to; KTO is a point.
    let (with_optimum, points): (Vec<&Row>, Vec<&Row>) =
        rows[1..].iter().partition(|r| r.exact_reward.is_finite());
    for r in &with_optimum {
        entropy_panel.series.push(Series::line(
            r.name.clone(),
            vec![(r.entropy, r.reward), (r.exact_entropy, r.exact_reward)],
        ));
        diversity_panel.series.push(Series::line(
            r.name.clone(),
            vec![(div_of(r, false), r.sampled_reward), (div_of(r, true), r.exact_reward)],
        ));
    }
    let trained: Vec<(f64, f64)> = with_optimum.iter().map(|r| (r.entropy, r.reward)).collect();
    entropy_panel.series.push(Series::markers("trained (line ends at its π*)", trained));
    for r in &points {
        entropy_panel.series.push(Series::markers(r.name.clone(), vec![(r.entropy, r.reward)]));
        diversity_panel
            .series
            .push(Series::markers(r.name.clone(), vec![(div_of(r, false), r.sampled_reward)]));
    }
    entropy_panel.series.push(Series::markers("reference", vec![(rows[0].entropy, rows[0].reward)]));
    let trained: Vec<(f64, f64)> =
        with_optimum.iter().map(|r| (div_of(r, false), r.sampled_reward)).collect();
    diversity_panel.series.push(Series::markers("trained (line ends at its π*)", trained));
    diversity_panel
        .series
        .push(Series::markers("reference", vec![(div_of(&rows[0], false), rows[0].sampled_reward)]));
    let mut written = plot::save(&[entropy_panel], &out.join("reward_vs_entropy"))?;
    written.extend(plot::save(&[diversity_panel], &out.join("reward_vs_diversity"))?);

    let mut md = String::new();
    md.push_str(&format!(
        "# fdpo demo: f-DPO on the review task\n\nseed {}, β = {}, {} prompts, {} preference pairs per prompt, \
         {} samples per prompt for evaluation; {:.0} s.\n\n\
         The grammar's {} responses per prompt cover at least {:.2}% of the reference's probability mass, so the \
         exact optimum π* over them is the task's optimum (to that precision).\n\n",
        a.task.seed,
        a.beta,
        GENRES.len(),
        a.task.pairs_per_prompt,
        a.samples,
        seconds,
        ReviewTask::enumerate().len(),
        100.0 * coverage
    ));
    if coverage < 0.99 {
        md.push_str(&format!(
            "**Caution**: {:.2}% is short of 99%: the reference often leaves the grammar, so the exact columns \
             describe the optimum over the grammar only, not the task's optimum (train the reference longer).\n\n",
            100.0 * coverage
        ));
    }
    md.push_str(&table.to_markdown());
    md.push_str(
        "\n*reward (samples)*: mean true reward of the samples. *reward / entropy / D_f (trained)*: exact over \
         the grammar's responses (renormalised), entropy of the whole response in nats. *(exact π\\*)*: the optimum \
         of E[r] − β·D_f for this divergence. *D_f (samples)*: E_π[f(u)/u], u = π/π_ref, from the policy's samples. \
         *token entropy*: mean next-token entropy over the samples. Diversity columns are per input (mean over \
         prompts of the metric on that prompt's samples); *(π\\*)* columns use samples from π*. *grammar mass*: the \
         policy's probability of staying in the grammar.\n\n\
         ![reward vs entropy](reward_vs_entropy.svg)\n![reward vs diversity](reward_vs_diversity.svg)\n",
    );
    let reverse_kl = rows.iter().find(|r| r.name == Divergence::ReverseKl.name());
    for r in &points {
        md.push_str(&format!(
            "\n**{}** trained on the same {} preference labels per prompt, unpaired (each pair's chosen response \
             desirable, its rejected one undesirable, as TRL's KTOTrainer unpairs a paired dataset): reward {}, \
             entropy {} nats, 1 − self-BLEU {}",
            r.name,
            a.task.pairs_per_prompt,
            cell3(r.reward),
            cell3(r.entropy),
            cell3(div_of(r, false)),
        ));
        match reverse_kl {
            Some(d) => md.push_str(&format!(
                "; reverse-KL f-DPO at β = {}: reward {}, entropy {} nats, 1 − self-BLEU {}.\n",
                a.beta,
                cell3(d.reward),
                cell3(d.entropy),
                cell3(div_of(d, false))
            )),
            None => md.push_str(".\n"),
        }
    }
    if !comparison.is_empty() {
        let mut t = Table::new(&[
            "round",
            "online labels",
            "online reward",
            "online distinct-2",
            "online 1-self-bleu",
            "offline labels",
            "offline reward",
            "offline distinct-2",
            "offline 1-self-bleu",
        ]);
        for c in comparison {
            let (on, off) = (&c.online, &c.offline);
            t.push(vec![
                on.round.to_string(),
                on.labels.to_string(),
                cell3(on.true_reward.unwrap_or(f64::NAN)),
                cell3(on.distinct_2.unwrap_or(f64::NAN)),
                cell3(on.one_minus_self_bleu.unwrap_or(f64::NAN)),
                off.labels.to_string(),
                cell3(off.true_reward.unwrap_or(f64::NAN)),
                cell3(off.distinct_2.unwrap_or(f64::NAN)),
                cell3(off.one_minus_self_bleu.unwrap_or(f64::NAN)),
            ]);
        }
        md.push_str(&format!(
            "\n## Online against offline ({}, same number of preference labels)\n\n\
             Online: each round samples groups of 4 responses per prompt from the current policy, pairs the best \
             with the worst by the true reward, and trains f-DPO against the fixed reference. Offline: one f-DPO \
             run on as many Bradley–Terry-labelled pairs of two reference samples.\n\n",
            a.divergences[0].name()
        ));
        md.push_str(&t.to_markdown());
        md.push_str("\n![online vs offline](online_vs_offline.svg)\n");
        let series = |name: &str, f: &dyn Fn(&Comparison) -> (f64, f64)| {
            Series::line(name.to_string(), comparison.iter().map(f).collect())
        };
        let panels = [
            Panel {
                title: "true reward by preference labels".into(),
                x_label: "preference labels".into(),
                y_label: "E[true reward]".into(),
                x_log: false,
                y_log: false,
                series: vec![
                    series("online", &|c| (c.online.labels as f64, c.online.true_reward.unwrap_or(f64::NAN))),
                    series("offline", &|c| {
                        (c.offline.labels as f64, c.offline.true_reward.unwrap_or(f64::NAN))
                    }),
                ],
            },
            Panel {
                title: "diversity by preference labels".into(),
                x_label: "preference labels".into(),
                y_label: "1 − self-BLEU (per input)".into(),
                x_log: false,
                y_log: false,
                series: vec![
                    series("online", &|c| {
                        (c.online.labels as f64, c.online.one_minus_self_bleu.unwrap_or(f64::NAN))
                    }),
                    series("offline", &|c| {
                        (c.offline.labels as f64, c.offline.one_minus_self_bleu.unwrap_or(f64::NAN))
                    }),
                ],
            },
        ];
        written.extend(plot::save(&panels, &out.join("online_vs_offline"))?);
        println!("online vs offline ({}):\n{}", a.divergences[0].name(), t.to_text());
    }
    let report = out.join("report.md");
    write_file(&report, md.as_bytes())?;
    let online: Vec<Value> = comparison
        .iter()
        .map(|c| json!({"round": c.online.round, "online": c.online, "offline": c.offline}))
        .collect();
    let summary: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"policy": r.name, "reward_samples": r.sampled_reward, "reward": r.reward, "exact_reward": r.exact_reward,
                   "entropy": r.entropy, "exact_entropy": r.exact_entropy, "divergence_samples": r.divergence_sampled,
                   "divergence": r.divergence, "exact_divergence": r.exact_divergence, "token_entropy": r.token_entropy,
                   "grammar_mass": r.mass,
                   "diversity": r.diversity.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                   "exact_diversity": r.exact_diversity.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>()})
        })
        .collect();
    write_file(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&json!({"seed": a.task.seed, "beta": a.beta, "settings": settings(a), "coverage": coverage, "seconds": seconds, "rows": summary, "online_vs_offline": online}))?
            .as_bytes(),
    )?;
    println!("{}", table.to_text());
    eprintln!("report: {} ({} plots), {:.0} s", report.display(), written.len(), seconds);
    Ok(())
}
