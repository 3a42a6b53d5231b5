//! `fdpo online`: online / iterative f-DPO rounds (fdpo_train::online) with a
//! reward model or the demo task's reward as the judge; prints one line per
//! round and resumes after the last completed round when run again.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use fdpo_core::Divergence;
use fdpo_train::online::{run_online, Anchor, Judge, OnlineConfig, RoundRecord};

use fdpo_data::records::{read_records, PromptRecord};
use fdpo_data::Text;

use super::train::Progress;

/// What each round trains against.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AnchorArg {
    /// The fixed reference.
    Reference,
    /// The previous round's policy.
    Previous,
}

/// Arguments of `fdpo online`.
#[derive(Debug, Args)]
pub struct OnlineArgs {
    /// The initial policy (Hugging Face directory).
    #[arg(long)]
    pub policy: PathBuf,
    /// The reference (default: the initial policy).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Records with a string `prompt`: .jsonl, .parquet or a dataset folder.
    #[arg(long)]
    pub prompts: PathBuf,
    /// `reward-model:DIR` or `demo-reward` (the built-in task's true reward).
    #[arg(long)]
    pub judge: String,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Samples per group; each group gives one (best, worst) pair.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Groups (pairs) per prompt per round.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Samples per prompt for the evaluation after each round.
    #[arg(long, default_value_t = 16)]
    pub eval_samples: usize,
    /// Train against the fixed reference or the previous round's policy.
    #[arg(long, value_enum, default_value = "reference")]
    pub against: AnchorArg,
    /// The f-divergence.
    #[arg(long, default_value = "reverse-kl")]
    pub f_divergence_type: Divergence,
    /// β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// f-DPO learning rate.
    #[arg(long, default_value_t = 1e-6)]
    pub learning_rate: f64,
    /// Epochs over each round's pairs.
    #[arg(long, default_value_t = 1.0)]
    pub num_train_epochs: f64,
    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    /// prompt + response tokens at most.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Prompt tokens at most.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// Tokens generated at most per response.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Report the demo task's true reward too (prompts from `fdpo demo`).
    #[arg(long)]
    pub demo_task: bool,
    /// Run folder.
    #[arg(long, default_value = "runs/online")]
    pub output_dir: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prints a round's line.
pub fn print_round(r: &RoundRecord) {
    let truth = r.true_reward.map(|t| format!(", true reward {t:.3}")).unwrap_or_default();
    let metric = |x: Option<f64>| x.map_or("undefined".to_string(), |x| format!("{x:.3}"));
    eprintln!(
        "round {}: {} labels, judged reward {:.3}{truth}, distinct-2 {}, 1 − self-BLEU {}",
        r.round,
        r.labels,
        r.judged_reward,
        metric(r.distinct_2),
        metric(r.one_minus_self_bleu)
    );
}

/// Runs `fdpo online`.
pub fn run(a: OnlineArgs) -> Result<()> {
    if a.samples < 2 || a.groups == 0 {
        bail!("--samples must be at least 2 and --groups at least 1");
    }
    if a.eval_samples < 2 {
        bail!("--eval-samples must be at least 2: diversity compares a prompt's samples with each other");
    }
    let device = fdpo_model::device(&a.device)?;
    let mut prompts = vec![];
    for (at, record) in read_records::<PromptRecord>(&a.prompts, "train")? {
        match record.prompt {
            Text::Plain(text) => prompts.push(text),
            Text::Messages(_) => bail!("{at}: field `prompt`: fdpo online takes plain-text prompts"),
        }
    }
    let judge = Judge::load(&a.judge, &device)?;
    let cfg = OnlineConfig {
        ref_model: a.ref_model.clone().unwrap_or_else(|| a.policy.clone()),
        policy: a.policy,
        prompts,
        output_dir: a.output_dir.clone(),
        rounds: a.rounds,
        groups: a.groups,
        samples: a.samples,
        eval_samples: a.eval_samples,
        anchor: match a.against {
            AnchorArg::Reference => Anchor::Reference,
            AnchorArg::Previous => Anchor::Previous,
        },
        divergence: a.f_divergence_type,
        beta: a.beta,
        learning_rate: a.learning_rate,
        num_train_epochs: a.num_train_epochs,
        batch_size: a.per_device_train_batch_size,
        max_length: a.max_length,
        max_prompt_length: a.max_prompt_length,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        demo_task: a.demo_task || a.judge == "demo-reward",
    };
    run_online(&cfg, &judge, &device, &mut Progress::new("f-DPO round"), print_round)?;
    eprintln!("rounds logged in {}", a.output_dir.join("rounds.jsonl").display());
    Ok(())
}
